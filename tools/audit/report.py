"""The audit report: a markdown table of attack x setting, DP checks, accounted epsilons, ROC PNGs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fedser.server.plots import _pyplot, save_figure
from .attacks import LOW_FPR, RocSummary
from .dpchecks import CheckResult

REPORT_FILE = "audit.md"
JSON_FILE = "audit.json"
# audit.json names each privacy setting by a key; "defaults" repeats the rows of the setting that
# fedser's default run settings give.
SETTING_KEYS = {"no DP": "no-dp", "sample-level DP": "sample-level", "user-level DP": "user-level", "both": "both"}
DEFAULTS_KEY = "defaults"


@dataclass
class Row:
    """One line of the attack table; the ``*_key`` fields and ``luck_band`` are its audit.json row.

    ``chance`` is what the table shows: a measured luck band where there is one, else the
    guessing rate. ``luck_band`` is the measured band only (None where none was measured).
    """
    attack: str
    setting: str
    metric: str
    value: float
    chance: float
    note: str = ""
    attack_key: str = ""
    setting_key: str = ""
    metric_key: str = ""
    luck_band: float | None = None


def json_rows(rows: Sequence[Row], defaults_setting: str) -> list[dict]:
    """audit.json: ``{"setting", "attack", "metric", "value", "luck_band", "detail"}`` per row, and the
    rows of ``defaults_setting`` (a ``SETTING_KEYS`` value) once more as setting ``"defaults"``."""
    out = []
    for r in rows:
        entry = {"setting": r.setting_key, "attack": r.attack_key, "metric": r.metric_key, "value": float(r.value),
                 "luck_band": None if r.luck_band is None else float(r.luck_band),
                 "detail": f"{r.attack}; {r.setting}; {r.metric}"}
        out.append(entry)
        if r.setting_key == defaults_setting:
            out.append({**entry, "setting": DEFAULTS_KEY})
    return out


def roc_png(curves: Sequence[tuple[str, RocSummary]], path: str | Path, title: str) -> Path:
    """ROC curves on linear and log-FPR axes (the low-FPR region is where membership attacks matter)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, log in zip(axes, (False, True)):
        for label, roc in curves:
            ax.plot(roc.fpr, roc.tpr, label=f"{label} (AUC {roc.auc:.3f})")
        grid = [1e-3, 1.0] if log else [0.0, 1.0]
        ax.plot(grid, grid, "k:", lw=1, label="chance")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(1e-3, 1)
            ax.set_ylim(1e-3, 1)
            ax.axvline(LOW_FPR, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    return save_figure(fig, path, title)


def _eps(v: float | None) -> str:
    if v is None:
        return "—"
    return "inf (no guarantee)" if math.isinf(v) else f"{v:.3g}"


def render(title: str, run_line: str, rows: Sequence[Row], checks: Sequence[tuple[str, CheckResult]],
           epsilons: dict[str, dict[str, float]], images: Sequence[str], notes: Sequence[str]) -> str:
    lines = [f"# {title}", "", run_line, "",
             "## Attacks", "",
             "Each row is one attack on one privacy setting. *Chance* is what an attacker who "
             "guesses achieves; where a band was measured, what guessing reaches by luck 95 % of the time "
             "on as many clients or examples. An attack at or below chance learns nothing; one clearly "
             "above it leaks.", "",
             "| attack | setting | metric | value | chance |", "|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.attack} | {r.setting} | {r.metric} | {r.value:.3f} | {r.chance:.2f} |"
                     + (f" {r.note}" if r.note else ""))
    if epsilons:
        lines += ["", "## Accounted epsilons of each setting", "",
                  "From Opacus accountants (sample-level: a device's DP-SGD over the run's rounds; "
                  "user-level: the server's accountant over the run's rounds and client sampling).", "",
                  "| setting | sample-level epsilon | user-level epsilon |", "|---|---:|---:|"]
        for name, e in epsilons.items():
            lines.append(f"| {name} | {_eps(e.get('sample'))} | {_eps(e.get('user'))} |")
    if checks:
        lines += ["", "## Checks of the DP machinery", "", "| check | setting | result | detail |", "|---|---|---|---|"]
        for setting, c in checks:
            lines.append(f"| {c.name} | {setting} | {'pass' if c.passed else '**FAIL**'} | {c.detail} |")
    if images:
        lines += ["", "## ROC curves", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in images]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
