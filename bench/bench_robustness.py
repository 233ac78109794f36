"""Robustness of the server: malicious devices against three aggregation rules, and a reply fuzz.

Federation: devices are the real ClientApp (``fedser.client.app``: DP-SGD, ledger, clip, noise)
called in this process, one per speaker group; the server is the real strategy
(``HeteroFedAvg``: validation, profiles, capped weights). 1 or 2 of the devices are malicious:
each takes its honest reply and turns it into an attack before it is sent:

* ``weight lie``: the update's sign flipped, and 10**6 examples claimed (in the profile too);
* ``scaled update``: the update times 100;
* ``sign flip``: the update's sign flipped;
* ``at the bound``: the flipped update's direction, noise-free, at 0.999 of the largest norm the
  server's check lets through (clipping plus what the noise can produce).

Rules: the default (sample-weighted mean, weights capped at the cohort's lower median),
``trimmed-mean`` (fedser.server.robust, trim 0.2) and plain FedAvg (claimed counts as weights;
for comparison only). Each rule's clean run (no attacker) is the baseline of its rows. Every
run draws the devices' training seeds from the same sequence (common random numbers), so the
honest devices train alike in the clean and attacked runs and a change is the attack's. The
figure is the keyword-spotting accuracy of the final global model on held-out speakers.

Noise shape: the honest updates of the default rule's clean run, privatized as a device does
under user-level noise (C=2, z=1, distributed over the cohort), and the same steps sent
noise-free at 0.999 of the norm bound, through the server's ``validate_update``: how many
of each it accepts.

Fuzz: the generated train and evaluation replies of ``tests/server/test_strategy.py`` (valid
and malformed in every way that file knows), ``--fuzz N`` replies at least, thrown at the
server's ``aggregate_train`` / ``aggregate_evaluate``; counted: replies, exceptions that
escaped, malformed replies accepted.

    python bench/bench_robustness.py [--quick] [--json] [--data DIR] [--devices 20] [--rounds 5] [--cache DIR]

Devices train without DP noise here (clipping and every server check stay): under DP a model
learns too slowly in a few rounds for an attack's harm to show in its accuracy.

``--quick`` uses a synthesized corpus (espeak-ng, 8 speakers), 6 devices, 4 rounds, one attacker
and 2,000 fuzz replies. ``--json`` prints one JSON object on the last line of standard output.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import secrets
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, REPO, Report, load_average, load_note, machine_line, md_table

ATTACKS = ("weight lie", "scaled update", "sign flip", "at the bound")
RULES = ("default", "trimmed-mean", "plain FedAvg")
# Not run unless asked: the previous default, weights capped at 4x the lower median.
OTHER_RULES = ("capped at 4x",)
LIAR_EXAMPLES = 10 ** 6
CLIP = 2.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="synthesized corpus, 6 devices, 3 rounds, 1 attacker")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the development corpus (speech_commands/)")
    p.add_argument("--devices", type=int, default=None, help="devices (default 20; 6 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (default 5; 4 with --quick)")
    p.add_argument("--fuzz", type=int, default=None, help="generated replies at least (default 10000; 2000 quick)")
    p.add_argument("--attackers", type=int, nargs="+", default=None,
                   help="malicious devices per attacked run (default 1 2; 1 with --quick)")
    p.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench-features",
                   help="feature cache shared with the other benches, so a second run starts at once")
    p.add_argument("--rules", nargs="+", choices=RULES + OTHER_RULES, default=list(RULES))
    p.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the federation


def corpus(args, work: Path) -> tuple[list[str], str]:
    """The corpus folders and how to describe them."""
    if args.quick:
        from fedser.tools import synth

        out = work / "synth"
        synth.synthesize_corpus(out, n_speakers=8, seed=args.seed, statements=1, repetitions=1,
                                command_repetitions=3, noise_seconds=0, progress=False)
        return [str(out / "commands")], "synthesized (espeak-ng), 8 speakers, 12 command classes"
    commands = args.data / "speech_commands"
    if not commands.is_dir():
        print(f"skipped: no development corpus at {commands} (use --quick for a synthesized one)")
        raise SystemExit(0)
    return [str(commands)], f"Speech Commands subset at {commands}"


class Federation:
    """Devices (real ClientApp contexts), the held-out test set, and a loop over rounds."""

    def __init__(self, data: list[str], n_devices: int, work: Path, seed: int, cache: Path):
        import torch

        from fedser.common.cache import FeatureCache
        from fedser.common.data import build_task_data
        from fedser.common.features import FeatureSpec
        from fedser.common.models import ModelConfig, build_model
        from fedser.common.params import state_to_arrays
        from fedser.tools.commands.args import load_data
        from fedser.tools.commands.partition import partition_corpus

        split = partition_corpus(load_data(data, log=lambda s: None), work / "parts", n_devices, test=0.2, seed=seed)
        self.manifests = split.devices
        self.cache = cache
        self.spec = FeatureSpec()
        self.model_config = ModelConfig(n_features=self.spec.n_features())
        torch.manual_seed(seed)
        self.init = state_to_arrays(build_model(self.model_config))
        self.test = build_task_data(split.test_utterances, self.spec, "kws", FeatureCache(self.cache), progress=False)
        self.work = work
        self.seed = seed

    def contexts(self, tag: str):
        from flwr.app import Context, RecordDict

        return {i + 1: Context(run_id=1, node_id=i + 1, run_config={}, state=RecordDict(), node_config={
            "data": str(m), "tier": 1.0, "max-epsilon": 8.0, "delta": 1e-5, "cache": str(self.cache),
            "require-dp": False,
            "ledger": str(self.work / "ledgers" / tag / f"device-{i}.json")}) for i, m in enumerate(self.manifests)}

    def run(self, rule: str, attack: str | None, attackers: int, rounds: int,
            keep: list | None = None) -> float:
        """The KWS accuracy of the final model of one federation; ``keep`` collects every honest
        training update (the array dicts the devices sent)."""
        from flwr.app import ConfigRecord

        from fedser.common.models import build_model
        from fedser.common.params import arrays_to_state
        from fedser.common.records import arrays_to_record, record_to_arrays
        from fedser.common.training import evaluate_task

        tag = f"{rule}-{attack}-{attackers}".replace(" ", "_")
        contexts = self.contexts(tag)
        strategy = make_strategy(rule, self.model_config, self.spec, len(contexts), rounds)
        evil = set(sorted(contexts)[:attackers]) if attack else set()
        grid = AttackGrid(contexts, evil, attack, strategy, keep)
        arrays = dict(self.init)
        # Common random numbers: a device draws its training seed (shuffling, augmentation) from
        # the OS; here every run draws the same sequence, so the honest devices train alike in
        # the clean and the attacked runs and a change measures the attack, not the dice.
        draws = random.Random(self.seed)
        with mock.patch.object(secrets, "randbits", draws.getrandbits):
            for rnd in range(1, rounds + 1):
                messages = list(strategy.configure_train(rnd, arrays_to_record(arrays), ConfigRecord(), grid))
                new, _ = strategy.aggregate_train(rnd, grid.send_and_receive(messages))
                if new is not None:
                    arrays = record_to_arrays(new)
        model = build_model(self.model_config)
        arrays_to_state(arrays, model)
        return float(evaluate_task(model, self.test)["accuracy"])


def make_strategy(rule: str, model_config, spec, n: int, rounds: int):
    from fedser.common import keys
    from fedser.server.aggregation import WEIGHT_CAP_FACTOR
    from fedser.server.robust import TrimmedMeanHeteroFedAvg
    from fedser.server.strategy import HeteroFedAvg

    # Without DP noise the clean model learns within a few rounds, so an attack's harm shows in its
    # accuracy; clipping (C) and the server's checks are the same as in a DP run.
    common = dict(clip_norm=CLIP, noise_multiplier=0.0, noise_mode="none",
                  train_settings={keys.LOCAL_EPOCHS: 2, keys.BATCH_SIZE: 16, keys.LEARNING_RATE: 0.01,
                                  keys.DP_ENABLED: False, keys.DP_NOISE_MULTIPLIER: 0.0, keys.DP_MAX_GRAD_NORM: 1.0,
                                  "num-rounds": rounds, "timeout": 600.0},
                  min_train_nodes=n, min_available_nodes=n, min_evaluate_nodes=n)
    if rule == "trimmed-mean":
        return TrimmedMeanHeteroFedAvg(model_config, spec, trim=0.2, **common)
    cap = {"plain FedAvg": None, "capped at 4x": 4}.get(rule, WEIGHT_CAP_FACTOR)
    return HeteroFedAvg(model_config, spec, weight_cap=cap, **common)


class AttackGrid:
    """Routes instructions to the real ClientApp; the ``evil`` devices turn their reply into ``attack``."""

    def __init__(self, contexts, evil: set[int], attack: str | None, strategy, keep: list | None = None):
        self.contexts, self.evil, self.attack, self.strategy = contexts, evil, attack, strategy
        self.keep = keep

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import MessageType

        from fedser.client.app import app
        from fedser.common import keys
        from fedser.common.records import record_to_arrays

        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            reply = app(m, self.contexts[node])
            if (self.keep is not None and node not in self.evil and not reply.has_error()
                    and m.metadata.message_type == MessageType.TRAIN):
                self.keep.append(record_to_arrays(reply.content[keys.ARRAYS]))
            if node in self.evil and not reply.has_error():
                reply = self.corrupt(m, reply)
            replies.append(reply)
        return replies

    def corrupt(self, instruction, reply):
        import numpy as np
        from flwr.app import Message, MessageType, MetricRecord, RecordDict

        from fedser.common import keys
        from fedser.common.privacy import global_norm, max_expected_norm
        from fedser.common.records import arrays_to_record, record_to_arrays

        metrics = dict(reply.content[keys.METRICS])
        if instruction.metadata.message_type == MessageType.QUERY:
            if self.attack == "weight lie":
                metrics[keys.NUM_EXAMPLES] = LIAR_EXAMPLES
            return Message(RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=instruction)
        if instruction.metadata.message_type != MessageType.TRAIN:
            return reply
        delta = record_to_arrays(reply.content[keys.ARRAYS])
        if self.attack == "weight lie":
            delta = {k: -v for k, v in delta.items()}
            metrics[keys.NUM_EXAMPLES] = LIAR_EXAMPLES
        elif self.attack == "scaled update":
            delta = {k: v * np.float32(100) for k, v in delta.items()}
        elif self.attack == "sign flip":
            delta = {k: -v for k, v in delta.items()}
        elif self.attack == "at the bound":
            s = self.strategy
            n = sum(v.size for v in delta.values())
            bound = max_expected_norm(s.clip_norm, s.noise_multiplier, s.noise_mode, s._expected_clients, n)
            scale = np.float32(0.999 * bound / max(global_norm(delta), 1e-12))
            delta = {k: (-v * scale).astype(np.float32) for k, v in delta.items()}
        return Message(RecordDict({keys.ARRAYS: arrays_to_record(delta), keys.METRICS: MetricRecord(metrics)}),
                       reply_to=instruction)


# --------------------------------------------------------------------------- the noise shape


def noise_shape_check(fed: Federation, steps: list[dict], seed: int) -> dict:
    """How many honest privatized updates and noise-free ones at the norm bound the server accepts."""
    import numpy as np

    from fedser.client.update import privatize_update
    from fedser.common.models import build_model, trained_entries
    from fedser.common.privacy import global_norm, max_expected_norm, update_noise_std
    from fedser.server.validation import UpdateNoise, validate_update

    z, mode, m = 1.0, "distributed", len(fed.manifests)
    shapes = {k: v.shape for k, v in fed.init.items()}
    noise = UpdateNoise(frozenset(trained_entries(build_model(fed.model_config), "all")),
                        update_noise_std(CLIP, z, mode, m), CLIP)
    n = sum(int(np.prod(s)) for k, s in shapes.items() if k in noise.trained)
    bound = max_expected_norm(CLIP, z, mode, m, n)
    rng = np.random.default_rng(seed)

    def accepted(arrays) -> bool:
        return not validate_update(arrays, shapes, max_norm=bound, current_model_version=0, reply_model_version=0,
                                   num_examples=1, heads_mask=1, noise=noise)

    honest = sum(accepted(privatize_update(s, CLIP, z, mode, m, rng)[0]) for s in steps)
    crafted = sum(accepted({k: (v * np.float32(0.999 * bound / max(global_norm(s), 1e-12))).astype(np.float32)
                            for k, v in s.items()}) for s in steps)
    return {"updates": len(steps), "honest_accepted": honest, "noise_free_accepted": crafted,
            "noise_std": noise.noise_std, "weights": n}


# --------------------------------------------------------------------------- the fuzz


def fuzz(at_least: int) -> dict:
    """Run the server tests' generated replies until ``at_least`` replies were thrown."""
    per_example = 3   # three nodes' replies each, sometimes one more
    os.environ["FEDSER_FUZZ_EXAMPLES"] = str(max(1, at_least // (2 * per_example) + 1))
    sys.path.insert(0, str(REPO / "tests" / "server"))
    import test_strategy as t

    from fedser.server.strategy import HeteroFedAvg

    counts = {"replies": 0, "escaped": 0}
    original = {name: getattr(HeteroFedAvg, name) for name in ("aggregate_train", "aggregate_evaluate")}

    def counting(name):
        def wrapped(self, server_round, replies):
            replies = list(replies)
            counts["replies"] += len(replies)
            try:
                return original[name](self, server_round, replies)
            except Exception:
                counts["escaped"] += 1
                raise
        return wrapped

    fuzz_round = t.make_fuzz_round(t.make_global_arrays())
    failures = []
    try:
        for name in original:
            setattr(HeteroFedAvg, name, counting(name))
        for test in (t.test_fuzz_generated_train_replies_never_raise_and_each_is_used_or_rejected,
                     t.test_fuzz_generated_evaluation_replies_never_raise_and_each_is_averaged_or_rejected):
            try:
                test(fuzz_round=fuzz_round)
            except Exception as exc:   # an escaped exception or an accepted malformed reply
                failures.append(f"{test.__name__}: {type(exc).__name__}: {str(exc)[:300]}")
    finally:
        for name, fn in original.items():
            setattr(HeteroFedAvg, name, fn)
    accepted = sum(1 for f in failures if "AssertionError" in f)
    return {"fuzz_cases": counts["replies"], "fuzz_crashes": counts["escaped"],
            "fuzz_malformed_accepted": accepted, "failures": failures}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("fedser.server").setLevel(logging.ERROR)   # every rejection would be logged
    devices = args.devices or (6 if args.quick else 20)
    rounds = args.rounds or (4 if args.quick else 5)
    attacker_counts = tuple(args.attackers or ((1,) if args.quick else (1, 2)))
    fuzz_target = args.fuzz or (2000 if args.quick else 10_000)
    load_before = load_average()
    t0 = time.perf_counter()
    fuzz_result = fuzz(fuzz_target)
    fuzz_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="fedser-robustness-") as tmp:
        work = Path(tmp)
        data, described = corpus(args, work)
        fed = Federation(data, devices, work, args.seed, work / "cache" if args.quick else args.cache)
        clean = {}
        rows, attacks, steps = [], [], []
        for rule in args.rules:
            t = time.perf_counter()
            clean[rule] = fed.run(rule, None, 0, rounds, keep=steps if rule == args.rules[0] else None)
            rows.append([rule, "none", 0, f"{clean[rule]:.3f}", "", f"{time.perf_counter() - t:.0f}"])
            print(f"{rule}, clean: accuracy {clean[rule]:.3f}", file=sys.stderr, flush=True)
            for attack in args.attacks:
                for n in attacker_counts:
                    t = time.perf_counter()
                    acc = fed.run(rule, attack, n, rounds)
                    change = 100 * (acc - clean[rule])
                    rows.append([rule, attack, n, f"{acc:.3f}", f"{change:+.1f}", f"{time.perf_counter() - t:.0f}"])
                    attacks.append({"rule": rule, "attack": attack, "attackers": n, "accuracy": acc,
                                    "change_points": change})
                    print(f"{rule}, {attack} x{n}: accuracy {acc:.3f} ({change:+.1f} points)", file=sys.stderr,
                          flush=True)
        shape = noise_shape_check(fed, steps, args.seed)
    load_after = load_average()
    subset = list(args.rules) != list(RULES) or list(args.attacks) != list(ATTACKS)
    name = "robustness" + ("_quick" if args.quick else "") + ("_subset" if subset else "")
    rep = Report(name, "Robustness: malicious devices and malformed replies")
    rep.add(machine_line())
    rep.add(load_note(load_before, load_after))
    rep.add("")
    rep.add(f"Corpus: {described}{' (quick mode: synthesized speech, few rounds)' if args.quick else ''}. "
            f"{devices} devices, one per speaker group, each the real ClientApp; {rounds} rounds of 2 local "
            f"epochs; updates clipped to C={CLIP:g}, no DP noise (so that the clean model learns within the "
            "rounds and an attack's harm shows; the server's checks are those of a DP run); figure: KWS "
            "accuracy of the final model on held-out speakers. Change in points against the same rule's "
            "clean run.")
    rep.add("")
    rep.add(md_table(["rule", "attack", "attackers", "KWS accuracy", "change (points)", "seconds"], rows,
                     ["l", "l", "r", "r", "r", "r"]))
    rep.add("")
    rep.add(f"Noise shape: {shape['updates']} honest training updates of the {args.rules[0]} rule's clean run, "
            f"privatized under user-level noise (C={CLIP:g}, z=1, distributed over {devices} devices: "
            f"std {shape['noise_std']:.3g} on {shape['weights']} weights): the server accepted "
            f"{shape['honest_accepted']} of {shape['updates']}. The same steps sent noise-free at 0.999 of the "
            f"norm bound (the norm check alone passes them): accepted {shape['noise_free_accepted']} "
            f"of {shape['updates']}.")
    rep.add("")
    rep.add(f"Fuzz: {fuzz_result['fuzz_cases']} generated replies (train and evaluation, valid and malformed) in "
            f"{fuzz_s:.0f} s: {fuzz_result['fuzz_crashes']} exceptions escaped, "
            f"{fuzz_result['fuzz_malformed_accepted']} malformed replies accepted.")
    for f in fuzz_result["failures"]:
        rep.add(f"- {f}")
    path = rep.save()
    print(path.read_text())
    if args.json:
        print(json.dumps({"fuzz_cases": fuzz_result["fuzz_cases"], "fuzz_crashes": fuzz_result["fuzz_crashes"],
                          "fuzz_malformed_accepted": fuzz_result["fuzz_malformed_accepted"],
                          "clean_accuracy": clean[args.rules[0]], "attacks": attacks,
                          "noise_shape": shape,
                          "quick": bool(args.quick)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
