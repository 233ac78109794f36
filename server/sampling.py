"""Which connected devices take part in a round.

Flower's strategies sample with a helper of their own (``strategy_utils.sample_nodes``) that is
not part of its public API; this is the same rule on the public ``Grid`` interface, so a Flower
release that moves its internals cannot break a round.
"""
from __future__ import annotations

import logging
import math
import random
import time

from flwr.serverapp import Grid

from fedser.common.errors import FedserError

log = logging.getLogger("fedser.server")


class NotEnoughDevices(FedserError):
    """Fewer devices than a round needs stayed connected for longer than the run allows."""


def sample_nodes(grid: Grid, min_available: int, sample_size: int, *, poll: float = 1.0,
                 rng: random.Random | None = None, max_wait: float = math.inf) -> tuple[list[int], list[int]]:
    """Wait until at least ``max(min_available, sample_size)`` nodes are connected, then draw ``sample_size``.

    Returns ``(sampled, connected)``. ``rng`` defaults to the module-level ``random`` (as Flower's
    strategies use it, so a run seeded through ``random.seed`` samples the same way). The wait is
    logged whenever the count changes and ends after ``max_wait`` seconds with
    ``NotEnoughDevices``, which says how many were connected and how many were needed.
    """
    if sample_size < 0:
        raise ValueError(f"sample_size {sample_size}: expected >= 0")
    needed = max(min_available, sample_size)
    deadline = time.monotonic() + max_wait
    last = None
    while len(connected := list(grid.get_node_ids())) < needed:
        if len(connected) != last:
            log.warning("waiting for devices to connect: %d connected, %d needed (min-clients); giving up after "
                        "%s s", len(connected), needed, f"{max_wait:.0f}" if math.isfinite(max_wait) else "no")
            last = len(connected)
        if time.monotonic() >= deadline:
            raise NotEnoughDevices(f"{len(connected)} device(s) connected, {needed} needed (min-clients) after "
                                   f"{max_wait:.0f} s (connect-timeout): start more devices, lower min-clients, "
                                   "or raise connect-timeout; resume the run with --resume")
        time.sleep(poll)
    draw = rng.sample if rng is not None else random.sample
    return draw(connected, sample_size), connected
