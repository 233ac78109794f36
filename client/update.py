"""User-level privacy of one device's update: clip the whole update to norm C, then add noise.

The update is ``local weights - global weights`` over every array the device trained. Its
global L2 norm (all arrays as one vector) is clipped to C, then Gaussian noise is added:

* "local": std z*C per element, so each update alone is user-level DP;
* "distributed": std z*C/sqrt(m), so the sum over the m sampled devices carries std z*C;
* "none": no noise (clipping only; the server then has no user-level guarantee).

The noised update's norm exceeds C by design; the server bounds it with
:func:`max_expected_norm`. Both live in ``fedser.common.privacy`` so the server and the privacy
audit (``fedser.common.audit``) run exactly the code a device runs.
"""
from __future__ import annotations

from fedser.common.privacy import (
    NOISE_MODES,
    UpdateStats,
    global_norm,
    max_expected_norm,
    privatize_update,
    update_noise_std,
)

__all__ = ["NOISE_MODES", "UpdateStats", "global_norm", "max_expected_norm", "privatize_update",
           "update_noise_std"]
