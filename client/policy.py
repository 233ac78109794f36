"""The device owner's privacy policy: what no server instruction can make the device do.

The server says how to train each round (DP-SGD on or off, its noise floor, user-level noise,
which weights train); the device checks every such instruction against its owner's policy
before it loads data or trains, and declines one outside the policy with the reason
(``keys.DECLINE_POLICY``), never obeys it. The owner sets the policy in ``--node-config``
(``fedser-client start`` options); the budget itself (``max-epsilon``) is enforced by the
device's ledger (``fedser.client.ledger``).

The default policy requires DP-SGD: a device joins only rounds that spend, and record, a
sample-level privacy budget. Virtual devices of a simulation take their policy from the run's
``partition-*`` settings instead (their operator runs both sides).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedser.common.keys import TRAIN_SCOPES

if TYPE_CHECKING:
    from .update import RoundSettings   # torch: not for the resident agent, which reads policies

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class PrivacyPolicy:
    """Bounds on any instruction this device follows.

    ``require_dp``: train only with DP-SGD (sample-level, accounted in the ledger).
    ``min_dp_noise``: the DP-SGD noise multiplier never goes below this, whatever the server's
    floor (the device's ledger may still choose more to stay within budget).
    ``min_update_noise``: user-level noise multiplier z the update must carry at least; above 0
    an instruction without user-level noise ("none") is declined.
    ``train_scopes``: which parts of the model the device agrees to train (``keys.TRAIN_SCOPES``).
    """

    require_dp: bool = True
    min_dp_noise: float = 0.0
    min_update_noise: float = 0.0
    train_scopes: tuple[str, ...] = TRAIN_SCOPES

    @classmethod
    def from_node_config(cls, node_config: Mapping, defaults: Mapping | None = None,
                         problems: list[str] | None = None) -> "PrivacyPolicy":
        """The policy in ``node_config`` (``require-dp``, ``min-dp-noise``, ``min-update-noise``,
        ``train-scopes``), falling back to ``defaults`` and then to the class defaults.

        Problems are appended to ``problems`` (collect-then-raise, as ``DeviceSettings`` does);
        the returned policy then holds the defaults for the bad values.
        """
        defaults = defaults or {}
        problems = problems if problems is not None else []
        d = cls()

        def value(key: str, fallback):
            return node_config.get(key, defaults.get(key, fallback))

        require = value("require-dp", d.require_dp)
        if isinstance(require, str) and require.strip().lower() in _TRUE | _FALSE:
            require = require.strip().lower() in _TRUE
        if not isinstance(require, bool):
            problems.append(f"require-dp must be true or false, got {require!r}")
            require = d.require_dp
        floors = {}
        for key, fallback in (("min-dp-noise", d.min_dp_noise), ("min-update-noise", d.min_update_noise)):
            raw = value(key, fallback)
            try:
                floors[key] = float(raw)
            except (TypeError, ValueError):
                floors[key] = math.nan
            if not (math.isfinite(floors[key]) and floors[key] >= 0):
                problems.append(f"{key} must be a number >= 0, got {raw!r}")
                floors[key] = fallback
        scopes_raw = value("train-scopes", ",".join(d.train_scopes))
        scopes = tuple(s.strip() for s in str(scopes_raw).split(",") if s.strip())
        unknown = [s for s in scopes if s not in TRAIN_SCOPES]
        if not scopes or unknown:
            problems.append(f"train-scopes must be a comma-separated subset of {','.join(TRAIN_SCOPES)}, "
                            f"got {scopes_raw!r}")
            scopes = d.train_scopes
        return cls(require_dp=require, min_dp_noise=floors["min-dp-noise"],
                   min_update_noise=floors["min-update-noise"], train_scopes=scopes)

    def violations(self, instruction: RoundSettings) -> list[str]:
        """Every way ``instruction`` falls outside this policy (empty: the device may follow it)."""
        out = []
        if self.require_dp and not instruction.dp:
            out.append("the server asks to train without DP-SGD, and this device's policy requires it "
                       "(its owner can allow it with --allow-no-dp)")
        if self.min_update_noise > 0:
            if instruction.noise_mode == "none":
                out.append(f"the server asks for no user-level noise; this device's policy requires a noise "
                           f"multiplier of at least {self.min_update_noise:g}")
            elif instruction.noise_multiplier < self.min_update_noise:
                out.append(f"the server asks for user-level noise multiplier {instruction.noise_multiplier:g}, "
                           f"below this device's minimum {self.min_update_noise:g}")
        if instruction.scope not in self.train_scopes:
            out.append(f"the server asks to train scope {instruction.scope!r}; this device's policy allows "
                       f"{', '.join(self.train_scopes)}")
        return out

    def dp_noise_floor(self, server_floor: float) -> float:
        """The DP-SGD noise floor of a round: the server's or the device's, whichever is higher."""
        return max(float(server_floor), self.min_dp_noise)

    def to_node_config(self) -> dict[str, bool | float | str]:
        """The ``--node-config`` entries that give a device this policy."""
        return {"require-dp": self.require_dp, "min-dp-noise": self.min_dp_noise,
                "min-update-noise": self.min_update_noise, "train-scopes": ",".join(self.train_scopes)}
