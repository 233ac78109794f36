"""The user-level noise multiplier one heterogeneous aggregation actually carries.

Each element x of the new model is the weighted mean over its contributors C(x) of
``delta_i + noise_i`` (weights n_i, noise std s_i per element). Treating sample counts
as public metadata (they are sent in the clear) and one user replacing another as the
neighbouring relation, user j's influence on the released vector, measured in units of
the noise, is at most ``n_j * C / min_{x in cover(j)} sqrt(V(x))`` with
``V(x) = sum_{i in C(x)} n_i^2 s_i^2``. The round's effective noise multiplier is the
smallest ratio ``sqrt(V) / (n_j C)`` over all users j — what the accountant must use.

Nested slices make the minimum cheap: the least-covered elements of j's slice are those
only clients at least as wide as j train, so ``V_min(j)`` is a sum over clients with
``width_i >= width_j`` sharing the parameter group (encoder, or a head j trained).

Sanity: m equal clients at one width, distributed noise z*C/sqrt(m) -> z; local noise
z*C -> z*sqrt(m) (local mode protects each update on its own, and more so the sum).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Contribution:
    weight: float        # n_i, the client's sample count
    width: float         # tier
    heads: frozenset     # heads trained
    noise_std: float     # s_i, per-element std of the client's added noise


def round_noise_multiplier(contributions: list[Contribution], clip_norm: float) -> float:
    """Effective user-level z of one aggregation (0 when any user is not covered by noise)."""
    if not contributions:
        return math.inf  # nothing released from users this round
    worst = math.inf
    for j in contributions:
        groups = [None] + sorted(j.heads)  # None = the shared encoder
        v_min = math.inf
        for g in groups:
            v = sum(i.weight ** 2 * i.noise_std ** 2 for i in contributions
                    if i.width >= j.width and (g is None or g in i.heads))
            v_min = min(v_min, v)
        worst = min(worst, math.sqrt(v_min) / (j.weight * clip_norm))
    return worst
