"""``tier = auto``: pick a width tier from a quick on-device speed probe.

Times DP-free training steps of the full-width default model on a synthetic batch and
maps the throughput to the widest tier that keeps a local round short on this device.
"""
from __future__ import annotations

import time

import torch

from fedser.common.features import FeatureSpec
from fedser.common.models import ModelConfig, build_model

# Samples per second of full-width training needed for each tier (widest first).
TIER_THRESHOLDS = ((1.0, 150.0), (0.5, 40.0))


def training_throughput(width: float = 1.0, batch: int = 16, steps: int = 3) -> float:
    spec = FeatureSpec()
    model = build_model(ModelConfig(n_features=spec.n_features(), width=width))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch, spec.n_features(), spec.n_frames(spec.clip_samples("kws")))
    y = torch.zeros(batch, dtype=torch.long)
    loss_fn = torch.nn.CrossEntropyLoss()
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()  # the first step warms up allocators and kernels
        opt.zero_grad()
        loss_fn(model(x, "kws"), y).backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def auto_tier() -> float:
    speed = training_throughput()
    for tier, needed in TIER_THRESHOLDS:
        if speed >= needed:
            return tier
    return 0.25
