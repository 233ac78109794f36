"""User-level privacy of one device's update: clip the whole update to norm C, then add noise.

The update is ``local weights - global weights`` over every array the device trained. Its
global L2 norm (all arrays as one vector) is clipped to C, then Gaussian noise is added:

* "local": std z*C per element, so each update alone is user-level DP;
* "distributed": std z*C/sqrt(m), so the sum over the m sampled devices carries std z*C;
* "none": no noise (clipping only; the server then has no user-level guarantee).

The noised update's norm exceeds C by design; the server bounds it with
:func:`max_expected_norm` (defined in ``fedser.common.privacy`` so the server can use it too).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedser.common.errors import ConfigError, UpdateRejected, collect
from fedser.common.privacy import (
    NOISE_MODES,
    global_norm,
    max_expected_norm,
    update_noise_std,
    update_settings_problems,
)

__all__ = ["NOISE_MODES", "UpdateStats", "global_norm", "max_expected_norm", "privatize_update",
           "update_noise_std"]


@dataclass(frozen=True)
class UpdateStats:
    """What ``privatize_update`` did: norms before / after clipping, the scale applied, the noise std."""

    norm_before: float
    norm_after_clip: float
    scale: float
    noise_std: float


def privatize_update(
    delta: Mapping[str, np.ndarray], clip_norm: float, noise_multiplier: float, mode: str,
    expected_clients: int, rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], UpdateStats]:
    """Clip ``delta`` to global L2 norm ``clip_norm`` and add Gaussian noise as ``mode`` says.

    Args:
        delta: name -> float array (any shape); the update, local minus global.
        clip_norm: C > 0, bound on the global L2 norm of the clipped update.
        noise_multiplier: z >= 0; noise std is z*C ("local") or z*C/sqrt(m) ("distributed").
        mode: one of ``NOISE_MODES``.
        expected_clients: m >= 1, devices per round the distributed noise is split over.
        rng: source of the noise.

    Returns:
        (name -> array with the same shapes, dtypes and key order as ``delta``, UpdateStats).

    Raises:
        ConfigError naming bad settings; UpdateRejected if an array is not floating point or
        holds NaN/Inf (such an update must not leave the device).
    """
    problems = update_settings_problems(clip_norm, noise_multiplier, mode, expected_clients)
    if not isinstance(rng, np.random.Generator):
        problems.append(f"rng={rng!r} must be a numpy.random.Generator (np.random.default_rng(seed))")
    if not isinstance(delta, Mapping) or not delta:
        problems.append(f"delta must be a non-empty mapping of name -> array; got {type(delta).__name__}")
    collect(problems, ConfigError, prefix="privatize_update")

    arrays = {k: np.asarray(v) for k, v in delta.items()}
    bad = [f"{k}: dtype {a.dtype} is not floating point" for k, a in arrays.items()
           if not np.issubdtype(a.dtype, np.floating)]
    bad += [f"{k}: {int(np.size(a) - np.isfinite(a).sum())} non-finite values" for k, a in arrays.items()
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all()]
    if bad:
        raise UpdateRejected(bad)

    c = float(clip_norm)
    norm = global_norm(arrays)
    # Scale down only: an update already inside the ball is sent unchanged (before noise).
    scale = 1.0 if norm <= c else c / norm
    std = update_noise_std(clip_norm, noise_multiplier, mode, expected_clients)
    out: dict[str, np.ndarray] = {}
    for k, a in arrays.items():
        v = a.astype(np.float64) * scale
        if std > 0.0:
            v = v + rng.normal(0.0, std, size=a.shape)
        out[k] = v.astype(a.dtype, copy=False)
    return out, UpdateStats(norm_before=norm, norm_after_clip=norm * scale, scale=scale, noise_std=std)
