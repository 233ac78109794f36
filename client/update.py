"""The device's round, in one place: DP-SGD on the global slice, ``local - global``, clip, noise.

A round (``train_round``) trains the model the server sent with Opacus DP-SGD (``train_task``,
noise calibrated by the device's ledger: ``fedser.client.ledger.plan_round``), takes the update
``local weights - global weights`` over every array, and hands it to :func:`privatize_update`,
which is where an update is clipped and noised before it leaves the device:

* its global L2 norm (all arrays as one vector) is clipped to C;
* Gaussian noise is added: "local": std z*C per element, so each update alone is user-level DP;
  "distributed": std z*C/sqrt(m), so the sum over the m sampled devices carries std z*C;
  "none": no noise (clipping only; the server then has no user-level guarantee).

The noised update's norm exceeds C by design; the server bounds it with
``fedser.common.privacy.max_expected_norm``. The ClientApp (``fedser.client.app``) and the
privacy audit (``fedser.tools.audit``) both run this module, so the audit attacks exactly what
a device sends.
"""
from __future__ import annotations

import math
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedser.common import keys
from fedser.common.augment import Augmenter
from fedser.common.data import TaskData
from fedser.common.errors import ConfigError, UpdateRejected, collect
from fedser.common.features import FeatureSpec
from fedser.common.models import trained_entries
from fedser.common.params import state_to_arrays
from fedser.common.privacy import SpendRecord, global_norm, update_noise_std, update_settings_problems
from fedser.common.training import TrainConfig, train_task


@dataclass(frozen=True)
class RoundSettings:
    """How the server asks a device to train this round (every value comes from its instruction)."""

    epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 3e-3
    dp: bool = True                 # sample-level DP-SGD
    dp_max_grad_norm: float = 1.0
    scope: str = "all"              # which encoder weights train (``keys.TRAIN_SCOPES``)
    clip_norm: float = 2.0          # user-level clipping bound C
    noise_multiplier: float = 1.0   # user-level noise multiplier z
    noise_mode: str = "distributed"
    expected_clients: int = 1       # m, the devices per round distributed noise is split over
    # Adaptive clipping: std of the noise on the bit "norm <= C" the device sends; None = fixed clip.
    clip_count_std: float | None = None

    @classmethod
    def from_config(cls, cfg: Mapping) -> "RoundSettings":
        """The settings of a train instruction's ConfigRecord; ``KeyError``/``ValueError`` if one is missing or bad.

        DP-SGD and the train scope may be left out (on, and "all"); every other setting must be there.
        """
        missing = [key for field, key in _CONFIG_KEYS.items() if key not in cfg and field not in ("dp", "scope")]
        if missing:
            raise KeyError(f"the instruction lacks {', '.join(missing)}")
        settings = cls.announced(cfg)
        if settings.clip_count_std is not None and not (math.isfinite(settings.clip_count_std)
                                                        and settings.clip_count_std >= 0):
            raise ValueError(f"{keys.CLIP_COUNT_STD} must be a finite number >= 0, got {settings.clip_count_std}")
        return settings

    @property
    def protects_users(self) -> bool:
        """Whether the update carries user-level noise (what the device sends is then DP for its owner)."""
        return self.noise_mode != "none" and self.noise_multiplier > 0

    @classmethod
    def announced(cls, cfg: Mapping) -> "RoundSettings":
        """What a query says about the coming round: the keys it carries, the defaults for the rest
        (a device checks its policy against it; the train instruction itself is checked again)."""
        defaults = cls()
        count_std = cfg.get(keys.CLIP_COUNT_STD)
        return cls(**{field: type(getattr(defaults, field))(cfg.get(key, getattr(defaults, field)))
                      for field, key in _CONFIG_KEYS.items()},
                   clip_count_std=None if count_std is None else float(count_std))


# RoundSettings field -> its key in an instruction's ConfigRecord.
_CONFIG_KEYS = {"epochs": keys.LOCAL_EPOCHS, "batch_size": keys.BATCH_SIZE, "learning_rate": keys.LEARNING_RATE,
                "dp": keys.DP_ENABLED, "dp_max_grad_norm": keys.DP_MAX_GRAD_NORM, "scope": keys.TRAIN_SCOPE,
                "clip_norm": keys.CLIP_NORM, "noise_multiplier": keys.NOISE_MULTIPLIER,
                "noise_mode": keys.NOISE_MODE, "expected_clients": keys.EXPECTED_CLIENTS}


@dataclass(frozen=True)
class UpdateStats:
    """What ``privatize_update`` did: norms before / after clipping, the scale applied, the noise std."""

    norm_before: float
    norm_after_clip: float
    scale: float
    noise_std: float


@dataclass
class RoundResult:
    """One device round: what leaves the device and what it took to make it."""

    sent: dict[str, np.ndarray]          # the clipped, noised update
    local_delta: dict[str, np.ndarray]   # local - global, before clipping (never leaves the device)
    stats: UpdateStats
    losses: list[float]                  # final training loss per task
    steps: int                           # optimizer steps over all tasks
    spend: list[SpendRecord]             # sample-level spend per task (empty without DP)
    clip_bit: float | None = None        # noised "norm <= C" under adaptive clipping (None: fixed clip)


def train_round(model: torch.nn.Module, global_arrays: Mapping[str, np.ndarray], data: Mapping[str, TaskData],
                spec: FeatureSpec, settings: RoundSettings, *, sample_noise: float | None, delta: float,
                rng: np.random.Generator, seed: int | None = None) -> RoundResult:
    """One round of one device: DP-SGD on each task of ``data`` in turn, then :func:`privatize_update`.

    Args:
        model: the model with ``global_arrays`` loaded (the device's width slice); trained in place.
        global_arrays: name -> array of the model as the server sent it.
        data: task -> the device's training examples for that head.
        settings: the server's instruction for this round.
        sample_noise: the DP-SGD noise multiplier the ledger planned (None without DP).
        delta: the device's sample-level delta.
        rng: source of the user-level noise.
        seed: seeds shuffling, dropout, augmentation and the DP-SGD noise. ``None`` (a real device)
            draws a fresh unpredictable one, so no two rounds reuse noise and no one can
            reproduce it; a simulation passes its own for repeatable figures.

    Encoder arrays outside ``settings.scope`` are frozen: they stay exactly as sent and travel
    as zeros without noise.
    """
    if settings.dp and sample_noise is None:
        raise ConfigError("train_round: DP-SGD needs the noise multiplier the ledger planned")
    seed = secrets.randbits(62) if seed is None else int(seed)
    trained = trained_entries(model, settings.scope)   # ConfigError for an unknown scope
    losses, steps, spend = [], 0, []
    torch.manual_seed(seed)
    for task, examples in data.items():
        cfg = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.learning_rate,
                          dp=settings.dp, noise_multiplier=sample_noise, scope=settings.scope,
                          max_grad_norm=settings.dp_max_grad_norm, delta=delta, seed=seed + steps)
        result = train_task(model, task, examples, None, cfg, spec, Augmenter(spec, seed=seed + steps),
                            progress=False)
        losses.append(result.loss)
        steps += result.steps
        spend += list(result.spend)
    local = state_to_arrays(model)
    local_delta = {k: (local[k] - np.asarray(global_arrays[k])).astype(np.float32) for k in global_arrays}
    frozen = [k for k in local_delta if k not in trained]
    sent, stats = privatize_update(local_delta, clip_norm=settings.clip_norm,
                                   noise_multiplier=settings.noise_multiplier, mode=settings.noise_mode,
                                   expected_clients=settings.expected_clients, rng=rng, frozen=frozen)
    clip_bit = None
    if settings.clip_count_std is not None:
        # The only thing about the norm that leaves the device, noised like the update itself.
        clip_bit = float(stats.norm_before <= settings.clip_norm)
        if settings.clip_count_std > 0:
            clip_bit += float(rng.normal(0.0, settings.clip_count_std))
    return RoundResult(sent, local_delta, stats, losses, steps, spend, clip_bit)


def privatize_update(
    delta: Mapping[str, np.ndarray], clip_norm: float, noise_multiplier: float, mode: str,
    expected_clients: int, rng: np.random.Generator, frozen: Collection[str] = (),
) -> tuple[dict[str, np.ndarray], UpdateStats]:
    """Clip ``delta`` to global L2 norm ``clip_norm`` and add Gaussian noise as ``mode`` says.

    ``frozen`` names arrays the device did not train (the run fixed them for every device):
    they must be exactly zero and are sent as zeros, without noise. Being the same for every
    device, they reveal nothing, and noise on them would only corrupt weights nobody trains.

    Args:
        delta: name -> float array (any shape); the update, local minus global.
        clip_norm: C > 0, bound on the global L2 norm of the clipped update.
        noise_multiplier: z >= 0; noise std is z*C ("local") or z*C/sqrt(m) ("distributed").
        mode: one of ``NOISE_MODES``.
        expected_clients: m >= 1, devices per round the distributed noise is split over.
        rng: source of the noise.
        frozen: names in ``delta`` left untrained (all zero); no noise is added to them.

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
    frozen = set(frozen)
    unknown = sorted(frozen - set(arrays))
    bad += [f"{k}: named frozen but not in the update" for k in unknown]
    bad += [f"{k}: named frozen but changed (norm {float(np.linalg.norm(arrays[k])):.3g})" for k in sorted(frozen)
            if k in arrays and np.issubdtype(arrays[k].dtype, np.floating) and np.any(arrays[k])]
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
        if std > 0.0 and k not in frozen:
            v = v + rng.normal(0.0, std, size=a.shape)
        out[k] = v.astype(a.dtype, copy=False)
    return out, UpdateStats(norm_before=norm, norm_after_clip=norm * scale, scale=scale, noise_std=std)
