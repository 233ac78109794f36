"""HeteroFL nested slices of one global model.

A client of width tier ``w`` trains ``build_model(cfg.scaled(w))``. Its parameters are
the *first* ``k`` units of every scaled dimension of the global model's parameters,
where ``k = cfg.scaled(w).units(n)``; dimensions that hold stacked equal blocks (the
DPGRU's r/z/n gates, the heads' ``[mean | std]`` inputs, see
``MultiTaskNet.block_dims``) take the first ``k`` units of *each* block. Because the
counts are monotone in ``w``, slices nest: the 0.25 slice of the 0.5 slice is the 0.25
slice of the global model.

The index of every parameter is derived from the models themselves (the global and
the width-``w`` ``state_dict`` shapes plus the block layout), never written by hand,
so a new encoder needs no change here.

Indices are ``np.ix_``-style tuples: ``global_array[index[name]]`` is the sub-array and
``global_array[index[name]] = sub_array`` writes it back.
"""
from __future__ import annotations

import functools
from typing import Mapping

import numpy as np

from .errors import ConfigError, collect
from .models import ModelConfig, build_model

Index = tuple[np.ndarray, ...]


def _dim_index(global_size: int, sub_size: int, n_blocks: int) -> np.ndarray:
    """Positions in a dimension of ``global_size`` that a ``sub_size`` slice keeps.

    The dimension is ``n_blocks`` stacked blocks; the first ``sub_size / n_blocks``
    positions of each block are kept, e.g. (12, 6, 3) -> [0 1 | 4 5 | 8 9].
    """
    g, s = global_size // n_blocks, sub_size // n_blocks
    if global_size % n_blocks or sub_size % n_blocks or s > g:
        raise ConfigError(
            f"cannot slice a dimension of {global_size} ({n_blocks} blocks) down to {sub_size}"
        )
    return np.concatenate([b * g + np.arange(s) for b in range(n_blocks)]).astype(np.intp)


@functools.lru_cache(maxsize=64)
def _layout(cfg: ModelConfig, width: float) -> tuple[dict[str, Index], dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(index, global shapes, sub shapes) for ``cfg`` sliced to ``width``; cached, read-only."""
    if not isinstance(cfg, ModelConfig):
        raise ConfigError(f"slicing: expected a ModelConfig, got {type(cfg).__name__}")
    if not 0 < width <= cfg.width:
        raise ConfigError(f"width: expected a number in (0, {cfg.width}] (the global width), got {width!r}")
    big = build_model(cfg)
    small = build_model(cfg.scaled(width))
    g_shapes = {k: tuple(v.shape) for k, v in big.state_dict().items()}
    s_shapes = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    if list(g_shapes) != list(s_shapes):
        raise ConfigError(f"encoder {cfg.encoder!r}: models of width {cfg.width} and {width} have different parameter names")
    blocks = big.block_dims()
    index: dict[str, Index] = {}
    for name, g_shape in g_shapes.items():
        s_shape = s_shapes[name]
        if len(g_shape) != len(s_shape):
            raise ConfigError(f"{name}: rank differs between widths ({g_shape} vs {s_shape})")
        per_dim = [
            _dim_index(g, s, blocks.get(name, {}).get(d, 1)) for d, (g, s) in enumerate(zip(g_shape, s_shape))
        ]
        ix = np.ix_(*per_dim)
        for a in ix:
            a.flags.writeable = False
        index[name] = ix
    return index, g_shapes, s_shapes


def _key(cfg: ModelConfig, width: float) -> tuple[ModelConfig, float]:
    try:
        return cfg, float(width)
    except (TypeError, ValueError):
        raise ConfigError(f"width: expected a number, got {width!r}") from None


def slice_index(cfg: ModelConfig, width: float) -> dict[str, Index]:
    """Per state entry, the ``np.ix_``-style index of the width-``width`` sub-model.

    ``cfg`` is the global model's config and ``0 < width <= cfg.width``. Entries are in
    ``state_dict`` order; ``global_array[index[name]]`` has the sub-model's shape.
    The index arrays are shared and read-only.
    """
    return dict(_layout(*_key(cfg, width))[0])


def _check(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    problems = [f"missing {k}" for k in shapes if k not in arrays]
    problems += [f"unexpected {k}" for k in arrays if k not in shapes]
    problems += [
        f"{k}: expected shape {shapes[k]}, got {tuple(np.shape(arrays[k]))}"
        for k in shapes
        if k in arrays and tuple(np.shape(arrays[k])) != shapes[k]
    ]
    collect(problems, ConfigError, what)


def slice_state(global_state: Mapping[str, np.ndarray], cfg: ModelConfig, width: float) -> dict[str, np.ndarray]:
    """The width-``width`` sub-model's state cut out of the global model's state.

    ``global_state`` holds every entry of ``build_model(cfg).state_dict()`` with its
    shape; the result (fresh arrays, same dtype, ``state_dict`` order) loads strictly
    into ``build_model(cfg.scaled(width))``. Raises ``ConfigError`` naming missing,
    unexpected and misshapen entries.
    """
    index, g_shapes, _ = _layout(*_key(cfg, width))
    _check(global_state, g_shapes, f"global state for width {cfg.width}")
    return {k: np.ascontiguousarray(np.asarray(global_state[k])[ix]) for k, ix in index.items()}
