"""Models that learn under DP: frozen public encoders with small heads, against training from scratch.

Every figure is on speakers the model never trained on (speaker-independent splits of the
development corpus), printed beside its baseline from the same run:

* centralized: KWS accuracy (Speech Commands, 12 classes) and emotion UAR (RAVDESS actor-
  independent, 8 classes; EmoDB, 7) for the default (``tcn`` head over speech_embedding +
  eGeMAPS, per-speaker normalisation), the same with global normalisation (statistics of the
  training set), the other heads (``gru``, ``mlp``), the from-scratch ``cnn`` over log-mel and
  the raw-waveform M5;
* cross-corpus: train on one emotion corpus, test on the other over their shared classes;
* DP-SGD at epsilon 8 (delta 1e-5), same head, against its plain run (also after public
  pretraining: on the other emotion corpus, and for KWS on commands synthesized by ``fedser synth``),
  and the time of a DP-SGD epoch against a plain one;
* federated: one device per speaker, each the real ClientApp (DP-SGD within its own budget of
  epsilon 8, its ledger, update clipping) and the real strategy, from scratch or after the server's
  public pretraining (public speakers, or for KWS synthesized commands); then the same with user-level
  (distributed) noise, with the user-level epsilon the server's accountant reports for the
  population.

    python bench/bench_encoders.py [--data DIR] [--sections central cross dp federated] [--rounds 10]
    python bench/bench_encoders.py --quick      # fewer epochs and rounds, one head

Features are cached under ``--cache`` (default ``.cache/bench-features``), so a second run starts
training at once.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, REPO, Report, data_or_skip, load_average, load_note, machine_line, md_table

SECTIONS = ("central", "cross", "dp", "federated")
SYNTH_VOICES = 64   # voices of the synthesized public command corpus
TARGETS = {"kws": 0.95, "emotion": 0.70}
DP_EPSILON, DELTA = 8.0, 1e-5
DP_SEEDS = 3
TIMING_RUNS, TIMING_EPOCHS = 9, 6   # DP-SGD time against plain: alternating runs, epochs per run
TIMING_BATCHES = (16, 64, 256)
DP_EPOCH_FACTOR = 2                 # DP-SGD rows train up to this many times the plain epochs
PUBLIC_EPOCHS = 30   # public pretraining before DP-SGD (no validation: all of the public corpus trains)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench-features")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (default 10; 4 quick)")
    p.add_argument("--epochs", type=int, default=None, help="centralized epochs (default 60; 15 quick)")
    p.add_argument("--max-devices", type=int, default=24,
                   help="federated devices at most (one per speaker; more speakers are dealt among them)")
    p.add_argument("--encoders", nargs="+", default=None, metavar="NAME",
                   help="centralized rows of these encoders only (the default's row is still the baseline)")
    p.add_argument("--corpora", nargs="+", choices=("kws", "ravdess", "emodb"), default=None,
                   help="only these corpora's rows (default: every corpus found)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- data


class Corpora:
    """Speaker-independent splits and their features, built once per feature spec."""

    def __init__(self, data: Path, cache: Path, seed: int):
        from fedser.common.cache import FeatureCache
        from fedser.tools.commands.args import load_data

        self.cache = FeatureCache(cache)
        self.seed = seed
        self.utterances = {}
        for name, folder, task in (("kws", "speech_commands", "kws"), ("ravdess", "ravdess", "emotion"),
                                   ("emodb", "emodb", "emotion")):
            if (data / folder).is_dir():
                corpus = load_data([str(data / folder)], log=lambda s: None)
                self.utterances[name] = (task, [u for u in corpus.utterances if u.task == task])
        self._built = {}

    def split(self, name: str):
        from fedser.common.splits import speaker_split

        task, utts = self.utterances[name]
        return task, speaker_split(utts, val=0.15, test=0.25, seed=self.seed)

    def task_data(self, name: str, spec, part: str):
        """``part`` in train / val / test / all; features normalised as ``spec`` says."""
        from fedser.common.data import build_task_data

        key = (name, spec, part)
        if key not in self._built:
            task, (train, val, test) = self.split(name)
            utts = {"train": train, "val": val, "test": test, "all": train + val + test}[part]
            self._built[key] = build_task_data(utts, spec, task, self.cache, progress=True,
                                               desc=f"features {name}/{part}")
        return self._built[key]

    def synthesized_commands(self, spec):
        """``fedser synth``'s command clips of ``SYNTH_VOICES`` voices (seed 7; synthesized once beside
        the feature cache) as public KWS training data."""
        from fedser.common.corpora import load_corpora
        from fedser.common.data import build_task_data
        from fedser.tools import synth

        key = ("synthesized commands", spec, "all")
        if key not in self._built:
            root = self.cache.root.parent / f"bench-synth-{SYNTH_VOICES}"
            if not synth.is_complete(root):
                synth.synthesize_corpus(root, n_speakers=SYNTH_VOICES, seed=7, emotions=("neutral",), statements=1,
                                        repetitions=1, overwrite=True, progress=True)
            utts = [u for u in load_corpora([str(root / "commands")]).utterances if u.task == "kws"]
            self._built[key] = build_task_data(utts, spec, "kws", self.cache, progress=True,
                                               desc="features synthesized commands")
        return self._built[key]


def globally_normalised(corpora: Corpora, name: str, spec):
    """Train / val / test normalised with the training set's statistics (the baseline of per-speaker)."""
    from fedser.common.normalization import FeatureStats

    raw = replace(spec, normalize="none")
    parts = [corpora.task_data(name, raw, p) for p in ("train", "val", "test")]
    stats = FeatureStats.of(parts[0].feats)
    return [replace(d, feats=stats.apply(d.feats)) for d in parts]


def wanted(args, corpora: Corpora, name: str) -> bool:
    """Corpus ``name`` is on disk and among ``--corpora`` (when given)."""
    return name in corpora.utterances and (not args.corpora or name in args.corpora)


# --------------------------------------------------------------------------- centralized


def train_eval(train, val, test, spec, encoder: str, epochs: int, seed: int, dp: bool = False,
               allowed=None, public=None, regularize: bool | None = None, lr: float | None = None,
               batch_size: int | None = None, clip: float | None = None) -> dict:
    """Train on ``train`` (early stopping on ``val``), score on ``test``; with ``public``, the model
    first trains without DP on that public corpus (public pretraining, private fine-tuning). ``lr``,
    ``batch_size`` and ``clip`` (DP-SGD's per-example clip) replace the (private) training's."""
    import torch

    from fedser.common.augment import Augmenter
    from fedser.common.models import ModelConfig, build_model, count_parameters
    from fedser.common.training import TrainConfig, evaluate_task, train_task

    torch.manual_seed(seed)
    cfg = ModelConfig(encoder=encoder, n_features=spec.n_features())
    model = build_model(cfg)
    if public is not None:
        train_task(model, public.task, public, None, TrainConfig(epochs=PUBLIC_EPOCHS, batch_size=64, seed=seed),
                   spec, None, progress=False)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size or (256 if dp else 64), lr=lr or (1e-2 if dp else 3e-3),
                       patience=max(epochs // 4, 3), seed=seed, dp=dp, max_grad_norm=clip or 1.0,
                       target_epsilon=DP_EPSILON if dp else None, delta=DELTA, regularize=regularize)
    t0 = time.perf_counter()
    result = train_task(model, train.task, train, val, tcfg, spec, Augmenter(spec, seed=seed), progress=False)
    seconds = time.perf_counter() - t0
    if allowed is None:
        allowed = [train.class_names.index(c) for c in train.labels_present()]
    report = evaluate_task(model, test, allowed)
    return {"accuracy": report["accuracy"], "uar": report["uar"], "n": report["n"], "epsilon": result.epsilon,
            "val_uar": result.best_score,
            "seconds": seconds, "epochs": len(result.history), "parameters": count_parameters(model)}


def default_baseline(corpora: Corpora, name: str, figures: dict, epochs: int, seed: int) -> dict:
    """The default's centralized figures on corpus ``name``: this run's own, trained now if no
    section has trained them yet (kept in ``figures`` for the sections after)."""
    from fedser.common.features import FeatureSpec

    key = f"central/{name}/tcn/speaker"
    if key not in figures:
        spec = FeatureSpec()
        figures[key] = train_eval(*(corpora.task_data(name, spec, p) for p in ("train", "val", "test")), spec,
                                  "tcn", epochs, seed)
    return figures[key]


def options(quick: bool):
    from fedser.common.features import FeatureSpec, spec_for

    default = FeatureSpec()
    out = [("tcn over speech_embedding + eGeMAPS, per-speaker normalisation (default)", default, "tcn", "speaker"),
           ("tcn, global normalisation", default, "tcn", "global")]
    if not quick:
        out += [("gru over the same", default, "gru", "speaker"), ("mlp over the same", default, "mlp", "speaker"),
                ("cnn from scratch over log-mel", spec_for("logmel"), "cnn", "utterance"),
                ("m5 from scratch over the raw waveform", spec_for("waveform"), "m5", "utterance")]
    return out


def central(corpora: Corpora, args, epochs: int, rows: list, figures: dict) -> None:
    for name in ("kws", "ravdess", "emodb"):
        if not wanted(args, corpora, name):
            continue
        task = corpora.utterances[name][0]
        metric = "accuracy" if task == "kws" else "uar"
        for label, spec, encoder, norm in options(args.quick):
            if args.encoders and encoder not in args.encoders:
                continue
            if norm == "global":
                train, val, test = globally_normalised(corpora, name, spec)
            else:
                train, val, test = (corpora.task_data(name, spec, p) for p in ("train", "val", "test"))
            r = train_eval(train, val, test, spec, encoder, epochs, args.seed)
            figures[f"central/{name}/{encoder}/{norm}"] = r
            baseline = default_baseline(corpora, name, figures, epochs, args.seed)[metric]
            target = TARGETS[task] if (encoder, norm) == ("tcn", "speaker") and name in ("kws", "ravdess") else None
            rows.append([f"{name} centralized", label, f"{r[metric]:.3f} {metric}",
                         "—" if (encoder, norm) == ("tcn", "speaker") else f"{100 * (r[metric] - baseline):+.1f}",
                         f">= {target:.2f}" if target else "", f"{r['parameters']:,}", f"{r['seconds']:.0f}"])
            print(rows[-1], file=sys.stderr, flush=True)


def cross(corpora: Corpora, args, epochs: int, rows: list, figures: dict) -> None:
    from fedser.common.data import HEAD_CLASSES
    from fedser.common.features import FeatureSpec

    if not (wanted(args, corpora, "ravdess") and wanted(args, corpora, "emodb")):
        return
    spec = FeatureSpec()
    for source, target in (("ravdess", "emodb"), ("emodb", "ravdess")):
        train, val = corpora.task_data(source, spec, "train"), corpora.task_data(source, spec, "val")
        test = corpora.task_data(target, spec, "all")
        shared = sorted(set(train.labels_present()) & set(test.labels_present()))
        keep = [i for i, y in enumerate(test.y.tolist()) if HEAD_CLASSES["emotion"][y] in shared]
        test = replace(test, feats=test.feats[keep], y=test.y[keep], speakers=[test.speakers[i] for i in keep])
        allowed = [HEAD_CLASSES["emotion"].index(c) for c in shared]
        r = train_eval(train, val, test, spec, "tcn", epochs, args.seed, allowed=allowed)
        figures[f"cross/{source}->{target}"] = r
        chance = 1.0 / len(shared)
        rows.append([f"cross-corpus {source} -> {target}", f"default, {len(shared)} shared classes",
                     f"{r['uar']:.3f} uar", f"chance {chance:.3f}", "reported", f"{r['parameters']:,}",
                     f"{r['seconds']:.0f}"])
        print(rows[-1], file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- DP

def dp(corpora: Corpora, args, epochs: int, rows: list, figures: dict) -> None:
    import torch

    from fedser.common.features import FeatureSpec
    from fedser.common.models import ModelConfig, build_model
    from fedser.common.training import TrainConfig, train_task

    spec = FeatureSpec()
    # DP-SGD's result moves by several points with the seed (its noise, its Poisson batches): every
    # DP row, and the plain baseline it is compared with, is the mean over DP_SEEDS seeds.
    seeds = [args.seed + k for k in range(DP_SEEDS)]
    # At a fixed epsilon DP-SGD gains from more, noisier steps (its noise is calibrated to them):
    # twice the plain epochs gave KWS 0.926 / 0.941 against 0.913 / 0.934 (from scratch / after
    # synthesized pretraining at lr 3e-3) and RAVDESS 0.523 / 0.592 against 0.508 / 0.569 (from
    # scratch / after EmoDB pretraining), three seeds each.
    dp_epochs = DP_EPOCH_FACTOR * epochs
    for name, points in (("kws", 2), ("ravdess", 4)):
        if not wanted(args, corpora, name):
            continue
        task = corpora.utterances[name][0]
        metric = "accuracy" if task == "kws" else "uar"
        train, val, test = (corpora.task_data(name, spec, p) for p in ("train", "val", "test"))
        # The first seed's plain run is the default's centralized figure, trained once per bench run.
        plain = [default_baseline(corpora, name, figures, epochs, seeds[0])] + \
            [train_eval(train, val, test, spec, "tcn", epochs, s) for s in seeds[1:]]
        plain_mean = statistics.mean(r[metric] for r in plain)
        figures[f"dp/{name}/plain"] = plain
        other = {"ravdess": "emodb"}.get(name)
        # The default trains without dropout and augmentation under DP-SGD; the second row keeps them.
        # A variant: (label, figures key, public corpus, regularize, learning rate, {batch_size, clip}).
        variants = [("default", "", None, None, None, {}),
                    ("with dropout and augmentation", "/regularized", None, True, None, {})]
        if other in corpora.utterances:
            # The product's path under DP: pretrain on public speech (here the other emotion corpus:
            # another language, other speakers), then DP-SGD on the private data.
            variants.append((f"default, pretrained on all of {other} (public; {PUBLIC_EPOCHS} epochs, no DP)",
                             f"/public-{other}", corpora.task_data(other, spec, "all"), None, None, {}))
        fine_tunings, tuning_names = [], {}
        if name == "kws":
            # Without a public command corpus, synthesized speech is one: no person's voice, so it
            # needs no privacy. Fine-tuning from it, the lower learning rate keeps what it taught;
            # or larger batches (the noise on the mean gradient is z*C/B) with a small clip, under
            # which every example's gradient is clipped to the same norm.
            synth = corpora.synthesized_commands(spec)
            synth_label = f"default, pretrained on synthesized commands ({SYNTH_VOICES} espeak-ng voices, public; " \
                f"{PUBLIC_EPOCHS} epochs, no DP)"
            tunings = (("fine-tuning learning rate 3e-3", "/public-synth-lr", 3e-3, {}),
                       ("fine-tuning batch 1024 and clip 0.1", "/public-synth-large", 1e-2,
                        {"batch_size": 1024, "clip": 0.1}))
            fine_tunings = [(f"{synth_label}, {how}", key, synth, None, lr, tuning) for how, key, lr, tuning in tunings]
            tuning_names = {key: how for how, key, _, _ in tunings}
            variants += [(synth_label, "/public-synth", synth, None, None, {}), *fine_tunings]

        def add_row(label: str, runs: list) -> None:
            values = [r[metric] for r in runs]
            eps = max(r["epsilon"] for r in runs)
            rows.append([f"{name} DP-SGD", f"{label}, up to {dp_epochs} epochs, epsilon <= {eps:.2f} (delta {DELTA:g})",
                         f"{statistics.mean(values):.3f} {metric} ({min(values):.3f}-{max(values):.3f})",
                         f"{100 * (statistics.mean(values) - plain_mean):+.1f} (plain {plain_mean:.3f})",
                         f"within {points} points", f"{runs[0]['parameters']:,}",
                         f"{sum(r['seconds'] for r in runs):.0f}"])
            print(rows[-1], file=sys.stderr, flush=True)

        for label, key, public, regularize, lr, tuning in variants:
            runs = [train_eval(train, val, test, spec, "tcn", dp_epochs, s, dp=True, public=public,
                               regularize=regularize, lr=lr, **tuning) for s in seeds]
            figures[f"dp/{name}{key}"] = runs
            add_row(label, runs)
        if fine_tunings:
            # Which fine-tuning a user would pick, seeing only the validation speakers (their UAR at the
            # kept epoch, the figure early stopping already reads); the test speakers only score it.
            # That choice is not accounted in epsilon (Papernot & Steinke 2022 bound its cost).
            chosen = max(fine_tunings, key=lambda v: statistics.mean(r["val_uar"] for r in figures[f"dp/{name}{v[1]}"]))
            figures[f"dp/{name}/chosen"] = figures[f"dp/{name}{chosen[1]}"]
            add_row(f"of the two fine-tunings above, the one with the higher validation UAR "
                    f"({tuning_names[chosen[1]]})",
                    figures[f"dp/{name}{chosen[1]}"])
    # Time of one epoch, same head and data, without and with DP-SGD (the default's per-example
    # clipping: ghost clipping for the default head): the median of nine alternating runs of 6
    # epochs each, so that a passing load spike moves neither side alone (with five runs of 3
    # epochs, repeated measurements of the same code spread from 1.7x to 2.3x). At a device's batch
    # (16), the batch the target is read at (64), and the DP rows' batch (256).
    train = corpora.task_data("kws", spec, "train")
    for batch in TIMING_BATCHES:
        runs = {False: [], True: []}
        for _ in range(TIMING_RUNS):
            for use_dp in (False, True):
                torch.manual_seed(0)
                model = build_model(ModelConfig(n_features=spec.n_features()))
                cfg = TrainConfig(epochs=TIMING_EPOCHS, batch_size=batch, dp=use_dp,
                                  noise_multiplier=1.0 if use_dp else None)
                runs[use_dp].append(train_task(model, "kws", train, None, cfg, spec, None, progress=False).seconds
                                    / TIMING_EPOCHS)
        seconds = {k: statistics.median(v) for k, v in runs.items()}
        figures[f"dp/time_ratio/{batch}"] = seconds[True] / seconds[False]
        rows.append(["DP-SGD time / plain", f"default head, KWS train set, batch {batch}, per epoch "
                     f"(median of {TIMING_RUNS})",
                     f"{seconds[True]:.2f} s / {seconds[False]:.2f} s = {seconds[True] / seconds[False]:.2f}x", "—",
                     "<= 1.3x", "", ""])
        print(rows[-1], file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- federated


class Federation:
    """One device per training speaker (speakers dealt round-robin when there are more than
    ``max_devices``), each the real ClientApp; the real strategy; in this process. The server
    pretrains on ``public_share`` of the training speakers (kept off the devices) or on
    ``public_data``."""

    def __init__(self, corpora: Corpora, name: str, work: Path, user_noise: float, rounds: int, seed: int,
                 max_devices: int, public_share: float = 0.0, public_data=None):
        import torch

        from fedser.common.augment import Augmenter
        from fedser.common.corpora import write_manifest
        from fedser.common.data import build_task_data
        from fedser.common.features import FeatureSpec
        from fedser.common.models import ModelConfig, build_model
        from fedser.common.params import state_to_arrays
        from fedser.common.training import TrainConfig, train_task

        self.task, (train, val, test) = corpora.split(name)
        speakers = sorted({u.speaker for u in train + val})
        self.spec = FeatureSpec()
        self.model_config = ModelConfig(n_features=self.spec.n_features())
        torch.manual_seed(seed)
        model = build_model(self.model_config)
        self.public_speakers = 0
        external = public_data is not None
        if public_share > 0:
            # The server's public speech: every k-th speaker, never a device. (Public speech from
            # elsewhere, ``public_data``, leaves every real speaker a device.)
            public = set(speakers[::max(1, round(1 / public_share))])
            speakers = [s for s in speakers if s not in public]
            self.public_speakers = len(public)
            public_data = build_task_data([u for u in train + val if u.speaker in public], self.spec, self.task,
                                          corpora.cache, progress=False)
        if public_data is not None:
            # It pretrains the model (no DP: public data) before the first round, as
            # `fedser-server start --public-corpus` does.
            train_task(model, self.task, public_data, None, TrainConfig(epochs=30, seed=seed), self.spec,
                       Augmenter(self.spec, seed=seed), progress=False)
        self.init = state_to_arrays(model)
        n = min(len(speakers), max_devices)
        owner = {s: i % n for i, s in enumerate(speakers)}
        self.speakers_per_device = len(speakers) / n
        self.manifests = [write_manifest([u for u in train + val if owner.get(u.speaker) == i],
                                         work / name / f"device-{i}.csv") for i in range(n)]
        self.test = corpora.task_data(name, self.spec, "test")
        self.work, self.name, self.rounds, self.user_noise = work, name, rounds, user_noise
        self.tag = f"{name}-z{user_noise:g}-p{public_share:g}" + ("-external" if external else "")
        self.cache = corpora.cache.root

    def run(self) -> tuple[list[float], dict]:
        from flwr.app import ConfigRecord, Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        from fedser.client.app import app
        from fedser.common import keys
        from fedser.common.models import build_model
        from fedser.common.params import arrays_to_state
        from fedser.common.records import arrays_to_record, record_to_arrays
        from fedser.common.training import evaluate_task
        from fedser.server.strategy import HeteroFedAvg

        # Flower stamps messages with the running task's identity; in this process there is none.
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
        tag = self.tag
        contexts = {i + 1: Context(run_id=1, node_id=i + 1, run_config={}, state=RecordDict(), node_config={
            "data": str(m), "tier": 1.0, "max-epsilon": DP_EPSILON, "delta": DELTA, "cache": str(self.cache),
            "require-dp": True, "ledger": str(self.work / "ledgers" / tag / f"device-{i}.json")})
            for i, m in enumerate(self.manifests)}
        n = len(contexts)
        strategy = HeteroFedAvg(
            self.model_config, self.spec, clip_norm=2.0, noise_multiplier=self.user_noise,
            noise_mode="distributed" if self.user_noise > 0 else "none",
            train_settings={keys.LOCAL_EPOCHS: 2, keys.BATCH_SIZE: 16, keys.LEARNING_RATE: 3e-3,
                            keys.DP_ENABLED: True, keys.DP_NOISE_MULTIPLIER: 0.0, keys.DP_MAX_GRAD_NORM: 1.0,
                            "num-rounds": self.rounds, "timeout": 600.0},
            min_train_nodes=n, min_available_nodes=n, min_evaluate_nodes=n)

        class Grid:
            def get_node_ids(self):
                return list(contexts)

            def send_and_receive(self, messages, *, timeout=None):
                return [app(m, contexts[m.metadata.dst_node_id]) for m in messages]

        arrays, curve = dict(self.init), []
        metric = "accuracy" if self.task == "kws" else "uar"
        model = build_model(self.model_config)
        info = {}
        for rnd in range(1, self.rounds + 1):
            messages = list(strategy.configure_train(rnd, arrays_to_record(arrays), ConfigRecord(), Grid()))
            new, metrics = strategy.aggregate_train(rnd, Grid().send_and_receive(messages))
            if new is not None:
                arrays = record_to_arrays(new)
            arrays_to_state(arrays, model)
            curve.append(float(evaluate_task(model, self.test)[metric]))
            info = dict(metrics or {})
            print(f"{tag} round {rnd}: {metric} {curve[-1]:.3f}", file=sys.stderr, flush=True)
        info["devices"] = n
        info["speakers_per_device"] = self.speakers_per_device
        return curve, info


def federated(corpora: Corpora, args, rounds: int, rows: list, figures: dict) -> None:
    from fedser.common.features import FeatureSpec
    from fedser.common.privacy import UserLevelAccountant

    with tempfile.TemporaryDirectory(prefix="fedser-bench-encoders-") as tmp:
        for name in ("kws", "ravdess"):
            if not wanted(args, corpora, name):
                continue
            task = corpora.utterances[name][0]
            metric = "accuracy" if task == "kws" else "uar"
            central_figure = default_baseline(corpora, name, figures, 60, args.seed)[metric]
            # (share of speakers kept public, pretraining on synthesized commands, user noise, target)
            settings = [(0.0, False, 0.0, 0.95), (0.2, False, 0.0, 0.95), (0.2, False, 1.0, 0.90)]
            if name == "kws":
                settings.append((0.0, True, 0.0, 0.95))
            for public, synthesized, user_noise, share in settings:
                t0 = time.perf_counter()
                fed = Federation(corpora, name, Path(tmp), user_noise, rounds, args.seed, args.max_devices, public,
                                 corpora.synthesized_commands(FeatureSpec()) if synthesized else None)
                curve, info = fed.run()
                n = info["devices"]
                final = curve[-1]
                user = "inf (no user-level noise)"
                if user_noise > 0:
                    acc = UserLevelAccountant(user_noise, n, n)
                    acc.step(rounds)
                    user = f"{acc.epsilon(DELTA):.1f} for these {n} devices; "
                    big = UserLevelAccountant(user_noise, 100, 10_000)
                    big.step(rounds)
                    user += f"{big.epsilon(DELTA):.2f} with 100 of 10,000 sampled per round"
                figures[f"federated/{name}/z{user_noise:g}/public{'synth' if synthesized else f'{public:g}'}"] = {
                    "curve": curve, "devices": n, "user_epsilon": user, "public_speakers": fed.public_speakers}
                ratio = f"{final / central_figure:.0%} of centralized" if central_figure else "—"
                per = info["speakers_per_device"]
                who = "one per speaker" if per == 1 else f"{per:.1f} speakers each"
                start = (f"pretrained by the server on synthesized commands ({SYNTH_VOICES} espeak-ng voices)"
                         if synthesized else
                         f"pretrained by the server on {fed.public_speakers} public speakers" if public
                         else "from scratch")
                rows.append([f"{name} federated", f"{n} devices ({who}), {start}, DP-SGD epsilon <= 8 each, "
                             f"user noise z={user_noise:g}; user epsilon {user}",
                             f"{final:.3f} {metric} (rounds: {' '.join(f'{c:.2f}' for c in curve)})", ratio,
                             f">= {share:.0%} of centralized", "", f"{time.perf_counter() - t0:.0f}"])
                print(rows[-1], file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if not data_or_skip(args.data, "speech_commands"):
        return 0
    logging.getLogger("fedser").setLevel(logging.WARNING)
    epochs = args.epochs or (15 if args.quick else 60)
    rounds = args.rounds or (4 if args.quick else 10)
    load_before = load_average()
    corpora = Corpora(args.data, args.cache, args.seed)
    rows, figures = [], {}
    for section, run in (("central", central), ("cross", cross), ("dp", dp), ("federated", federated)):
        if section in args.sections:
            run(corpora, args, rounds if section == "federated" else epochs, rows, figures)
    load_after = load_average()
    name = "encoders" + ("" if set(args.sections) == set(SECTIONS) else "_" + "_".join(args.sections)) \
        + ("_" + "_".join(args.corpora) if args.corpora else "") + ("_quick" if args.quick else "")
    rep = Report(name, "Frozen public encoders with small heads, against training from scratch")
    rep.add(machine_line())
    rep.add(load_note(load_before, load_after))
    rep.add("")
    rep.add(f"Development corpus at {args.data.name}/ (../shared/data): speaker-independent splits (15 % of "
            f"speakers validation, 25 % test, seed {args.seed}); every figure is on the test speakers. "
            f"Centralized: up to {epochs} epochs, early stopping on validation UAR. Federated: {rounds} rounds "
            "of 2 local epochs, devices are the real ClientApp. Change: points against the row's baseline.")
    rep.add("")
    rep.add(md_table(["figure", "option", "result", "change / baseline", "target", "trained weights", "seconds"],
                     rows, ["l", "l", "r", "r", "l", "r", "r"]))
    path = rep.save()
    print(path.read_text())
    if args.json:
        print(json.dumps(figures, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
