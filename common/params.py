"""Model parameters as named float32 numpy arrays, the form they cross the wire in.

``state_to_arrays`` and ``arrays_to_state`` are a pair: a model's state sent through
both comes back unchanged.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, collect


class StateMismatch(ConfigError):
    """Arrays do not fit a model: missing / unexpected names, wrong shapes, non-finite values."""


def _unwrap(model: nn.Module) -> nn.Module:
    # Opacus' GradSampleModule keeps the real model as ``_module``; its state names
    # would otherwise carry a ``_module.`` prefix.
    while isinstance(getattr(model, "_module", None), nn.Module):
        model = model._module
    return model


def _to_numpy(value: Any) -> np.ndarray:
    if torch.is_tensor(value):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        value = value.numpy()
    return np.array(value, dtype=np.float32, copy=True)


def state_to_arrays(model_or_state: nn.Module | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``name -> float32 array`` (fresh copies) in ``state_dict`` order.

    A model contributes its parameters and persistent buffers (``state_dict``); a
    mapping (a ``state_dict`` or a dict of arrays) is converted entry by entry.
    """
    if isinstance(model_or_state, nn.Module):
        state: Mapping[str, Any] = _unwrap(model_or_state).state_dict()
    elif isinstance(model_or_state, Mapping):
        state = model_or_state
    else:
        raise TypeError(f"state_to_arrays: expected an nn.Module or a mapping, got {type(model_or_state).__name__}")
    return {name: _to_numpy(value) for name, value in state.items()}


def arrays_to_state(arrays: Mapping[str, Any], model: nn.Module) -> None:
    """Load ``arrays`` into ``model`` (in place), strictly.

    Every name of the model's ``state_dict`` must be present with its exact shape and
    finite values, and no other name may appear. All problems are collected and
    raised at once as ``StateMismatch`` (a ``ConfigError``) before anything is loaded,
    so a bad payload never leaves the model half-updated.
    """
    target = _unwrap(model)
    expected = target.state_dict()
    problems = [f"missing {k}" for k in expected if k not in arrays]
    problems += [f"unexpected {k}" for k in arrays if k not in expected]
    tensors: dict[str, torch.Tensor] = {}
    for name, ref in expected.items():
        if name not in arrays:
            continue
        try:
            arr = np.asarray(arrays[name].detach().cpu() if torch.is_tensor(arrays[name]) else arrays[name])
            arr = arr.astype(np.float32, copy=False) if arr.dtype.kind in "fiub" else None
        except (TypeError, ValueError):
            arr = None
        if arr is None:
            problems.append(f"{name}: not a numeric array")
            continue
        if tuple(arr.shape) != tuple(ref.shape):
            problems.append(f"{name}: expected shape {tuple(ref.shape)}, got {tuple(arr.shape)}")
            continue
        if not np.isfinite(arr).all():
            problems.append(f"{name}: contains NaN or Inf")
            continue
        tensors[name] = torch.from_numpy(np.array(arr, copy=True)).to(dtype=ref.dtype, device=ref.device)
    collect(problems, StateMismatch, f"cannot load arrays into {type(target).__name__}")
    target.load_state_dict(tensors, strict=True)
