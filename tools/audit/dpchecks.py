"""Empirical checks of the DP machinery, each computed independently of the code it checks.

* :func:`check_clipping`: every sent update's clipped part has norm <= C. Without noise the sent
  norm itself is compared with C; with noise, ``||sent||^2 - n s^2`` is an unbiased estimate of
  the clipped norm squared, tested one-sided against C^2 (and the sent norm against the server's
  bound ``max_expected_norm``).
* :func:`check_noise`: the noise (sent minus the independently re-clipped local update) has
  standard deviation z*C ("local") or z*C/sqrt(m) ("distributed"): a chi-square test of the
  variance and a Kolmogorov-Smirnov test of normality.
* :func:`check_ledger`: a device ledger is intact (its SHA-256 matches its entries) and its
  epsilon, replayed step by step into a fresh Opacus ``RDPAccountant`` (and PRV where it
  applies), matches the epsilon the device reported.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fedser.common.privacy import exceeds_bound, max_expected_norm
from .inputs import AuditInputError

ALPHA = 1e-3        # a check fails when its test rejects at this level
Z_CLIP = 4.75       # one-sided z bound of the clipping estimate (p ~ 1e-6)
KS_SAMPLE = 50_000  # noise values the KS test looks at


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str
    values: dict = field(default_factory=dict)


def expected_std(clip_norm: float, noise_multiplier: float, mode: str, expected_clients: int) -> float:
    """What the settings promise, written out from DESIGN.md (not via ``update_noise_std``)."""
    if mode == "none" or noise_multiplier == 0:
        return 0.0
    if mode == "local":
        return noise_multiplier * clip_norm
    if mode == "distributed":
        return noise_multiplier * clip_norm / math.sqrt(expected_clients)
    raise AuditInputError(f"noise mode {mode!r} must be local, distributed or none")


def _flat(arrays: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in keys])


def check_clipping(pairs: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]], clip_norm: float,
                   noise_multiplier: float, mode: str, expected_clients: int) -> CheckResult:
    """``pairs`` = (local update before privatization, sent update); only the sent one is needed."""
    if not pairs:
        raise AuditInputError("check_clipping: no updates to check")
    s = expected_std(clip_norm, noise_multiplier, mode, expected_clients)
    c = float(clip_norm)
    worst_z, worst_norm, over = -math.inf, 0.0, 0
    for _, sent in pairs:
        v = _flat(sent, list(sent))
        norm = float(np.linalg.norm(v))
        worst_norm = max(worst_norm, norm)
        if s == 0.0:
            over += exceeds_bound(norm, c)
            continue
        n = v.size
        est = norm ** 2 - n * s * s
        z = (est - c * c) / math.sqrt(2 * n * s ** 4 + 4 * s * s * c * c)
        worst_z = max(worst_z, z)
        bound = max_expected_norm(c, noise_multiplier, mode, expected_clients, n)
        over += (z > Z_CLIP) or exceeds_bound(norm, bound)
    if s == 0.0:
        detail = f"{len(pairs)} updates, largest norm {worst_norm:.4g} (C = {c:g})"
    else:
        detail = (f"{len(pairs)} noised updates; largest z of the clipped-norm estimate {worst_z:.2f} "
                  f"(fails above {Z_CLIP}); C = {c:g}, noise std {s:.4g}")
    return CheckResult("sent update norm <= C", over == 0, detail + (f"; {over} over the bound" if over else ""),
                       {"updates": len(pairs), "over": over, "largest_norm": worst_norm,
                        "largest_z": worst_z if s else None})


def noise_residuals(pairs, clip_norm: float) -> np.ndarray:
    """Sent minus the re-clipped local update (float64), all updates concatenated."""
    out = []
    for local, sent in pairs:
        keys = list(local)
        d = _flat(local, keys)
        norm = float(np.linalg.norm(d))
        scale = 1.0 if norm <= clip_norm else clip_norm / norm
        out.append(_flat(sent, keys) - d * scale)
    return np.concatenate(out) if out else np.zeros(0)


def check_noise_std(residuals: np.ndarray, expected: float, alpha: float = ALPHA, seed: int = 0) -> CheckResult:
    """Chi-square test that ``residuals`` ~ N(0, expected^2) has that variance, KS test of its shape."""
    from scipy import stats

    r = np.asarray(residuals, dtype=np.float64).ravel()
    if r.size < 100:
        raise AuditInputError(f"check_noise_std: {r.size} noise values are too few for a test (need >= 100)")
    measured = float(np.sqrt(np.mean(r * r)))
    if expected == 0.0:
        # Only float32 rounding of the sent update may remain.
        ok = measured <= 1e-6 * max(1.0, float(np.abs(r).max()))
        return CheckResult("noise std", ok, f"no noise expected; residual rms {measured:.3g}",
                           {"expected": 0.0, "measured": measured})
    stat = float(np.sum(r * r) / expected ** 2)
    n = r.size
    p_chi = float(2 * min(stats.chi2.cdf(stat, n), stats.chi2.sf(stat, n)))
    rng = np.random.default_rng(seed)
    sample = r if n <= KS_SAMPLE else rng.choice(r, KS_SAMPLE, replace=False)
    p_ks = float(stats.kstest(sample / expected, "norm").pvalue)
    ok = p_chi >= alpha and p_ks >= alpha
    return CheckResult("noise std", ok,
                       f"measured {measured:.5g} vs expected {expected:.5g} (ratio {measured / expected:.4f}) over "
                       f"{n:,} values; chi-square p={p_chi:.3g}, KS p={p_ks:.3g} (fail below {alpha:g})",
                       {"expected": expected, "measured": measured, "p_chi2": p_chi, "p_ks": p_ks, "n": n})


def check_noise(pairs, clip_norm: float, noise_multiplier: float, mode: str, expected_clients: int,
                alpha: float = ALPHA) -> CheckResult:
    """The noise of ``pairs`` (local update, sent update) against what the settings promise."""
    return check_noise_std(noise_residuals(pairs, clip_norm),
                           expected_std(clip_norm, noise_multiplier, mode, expected_clients), alpha)


# ----------------------------------------------------------------------------- ledgers


def _ledger_entries(path: Path) -> tuple[list[dict], bool]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuditInputError(f"ledger {path}: unreadable ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != "fedser-privacy-ledger":
        raise AuditInputError(f"{path} is not a fedser privacy ledger")
    entries = state.get("entries")
    if not isinstance(entries, list):
        raise AuditInputError(f"ledger {path}: 'entries' is missing or not a list")
    canonical = json.dumps(entries, sort_keys=True, separators=(",", ":"), allow_nan=False)
    intact = state.get("sha256") == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return entries, intact


def recompute_epsilon(entries: Sequence[Mapping], delta: float, prv: bool = True) -> tuple[float, float | None]:
    """(RDP epsilon replayed one step at a time into a fresh accountant, PRV epsilon or None)."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    rdp = RDPAccountant()
    merged: dict[tuple[float, float], int] = {}
    for e in entries:
        z, q, steps = float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])
        if steps and z == 0.0:
            return math.inf, math.inf
        for _ in range(steps):
            rdp.step(noise_multiplier=z, sample_rate=q)
        if steps:
            merged[(z, q)] = merged.get((z, q), 0) + steps
    if not merged:
        return 0.0, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps_rdp = float(rdp.get_epsilon(delta))
        eps_prv: float | None = None
        try:
            if prv:
                acc = PRVAccountant()
                acc.history = [(z, q, n) for (z, q), n in merged.items()]
                eps_prv = float(acc.get_epsilon(delta, eps_error=0.05))
        except (ValueError, RuntimeError, OverflowError, MemoryError):
            eps_prv = None  # PRV's discretisation does not cover every (z, q, steps)
    return eps_rdp, eps_prv


def check_ledger(path: str | Path, delta: float, reported_epsilon: float | None = None,
                 rtol: float = 1e-3, prv: bool = True) -> CheckResult:
    """A ledger's integrity and its epsilon recomputed from its (z, q, steps) history.

    Fails when the checksum does not match the entries, when the recomputed RDP epsilon differs
    from ``reported_epsilon`` by more than ``rtol``, or when PRV (a tighter accountant) exceeds RDP.
    """
    path = Path(path)
    entries, intact = _ledger_entries(path)
    try:
        eps_rdp, eps_prv = recompute_epsilon(entries, delta, prv)
    except (KeyError, TypeError, ValueError) as exc:
        raise AuditInputError(f"ledger {path}: malformed entry ({exc})") from exc
    problems = [] if intact else ["checksum mismatch: the entries were altered after they were written"]
    if reported_epsilon is not None and not math.isclose(eps_rdp, reported_epsilon, rel_tol=rtol, abs_tol=1e-9):
        problems.append(f"recomputed epsilon {eps_rdp:.4f} != reported {reported_epsilon:.4f}")
    if eps_prv is not None and eps_prv > eps_rdp + 0.1:  # PRV upper bound carries eps_error
        problems.append(f"PRV epsilon {eps_prv:.4f} exceeds the RDP bound {eps_rdp:.4f}")
    prv_txt = f"{eps_prv:.4f}" if eps_prv is not None else "n/a"
    detail = (f"{path.name} ({path.parent.name}): {len(entries)} entries, recomputed epsilon RDP {eps_rdp:.4f}, "
              f"PRV {prv_txt} at delta {delta:g}"
              + (f"; reported {reported_epsilon:.4f}" if reported_epsilon is not None else ""))
    if problems:
        detail += "; " + "; ".join(problems)
    return CheckResult("ledger epsilon", not problems, detail,
                       {"entries": len(entries), "intact": intact, "epsilon_rdp": eps_rdp, "epsilon_prv": eps_prv,
                        "reported": reported_epsilon})
