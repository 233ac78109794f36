"""Multi-task acoustic models: one shared encoder, an emotion head and a keyword head.

Input is a batch of feature maps ``(B, F, T)``: by default 184 rows (speech_embedding's 96
plus eGeMAPS' 88, ``fedser.common.features``) on an 80 ms grid (9 frames for a 1 s keyword
clip, 34 for a 3 s emotion clip); the from-scratch encoders take 40 log-mel rows at a 10 ms
hop. Every encoder ends in statistics pooling over time (mean and standard deviation of
each channel), so the embedding size does not depend on ``T``.

Two families of encoders (the trainable part a device trains and sends):

- heads over frozen public features (default ``tcn``; ``gru``, ``mlp``): a few tens of
  thousands of weights, the models that learn under DP;
- from scratch over log-mel (``cnn``, ``crnn``) or the raw waveform (``m5``): whole acoustic
  networks, kept as options.

The models are DP-SGD ready by construction: GroupNorm with a fixed group *size*
(never BatchNorm), the recurrent layer is ``opacus.layers.DPGRU``, no in-place
activations, and ``forward`` touches only the head of the task it is asked for, so
one head can be frozen while Opacus trains the other. The state dict holds every
tensor once (DPGRU weights under their ``nn.GRU`` names, ``encoder.gru.weight_ih_l0``).

Every hidden channel / unit count is multiplied by ``ModelConfig.width`` (HeteroFL
tiers 1.0 / 0.5 / 0.25) and rounded to a multiple of the group size; the feature
dimension and the class counts never scale. See ``fedser.common.slicing`` for how a
narrow model maps onto the first units of the wide one.

Parameter counts (9 emotions, 12 keywords; 184 features for the heads, 40 for ``cnn`` and
``crnn``, one waveform row for ``m5``; measured):

=========  =========  =========  =========
encoder    width 1.0  width 0.5  width 0.25
=========  =========  =========  =========
``tcn``    50,581     22,229     10,357
``gru``    50,709     22,293     10,389
``mlp``    50,197     25,109     12,565
``cnn``    66,629     17,821     6,357
``crnn``   60,341     17,893     5,885
``m5``     27,157     8,213      2,773
=========  =========  =========  =========
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoders import EGEMAPS_DIM, EMBEDDING_DIM
from .errors import ConfigError, collect
from .keys import TASKS

# name -> encoder class; filled by @register_encoder below.
ENCODERS: dict[str, type["Encoder"]] = {}



def _loaded_dpgru() -> type | None:
    """DPGRU if Opacus is already imported, else None (then no DPGRU instance can exist).

    Opacus is imported lazily, when a recurrent encoder is built: it costs over a second
    at start-up, and every ClientApp message starts a fresh process.
    """
    layers = sys.modules.get("opacus.layers")
    return getattr(layers, "DPGRU", None)

def register_encoder(name: str) -> Callable[[type["Encoder"]], type["Encoder"]]:
    """Class decorator adding an ``Encoder`` subclass to ``ENCODERS`` under ``name``."""

    def add(cls: type[Encoder]) -> type[Encoder]:
        if name in ENCODERS:
            raise ConfigError(f"encoder {name!r} is already registered ({ENCODERS[name].__name__})")
        ENCODERS[name] = cls
        return cls

    return add


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a ``MultiTaskNet``; travels as JSON with the model.

    ``width`` is absolute: ``cfg.scaled(0.5)`` is the half-width model whatever
    ``cfg.width`` is. ``group_size`` is channels per GroupNorm group (fixed, so the
    first ``k`` channels of a wide layer are grouped exactly as a ``k``-channel layer);
    ``min_units`` is the floor of every scaled count. ``cmn`` subtracts each feature
    row's mean over time (per utterance) before the encoder, removing the
    microphone/channel offset that differs between devices; off by default, because the
    default features are normalised per speaker and eGeMAPS rows are constant over time.
    The defaults are the ``tcn`` head over the default features (speech_embedding + eGeMAPS).
    """

    encoder: str = "tcn"
    n_features: int = EMBEDDING_DIM + EGEMAPS_DIM
    width: float = 1.0
    n_emotions: int = 9
    n_keywords: int = 12
    dropout: float = 0.1
    group_size: int = 4
    min_units: int = 8
    cmn: bool = False

    def __post_init__(self) -> None:
        collect(_config_problems(dataclasses.asdict(self)), ConfigError, "ModelConfig")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``ModelConfig.from_dict(cfg.to_dict()) == cfg``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from a dict (e.g. parsed JSON). Missing keys take their defaults.

        Raises ``ConfigError`` naming every unknown key, wrong type and out-of-range value.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"ModelConfig: expected a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        problems = [f"{k}: unknown field (known: {', '.join(sorted(names))})" for k in d if k not in names]
        values = {**dataclasses.asdict(cls()), **{k: v for k, v in d.items() if k in names}}
        problems += _config_problems(values)
        collect(problems, ConfigError, "ModelConfig")
        # JSON may carry width as an int (1): store floats as floats.
        values["width"] = float(values["width"])
        values["dropout"] = float(values["dropout"])
        return cls(**values)

    def scaled(self, width: float) -> "ModelConfig":
        """The same model at another width tier (absolute, e.g. 0.5 or 0.25)."""
        return dataclasses.replace(self, width=float(width))

    def units(self, n: int) -> int:
        """Scaled size of a hidden layer that has ``n`` units at width 1.0.

        Rounded to the nearest multiple of ``group_size``, at least ``min_units``;
        monotone in ``width`` so narrower tiers nest inside wider ones.
        """
        k = math.floor(n * self.width / self.group_size + 0.5) * self.group_size
        return max(self.min_units, k)

    def n_classes(self, task: str) -> int:
        """Number of output classes of the head for ``task``."""
        _check_task(task)
        return self.n_emotions if task == "emotion" else self.n_keywords


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _config_problems(v: Mapping[str, Any]) -> list[str]:
    """Every problem of a ModelConfig given as a dict of field values (empty list: valid)."""
    p: list[str] = []
    enc = v["encoder"]
    if not isinstance(enc, str) or enc not in ENCODERS:
        p.append(f"encoder: unknown {enc!r}; choose one of {', '.join(sorted(ENCODERS))}")
    for name, low in (("n_features", 1), ("n_emotions", 2), ("n_keywords", 2), ("group_size", 1)):
        if not _is_int(v[name]) or v[name] < low:
            p.append(f"{name}: expected an integer >= {low}, got {v[name]!r}")
    if not _is_real(v["width"]) or not 0 < v["width"] <= 1:
        p.append(f"width: expected a number in (0, 1] (tiers 1.0, 0.5, 0.25), got {v['width']!r}")
    if not _is_real(v["dropout"]) or not 0 <= v["dropout"] < 1:
        p.append(f"dropout: expected a number in [0, 1), got {v['dropout']!r}")
    gs, mu = v["group_size"], v["min_units"]
    if not _is_int(mu) or mu < 1:
        p.append(f"min_units: expected an integer >= 1, got {mu!r}")
    elif _is_int(gs) and gs >= 1 and mu % gs:
        p.append(f"min_units: must be a multiple of group_size {gs}, got {mu!r}")
    if not isinstance(v["cmn"], bool):
        p.append(f"cmn: expected true or false, got {v['cmn']!r}")
    return p


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"task: unknown {task!r}; choose one of {', '.join(TASKS)}")


# --------------------------------------------------------------------------- building blocks


def group_norm(channels: int, group_size: int) -> nn.GroupNorm:
    """GroupNorm with ``group_size`` channels per group (``channels`` must be a multiple)."""
    if channels % group_size:
        raise ConfigError(f"GroupNorm: {channels} channels is not a multiple of group size {group_size}")
    return nn.GroupNorm(channels // group_size, channels)


def stats_pool(h: Tensor) -> Tensor:
    """Mean and standard deviation over time: ``(B, C, T) -> (B, 2C)`` as ``[mean | std]``.

    The output holds two stacked blocks of ``C`` (see ``MultiTaskNet.block_dims``).
    The epsilon keeps the gradient finite for constant channels.
    """
    mean = h.mean(dim=-1, keepdim=True)  # (B, C, 1)
    # The variance spelled out: torch.var over a short last axis (a few to a few hundred steps) is
    # several times slower on CPUs, forward and backward, than these elementwise ops.
    std = ((h - mean).square().mean(dim=-1) + 1e-5).sqrt()  # (B, C)
    return torch.cat([mean.squeeze(-1), std], dim=1)  # (B, 2C)


class ConvNormAct(nn.Module):
    """Conv1d over time -> GroupNorm -> ReLU.  ``(B, C_in, T) -> (B, C_out, ceil(T / stride))``."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, group_size: int):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.norm = group_norm(c_out, group_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv(x)))


class ResBlock(nn.Module):
    """TC-ResNet residual block: two temporal convs with GroupNorm and a projected shortcut.

    ``(B, C_in, T) -> (B, C_out, ceil(T / stride))``.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, group_size: int):
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=pad, bias=False)
        self.norm1 = group_norm(c_out, group_size)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel, padding=pad, bias=False)
        self.norm2 = group_norm(c_out, group_size)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv1d(c_in, c_out, 1, stride=stride, bias=False), group_norm(c_out, group_size)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))  # (B, C_out, T')
        y = self.norm2(self.conv2(y))  # (B, C_out, T')
        return F.relu(y + self.shortcut(x))  # (B, C_out, T')


def _dpgru_aliases(owner: nn.Module, prefix: str) -> list[tuple[str, str]]:
    """(duplicate key, nn.GRU-style key) of every DPGRU weight under ``owner``."""
    pairs = []
    for name, module in owner.named_modules():
        if (dpgru := _loaded_dpgru()) is not None and isinstance(module, dpgru):
            base = prefix + (name + "." if name else "")
            pairs += [(base + old, base + new) for old, new in module.old_to_new.items()]
    return pairs


def _drop_dpgru_aliases(owner: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for alias, _ in _dpgru_aliases(owner, prefix):
        state_dict.pop(alias, None)


def _fill_dpgru_aliases(owner: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    for alias, key in _dpgru_aliases(owner, prefix):
        if key in state_dict and alias not in state_dict:
            state_dict[alias] = state_dict[key]


def keep_one_name_per_dpgru_weight(owner: nn.Module) -> None:
    """Make ``owner``'s state hold each DPGRU tensor once, under its nn.GRU name.

    DPGRU registers every weight twice (``weight_ih_l0`` and its cell's
    ``l0.ih.weight``) and drops the second name only when the DPGRU itself is the
    root of ``state_dict()``; inside a model both names would reach the state, so
    an update would carry the GRU twice and loading would depend on key order.
    The hooks sit on the owner, not on the DPGRU, because Opacus' own state hook
    there replaces the dict instead of editing it. Loading accepts the nn.GRU names
    alone and fills the cell's names from them.
    """
    owner.register_state_dict_post_hook(_drop_dpgru_aliases)
    owner.register_load_state_dict_pre_hook(_fill_dpgru_aliases)


# --------------------------------------------------------------------------- encoders


class Encoder(nn.Module):
    """Shared acoustic encoder: ``(B, F, T) -> (B, dim)``.

    ``dim`` is the embedding size; ``pool_blocks`` says how many stacked blocks of
    equal size the embedding holds (2 for ``[mean | std]``), so slicing can take the
    first units of each block.
    """

    dim: int
    pool_blocks: int = 2
    # Opacus per-sample-gradient mode that trains this encoder fastest under DP-SGD on a CPU
    # (bench/bench_training.py --modes): all modes give the same gradients, only the speed differs.
    grad_sample_mode: str = "hooks"


@register_encoder("cnn")
class TCResNet(Encoder):
    """TC-ResNet8-style temporal CNN (Choi et al., 2019) with GroupNorm.

    Feature rows are input channels and every convolution runs over time only, which
    is fast on CPUs. Stem conv (k=3) then three residual blocks (k=9, stride 2), so
    the time axis shrinks 8x before statistics pooling.
    ``(B, F, T) -> (B, 2 * C)`` with ``C = units(48)``.
    """

    channels = (16, 24, 32, 48)
    kernel = 9
    # ExpandedWeights skips the im2col copy Opacus' conv hooks make: 2.58x vs 3.08x plain time.
    grad_sample_mode = "ew"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = [cfg.units(n) for n in self.channels]
        gs = cfg.group_size
        self.stem = ConvNormAct(cfg.n_features, c[0], 3, 1, gs)
        self.blocks = nn.Sequential(
            *(ResBlock(c[i], c[i + 1], self.kernel, 2, gs) for i in range(len(c) - 1))
        )
        self.dim = 2 * c[-1]

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)  # (B, C0, T)
        h = self.blocks(h)  # (B, C3, ceil(T / 8))
        return stats_pool(h)  # (B, 2 * C3)


@register_encoder("crnn")
class CRNN(Encoder):
    """Two strided temporal convs (GroupNorm) then a one-layer unidirectional DPGRU.

    The convs shrink time 4x (40 ms per GRU step at a 10 ms hop); statistics pooling
    runs over the GRU outputs. ``(B, F, T) -> (B, 2 * H)`` with ``H = units(96)``.
    ``sequence`` exposes the per-step outputs and the GRU state for streaming.
    """

    channels = (32, 48)
    kernel = 5
    hidden = 96

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = [cfg.units(n) for n in self.channels]
        gs = cfg.group_size
        self.convs = nn.Sequential(
            ConvNormAct(cfg.n_features, c[0], self.kernel, 2, gs),
            ConvNormAct(c[0], c[1], self.kernel, 2, gs),
        )
        self.hidden_size = cfg.units(self.hidden)
        from opacus.layers import DPGRU

        self.gru = DPGRU(c[1], self.hidden_size, num_layers=1, batch_first=True)
        keep_one_name_per_dpgru_weight(self)
        self.dim = 2 * self.hidden_size

    def sequence(self, x: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-step GRU outputs and final state.

        ``x`` (B, F, T), ``h`` (1, B, H) or None (zeros) ->
        ``(out (B, ceil(T / 4), H), h_n (1, B, H))``.
        """
        z = self.convs(x)  # (B, C1, T / 4)
        out, h_n = self.gru(z.transpose(1, 2), h)  # (B, T / 4, H), (1, B, H)
        return out, h_n

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.sequence(x)  # (B, T / 4, H)
        return stats_pool(out.transpose(1, 2))  # (B, 2H)


@register_encoder("tcn")
class TemporalHead(Encoder):
    """The default: a small temporal CNN over frozen encoder features, then statistics pooling.

    Two convolutions (k=3, GroupNorm) over the feature sequence (speech_embedding's 80 ms
    steps with eGeMAPS repeated along them), dropout on the input rows. About 50k weights at
    width 1.0 for 184 input rows: small enough that DP noise spread over them stays affordable.
    ``(B, F, T) -> (B, 2 * C)`` with ``C = units(64)``.
    """

    channels = 64
    kernel = 3
    # Ghost clipping (``fedser.common.dp_norms``): a DP-SGD epoch of the KWS bench set at batch 16
    # (a device's) in 0.69 s, ExpandedWeights 1.04 s; at batch 64 0.31 s and 0.32 s; at batch 256
    # 0.20 s and 0.30 s (plain 0.28, 0.16 and 0.11 s).
    grad_sample_mode = "ghost"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.units(self.channels)
        self.inputs = nn.Dropout(cfg.dropout)
        self.convs = nn.Sequential(ConvNormAct(cfg.n_features, c, self.kernel, 1, cfg.group_size),
                                   ConvNormAct(c, c, self.kernel, 1, cfg.group_size))
        self.dim = 2 * c

    def forward(self, x: Tensor) -> Tensor:
        return stats_pool(self.convs(self.inputs(x)))  # (B, 2C)


@register_encoder("gru")
class RecurrentHead(Encoder):
    """A one-layer DPGRU over frozen encoder features, then statistics pooling of its outputs.

    ``(B, F, T) -> (B, 2 * H)`` with ``H = units(64)``. ``sequence`` carries the state for streaming.
    """

    hidden = 64

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from opacus.layers import DPGRU

        self.hidden_size = cfg.units(self.hidden)
        self.inputs = nn.Dropout(cfg.dropout)
        self.gru = DPGRU(cfg.n_features, self.hidden_size, num_layers=1, batch_first=True)
        keep_one_name_per_dpgru_weight(self)
        self.dim = 2 * self.hidden_size

    def sequence(self, x: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x`` (B, F, T), ``h`` (1, B, H) or None -> ``(out (B, T, H), h_n (1, B, H))``."""
        return self.gru(self.inputs(x).transpose(1, 2), h)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.sequence(x)  # (B, T, H)
        return stats_pool(out.transpose(1, 2))  # (B, 2H)


@register_encoder("mlp")
class PooledHead(Encoder):
    """Statistics pooling of the input first, then one hidden layer: an MLP over functionals.

    ``(B, F, T) -> (B, H)`` with ``H = units(128)``: the clip's per-row mean and standard
    deviation (``2F`` values; for eGeMAPS rows the mean is the functional itself) through
    Linear, GroupNorm and ReLU.
    """

    hidden = 128
    pool_blocks = 1

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.units(self.hidden)
        self.inputs = nn.Dropout(cfg.dropout)
        self.hidden_layer = nn.Linear(2 * cfg.n_features, h)
        self.norm = group_norm(h, cfg.group_size)
        self.dim = h

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.hidden_layer(self.inputs(stats_pool(x)))))  # (B, H)


@register_encoder("m5")
class M5(Encoder):
    """M5, the raw-waveform CNN of Dai et al. (2017), with GroupNorm instead of BatchNorm.

    Takes the ``"waveform"`` feature kind ``(B, 1, T)``: a wide strided first convolution
    (80 samples, stride 16) learns its own filterbank, then three k=3 convolutions, each
    followed by max-pooling by 4, then statistics pooling. The end-to-end KWS model trained from
    scratch; kept to show what the frozen encoders buy. ``(B, 1, T) -> (B, 2 * C)``, ``C = units(64)``.
    """

    channels = (32, 32, 64, 64)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = [cfg.units(n) for n in self.channels]
        gs = cfg.group_size
        # ceil_mode: a clip shorter than the pooling still leaves one frame to pool.
        layers: list[nn.Module] = [ConvNormAct(cfg.n_features, c[0], 80, 16, gs), nn.MaxPool1d(4, ceil_mode=True)]
        for i in range(1, len(c)):
            layers += [ConvNormAct(c[i - 1], c[i], 3, 1, gs), nn.MaxPool1d(4, ceil_mode=True)]
        self.layers = nn.Sequential(*layers)
        self.dim = 2 * c[-1]

    def forward(self, x: Tensor) -> Tensor:
        return stats_pool(self.layers(x))  # (B, 2C)


# --------------------------------------------------------------------------- the model


class MultiTaskNet(nn.Module):
    """Shared encoder + ``heads = ModuleDict({"emotion": Linear, "kws": Linear})``.

    Head parameters are named ``heads.emotion.*`` and ``heads.kws.*`` (see ``head_of``);
    everything else is the shared encoder. See the module docstring for parameter counts.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder: Encoder = ENCODERS[cfg.encoder](cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.heads = nn.ModuleDict({task: nn.Linear(self.encoder.dim, cfg.n_classes(task)) for task in TASKS})

    @property
    def embed_dim(self) -> int:
        return self.encoder.dim

    def _prepare(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != self.cfg.n_features or x.shape[2] < 1:
            raise ValueError(
                f"expected features of shape (batch, {self.cfg.n_features}, frames >= 1), got {tuple(x.shape)}"
            )
        if self.cfg.cmn:
            x = x - x.mean(dim=-1, keepdim=True)  # (B, F, T), per-utterance mean removed
        return x

    def embed(self, x: Tensor) -> Tensor:
        """Utterance embedding: ``(B, F, T) -> (B, embed_dim)``."""
        return self.encoder(self._prepare(x))

    def forward(self, x: Tensor, task: str) -> Tensor:
        """Logits of one task's head: ``(B, F, T) -> (B, n_classes(task))``.

        The other head is not used, so its parameters get no gradient (freeze them
        with ``requires_grad_(False)`` when training under Opacus).
        """
        _check_task(task)
        return self.heads[task](self.dropout(self.embed(x)))

    def stream_step(self, x: Tensor, task: str, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One chunk of a stream through a recurrent encoder, carrying the GRU state.

        ``x`` (B, F, T_chunk), ``h`` (1, B, H) from the previous chunk or None ->
        ``(logits (B, n_classes(task)), h (1, B, H))``. Mean removal, the convs'
        GroupNorm and the pooling see this chunk only; the GRU state carries the past.
        Only encoders with a ``sequence`` method (``crnn``) support it.
        """
        _check_task(task)
        sequence = getattr(self.encoder, "sequence", None)
        if sequence is None:
            raise ConfigError(f"stream_step needs a recurrent encoder ('crnn'); this model uses {self.cfg.encoder!r}")
        out, h = sequence(self._prepare(x), h)  # (B, T', H), (1, B, H)
        return self.heads[task](stats_pool(out.transpose(1, 2))), h

    def block_dims(self) -> dict[str, dict[int, int]]:
        """State entries with dimensions made of stacked equal blocks: ``name -> {dim: n_blocks}``.

        DPGRU weights/biases stack the r, z, n gates (3 blocks of H along dim 0); the
        heads' weights read the ``[mean | std]`` embedding (``pool_blocks`` along dim 1).
        A width-``w`` slice takes the first units of every block, not the first units
        of the whole dimension.
        """
        blocks: dict[str, dict[int, int]] = {}
        for prefix, module in self.named_modules():
            if (dpgru := _loaded_dpgru()) is not None and isinstance(module, dpgru):
                for name in module.state_dict():
                    blocks[f"{prefix}.{name}"] = {0: 3}
        for task in TASKS:
            blocks[f"heads.{task}.weight"] = {1: self.encoder.pool_blocks}
        return blocks


def build_model(cfg: ModelConfig) -> MultiTaskNet:
    """A freshly initialised ``MultiTaskNet`` for ``cfg`` (in training mode)."""
    if not isinstance(cfg, ModelConfig):
        raise ConfigError(f"build_model: expected a ModelConfig, got {type(cfg).__name__}")
    return MultiTaskNet(cfg)


def encoder_params_in_scope(model: nn.Module, scope: str) -> set[str]:
    """Names of the encoder parameters a device trains under ``scope`` (``keys.TRAIN_SCOPES``).

    "all": every one; "norms": the affine scale and shift of the normalisation layers (a few
    hundred weights that adapt a pretrained encoder's features); "heads": none. The heads a
    device has labels for are trained under every scope.
    """
    from .keys import TRAIN_SCOPES

    if scope not in TRAIN_SCOPES:
        raise ConfigError(f"train scope {scope!r} is not one of {', '.join(TRAIN_SCOPES)}")
    names = set()
    for prefix, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            if head_of(full) is not None:
                continue
            if scope == "all" or (scope == "norms" and isinstance(module, _NORMS)):
                names.add(full)
    return names


def trained_entries(model: nn.Module, scope: str) -> set[str]:
    """State entries a device trains, clips and noises under ``scope``: every head and the encoder
    parameters in scope. The others (frozen weights, buffers) travel as zeros without noise."""
    heads = {name for name in model.state_dict() if head_of(name) is not None}
    return heads | encoder_params_in_scope(model, scope)


_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm1d)


def head_of(param_name: str) -> str | None:
    """``"emotion"`` / ``"kws"`` for a head parameter name, None for the shared encoder.

    Accepts names from an Opacus ``GradSampleModule`` too (``_module.heads.kws.weight``).
    """
    parts = param_name.split(".")
    while parts and parts[0] == "_module":
        parts.pop(0)
    if len(parts) >= 3 and parts[0] == "heads" and parts[1] in TASKS:
        return parts[1]
    return None


PARTS = ("encoder", "heads") + TASKS


def count_parameters(model: nn.Module, part: str | None = None) -> int:
    """Number of parameter elements: all (``part=None``), ``"encoder"``, ``"heads"``,
    ``"emotion"`` or ``"kws"``."""
    if part is not None and part not in PARTS:
        raise ConfigError(f"part: unknown {part!r}; choose None or one of {', '.join(PARTS)}")
    total = 0
    for name, p in model.named_parameters():
        head = head_of(name)
        if (
            part is None
            or (part == "encoder" and head is None)
            or (part == "heads" and head is not None)
            or part == head
        ):
            total += p.numel()
    return total
