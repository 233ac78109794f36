"""``fedser audit``: attack a federated run and check its DP machinery; writes a markdown report.

    fedser audit RUN_DIR --data PATH [--data PATH ...] --out DIR [--gender-csv FILE]

Attribute (gender) inference from updates under four settings (no DP, sample-level DP,
user-level DP, both), membership inference on the run's final model, and checks of clipping,
noise and the device ledgers. See ``fedser.tools.audit``.
"""
from __future__ import annotations

from pathlib import Path

from .args import cache_from_args

HELP = "privacy audit of a federated run: attribute and membership inference, checks of clipping, noise, ledgers"

_SHORT = {"none": "no DP", "sample": "sample-level DP", "user": "user-level DP", "both": "both"}


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory of fedser-server start or fedser demo")
    p.add_argument("--data", action="append", default=[], metavar="PATH",
                   help="corpus with speakers of known gender for attribute inference (RAVDESS, EmoDB, or any "
                        "corpus with --gender-csv); repeatable")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for audit.md and the ROC plots")
    p.add_argument("--gender-csv", default=None, metavar="FILE", help="CSV 'speaker,gender' (m/f) for other corpora")
    p.add_argument("--settings", default="none,sample,user,both",
                   help="privacy settings to attack updates under: none, sample, user, both (comma-separated)")
    p.add_argument("--updates-per-speaker", type=int, default=4)
    p.add_argument("--reference-models", type=int, default=4, help="reference federations of the calibrated "
                   "membership attack: the run's protocol without DP, from the run's starting model "
                   "(0: loss attack only)")
    p.add_argument("--chance-permutations", type=int, default=0, metavar="N",
                   help="measure the attribute attack's chance band over N label shufflings (0: report 0.5)")
    p.add_argument("--max-epsilon", type=float, default=8.0,
                   help="device sample-level budget the simulated devices calibrate DP-SGD noise to")
    p.add_argument("--members", action="append", default=[], metavar="CSV",
                   help="manifests of the run's training data (default RUN_DIR/devices/device-*/data.csv)")
    p.add_argument("--non-members", action="append", default=[], metavar="CSV",
                   help="manifests of data the run never saw (default RUN_DIR/devices/test.csv)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, metavar="DIR", help="feature cache folder ('none' disables it)")
    p.add_argument("--quiet", action="store_true")


def parse_settings(text: str) -> list[str]:
    from fedser.tools.audit.inputs import AuditInputError

    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in _SHORT]
    if not names or bad:
        raise AuditInputError(f"--settings {text!r}: use none, sample, user, both (comma-separated)")
    return [_SHORT[n] for n in names]


def run(args) -> int:
    from fedser.tools.audit.runner import AuditOptions, run_audit

    opts = AuditOptions(settings=parse_settings(args.settings), updates_per_speaker=args.updates_per_speaker,
                        reference_models=args.reference_models,
                        chance_permutations=args.chance_permutations,
                        max_epsilon=args.max_epsilon, gender_csv=args.gender_csv, members=args.members,
                        non_members=args.non_members, seed=args.seed, cache=cache_from_args(args),
                        progress=not args.quiet)
    result = run_audit(args.run_dir, args.data, args.out, opts, log=(lambda s: None) if args.quiet else print)
    print(result.report.read_text())
    print(f"audit report: {Path(result.report)}")
    if not result.checks_passed:
        print("fedser audit: at least one DP check FAILED (see the report)")
        return 1
    return 0
