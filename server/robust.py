"""A robust aggregation rule: the coordinate-wise trimmed mean (Yin et al., 2018).

For every global element, the updates that trained it (its width tier covers it, and it trained
the head the element belongs to, as in :mod:`fedser.server.aggregation`) are sorted, the
``trim`` share of the largest and of the smallest values is dropped, and the rest is averaged,
unweighted. With ``trim = 0.2`` up to a fifth of the devices on each side can send anything,
flipped or scaled without bound, and the element still moves by what the others sent.

It ignores the example counts devices claim, so a weight lie has no effect at all, and it costs
some efficiency on honest, non-IID cohorts (it averages fewer values per element, unweighted):
it is offered as a run setting (``aggregation = "trimmed-mean"``, :class:`TrimmedMeanHeteroFedAvg`),
while the default stays the sample-weighted mean with capped weights
(:func:`fedser.server.aggregation.capped_weights`).

The user-level accountant is given the noise multiplier of the unweighted mean of the updates;
how trimming changes the sensitivity is not analysed here, so a run that needs a user-level
guarantee should keep the default rule.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedser.common.models import head_of

from .aggregation import ENCODER, AggregationStats, ClientUpdate
from .strategy import HeteroFedAvg

RULES = ("fedavg", "trimmed-mean")
DEFAULT_TRIM = 0.2


def _check_trim(trim: object) -> None:
    if not (isinstance(trim, (int, float)) and 0.0 <= float(trim) < 0.5):
        raise ValueError(f"trim must be a share in [0, 0.5), e.g. {DEFAULT_TRIM}; got {trim!r}")


def trimmed_mean_aggregate(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    head_of: Callable[[str], str | None],
    trim: float = DEFAULT_TRIM,
) -> tuple[dict[str, np.ndarray], AggregationStats]:
    """The coordinate-wise trimmed mean of the updates' deltas added to ``global_state``.

    Per element, of the k updates that cover it, ``floor(trim * k)`` are dropped from each end;
    an element no update covers keeps its value. Same arguments and return value as
    :func:`fedser.server.aggregation.aggregate` (``num_examples`` only feeds the stats).

    Raises:
        ValueError: for ``trim`` outside [0, 0.5), a node twice, or a delta whose shape does not
        match its index.
    """
    _check_trim(trim)
    nodes = [u.node_id for u in updates]
    if len(set(nodes)) != len(nodes):
        raise ValueError("an update per node: a node appears twice")
    new_state: dict[str, np.ndarray] = {}
    stats = AggregationStats(num_updates=len(updates), total_examples=sum(int(u.num_examples) for u in updates))
    for name, g in global_state.items():
        g = np.asarray(g)
        head = head_of(name)
        eligible = [u for u in updates if head is None or head in u.heads]
        if not eligible:
            new_state[name] = g.copy()
            stats.coverage[name] = np.zeros(g.shape, np.int32)
            stats.fraction_updated[name] = 0.0
            continue
        stack = np.full((len(eligible),) + g.shape, np.nan, dtype=np.float64)   # (k, *shape)
        for i, u in enumerate(eligible):
            ix = u.index[name]
            delta = np.asarray(u.delta[name], dtype=np.float64)
            if delta.shape != tuple(np.size(a) for a in ix):
                raise ValueError(f"update of node {u.node_id}: {name} has shape {delta.shape}, its index expects "
                                 f"{tuple(np.size(a) for a in ix)}")
            stack[i][ix] = delta
        covered = np.count_nonzero(~np.isnan(stack), axis=0)                  # (*shape,)
        ordered = np.sort(stack, axis=0)                                       # NaN (not covered) last
        cut = np.floor(trim * covered).astype(np.int64)
        rank = np.arange(len(eligible)).reshape((-1,) + (1,) * g.ndim)
        keep = (rank >= cut) & (rank < covered - cut)
        kept = np.count_nonzero(keep, axis=0)
        step = np.where(keep, ordered, 0.0).sum(axis=0) / np.maximum(kept, 1)
        if not np.isfinite(step).all():
            raise ValueError(f"{name}: the trimmed mean is not finite; validate updates first")
        new_state[name] = np.where(covered > 0, g + step, g).astype(g.dtype)
        stats.coverage[name] = covered.astype(np.int32)
        stats.fraction_updated[name] = float(np.count_nonzero(covered)) / max(1, covered.size)
    for u in updates:
        for part in (ENCODER, *sorted(u.heads)):
            stats.head_contributors[part] = stats.head_contributors.get(part, 0) + 1
        stats.tier_contributors[u.width] = stats.tier_contributors.get(u.width, 0) + 1
    return new_state, stats


class TrimmedMeanHeteroFedAvg(HeteroFedAvg):
    """``HeteroFedAvg`` whose round combines updates by the coordinate-wise trimmed mean; every
    check before it (validation, profiles, capped counts) is the same."""

    def __init__(self, *args, trim: float = DEFAULT_TRIM, **kwargs):
        _check_trim(trim)
        super().__init__(*args, **kwargs)
        self.trim = float(trim)

    def combine(self, updates: list[ClientUpdate]) -> tuple[dict[str, np.ndarray], AggregationStats]:
        return trimmed_mean_aggregate(self._global, updates, head_of, self.trim)

    def accounting_weights(self, updates: list[ClientUpdate]) -> list[float]:
        return [1.0] * len(updates)
