"""Checks a client reply before it may touch the global model or the reported metrics.

:func:`decode_update` reads the arrays of a training reply without trusting what they claim
about themselves, :func:`validate_update` collects *every* reason to reject the update and
:func:`validate_evaluation` every reason to reject an evaluation reply (an empty list means
valid); the caller logs the reasons, drops the reply (or raises
``fedser.common.errors.UpdateRejected(reasons)``) and aggregates the rest, so a rejected
reply never changes the model or the figures.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedser.common.keys import ACCURACY, HEAD_BITS, NUM_EXAMPLES, TASKS, UAR
from fedser.common.privacy import (exceeds_bound, global_norm, noise_energy_bounds, noise_shape,
                                   noise_shape_bounds)
from fedser.common.records import decode_array

__all__ = [
    "DEFAULT_MAX_EXAMPLES",
    "NOISE_SHAPE_TAIL",
    "TaskScore",
    "UpdateNoise",
    "decode_update",
    "expected_shapes",
    "validate_evaluation",
    "validate_update",
]

# More examples than this from one device (one speaker) is not a real count.
DEFAULT_MAX_EXAMPLES = 1_000_000

_ALL_HEADS = sum(HEAD_BITS.values())


def expected_shapes(index: Mapping[str, tuple]) -> dict[str, tuple[int, ...]]:
    """Sub-array shapes a client of one tier must send, from its ``np.ix_``-style index.

    ``expected_shapes(slice_index(cfg, width))`` gives the ``expected`` argument of
    :func:`validate_update`.
    """
    return {name: tuple(int(np.size(a)) for a in ix) for name, ix in index.items()}


def decode_update(
    record: Mapping[str, object],
    expected: Mapping[str, tuple[int, ...]],
    dtype: np.dtype | type = np.float32,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays of one reply that match this client's slice, and the reasons for the others.

    Each array's declared dtype and shape are compared with ``expected`` first and only a
    match is decoded (:func:`fedser.common.records.decode_array` also checks the npy header
    and the byte length), so a reply cannot make the server allocate more than it sent nor
    end the round with a decoding error. Arrays not in ``expected`` are never decoded.
    Arrays ``expected`` names but the record lacks are left to :func:`validate_update`
    (pass it ``expected`` less the names reported here).
    """
    want = np.dtype(dtype)
    arrays: dict[str, np.ndarray] = {}
    reasons: list[str] = []
    for name in sorted(record, key=str):
        if name not in expected:
            reasons.append(f"unknown array {name!r}: not part of this client's sub-model")
            continue
        array, shape = record[name], tuple(expected[name])
        declared_dtype, declared_shape = getattr(array, "dtype", None), getattr(array, "shape", None)
        mismatch = []
        if isinstance(declared_dtype, str) and declared_dtype != want.name:
            mismatch.append(f"array {name!r} has dtype {declared_dtype}; expected {want.name}")
        if isinstance(declared_shape, (tuple, list)) and tuple(declared_shape) != shape:
            mismatch.append(f"array {name!r} has shape {tuple(declared_shape)}; expected {shape} for this tier")
        if mismatch:
            reasons += mismatch
            continue
        try:
            arrays[name] = decode_array(array, shape, want)
        except ValueError as exc:
            reasons.append(f"array {name!r} cannot be decoded: {exc}")
    return arrays, reasons


def _as_int(value) -> int | None:
    """``value`` as an int if it is an integral number (metrics arrive as int or float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if not math.isfinite(value) or value != int(value):
        return None
    return int(value)


NOISE_SHAPE_TAIL = 1e-6
"""How often the noise checks together may refuse an honest update (the norm check has its own 1e-6)."""


@dataclass(frozen=True)
class UpdateNoise:
    """What the run's instruction makes an honest update hold.

    ``trained``: the entries a device trains, clips and noises (``models.trained_entries``);
    every other entry must arrive as exact zeros. ``noise_std``: the user-level noise on each
    trained weight (0 when the run adds none). ``clip_norm``: C.
    """
    trained: frozenset[str]
    noise_std: float
    clip_norm: float


def _noise_reasons(parts: Mapping[str, np.ndarray], noise: UpdateNoise) -> list[str]:
    reasons = [f"array {name!r} is outside the run's train scope but changed: it must arrive as zeros"
               for name in sorted(set(parts) - noise.trained) if np.any(parts[name])]
    names = sorted(noise.trained & set(parts))
    noisy = [parts[name] for name in names]
    n = sum(a.size for a in noisy)
    if noise.noise_std <= 0 or not n:
        return reasons
    # NOISE_SHAPE_TAIL is shared: half for the shape of the whole update, half over its arrays.
    tail = NOISE_SHAPE_TAIL / 2
    s = noise.noise_std
    for name, a in zip(names, noisy):
        if not a.size:
            continue
        energy = float(np.sum(np.square(a, dtype=np.float64))) / (s * s)
        low, high = noise_energy_bounds(a.size, noise.clip_norm, s, tail / len(names))
        if not low <= energy <= high:
            reasons.append(
                f"array {name!r} does not carry the noise the run adds: its squared norm is {energy:.4g} "
                f"noise variances over {a.size} weights, outside [{max(low, 0.0):.4g}, {high:.4g}]"
            )
    shape = noise_shape(noisy, s)
    low, high = noise_shape_bounds(n, noise.clip_norm, s, tail)
    if not low <= shape <= high:
        reasons.append(
            f"update does not look like the noise the run adds: mean |weight| is {shape:.4f} noise "
            f"std over {n} weights, outside [{low:.4f}, {high:.4f}]"
        )
    return reasons


def validate_update(
    arrays: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    *,
    max_norm: float | None,
    current_model_version: int,
    reply_model_version: int | float | None,
    num_examples: int | float | None,
    heads_mask: int | float | None,
    dtype: np.dtype | type = np.float32,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    max_staleness: int = 0,
    profiled_examples: int | None = None,
    noise: UpdateNoise | None = None,
) -> list[str]:
    """Every reason to reject one client reply; ``[]`` when it may be aggregated.

    Args:
        arrays: name -> update array (the delta) as received.
        expected: name -> shape for the client's width tier (see :func:`expected_shapes`);
            every name must be present and nothing else.
        max_norm: bound on the global L2 norm of the update, including the noise allowance
            on top of the clipping norm C; ``None`` skips the check (no clipping).
        current_model_version: version of the global model now.
        reply_model_version: version the client trained on (from its reply).
        num_examples: examples the client trained on; must be an integer in [1, max_examples].
        heads_mask: bit mask of heads trained (``fedser.common.keys.HEAD_BITS``); must be a
            non-zero combination of known bits.
        dtype: dtype every array must have.
        max_examples: largest plausible num_examples for one device.
        max_staleness: how many versions behind the current one a reply may be.
        profiled_examples: the training examples the device reported when it was profiled;
            it trains on what it holds, so a larger ``num_examples`` is a false claim (or
            data that grew since, which a fresh profile will show).
        noise: what an honest update holds under the run's scope and noise; ``None`` skips
            those checks. Untrained entries must be zeros; with noise, every trained array
            must carry its share of it (:func:`fedser.common.privacy.noise_energy_bounds`) and
            the weights together must look like it (:func:`fedser.common.privacy.noise_shape`),
            which refuses a noise-free update sized to pass the norm bound.
    """
    if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite number > 0 or None; got {max_norm!r}")
    if max_staleness < 0:
        raise ValueError(f"max_staleness must be >= 0; got {max_staleness!r}")
    want_dtype = np.dtype(dtype)
    reasons: list[str] = []

    for name in sorted(set(arrays) - set(expected)):
        reasons.append(f"unknown array {name!r}: not part of this client's sub-model")
    for name in sorted(set(expected) - set(arrays)):
        reasons.append(f"missing array {name!r} (expected shape {tuple(expected[name])})")

    finite_parts = {}  # the norm is still checked on the finite part of a damaged update
    for name in sorted(arrays):
        try:
            a = np.asarray(arrays[name])
        except Exception as exc:  # a value numpy cannot even view as an array
            reasons.append(f"array {name!r} is not an array ({type(arrays[name]).__name__}: {exc})")
            continue
        if a.dtype != want_dtype:
            reasons.append(f"array {name!r} has dtype {a.dtype}; expected {want_dtype}")
        if name in expected and a.shape != tuple(expected[name]):
            reasons.append(
                f"array {name!r} has shape {a.shape}; expected {tuple(expected[name])} for this tier"
            )
        if a.dtype.kind not in "biuf":
            continue  # no norm for non-numeric data; the dtype reason says why
        finite = np.isfinite(a)
        bad = int(a.size - np.count_nonzero(finite))
        if bad:
            reasons.append(f"array {name!r} has {bad} NaN/Inf value(s)")
            a = a[finite]
        finite_parts[name] = a

    if max_norm is not None:
        norm = global_norm(finite_parts)
        if exceeds_bound(norm, max_norm):
            reasons.append(
                f"update L2 norm {norm:.6g} exceeds the bound {max_norm:.6g} "
                "(clipping norm plus noise allowance)"
            )
    if noise is not None:
        reasons += _noise_reasons(finite_parts, noise)

    version = _as_int(reply_model_version)
    if version is None:
        reasons.append(f"model version in the reply must be an integer; got {reply_model_version!r}")
    elif version > current_model_version:
        reasons.append(
            f"reply trained on model version {version}, newer than the current {current_model_version}"
        )
    elif current_model_version - version > max_staleness:
        reasons.append(
            f"stale update: trained on model version {version}, current is {current_model_version} "
            f"(at most {max_staleness} version(s) behind accepted)"
        )

    n = _as_int(num_examples)
    if n is None or n <= 0:
        reasons.append(f"num_examples must be a positive integer; got {num_examples!r}")
    elif n > max_examples:
        reasons.append(f"num_examples {n} is implausible for one device (limit {max_examples})")
    elif profiled_examples is not None and n > profiled_examples:
        reasons.append(f"num_examples {n} is more than the {profiled_examples} training examples "
                       "the device reported in its profile")

    mask = _as_int(heads_mask)
    if mask is None or mask <= 0 or mask & ~_ALL_HEADS:
        known = ", ".join(f"{h}={bit}" for h, bit in HEAD_BITS.items())
        reasons.append(
            f"heads mask {heads_mask!r} is invalid: expected a non-zero combination of {known}"
        )
    return reasons


# What one device's evaluation says about one task: examples, accuracy, UAR.
TaskScore = tuple[int, float, float]


def _unit_score(value: object) -> bool:
    """A finite real number in [0, 1] (accuracy, UAR)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value) and 0.0 <= value <= 1.0)


def validate_evaluation(
    metrics: Mapping[str, object],
    tasks: Iterable[str] = TASKS,
    *,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
) -> tuple[dict[str, TaskScore], list[str]]:
    """The scores of one evaluation reply per task it evaluated, and every reason to reject it.

    A task counts when the reply has ``<task>-n`` > 0; its count must then be an integer in
    [0, max_examples] and its ``<task>-accuracy`` and ``<task>-uar`` finite numbers in
    [0, 1]: a NaN would turn the averaged figure into NaN, and a count of 1e9 would make one
    device the whole average. ``num-examples``, when present, must be an integer >= 0 too.
    Scores are returned only when there is no reason at all.
    """
    scores: dict[str, TaskScore] = {}
    reasons: list[str] = []
    if NUM_EXAMPLES in metrics:
        total = _as_int(metrics[NUM_EXAMPLES])
        if total is None or total < 0:
            reasons.append(f"{NUM_EXAMPLES} must be an integer >= 0; got {metrics[NUM_EXAMPLES]!r}")
    for task in tasks:
        key = f"{task}-n"
        if key not in metrics:
            continue
        n = _as_int(metrics[key])
        if n is None or n < 0:
            reasons.append(f"{key} must be an integer >= 0; got {metrics[key]!r}")
            continue
        if n > max_examples:
            reasons.append(f"{key} {n} is implausible for one device (limit {max_examples})")
            continue
        if n == 0:
            continue
        values = []
        for metric in (ACCURACY, UAR):
            name = f"{task}-{metric}"
            value = metrics.get(name)
            if not _unit_score(value):
                reasons.append(f"{name} must be a finite number in [0, 1]; got {value!r}")
            values.append(value)
        scores[task] = (n, *(float(v) if _unit_score(v) else math.nan for v in values))
    return ({} if reasons else scores), reasons
