"""Training throughput and peak memory, with and without Opacus DP-SGD, on real keyword clips.

For each encoder (``cnn``, the default, and ``crnn``) and each of plain SGD and DP-SGD, a fresh
Python subprocess

1. loads ``--clips`` Speech Commands clips spread over the corpus and computes their features
   (the project's ``build_task_data``, the default ``FeatureSpec``; read from the feature cache
   when present; not timed),
2. warms up with ``fedser.common.training.train_task`` for about ``--warmup-steps`` steps,
3. times ``train_task`` for about ``--steps`` steps of batch ``--batch`` (whole epochs; Adam;
   no augmentation, no validation pass) — the exact loop a device and ``fedser train`` run,
   Opacus per-sample gradients, clipping and noise included when DP is on,
4. reports samples/s (examples actually fed, counted at the model's input) and its peak RSS
   (``ru_maxrss``: imports, corpus, features and training together).

One process per configuration keeps the memory peaks apart. Each configuration runs at torch's
default thread count and at 1 thread: on a shared, busy machine torch's default (one thread per
CPU) can be several times slower than 1 thread, and the two react differently to DP-SGD. With ``--repeats`` above 1 the
configurations take turns and the best throughput of each is kept, so load from other
processes on a shared machine falls on all of them alike.

    python bench/bench_training.py [--data DIR] [--clips 1000] [--batch 64] [--steps 320]
                                   [--encoders cnn crnn] [--repeats 1] [--quick]

Targets: DP-SGD costs at most 2x the time of plain training; a training run stays under 1 GB RSS.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DEFAULT_DATA, Report, data_or_skip, load_average, load_note,  # noqa: E402
                     machine_line, md_table, peak_rss_mb)

RSS_TARGET_MB = 1000.0
DP_COST_TARGET = 2.0


def child(args) -> int:
    """Measure one configuration; print one JSON line."""
    import numpy as np
    import torch

    from fedser.common.cache import FeatureCache
    from fedser.tools.commands.args import default_cache_dir
    from fedser.common.corpora import load_corpus
    from fedser.common.data import build_task_data
    from fedser.common.features import FeatureSpec
    from fedser.common.models import ModelConfig, build_model, count_parameters
    from fedser.common.training import TrainConfig, train_task

    rss_imports = peak_rss_mb()
    if args.threads and args.threads[0]:
        torch.set_num_threads(args.threads[0])
    corpus = load_corpus(args.data / "speech_commands")
    utts = sorted((u for u in corpus.utterances if u.task == "kws"), key=lambda u: (u.path, u.offset))
    if len(utts) > args.clips:
        utts = [utts[i] for i in np.linspace(0, len(utts) - 1, args.clips).round().astype(int)]
    spec = FeatureSpec()
    cache = FeatureCache(None if args.cache == "none" else Path(args.cache or default_cache_dir() / "features"))
    data = build_task_data(utts, spec, "kws", cache, progress=False)
    rss_features = peak_rss_mb()
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=args.encoder, n_features=spec.n_features()))

    seen = [0]

    def count(_module, inputs):
        if model.training:
            seen[0] += int(inputs[0].shape[0])

    model.register_forward_pre_hook(count)
    steps_per_epoch = math.ceil(len(data) / args.batch)

    def run(steps: int) -> tuple[float, int, int]:
        epochs = max(1, round(steps / steps_per_epoch))
        cfg = TrainConfig(epochs=epochs, batch_size=args.batch, dp=args.dp,
                          noise_multiplier=args.noise_multiplier if args.dp else None, seed=0,
                          grad_sample_mode=args.mode)
        seen[0] = 0
        result = train_task(model, "kws", data, None, cfg, spec, progress=False)
        return result.seconds, seen[0], result.steps

    run(args.warmup_steps)
    load_before = load_average()
    seconds, samples, steps = run(args.steps)
    load_after = load_average()
    print(json.dumps({
        "encoder": args.encoder, "dp": args.dp, "mode": args.mode if args.dp else "-", "parameters": count_parameters(model), "clips": len(data),
        "steps": steps, "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
        "rss_imports_mb": rss_imports, "rss_features_mb": rss_features, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
        "load_before": load_before, "load_after": load_after,
    }))
    return 0


def measure(args, encoder: str, dp: bool, threads: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--encoder", encoder, "--data", str(args.data), "--mode", mode,
           "--clips", str(args.clips), "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup-steps", str(args.warmup_steps), "--noise-multiplier", str(args.noise_multiplier)]
    cmd += ["--dp"] if dp else []
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--cache", args.cache] if args.cache else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if not dp:
            raise SystemExit(f"{encoder} plain training failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        # One grad-sample mode may not support a layer; the others still get measured.
        print(f"{encoder} DP-SGD ({mode}) failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}",
              file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus root holding speech_commands/")
    p.add_argument("--clips", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=320, help="timed steps (rounded to whole epochs)")
    p.add_argument("--warmup-steps", type=int, default=32)
    p.add_argument("--encoders", nargs="+", default=["cnn", "crnn"])
    p.add_argument("--noise-multiplier", type=float, default=1.0, help="DP-SGD noise (does not change the cost)")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration; the best throughput is kept")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch thread counts to measure, 0 = torch's default (default: 0 1, or 0 on one CPU)")
    p.add_argument("--cache", default=None, help="feature cache folder, or 'none' (default: fedser's)")
    p.add_argument("--quick", action="store_true", help="300 clips, 64 timed steps")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--encoder", default="cnn", help=argparse.SUPPRESS)
    p.add_argument("--dp", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="hooks", help=argparse.SUPPRESS)
    p.add_argument("--modes", nargs="+", default=["hooks", "functorch", "ew"],
                   choices=("hooks", "functorch", "ew", "ghost"),
                   help="Opacus grad-sample modes to measure for DP-SGD")
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if not data_or_skip(args.data, "speech_commands"):
        return 0
    if args.quick:
        args.clips, args.steps, args.warmup_steps = min(args.clips, 300), min(args.steps, 64), min(args.warmup_steps, 10)

    default_threads = int(subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True, text=True,
        check=True).stdout)
    thread_counts = args.threads or ([0, 1] if default_threads > 1 else [0])
    thread_counts = list(dict.fromkeys(t or default_threads for t in thread_counts))
    # Key: (encoder, threads, training) where training is "plain" or an Opacus grad-sample mode.
    trainings = ["plain"] + list(dict.fromkeys(args.modes))
    configs = [(e, t, m) for e in args.encoders for t in thread_counts for m in trainings]
    best: dict[tuple[str, int, str], dict] = {}
    load_start = load_average()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        for key in configs:
            enc, threads, training = key
            dp = training != "plain"
            r = measure(args, enc, dp, threads, training if dp else "hooks")
            if r is None:
                continue
            print(f"  {enc} {threads} thread(s) {'DP-SGD ' + training if dp else 'plain'}: "
                  f"{r['samples_per_s']:.0f} samples/s, peak RSS {r['peak_rss_mb']:.0f} MiB, "
                  f"load {r['load_before']:.1f}/{r['load_after']:.1f}", file=sys.stderr, flush=True)
            old = best.get(key)
            peak = max(r["peak_rss_mb"], old["peak_rss_mb"]) if old else r["peak_rss_mb"]
            if old is None or r["samples_per_s"] > old["samples_per_s"]:
                best[key] = r
            best[key]["peak_rss_mb"] = peak
    wall = time.perf_counter() - t0
    load_end = load_average()

    rep = Report("bench_training_quick" if args.quick else "bench_training", "Training throughput and peak memory (plain vs Opacus DP-SGD)")
    any_r = next(iter(best.values()))
    if args.quick:
        rep.add("**Quick mode: fewer clips and steps; a pipeline check more than a measurement.**\n")
    rep.add(f"{any_r['clips']} Speech Commands clips (default FeatureSpec: 40 log-mel x 101 frames), batch "
            f"{args.batch}, Adam, no augmentation; ~{args.steps} timed steps after ~{args.warmup_steps} warm-up "
            f"steps; DP-SGD: Opacus, Poisson sampling, noise multiplier {args.noise_multiplier}, clip 1.0, "
            f"per-sample gradients by each grad-sample mode ({', '.join(trainings[1:])}); "
            f"best of {args.repeats} run(s), one fresh process per run.")
    rep.add(f"{machine_line()}; torch's default thread count {default_threads}; each configuration is measured "
            f"at {' and '.join(str(t) for t in thread_counts)} thread(s).")
    rep.add(f"{load_note(load_start, load_end)}.")
    rep.add("")
    rows = []
    for enc in args.encoders:
        for threads in thread_counts:
            plain = best[(enc, threads, "plain")]
            for training in trainings:
                r = best.get((enc, threads, training))
                if r is None:
                    rows.append([enc, threads, f"DP-SGD ({training})", "failed"] + [""] * 8)
                    continue
                cost = plain["samples_per_s"] / r["samples_per_s"]
                rows.append([enc, threads, "plain" if training == "plain" else f"DP-SGD ({training})", r["steps"],
                             r["samples"], f"{r['seconds']:.1f}", f"{r['samples_per_s']:,.0f}", f"{cost:.2f}x",
                             f"{r['rss_imports_mb']:.0f}", f"{r['rss_features_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                             f"{r['load_before']:.2f} / {r['load_after']:.2f}"])
    rep.add(md_table(["encoder", "threads", "training", "steps", "samples", "seconds", "samples/s",
                      "time vs plain", "RSS after imports (MiB)", "after features", "peak RSS (MiB)",
                      "load avg before / after"], rows, ["l", "r", "l"] + ["r"] * 9))
    rep.add("")
    rep.add("RSS columns are the process's peak so far (`ru_maxrss`) after importing torch/Opacus/fedser, after "
            "computing the features, and at the end of training. Parameters: "
            + ", ".join(f"{e} {best[(e, thread_counts[0], 'plain')]['parameters']:,}" for e in args.encoders) + ".")
    rep.add("")
    for enc in args.encoders:
        for threads in thread_counts:
            plain = best[(enc, threads, "plain")]
            for training in trainings[1:]:
                dp = best.get((enc, threads, training))
                if dp is None:
                    rep.add(f"- {enc}, {threads} thread(s), {training}: failed (see the bench's stderr).")
                    continue
                cost = plain["samples_per_s"] / dp["samples_per_s"]
                rss = max(plain["peak_rss_mb"], dp["peak_rss_mb"])
                rep.add(f"- {enc}, {threads} thread(s), {training}: DP-SGD costs {cost:.2f}x plain training (target <= "
                        f"{DP_COST_TARGET:.0f}x: {'met' if cost <= DP_COST_TARGET else 'MISSED'}); peak RSS {rss:.0f} MiB "
                        f"(target < {RSS_TARGET_MB:.0f} MB: {'met' if rss * 1.048576 < RSS_TARGET_MB else 'MISSED'}).")
    rep.add(f"\nWall time of this bench: {wall:.0f} s.")
    rep.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
