"""User-level DP at population scale: utility against user-level epsilon for 100 / 500 / 1000 devices.

The development corpus's Speech Commands subset is split by speaker into private speakers (the
devices'), a quarter standing for public speech the server pretrains on, and a quarter of unseen
test speakers. Each population deals the private clips into N virtual devices (sorted by speaker
and cut into N nearly equal runs, so a device holds a few clips of one speaker, at most two at a
run's border). The total data is the same at every N: more devices means fewer clips each, as when
the same speech is spread over more phones. Each round samples m = q*N devices (without
replacement) and every sampled device runs the device's own round
(``fedser.client.update.train_round``: local training, clipping to C, Gaussian noise as the noise
mode says); the server's aggregation combines them. User-level epsilon is the server's accountant
(``UserLevelAccountant``: z, q = m/N, rounds). Sample-level DP-SGD is off, so the curve shows what
user-level noise costs.

Printed: one row per (N, model, noise mode, clipping, z): the model from scratch, or private heads
over the publicly pretrained encoder (``train-scope=heads``); C fixed at 2 or adaptive
(``clip-quantile=0.5``); KWS accuracy on the unseen speakers, its share of the centralized model
(trained on the private and public clips), the points it gained over its starting model, and user
epsilon; the issue's target row (user epsilon <= 10 at 1000 devices with utility >= 0.9x
centralized) for both models; a plot of utility against epsilon.

    python bench/bench_population.py [--populations 100 500 1000] [--noise 0.5 1 2] [--rounds 60]
    python bench/bench_population.py --quick      # one small population, few rounds
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_DATA,
    REPO,
    RESULTS_DIR,
    Report,
    data_or_skip,
    load_average,
    load_note,
    machine_line,
    md_table,
)

DELTA = 1e-5
ADAPTIVE_START, ADAPTIVE_QUANTILE = 2.0, 0.5   # the run settings' clip-norm and a median target
TARGET_EPSILON, TARGET_SHARE, TARGET_POPULATION = 10.0, 0.9, 1000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus root (default ../shared/data)")
    p.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench-features")
    p.add_argument("--populations", type=int, nargs="+", default=None, help="N (default 100 500 1000)")
    p.add_argument("--sample-rate", type=float, default=0.1, help="q: share of the devices sampled per round")
    p.add_argument("--noise", type=float, nargs="+", default=None,
                   help="z swept for private heads with adaptive clipping, distributed noise (default 0.5 1 2)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 60)")
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--public-share", type=float, default=0.25,
                   help="share of the speakers that stand for public speech the server pretrains on")
    p.add_argument("--central-epochs", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="N=100, z=1, 4 rounds (a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="population", help="results name under bench/results")
    args = p.parse_args(argv)
    quick = args.quick
    args.populations = args.populations or ([100] if quick else [100, 500, 1000])
    args.noise = args.noise if args.noise is not None else ([1.0] if quick else [0.5, 1.0, 2.0])
    args.rounds = args.rounds or (4 if quick else 60)
    if quick:
        args.central_epochs = min(args.central_epochs, 5)
        args.out = f"{args.out}_quick"
    problems = [f"population {n} must be >= 2" for n in args.populations if n < 2]
    if not 0 < args.sample_rate <= 1:
        problems.append(f"--sample-rate must be in (0, 1], got {args.sample_rate}")
    if not 0 < args.public_share < 0.75:
        problems.append(f"--public-share must be in (0, 0.75), got {args.public_share}")
    problems += [f"noise {z} must be > 0" for z in args.noise if not z > 0]
    if problems:
        p.error("; ".join(problems))
    return args


def recipe(noise: list[float]) -> list[tuple[str, str, float, str]]:
    """(model, noise mode, z, clipping) of each federation run at every population.

    "scratch": every weight trains from the initial model; "heads": the server's publicly
    pretrained encoder is fixed and devices train the heads (train-scope=heads). Clipping "2" is
    the run settings' fixed C; "adaptive" starts there and tracks the median norm."""
    rows = [("scratch", "none", 0.0, "2"), ("scratch", "distributed", 1.0, "2"),
            ("scratch", "distributed", 1.0, "adaptive"), ("heads", "none", 0.0, "2"),
            ("heads", "distributed", 1.0, "2")]
    rows += [("heads", "distributed", z, "adaptive") for z in noise]
    return rows + [("heads", "local", 1.0, "adaptive")]


def devices_of(train, n: int):
    """``train`` cut into ``n`` runs of nearly equal size, in speaker order (a device is a run)."""
    import numpy as np

    from fedser.tools.audit.protocol import subset

    order = sorted(range(len(train)), key=lambda i: (train.speakers[i], i))
    return [subset(train, part.tolist()) for part in np.array_split(np.asarray(order), n)]


def plot(rows: list[dict], central: float, path: Path) -> Path:
    from fedser.server.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    curves = sorted({(r["n"], r["model"], r["mode"], r["clip"]) for r in rows if r["z"] > 0})
    for key, marker in zip(curves, "osD^v<>p*hH+x" * 3):
        pts = sorted((r["epsilon"], r["utility"]) for r in rows if (r["n"], r["model"], r["mode"], r["clip"]) == key)
        xs, ys = zip(*pts)
        n, model, mode, clip = key
        ax.plot(xs, ys, marker=marker, ls="-" if len(pts) > 1 else "", label=f"N={n}, {model}, {mode}, C {clip}")
    ax.axhline(central, color="k", lw=0.8, ls="--", label="centralized, no DP")
    ax.axhline(TARGET_SHARE * central, color="grey", lw=0.8, ls=":", label=f"{TARGET_SHARE:g}x centralized")
    ax.axvline(TARGET_EPSILON, color="grey", lw=0.8, ls="-.", label=f"epsilon {TARGET_EPSILON:g}")
    ax.set_xscale("log")
    ax.set_xlabel(f"user-level epsilon (delta {DELTA:g})")
    ax.set_ylabel("KWS accuracy, unseen speakers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if not data_or_skip(args.data, "speech_commands"):
        return 0
    import torch

    from fedser.common.cache import FeatureCache
    from fedser.common.data import build_task_data
    from fedser.common.features import FeatureSpec
    from fedser.common.models import ModelConfig, build_model
    from fedser.common.params import arrays_to_state, state_to_arrays
    from fedser.common.privacy import UserLevelAccountant
    from fedser.common.splits import speaker_split
    from fedser.common.training import TrainConfig, evaluate_task, train_task
    from fedser.tools.audit.protocol import Protocol, concat, simulate_federation
    from fedser.tools.commands.args import load_data

    torch.set_num_threads(1)
    load_before, t_start = load_average(), time.perf_counter()
    report = Report(args.out, "User-level DP at population scale: utility against user-level epsilon")
    report.add(machine_line())
    report.add()

    corpus = load_data([str(args.data / "speech_commands")], log=lambda s: None)
    utts = [u for u in corpus.utterances if u.task == "kws"]
    private_u, public_u, test_u = speaker_split(utts, val=args.public_share, test=0.25, seed=args.seed)
    spec = FeatureSpec()
    cache = FeatureCache(args.cache)
    train = build_task_data(private_u, spec, "kws", cache, progress=True, desc="features private")
    public = build_task_data(public_u, spec, "kws", cache, progress=True, desc="features public")
    test = build_task_data(test_u, spec, "kws", cache, progress=True, desc="features test")
    allowed = [train.class_names.index(c) for c in train.labels_present()]
    mc = ModelConfig(n_features=spec.n_features())

    def accuracy(arrays) -> float:
        model = build_model(mc)
        arrays_to_state(arrays, model)
        return float(evaluate_task(model, test, allowed)["accuracy"])

    def trained_on(data, init_arrays=None):
        torch.manual_seed(args.seed)
        model = build_model(mc)
        if init_arrays is not None:
            arrays_to_state(init_arrays, model)
        train_task(model, "kws", data, None, TrainConfig(epochs=args.central_epochs, seed=args.seed), spec, None,
                   progress=False)
        return state_to_arrays(model)

    torch.manual_seed(args.seed)
    starts = {"scratch": state_to_arrays(build_model(mc))}
    t0 = time.perf_counter()
    starts["heads"] = trained_on(public)
    pretrained = accuracy(starts["heads"])
    start_accuracy = {"scratch": accuracy(starts["scratch"]), "heads": pretrained}
    central = accuracy(trained_on(concat([train, public])))
    report.add(f"Corpus: Speech Commands subset at {args.data}, split by speaker: {len({*train.speakers})} private "
               f"speakers ({len(train)} clips) held by the devices, {len({*public.speakers})} speakers "
               f"({len(public)} clips) standing for the public speech the server pretrains on, "
               f"{len({*test.speakers})} unseen test speakers ({len(test)} clips). Centralized on the private and "
               f"public clips together, no DP ({args.central_epochs} epochs, default head): accuracy "
               f"**{central:.3f}**. The server's public pretraining alone: {pretrained:.3f} "
               f"({time.perf_counter() - t0:.0f} s for both).")
    report.add()
    head_weights = sum(a.size for k, a in starts["heads"].items() if k.startswith("heads."))
    report.add(f"Federation: N devices (the private clips in speaker order cut into N runs), m = q*N sampled "
               f"per round with q = {args.sample_rate:g}, {args.rounds} rounds x {args.local_epochs} local "
               f"epochs, batch 16, Adam lr 0.003 (the run defaults), sample-level DP-SGD off. Model "
               f"'scratch': every weight of the default head trains from its initialisation; 'heads': the "
               f"publicly pretrained encoder stays fixed and the devices train the output heads "
               f"(train-scope=heads), so update, clip and noise cover {head_weights:,} weights. Clipping: C = 2 "
               f"fixed (the run default), or 'adaptive': from C = {ADAPTIVE_START:g}, moved each round towards "
               f"the median update norm by the devices' noised bits (run setting clip-quantile="
               f"{ADAPTIVE_QUANTILE:g}); its cost in update noise is inside the accounted z. Distributed "
               f"noise: each update carries z*C/sqrt(m), the sum z*C (secure aggregation would hide single "
               f"updates from the server). Local noise: each update carries z*C (the default until secure "
               f"aggregation exists). User epsilon: the server's accountant at (z, q, rounds), delta "
               f"{DELTA:g}; with local noise the aggregate carries about z*sqrt(m), so its figure is an "
               f"upper bound.")
    report.add()

    rows: list[dict] = []
    table: list[list] = []
    header = ["N", "m per round", "clips per device", "model", "noise", "C", "z", "user epsilon", "KWS accuracy",
              "share of centralized", "points over its start", "accuracy by round (every 5th)", "seconds"]
    for n in args.populations:
        if n > len(train):
            report.add(f"N={n}: skipped, more devices than the {len(train)} private clips")
            continue
        devices = devices_of(train, n)
        m = max(1, round(args.sample_rate * n))
        sizes = sorted(len(d) for d in devices)
        for model_kind, mode, z, clip in recipe(args.noise):
            protocol = Protocol(clip_norm=ADAPTIVE_START if clip == "adaptive" else float(clip), noise_multiplier=z,
                                noise_mode=mode, expected_clients=m, total_clients=n, dp=False, rounds=args.rounds,
                                local_epochs=args.local_epochs,
                                clip_quantile=ADAPTIVE_QUANTILE if clip == "adaptive" else 0.0,
                                scope="heads" if model_kind == "heads" else "all")
            curve: list[float] = []
            bounds: list[float] = []

            def watch(rnd, arrays, clip_norm, curve=curve, bounds=bounds):
                bounds.append(clip_norm)
                if rnd % 5 == 0:
                    curve.append(accuracy(arrays))

            t0 = time.perf_counter()
            final = simulate_federation(mc, spec, devices, protocol, seed=args.seed, init=starts[model_kind],
                                        progress=True, on_round=watch)
            seconds = time.perf_counter() - t0
            acc = accuracy(final)
            accountant = UserLevelAccountant(z, m, n)
            accountant.step(args.rounds)
            eps = accountant.epsilon(DELTA)
            label = f"adaptive ({bounds[0]:g} -> {bounds[-1]:.2f})" if clip == "adaptive" else clip
            rows.append({"n": n, "m": m, "model": model_kind, "mode": mode, "z": z, "clip": clip, "epsilon": eps,
                         "utility": acc, "share": acc / central})
            table.append([n, m, f"{sizes[len(sizes) // 2]} ({sizes[0]}-{sizes[-1]})", model_kind, mode, label,
                          f"{z:g}", "inf" if math.isinf(eps) else f"{eps:.2f}",
                          f"{acc:.3f}", f"{acc / central:.2f}x", f"{100 * (acc - start_accuracy[model_kind]):+.1f}",
                          " ".join(f"{a:.2f}" for a in curve),
                          f"{seconds:.0f}"])
            print(table[-1], file=sys.stderr, flush=True)

    report.add(md_table(header, table))
    report.add()
    png = plot(rows, central, RESULTS_DIR / f"{args.out}.png")
    report.add(f"![utility against user-level epsilon]({png.name})")
    report.add()
    report.add(f"Reference lines: centralized {central:.3f}; public pretraining alone {pretrained:.3f}.")
    report.add()

    report.add("### Target")
    report.add()
    target_rows = []
    for kind, what in (("heads", "private heads over the publicly pretrained encoder"),
                       ("scratch", "from scratch, no public pretraining")):
        fits = [r for r in rows if r["n"] == TARGET_POPULATION and r["model"] == kind and r["z"] > 0
                and r["share"] >= TARGET_SHARE]
        best = min(fits, key=lambda r: r["epsilon"], default=None)
        measured = (f"{best['epsilon']:.2f} ({best['mode']} noise, C {best['clip']}, z={best['z']:g}, "
                    f"{best['share']:.2f}x)" if best
                    else f"no {TARGET_POPULATION}-device row with noise reached {TARGET_SHARE:g}x")
        met = "yes" if best and best["epsilon"] <= TARGET_EPSILON else "**no**"
        if TARGET_POPULATION not in args.populations:
            measured, met = f"N={TARGET_POPULATION} not run", "—"
        target_rows.append([f"user epsilon at {TARGET_POPULATION} sampled devices with utility >= "
                            f"{TARGET_SHARE:g}x centralized: <= {TARGET_EPSILON:g}; {what}", measured, met])
    report.add(md_table(["target", "measured", "met"], target_rows))
    report.add()
    report.add(f"'Points over its start' is what the federation added to the model it started from: the "
               f"initialisation for 'scratch', the server's public pretraining ({pretrained:.3f}) for 'heads'. "
               f"Where the public speech already teaches the task, the heads rows meet the target by keeping "
               f"the pretrained model intact under the noise, not by learning more from the devices.")
    report.add()
    report.add(f"Wall time {time.perf_counter() - t_start:.0f} s; {load_note(load_before, load_average())}.")
    report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
