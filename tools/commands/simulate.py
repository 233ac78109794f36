"""``fedser simulate``: the same ServerApp and ClientApp on Flower's Simulation Engine (Ray).

One virtual client per device folder of a ``fedser partition`` output: client
``partition-id`` i trains on ``device-<i>/data.csv``; the held-out ``test.csv`` is the
server's evaluation set. The run itself is the server's (``fedser.server.simulation``): a
local SuperLink in simulation mode plus ``flwr run``.
"""
from __future__ import annotations

from fedser.server.simulation import add_arguments, run

HELP = "run a federation of virtual clients (one per partition) on Flower's Simulation Engine"

__all__ = ["HELP", "add_arguments", "run"]
