"""``fedser train``: the centralized baseline on a speaker-independent split."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fedser.common.augment import Augmenter
from fedser.common.bundle import Bundle, save_bundle
from fedser.common.data import HEAD_CLASSES, build_task_data, report_skipped
from fedser.common.errors import ConfigError
from fedser.common.features import KINDS, FeatureSpec, spec_for
from fedser.common.models import ENCODERS, ModelConfig, build_model, count_parameters
from fedser.server.plots import confusion_png, curves_png
from fedser.common.splits import speaker_split
from fedser.common.training import GRAD_SAMPLE_MODES, TrainConfig, evaluate_task, train_task
from .args import add_data_arguments, cache_from_args, load_data, noise_dirs

HELP = "train one head centrally on a speaker-independent split (the baseline)"


# Defaults measured on the development corpus (bench/bench_baselines.py): DP-SGD at batch 64 lost
# 44 accuracy points on keyword spotting; batch 256 at a higher learning rate kept 12 more.
PLAIN_BATCH, PLAIN_LR, PLAIN_EPOCHS = 64, 3e-3, 60
# At a fixed epsilon DP-SGD gains from more, noisier steps: 120 epochs gave KWS accuracy 0.926 and
# RAVDESS UAR 0.523 against 0.913 and 0.508 at 60 (three seeds; bench/bench_encoders.py).
DP_BATCH, DP_LR, DP_EPOCHS = 256, 1e-2, 120


def add_arguments(p) -> None:
    p.add_argument("--task", choices=("kws", "emotion"), required=True)
    add_data_arguments(p)
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write")
    p.add_argument("--features", default=",".join(FeatureSpec().kinds), metavar="KIND[,KIND...]",
                   help=f"feature kinds, stacked (default: the frozen public encoders; from scratch: logmel; "
                        f"known: {', '.join(KINDS)})")
    p.add_argument("--encoder", choices=sorted(ENCODERS), default=ModelConfig.encoder,
                   help="the trained model over the features (default: tcn, a small head for the frozen "
                        "encoders; cnn / crnn train from scratch on logmel)")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier (1.0, 0.5, 0.25)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"at most this many epochs (cosine learning-rate schedule over them; default {PLAIN_EPOCHS}, "
                        f"{DP_EPOCHS} with --dp, whose noise is calibrated to them)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"default {PLAIN_BATCH} ({DP_BATCH} with --dp: DP-SGD's noise on the mean gradient is z*C/B, "
                        "so it needs larger batches)")
    p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {PLAIN_LR:g}; {DP_LR:g} with --dp)")
    p.add_argument("--patience", type=int, default=15, help="early-stopping patience in epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val", type=float, default=0.15, help="share of speakers for validation")
    p.add_argument("--test", type=float, default=0.2, help="share of speakers for test")
    p.add_argument("--no-augment", action="store_true", help="disable SpecAugment, time shift and noise mixing")
    p.add_argument("--dp", action="store_true", help="train with Opacus DP-SGD")
    p.add_argument("--target-epsilon", type=float, default=None, help="with --dp: budget for the whole run")
    p.add_argument("--noise-multiplier", type=float, default=None, help="with --dp: instead of --target-epsilon")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--grad-sample-mode", choices=GRAD_SAMPLE_MODES, default=TrainConfig.grad_sample_mode,
                   help="with --dp: how Opacus clips each example's gradient (same result, different speed; "
                        "ghost: from gradient norms, with a second backward pass; auto: the encoder's fastest)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def training_defaults(args) -> tuple[int, int, float]:
    """(epochs, batch size, learning rate): those given, else plain training's or DP-SGD's defaults."""
    dp = bool(args.dp)
    return (args.epochs if args.epochs is not None else (DP_EPOCHS if dp else PLAIN_EPOCHS),
            args.batch_size if args.batch_size is not None else (DP_BATCH if dp else PLAIN_BATCH),
            args.lr if args.lr is not None else (DP_LR if dp else PLAIN_LR))


def log(msg: str) -> None:
    print(msg, file=sys.stderr)


def metrics_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown table of the headline metrics, one row per (name, report)."""
    lines = ["| run | n | accuracy | UAR | weighted F1 | epsilon |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        eps = r.get("epsilon")
        lines.append(f"| {name} | {r['n']} | {r['accuracy']:.3f} | {r['uar']:.3f} | {r['weighted_f1']:.3f} | "
                     f"{'—' if eps is None else f'{eps:.2f}'} |")
    return "\n".join(lines)


def run(args) -> int:
    if args.dp and args.target_epsilon is None and args.noise_multiplier is None:
        raise ConfigError("--dp needs --target-epsilon E (or --noise-multiplier Z)")
    if not args.dp and (args.target_epsilon is not None or args.noise_multiplier is not None):
        raise ConfigError("--target-epsilon / --noise-multiplier only make sense with --dp")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.lr is not None and not args.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    spec = spec_for(args.features)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    corpus = load_data(args.data)
    utts = [u for u in corpus.utterances if u.task == args.task]
    if not utts:
        raise ConfigError(f"the data has no {args.task} utterances (tasks found: "
                          f"{', '.join(sorted(corpus.tasks())) or 'none'})")
    train_u, val_u, test_u = speaker_split(utts, val=args.val, test=args.test, seed=args.seed)
    log(f"speaker-independent split: train {len(train_u)} / val {len(val_u)} / test {len(test_u)} utterances "
        f"({len({u.speaker for u in train_u})} / {len({u.speaker for u in val_u})} / "
        f"{len({u.speaker for u in test_u})} speakers)")
    cache = cache_from_args(args)
    augmenter = None
    if not args.no_augment:
        noise = noise_dirs(args.data) if args.task == "kws" else []
        augmenter = Augmenter(spec, noise_dir=str(noise[0]) if noise else None, seed=args.seed)
        if noise:
            log(f"noise mixing from {noise[0]}")
    train = build_task_data(train_u, spec, args.task, cache, keep_waves=augmenter is not None, progress=progress,
                            desc="features (train)")
    val = build_task_data(val_u, spec, args.task, cache, progress=progress, desc="features (val)")
    test = build_task_data(test_u, spec, args.task, cache, progress=progress, desc="features (test)")
    skipped = corpus.skipped + train.skipped + val.skipped + test.skipped
    if skipped:
        log(report_skipped(skipped))
    if len(train) == 0:
        raise ConfigError("no usable training examples after skipping bad files")

    torch.manual_seed(args.seed)
    mcfg = ModelConfig(encoder=args.encoder, n_features=spec.n_features(), width=args.width)
    model = build_model(mcfg)
    epochs, batch_size, lr = training_defaults(args)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=args.patience,
                       seed=args.seed, dp=args.dp, noise_multiplier=args.noise_multiplier,
                       target_epsilon=args.target_epsilon, delta=args.delta, max_grad_norm=args.max_grad_norm,
                       grad_sample_mode=args.grad_sample_mode)
    train_labels = train.labels_present()
    meta = {"task": args.task, "corpus": [{"path": str(Path(p).resolve()), "layout": None} for p in args.data],
            "train_speakers": sorted(set(train.speakers)), "model_version": 1, "kws_head_version": 0,
            "privacy": None, "mode": "centralized"}

    def checkpoint(m, row) -> None:  # best-so-far bundle, so an interrupted run still leaves a model
        save_bundle(Bundle.from_model(m, mcfg, spec, {args.task: train_labels}, {**meta, "epoch": row["epoch"]}), out)

    log(f"model: {args.encoder} encoder, {count_parameters(model)} parameters"
        + (f"; DP-SGD target epsilon {args.target_epsilon}, delta {args.delta}" if args.dp else ""))
    t0 = time.perf_counter()
    result = train_task(model, args.task, train, val, tcfg, spec, augmenter, progress=progress, on_improve=checkpoint)
    classes = HEAD_CLASSES[args.task]
    allowed = [classes.index(c) for c in train_labels]
    report = evaluate_task(model, test, allowed) if len(test) else None
    privacy = None
    if args.dp:
        privacy = {"level": "sample", "epsilon": result.epsilon, "delta": args.delta,
                   "noise_multiplier": result.noise_multiplier, "max_grad_norm": args.max_grad_norm,
                   "steps": result.steps, "accountant": "rdp (opacus)"}
    meta.update(privacy=privacy, best_epoch=result.best_epoch)
    save_bundle(Bundle.from_model(model, mcfg, spec, {args.task: train_labels}, meta), out)
    metrics = {
        "task": args.task, "mode": "centralized", "encoder": args.encoder, "parameters": count_parameters(model),
        "feature_spec": spec.to_dict(), "train_config": asdict(tcfg),
        "split": {"train": len(train), "val": len(val), "test": len(test),
                  "train_speakers": len(set(train.speakers)), "test_speakers": len(set(test.speakers))},
        "history": result.history, "best_epoch": result.best_epoch, "seconds": time.perf_counter() - t0,
        "test": report, "privacy": privacy, "skipped": [{"path": p, "reason": r} for p, r in skipped],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    curves_png(result.history, "epoch", [("loss", ["train_loss"]), ("validation", ["val_accuracy", "val_uar"]),
                                         ("epsilon", ["epsilon"])], out / "learning_curve.png",
               title=f"{args.task} ({args.encoder})")
    if report:
        confusion_png(report["confusion"], report["labels"], out / "confusion.png",
                      title=f"{args.task} test, UAR {report['uar']:.3f}")
        print(metrics_table([(f"{args.task} test" + (" (DP)" if args.dp else ""),
                              {**report, "epsilon": result.epsilon})]))
    log(f"wrote {out}/model.fedser, metrics.json, learning_curve.png" + (", confusion.png" if report else ""))
    return 0
