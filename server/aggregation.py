"""Heterogeneous FedAvg: per-element weighted means over the clients that trained each element.

Clients differ in three ways, and the rule below handles all three at once:

- **width tier** (HeteroFL): a client trains a nested slice of every global array, so
  an element is only *covered* by the clients whose slice contains it;
- **labels**: the emotion head is trained only by clients with emotion labels, the KWS
  head only by clients with command labels (``ClientUpdate.heads``), while the shared
  encoder is trained by every client;
- **data size**: each client counts with its number of training examples.

For every global element ``x``::

    C(x)  = clients whose slice covers x and that trained the head x belongs to
    x_new = x + server_lr * sum_{i in C(x)} n_i * delta_i(x) / sum_{i in C(x)} n_i   if C(x) is not empty
    x_new = x                                                                        otherwise

**Deltas, not weights.** Clients send ``delta = local - global_slice``. For covered
elements, ``x + mean(delta_i)`` equals ``mean(x + delta_i) = mean(local_i)``, so with
``server_lr = 1`` this is exactly FedAvg over weights (sample-weighted, per element);
with every client at full width and both heads it *is* plain FedAvg (a test holds it
against Flower's own aggregation). Averaging deltas is also what DP-FedAvg needs: the
device clips its delta to norm C and adds Gaussian noise, and the server averages those
noised deltas (McMahan et al., 2018). ``server_lr != 1`` scales the averaged step
(FedAvg with a server learning rate).

**Capped weights.** ``n_i`` is what the client *claims*; :func:`capped_weights` bounds each
claim at the cohort's lower median (times a factor, 1 by default) before it becomes a weight,
so one device cannot outweigh the rest by claiming a million examples.

Updates must be validated first (``fedser.server.validation.validate_update``); the
caller drops rejected replies, so a rejected reply never touches the model. As a last
line of defence :func:`aggregate` raises instead of writing a non-finite value.
"""
from __future__ import annotations

import math
import statistics
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

__all__ = [
    "ENCODER",
    "AggregationStats",
    "ClientUpdate",
    "EVAL_WEIGHT_CAP_FACTOR",
    "WEIGHT_CAP_FACTOR",
    "aggregate",
    "aggregate_sum",
    "capped_weights",
    "full_index",
]

# Name under which stats count the shared (head-less) parameters.
ENCODER = "encoder"


@dataclass
class ClientUpdate:
    """One validated client reply, ready to aggregate.

    ``delta[name]`` has the shape of the client's sub-array, i.e. ``global[name][index[name]]``;
    it is ``local - global_slice``, already clipped and noised on the device.
    ``index[name]`` is the ``np.ix_``-style tuple (one integer array per axis) that places the
    sub-array inside the global array, as ``fedser.common.slicing.slice_index`` returns it
    for the client's width tier. Clients whose index tuples are the very same objects (as
    ``slice_index`` hands out for one tier) are summed together in one batch, and read-only
    index arrays are analysed once per process; other indices work too, only slower.
    Index arrays must not change while in use.
    """

    node_id: int | str
    delta: dict[str, np.ndarray]
    index: dict[str, tuple[np.ndarray, ...]]
    num_examples: int
    heads: set[str]                 # heads trained, e.g. {"emotion"}, {"kws"}, {"emotion", "kws"}
    width: float


@dataclass
class AggregationStats:
    """What one aggregation did.

    ``coverage[name]`` has the shape of the global array and counts, per element, the
    updates that contributed to it (0 = left unchanged).
    """

    num_updates: int
    total_examples: int
    coverage: dict[str, np.ndarray] = field(default_factory=dict)            # int32, global shapes
    fraction_updated: dict[str, float] = field(default_factory=dict)         # per param, in [0, 1]
    head_contributors: dict[str, int] = field(default_factory=dict)          # "encoder"/"emotion"/"kws" -> n
    tier_contributors: dict[float, int] = field(default_factory=dict)        # width -> n updates

    def overall_fraction_updated(self) -> float:
        """Share of all global elements that changed this round (element-weighted)."""
        total = sum(c.size for c in self.coverage.values())
        if total == 0:
            return 0.0
        return sum(int(np.count_nonzero(c)) for c in self.coverage.values()) / total

    def to_metrics(self) -> dict[str, float]:
        """Flat scalar metrics (MetricRecord-ready) for run reports."""
        metrics = {
            "agg-updates": float(self.num_updates),
            "agg-examples": float(self.total_examples),
            "agg-fraction-updated": self.overall_fraction_updated(),
        }
        for head, n in self.head_contributors.items():
            metrics[f"agg-contributors-{head}"] = float(n)
        for width, n in self.tier_contributors.items():
            metrics[f"agg-tier-{width:g}"] = float(n)
        return metrics


# A device counts with at most this many times the cohort's lower-median example count.
WEIGHT_CAP_FACTOR = 1
# The same for the reported evaluation figures: they cannot steer the model, so they keep
# ordinary spreads exactly example-weighted and bound only claims far beyond the cohort.
EVAL_WEIGHT_CAP_FACTOR = 4


def capped_weights(counts: Sequence[int], factor: int = WEIGHT_CAP_FACTOR) -> list[int]:
    """Each claimed example count, capped at ``factor`` x the lower median of ``counts``.

    Example counts are claims a device makes about itself, and FedAvg weights by them: one
    device that claims 10**6 examples among devices of ten steers the global step alone (and
    its weight drives the user-level noise multiplier the accountant is given). Bounding
    every weight is what DP-FedAvg does (McMahan et al., 2018, w = min(n / n_cap, 1)); the
    bound here is relative to the cohort:

    - the *lower* median is a count an honest device sent whenever fewer than half of the
      cohort lie, so a minority cannot raise the cap (the upper median or the mean of two
      devices could be the liar's own claim);
    - the default factor 1 gives a liar exactly the weight of the typical honest device: lying
      gains nothing over sending the same update honestly, so one attacker's reach is its
      1/m share (``bench/bench_robustness.py``: a flipped update claiming 10**6 examples among
      twenty devices moves the final accuracy as much as the same update at an honest count).
      A factor of 4 kept honest cohorts of ordinary spread weighted exactly, but let one liar
      among twenty equal devices take 4/23 of every step instead of 1/20;
    - devices below the median keep their counts, so small devices still count for less;
      devices above it count as the median (what the DP-FedAvg cap does at n_cap = median);
    - one device then holds at most f / (f + ceil((m - 1) / 2)) of the total weight of m
      devices for a factor f.

    Uniform weights (the other DP-FedAvg choice) would also bound a liar to 1/m but would
    discard the size information of the devices below the median.

    Raises:
        ValueError: for a count that is not a positive integer, or a factor < 1.
    """
    bad = [n for n in counts if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0]
    if bad:
        raise ValueError(f"example counts must be positive integers; got {bad[:5]!r}: validate replies first")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1; got {factor!r}")
    if not counts:
        return []
    cap = factor * int(statistics.median_low([int(n) for n in counts]))
    return [min(int(n), cap) for n in counts]


def full_index(state: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, ...]]:
    """The ``np.ix_`` index of every array as a whole (the width-1.0 tier)."""
    return {name: np.ix_(*(np.arange(d) for d in np.shape(a))) for name, a in state.items()}


@dataclass(frozen=True)
class _Region:
    key: tuple            # equal keys <=> identical element sets
    where: tuple          # basic slices (a view) when contiguous, else an np.ix_ tuple
    shape: tuple[int, ...]
    size: int


def _region(ix: Sequence[np.ndarray], shape: tuple[int, ...]) -> _Region | str:
    """Turn an np.ix_-style index into the cheapest equivalent selector, or explain why it is bad.

    Contiguous axes (HeteroFL prefixes) become basic slices, so ``acc[where] += ...`` works
    on a view; other axes (e.g. the first units of each stacked GRU gate) keep an np.ix_
    gather/scatter.
    """
    if len(ix) != len(shape):
        return f"index has {len(ix)} axes, the array has {len(shape)}"
    flats, slices, contiguous = [], [], True
    for axis, (a, dim) in enumerate(zip(ix, shape)):
        flat = np.asarray(a).reshape(-1)
        if flat.size and flat.dtype.kind not in "iu":
            return f"index of axis {axis} has dtype {flat.dtype}; expected integers"
        flat = flat.astype(np.intp, copy=False)
        values = flat.tolist()  # index axes are short; plain Python beats numpy calls here
        k = len(values)
        start = values[0] if k else 0
        if values == list(range(start, start + k)):
            if start < 0 or start + k > dim:
                return f"index of axis {axis} spans [{start}, {start + k - 1}], outside [0, {dim - 1}]"
            slices.append(slice(start, start + k))
        else:
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= dim:
                return f"index of axis {axis} spans [{lo}, {hi}], outside [0, {dim - 1}]"
            # np.ix_ with a repeated entry would make `acc[ix] += v` drop contributions.
            if np.unique(flat).size != k:
                return f"index of axis {axis} repeats elements"
            contiguous = False
        flats.append(flat)
    sub_shape = tuple(f.size for f in flats)
    size = math.prod(sub_shape)
    if contiguous:
        return _Region(tuple((s.start, s.stop) for s in slices), tuple(slices), sub_shape, size)
    key = tuple(f.tobytes() for f in flats)
    return _Region(key, np.ix_(*(f.copy() for f in flats)), sub_shape, size)  # pins no caller array


# Read-only index arrays (``slice_index`` returns such) are analysed once per process, not
# once per round: the entry holds weak references and is used only while the very same
# array objects are alive.
_REGION_CACHE: dict[tuple, tuple[tuple[weakref.ref, ...], _Region | str]] = {}
_REGION_CACHE_MAX = 4096


def _cached_region(ix: Sequence[np.ndarray], shape: tuple[int, ...]) -> _Region | str:
    key = (shape, *map(id, ix))
    hit = _REGION_CACHE.get(key)
    if hit is not None and len(hit[0]) == len(ix) and all(r() is a for r, a in zip(hit[0], ix)):
        return hit[1]
    region = _region(ix, shape)
    if all(isinstance(a, np.ndarray) and not a.flags.writeable for a in ix):
        if len(_REGION_CACHE) >= _REGION_CACHE_MAX:
            _REGION_CACHE.clear()
        _REGION_CACHE[key] = (tuple(weakref.ref(a) for a in ix), region)
    return region


def _check_updates(
    global_state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], server_lr: float
) -> list[str]:
    """Problems visible without looking at the arrays."""
    problems = []
    number = isinstance(server_lr, (int, float, np.integer, np.floating)) and not isinstance(server_lr, bool)
    if not (number and math.isfinite(server_lr) and server_lr > 0):
        problems.append(f"server_lr must be a finite number > 0; got {server_lr!r}")
    seen: set = set()
    known = set(global_state)
    for u in updates:
        who = f"update from node {u.node_id!r}"
        if u.node_id in seen:
            problems.append(f"{who} appears twice; each client may contribute once per round")
        seen.add(u.node_id)
        n = u.num_examples
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            problems.append(f"{who}: num_examples must be a positive integer; got {n!r}")
        unknown = sorted(set(u.delta) - known)
        if unknown:
            problems.append(f"{who}: arrays not in the global model: {', '.join(unknown)}")
    return problems


@dataclass
class _Group:
    """Updates that train the same parameters with the very same index objects.

    Their deltas, flattened and concatenated in ``names`` order, are rows of one matrix,
    so the weighted sum of the whole group is one matrix-vector product.
    """

    names: list[str]
    regions: list[_Region]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    size: int
    whole: bool                     # every parameter, each array whole: rows match the flat state
    members: list[ClientUpdate] = field(default_factory=list)


# Deltas are stacked at most this many rows (clients) at a time, and at most this many
# elements in all (16 MiB of float32), which bounds memory however many clients reply.
# Rows are summed in float32 (a few clients, exactly representable weights), and the
# partial sums in float64.
_CHUNK_ROWS = 16
_CHUNK_ELEMENTS = 4 * 1024 * 1024


def _plan(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    param_heads: dict[str, str | None],
    problems: list[str],
) -> list[_Group]:
    """Group the updates and check every index and delta shape they would use."""
    model_heads = {h for h in param_heads.values() if h is not None}
    eligible: dict[frozenset, tuple[list[str], frozenset[str]]] = {}
    regions: dict[tuple, _Region | str] = {}
    groups: dict[tuple, _Group] = {}
    for u in updates:
        who = f"update from node {u.node_id!r}"
        heads = frozenset(h for h in u.heads if h in model_heads)
        if heads not in eligible:
            names = [n for n, h in param_heads.items() if h is None or h in heads]
            eligible[heads] = (names, frozenset(names))
        names, name_set = eligible[heads]
        if not (u.delta.keys() >= name_set and u.index.keys() >= name_set):
            missing = [n for n in names if n not in u.delta or n not in u.index]
            problems += [
                f"{who}: no {'delta' if n not in u.delta else 'index'} for {n!r}, which it trained"
                for n in missing
            ]
            continue
        # Index objects are alive for the whole call, so their ids identify them: clients of
        # one tier (sharing slice_index's arrays) fall into one group, analysed once.
        key = (heads, tuple([id(u.index[n]) for n in names]))
        group = groups.get(key)
        if group is None:
            found, bad = [], []
            for n in names:
                ix = u.index[n]
                shape = np.shape(global_state[n])
                rkey = (shape, *map(id, ix))
                region = regions.get(rkey)
                if region is None:
                    region = regions[rkey] = _cached_region(ix, shape)
                if isinstance(region, str):
                    bad.append(f"{who}, {n!r}: {region}")
                found.append(region)
            if bad:
                problems += bad
                continue
            sizes = [r.size for r in found]
            offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
            whole = len(names) == len(param_heads) and all(
                r.key == tuple((0, d) for d in np.shape(global_state[n]))
                for n, r in zip(names, found)
            )
            group = groups[key] = _Group(
                names, found, [r.shape for r in found], offsets[:-1], offsets[-1], whole
            )
        try:
            shapes = [u.delta[n].shape for n in group.names]
        except AttributeError:
            problems += [f"{who}: {n!r} is not a numpy array" for n in group.names
                         if not isinstance(u.delta[n], np.ndarray)]
            continue
        if shapes != group.shapes:
            problems += [
                f"{who}: {n!r} has shape {s}, its index selects {r.shape}"
                for n, s, r in zip(group.names, shapes, group.regions) if s != r.shape
            ]
            continue
        group.members.append(u)
    return list(groups.values())


def _weighted_sum(group: _Group) -> np.ndarray:
    """sum_i n_i * flat(delta_i) over the group's members, shape (group.size,), float64."""
    total = np.zeros(group.size, dtype=np.float64)
    if group.size == 0:
        return total
    members = group.members
    counts = [u.num_examples for u in members]
    # float32 holds every weight exactly up to 2**24 examples; past that, stay in float64.
    dtype = np.float32 if max(counts) <= 2**24 else np.float64
    weights = np.array(counts, dtype=dtype)
    rows = max(1, min(len(members), _CHUNK_ROWS, _CHUNK_ELEMENTS // group.size))
    buffer = np.empty((rows, group.size), dtype=dtype)
    for start in range(0, len(members), rows):
        chunk = members[start:start + rows]
        block = buffer[: len(chunk)]
        for row, u in zip(block, chunk):
            np.concatenate([u.delta[n] for n in group.names], axis=None, out=row)
        # einsum, not BLAS: a multi-threaded gemv stalls for milliseconds on a busy server.
        total += np.einsum("i,ij->j", weights[start:start + len(chunk)], block)
    return total


def _contributors(updates: Sequence[ClientUpdate], param_heads: dict[str, str | None]) -> AggregationStats:
    """Stats without coverage: how many updates, examples, contributors per head and tier."""
    head_names = [ENCODER] if any(h is None for h in param_heads.values()) else []
    head_names += sorted({h for h in param_heads.values() if h is not None})
    stats = AggregationStats(
        num_updates=len(updates),
        total_examples=int(sum(int(u.num_examples) for u in updates)),
        head_contributors={h: 0 for h in head_names},
    )
    for u in updates:
        stats.tier_contributors[u.width] = stats.tier_contributors.get(u.width, 0) + 1
        for h in head_names:
            if h == ENCODER or h in u.heads:
                stats.head_contributors[h] += 1
    return stats


def aggregate(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    head_of: Callable[[str], str | None],
    server_lr: float = 1.0,
) -> tuple[dict[str, np.ndarray], AggregationStats]:
    """Heterogeneous FedAvg of client deltas into a new global state (see the module docstring).

    Args:
        global_state: name -> global array (any shape; float32 in fedser). Not modified.
        updates: validated client updates; ``delta[name]`` shaped like ``global[name][index[name]]``.
        head_of: name -> "emotion" / "kws" for head parameters, None for shared ones; a head
            parameter is aggregated only over the updates whose ``heads`` contain its head
            (arrays a client sends for a head it did not train are ignored, and may be absent).
        server_lr: step size applied to the averaged delta (1.0 = plain FedAvg).

    Returns:
        ``(new_state, stats)``: new arrays with the global shapes and dtypes (elements no
        eligible update covers keep their value bit for bit; the arrays may be
        non-overlapping views of one buffer, never of ``global_state``), and
        :class:`AggregationStats`.

    Raises:
        ValueError: listing every malformed update (wrong shape, missing array, bad index,
            duplicate node, num_examples <= 0) or a non-finite result; nothing is returned then.

    Clients that share a tier (the same index arrays) and a head set form one group; a
    group's weighted sum is one pass over its deltas (float32 within chunks of at most 16
    clients, float64 across chunks), then one scatter per parameter. Means, steps and the
    new values are computed in float64 and cast back to each array's dtype.
    """
    param_heads = {name: head_of(name) for name in global_state}
    problems = _check_updates(global_state, updates, server_lr)
    groups = _plan(global_state, updates, param_heads, problems)
    if problems:
        raise ValueError("cannot aggregate: " + "; ".join(problems))

    stats = _contributors(updates, param_heads)

    # One flat float64 buffer per quantity, with a per-parameter view into it: the
    # accumulation works on the views, the final mean on the whole buffer at once.
    names = list(global_state)
    shapes = [np.shape(global_state[n]) for n in names]
    sizes = [math.prod(shape) for shape in shapes]
    bounds = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
    n_total = bounds[-1]
    acc_flat = np.zeros(n_total, dtype=np.float64)
    weight_flat = np.zeros(n_total, dtype=np.float64)
    count_flat = np.zeros(n_total, dtype=np.int32)

    def views(flat: np.ndarray) -> dict[str, np.ndarray]:
        return {n: flat[lo:hi].reshape(shape) for n, lo, hi, shape in zip(names, bounds, bounds[1:], shapes)}

    acc, weight, count = views(acc_flat), views(weight_flat), views(count_flat)
    # Per parameter, identical regions (same elements) share one weight/count write.
    cover: dict[str, dict[tuple, list]] = {name: {} for name in names}
    for group in groups:
        if not group.members:
            continue
        total = _weighted_sum(group)
        group_weight = float(sum(float(u.num_examples) for u in group.members))
        if group.whole:  # full width, every head: the group's rows are laid out like the state
            acc_flat += total
            weight_flat += group_weight
            count_flat += len(group.members)
            continue
        for name, region, offset in zip(group.names, group.regions, group.offsets):
            if region.size == 0:
                continue
            acc[name][region.where] += total[offset:offset + region.size].reshape(region.shape)
            entry = cover[name].setdefault(region.key, [region.where, 0.0, 0])
            entry[1] += group_weight
            entry[2] += len(group.members)
    for name, entries in cover.items():
        for where, w, c in entries.values():
            weight[name][where] += w
            count[name][where] += c

    covered_flat = weight_flat > 0
    step_flat = np.divide(acc_flat, weight_flat, out=np.zeros(n_total), where=covered_flat)
    if not np.all(np.isfinite(step_flat)):
        step = views(step_flat)
        for name in names:
            if np.all(np.isfinite(step[name])):
                continue
            culprits = [
                str(u.node_id) for u in updates
                if name in u.delta and not np.all(np.isfinite(u.delta[name]))
            ]
            problems.append(
                f"{name!r} would become non-finite (non-finite delta from node(s) "
                f"{', '.join(culprits) or 'unknown'}); validate updates before aggregating"
            )
        raise ValueError("cannot aggregate: " + "; ".join(problems))
    global_flat = np.concatenate(
        [np.ravel(global_state[n]) for n in names] or [np.zeros(0)], dtype=np.float64
    )
    # Uncovered elements take the global value, which float64 holds exactly for float32
    # (and any float) arrays, so they come back bit for bit.
    new_flat = np.where(covered_flat, global_flat + server_lr * step_flat, global_flat)
    dtypes = {np.asarray(global_state[n]).dtype for n in names}
    if len(dtypes) == 1 and next(iter(dtypes)).kind == "f":
        # One buffer for the whole new state; each array is its own non-overlapping view.
        new_state = views(new_flat.astype(next(iter(dtypes))))
    else:
        new_state = {}
        covered, updated = views(covered_flat), views(new_flat)
        for name in names:
            new = np.array(global_state[name], copy=True)
            np.copyto(new, updated[name], casting="unsafe", where=covered[name])
            new_state[name] = new
    stats.coverage = count
    for name, size in zip(names, sizes):
        stats.fraction_updated[name] = np.count_nonzero(count[name]) / size if size else 0.0
    return new_state, stats


def aggregate_sum(
    global_state: Mapping[str, np.ndarray],
    sums: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    head_of: Callable[[str], str | None],
    server_lr: float = 1.0,
) -> tuple[dict[str, np.ndarray], AggregationStats]:
    """Heterogeneous FedAvg from the sum of the updates alone (what secure aggregation reveals).

    ``sums[name]`` has the global shape and holds the sum of every update's delta padded with
    zeros outside its slice and its heads; each update counts once. An element's mean divides
    by the updates that cover it, known from their tiers (``index``) and heads without their
    deltas. Arrays not in ``sums`` (frozen under the run's scope) and elements no update covers
    keep their value.
    """
    problems = _check_updates(global_state, [replace(u, delta={}) for u in updates], server_lr)
    problems += [f"sum of {name!r} has shape {np.shape(v)}, the model {np.shape(global_state.get(name))}"
                 for name, v in sums.items() if name not in global_state or np.shape(v) != np.shape(global_state[name])]
    problems += [f"sum of {name!r} holds non-finite values" for name, v in sums.items() if not np.all(np.isfinite(v))]
    if problems:
        raise ValueError("cannot aggregate: " + "; ".join(problems))
    stats = _contributors(updates, {name: head_of(name) for name in global_state})
    new_state: dict[str, np.ndarray] = {}
    for name, current in global_state.items():
        current = np.asarray(current)
        count = np.zeros(current.shape, dtype=np.int32)
        if name in sums:
            head = head_of(name)
            for u in updates:
                if head is None or head in u.heads:
                    count[u.index[name]] += 1
        covered = count > 0
        step = np.divide(np.asarray(sums.get(name, 0.0), dtype=np.float64), count, out=np.zeros(current.shape),
                         where=covered)
        new_state[name] = np.where(covered, current.astype(np.float64) + server_lr * step, current).astype(current.dtype)
        stats.coverage[name] = count
        stats.fraction_updated[name] = np.count_nonzero(count) / count.size if count.size else 0.0
    return new_state, stats
