"""``fedser evaluate``: metrics of a run's model bundle on any corpus."""
from __future__ import annotations

import json
import sys

from fedser.common.bundle import load_bundle
from fedser.common.data import HEAD_CLASSES, build_task_data, report_skipped
from fedser.common.errors import ConfigError
from fedser.common.training import evaluate_task
from .args import add_data_arguments, cache_from_args, load_data

HELP = "evaluate a run's model (centralized or federated) on a corpus"


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or model bundle file)")
    add_data_arguments(p)
    p.add_argument("--task", choices=("kws", "emotion"), default=None,
                   help="head to evaluate (default: the one task the model and the data share)")
    p.add_argument("--include-train-speakers", action="store_true",
                   help="also score speakers the model was trained on (excluded by default)")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def log(msg: str) -> None:
    print(msg, file=sys.stderr)


def evaluate_bundle(bundle, corpus, task: str, cache, include_train_speakers=False, progress=True) -> dict:
    """Evaluate ``bundle``'s ``task`` head over the classes it and ``corpus`` share."""
    classes = HEAD_CLASSES[task]
    utts = [u for u in corpus.utterances if u.task == task]
    notes = []
    seen = set(bundle.meta.get("train_speakers") or [])
    if seen and not include_train_speakers:
        kept = [u for u in utts if u.speaker not in seen]
        if len(kept) < len(utts):
            notes.append(f"excluded {len(utts) - len(kept)} utterances of speakers seen in training")
        utts = kept
    trained = list(bundle.labels.get(task) or [])
    data_labels = sorted({u.label for u in utts}, key=classes.index)
    shared = [c for c in data_labels if c in trained]
    if not shared:
        raise ConfigError(f"the model's {task} classes {trained} and the data's {data_labels} have none in common")
    if set(shared) != set(data_labels) or set(shared) != set(trained):
        notes.append(f"label sets differ: evaluating over the {len(shared)} shared classes {shared} "
                     f"(model: {len(trained)}, data: {len(data_labels)})")
    utts = [u for u in utts if u.label in shared]
    data = build_task_data(utts, bundle.feature_spec, task, cache, progress=progress, desc="features (eval)")
    if len(data) == 0:
        raise ConfigError("no usable utterances to evaluate" + (f" ({report_skipped(data.skipped)})"
                                                               if data.skipped else ""))
    model = bundle.build_model()
    report = evaluate_task(model, data, [classes.index(c) for c in shared])
    skipped = list(corpus.skipped) + data.skipped
    report.update(task=task, label_set=shared, label_set_note="; ".join(notes) or None,
                  skipped=[{"path": p, "reason": r} for p, r in skipped], speakers=len(set(data.speakers)))
    return report


def run(args) -> int:
    bundle = load_bundle(args.run_dir)
    corpus = load_data(args.data)
    task = args.task
    if task is None:
        common = [t for t in bundle.tasks if t in corpus.tasks()]
        if len(common) != 1:
            raise ConfigError(f"model heads {bundle.tasks}, data tasks {sorted(corpus.tasks())}: "
                              "pass --task kws or --task emotion")
        task = common[0]
    if task not in bundle.tasks:
        raise ConfigError(f"the model was not trained for {task} (its heads: {bundle.tasks})")
    report = evaluate_bundle(bundle, corpus, task, cache_from_args(args), args.include_train_speakers,
                             progress=not args.quiet)
    if report["label_set_note"]:
        log(report["label_set_note"])
    if report["skipped"]:
        log(report_skipped([(s["path"], s["reason"]) for s in report["skipped"]]))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{task}: n={report['n']} accuracy={report['accuracy']:.3f} UAR={report['uar']:.3f} "
              f"weighted F1={report['weighted_f1']:.3f}")
        for c, r in report["per_class_recall"].items():
            print(f"  {c:>12s}  recall {r:.3f}")
    return 0
