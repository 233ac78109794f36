"""Keyword spotting with the GRU state of a ``crnn`` encoder carried across hops.

The listener re-runs the whole window each hop by default (``recurrent="window"``): for a
recurrent encoder that is a GRU started from zero one window back, exactly the per-clip
computation it was trained on. Recurrent encoders (``crnn``, PyTorch bundles) can instead
keep their GRU state across hops (``recurrent="state"``): the convolutions run over the
current window, the GRU advances only over the new steps, the keyword head pools the GRU
outputs of the last window, and the listener resets the state when the voiced segment ends.
``"carry"`` never resets the state and exists to measure what a missing reset costs. With the
per-utterance feature normalisation of ``FrontEnd`` a frame's features depend on the window it
is computed in, so the steps a carried state has seen were normalised against other windows
than the ones it is pooled with: the state modes detect fewer keywords than re-running the
window (a from-scratch ``crnn`` model over log-mel, ``bench/bench_streaming.py --model``: 42.8 % of
900 command words in ``"state"`` mode, 28.3 % in ``"carry"``, 69.1 % re-running the window), which
is why they are not the default.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

from fedser.client.runtime import TorchRuntime
from fedser.common.errors import ConfigError
from fedser.common.export_format import takes_features
from fedser.common.models import stats_pool


class RecurrentKWS:
    """Keyword probabilities from a ``crnn`` encoder whose GRU state lives across hops.

    Each ``step(window)`` computes features and convolutions over the whole window (so
    utterance normalisation, mean removal and GroupNorm see the window, as in training)
    and advances the GRU only over the steps that are new since the previous hop. The
    newest ``lag`` steps are held back until the next hop: their receptive field still
    reaches past the window's end, into zero padding. The first step after a reset
    primes the GRU with the whole window, which is exactly the per-clip computation.
    The head pools (mean and std) the GRU outputs of the last window.
    """

    def __init__(self, runtime: TorchRuntime, hop_samples: int, lag: int = 2):
        model = runtime.pipeline.model
        encoder = model.encoder
        if not (hasattr(encoder, "convs") and hasattr(encoder, "gru")) or takes_features(runtime.spec):
            raise ConfigError(f"recurrent streaming needs a 'crnn' encoder over spectral features; this model "
                              f"uses {model.cfg.encoder!r} over {', '.join(runtime.spec.kinds)}")
        self.model, self.encoder = model, encoder
        self.frontend = runtime.pipeline.frontend
        self.mask = runtime.pipeline.mask_kws
        spec = runtime.spec
        self.stride = self.frames_per_step(encoder)
        step_samples = spec.hop_length * self.stride
        if hop_samples % step_samples:
            raise ConfigError(f"hop of {hop_samples} samples is not a whole number of GRU steps "
                              f"({step_samples} samples)")
        self.new_steps = hop_samples // step_samples
        self.lag = lag
        window_frames = spec.n_frames(spec.clip_samples("kws"))
        self.window_steps = -(-window_frames // self.stride)
        self.reset()

    @staticmethod
    def frames_per_step(encoder: torch.nn.Module) -> int:
        stride = 1
        for m in encoder.convs.modules():
            if isinstance(m, torch.nn.Conv1d):
                stride *= int(m.stride[0])
        return stride

    def reset(self) -> None:
        self.h: torch.Tensor | None = None
        self.outputs: deque[torch.Tensor] = deque(maxlen=self.window_steps)

    @torch.inference_mode()
    def step(self, window: np.ndarray) -> np.ndarray:
        """``(window_samples,)`` -> ``(n_keywords,)`` probabilities; advances the state."""
        feats = self.frontend(torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32)))  # (1, F, frames)
        z = self.encoder.convs(self.model._prepare(feats))  # (1, C, steps)
        usable = z.shape[-1] - self.lag
        first = self.h is None
        new = z[:, :, :usable] if first else z[:, :, max(0, usable - self.new_steps):usable]
        out, self.h = self.encoder.gru(new.transpose(1, 2), self.h)  # (1, n, H), (1, 1, H)
        self.outputs.extend(out[0])
        pooled = stats_pool(torch.stack(list(self.outputs), dim=1).unsqueeze(0))  # (1, 2H)
        logits = self.model.heads["kws"](pooled)[0] + self.mask
        return torch.softmax(logits, dim=-1).numpy()
