"""Per-round run reports: metrics.csv, metrics.json and PNG plots in the run directory."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .plots import curves_png


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def write_metrics(run_dir: str | Path, rows: list[dict], summary: dict) -> None:
    run_dir = Path(run_dir)
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: _clean(r.get(k)) for k in columns})
    doc = {"summary": {k: _clean(v) for k, v in summary.items()}, "rounds": [
        {k: _clean(v) for k, v in r.items()} for r in rows]}
    (run_dir / "metrics.json").write_text(json.dumps(doc, indent=2, default=str))


def write_plots(run_dir: str | Path, rows: list[dict]) -> list[Path]:
    run_dir = Path(run_dir)
    finite = [{k: v for k, v in r.items() if not (isinstance(v, float) and not math.isfinite(v))} for r in rows]
    return [
        curves_png(finite, "round", [
            ("accuracy", ["server-kws-accuracy", "server-emotion-accuracy", "kws-accuracy", "emotion-accuracy"]),
            ("UAR", ["server-kws-uar", "server-emotion-uar", "kws-uar", "emotion-uar"]),
            ("train loss", ["train-loss"]),
        ], run_dir / "accuracy.png", title="global model per round (server-side and federated evaluation)"),
        curves_png(finite, "round", [
            ("epsilon", ["user-epsilon", "max-device-epsilon"]),
            ("bytes", ["bytes-sent", "bytes-received"]),
            ("clients", ["clients-used", "clients-rejected", "clients-declined", "clients-failed"]),
        ], run_dir / "privacy_and_traffic.png", title="privacy spent, traffic and participation per round"),
    ]
