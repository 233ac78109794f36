"""``fedser demo``: the main job on an embedded default corpus.

Synthesizes the demo corpus (espeak-ng) unless ``--data`` is given, trains the KWS and
emotion heads centrally on speaker-independent splits, prints the metrics table and
writes the plots.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .train import metrics_table

HELP = "run the main job end to end on the synthesized demo corpus (or --data)"


def add_arguments(p) -> None:
    p.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="corpus folder or manifest (default: synthesize the demo corpus)")
    p.add_argument("--out", default="runs/demo", metavar="RUN_DIR")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--encoder", default="cnn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    import json

    from .. import synth
    from . import train

    out = Path(args.out)
    data = args.data
    if not data:
        corpus_dir = out / "corpus"
        if not synth.is_complete(corpus_dir):
            print(f"synthesizing the demo corpus into {corpus_dir} ...", file=sys.stderr)
            synth.synthesize_corpus(corpus_dir, seed=args.seed, progress=not args.quiet, overwrite=True)
        data = [str(corpus_dir / "commands"), str(corpus_dir / "emotion")]
    rows = []
    for task in ("kws", "emotion"):
        run_dir = out / task
        targs = argparse.Namespace(
            task=task, data=data, cache=None, out=str(run_dir), encoder=args.encoder, width=1.0,
            epochs=args.epochs, batch_size=32, lr=3e-3, patience=6, seed=args.seed, val=0.15, test=0.2,
            no_augment=False, dp=False, target_epsilon=None, noise_multiplier=None, delta=1e-5,
            max_grad_norm=1.0, quiet=args.quiet)
        print(f"\n== {task}: centralized training ==", file=sys.stderr)
        train.run(targs)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if metrics["test"]:
            rows.append((task, metrics["test"]))
    print("\n" + metrics_table(rows))
    print(f"\nplots: {out}/*/confusion.png, {out}/*/learning_curve.png")
    return 0
