"""Which connected devices take part in a round.

Flower's strategies sample with a helper of their own (``strategy_utils.sample_nodes``) that is
not part of its public API; this is the same rule on the public ``Grid`` interface, so a Flower
release that moves its internals cannot break a round.
"""
from __future__ import annotations

import logging
import random
import time

from flwr.serverapp import Grid

log = logging.getLogger("fedser.server")


def sample_nodes(grid: Grid, min_available: int, sample_size: int, *, poll: float = 1.0,
                 rng: random.Random | None = None) -> tuple[list[int], list[int]]:
    """Wait until at least ``max(min_available, sample_size)`` nodes are connected, then draw ``sample_size``.

    Returns ``(sampled, connected)``. ``rng`` defaults to the module-level ``random`` (as Flower's
    strategies use it, so a run seeded through ``random.seed`` samples the same way).
    """
    if sample_size < 0:
        raise ValueError(f"sample_size {sample_size}: expected >= 0")
    needed = max(min_available, sample_size)
    while len(connected := list(grid.get_node_ids())) < needed:
        log.info("waiting for devices to connect: %d connected, %d needed", len(connected), needed)
        time.sleep(poll)
    draw = rng.sample if rng is not None else random.sample
    return draw(connected, sample_size), connected
