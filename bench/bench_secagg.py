"""Secure aggregation's cost per round against the plain round, through the real protocol code.

For cohorts of m devices, each with an update of the default model (train scope "all": every
weight of the small model over the frozen encoders; "heads": the heads alone), one round:

- **plain**: devices send their float32 slices; the server validates and aggregates each one
  (``HeteroFedAvg.aggregate_train``);
- **secure**: ``fedser.server.secure_round.SecureRound``'s four stages with the devices' real
  protocol code (``fedser.client.secure``: P-384 keys, Shamir shares, masks); the server rebuilds
  the masks and aggregates the sum;
- **secure, 10 % drop out** after sharing keys: the server also rebuilds their mask keys;

each secure round with every device masking with every other (SecAgg) and with 16 neighbours on
SecAgg+'s random ring, where the cohort has more than 17 devices.

Devices are mixed (widths 1.0 / 0.5 / 0.25, heads both / emotion / kws, in turn) and answer in
this one process, one after the other; the table gives the devices' protocol work per device
(mean) and the server's own time, and the bytes that crossed the wire (Flower's record sizes).
Training and Flower's transport are the same in both and not counted; in a deployment each
secure round also starts the ClientApp three more times per device (see the README).

    python bench/bench_secagg.py [--cohorts 10 50 100] [--scopes all heads] [--neighbours 0 16]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, load_average, load_note, machine_line, md_table  # noqa: E402

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.app.message_type import MessageType  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedser.client import secure  # noqa: E402
from fedser.common import keys  # noqa: E402
from fedser.common.features import spec_for  # noqa: E402
from fedser.common.models import ModelConfig, build_model, trained_entries  # noqa: E402
from fedser.common.params import state_to_arrays  # noqa: E402
from fedser.common.privacy import AdaptiveClip, update_noise_std  # noqa: E402
from fedser.common.records import arrays_to_record  # noqa: E402
from fedser.common.secagg import Layout  # noqa: E402
from fedser.common.slicing import slice_index  # noqa: E402
from fedser.server.secure_round import SecureRound  # noqa: E402
from fedser.server.strategy import HeteroFedAvg  # noqa: E402

TIERS, HEADS = (1.0, 0.5, 0.25), (3, 1, 2)


class Device:
    """A device that skips training: its update is a small value plus the instructed noise."""

    def __init__(self, node: int, config: ModelConfig, scope: str, drops: bool):
        self.node, self.tier, self.heads = node, TIERS[node % 3], HEADS[(node // 3) % 3]
        self.config, self.scope, self.drops = config, scope, drops
        self.state = RecordDict()
        self.seconds = 0.0

    def __call__(self, msg: Message) -> Message | None:
        t0 = time.perf_counter()
        try:
            return self._answer(msg)
        finally:
            self.seconds += time.perf_counter() - t0

    def _answer(self, msg: Message) -> Message | None:
        cfg = msg.content["config"]
        if msg.metadata.message_type == MessageType.QUERY:
            if keys.SECAGG_STAGE in cfg:
                return Message(RecordDict({keys.SECAGG: secure.handle_stage(cfg, self.state, self.node)}),
                               reply_to=msg)
            return Message(RecordDict({keys.METRICS: MetricRecord({keys.TIER: self.tier, keys.HEADS: self.heads,
                                                                   keys.NUM_EXAMPLES: 50})}), reply_to=msg)
        if self.drops:
            return None
        std = update_noise_std(cfg[keys.CLIP_NORM], cfg[keys.NOISE_MULTIPLIER], cfg[keys.NOISE_MODE],
                               cfg[keys.EXPECTED_CLIENTS])
        rng = np.random.default_rng(self.node)
        trained = trained_entries(build_model(self.config), self.scope)
        sent = {k: (np.full(v.shape, 1e-3) + rng.normal(0, std, v.shape)).astype(np.float32) if k in trained
                else np.zeros(v.shape, np.float32) for k, v in msg.content[keys.ARRAYS].items()}
        bit = 1.0 + float(rng.normal(0, cfg[keys.CLIP_COUNT_STD]))
        metrics = {keys.NUM_EXAMPLES: 50, keys.HEADS: self.heads, keys.TIER: self.tier,
                   keys.MODEL_VERSION: int(cfg[keys.MODEL_VERSION]), keys.EPSILON: 1.0}
        if keys.SECAGG_SRCS not in cfg:
            record = arrays_to_record(sent)
            metrics[keys.CLIP_BIT] = bit
        else:
            secure.receive_shares(cfg, self.state, self.node)
            shapes = {k: v.shape for k, v in build_model(self.config).state_dict().items()}
            layout = Layout.of(shapes, trained, with_bit=True)
            padded = secure.padded_update(sent, slice_index(self.config, self.tier), layout,
                                          set(keys.mask_to_heads(self.heads)))
            record = ArrayRecord({keys.MASKED: Array(secure.masked_input(self.state, self.node,
                                                                         layout.flatten(padded, bit)))})
        return Message(RecordDict({keys.ARRAYS: record, keys.METRICS: MetricRecord(metrics)}), reply_to=msg)


class Grid:
    def __init__(self, devices: dict[int, Device]):
        self.devices = devices

    def get_node_ids(self):
        return list(self.devices)

    def send_and_receive(self, messages, *, timeout=None):
        replies = [self.devices[m.metadata.dst_node_id](m) for m in messages]
        return [r for r in replies if r is not None]


def one_round(m: int, scope: str, mode: str, neighbours: int = 0) -> dict:
    spec = spec_for("speech-embedding,egemaps")
    config = ModelConfig(encoder="tcn", n_features=spec.n_features())
    secured = mode != "plain"
    dropping = max(1, m // 10) if mode == "secure, 10% drop out" else 0
    devices = {n: Device(n, config, scope, drops=n < dropping) for n in range(m)}
    strategy = HeteroFedAvg(config, spec, clip_norm=2.0, noise_multiplier=1.0, noise_mode="distributed",
                            train_settings={keys.TRAIN_SCOPE: scope, keys.LOCAL_EPOCHS: 1, keys.BATCH_SIZE: 16},
                            min_train_nodes=m, min_available_nodes=m, min_evaluate_nodes=m,
                            adaptive_clip=AdaptiveClip(2.0), secure=secured)
    grid = Grid(devices)
    arrays = arrays_to_record(state_to_arrays(build_model(config)))
    strategy.profile_nodes(range(m), grid, 1, timeout=60)     # profiled before the round, as after round 1
    for d in devices.values():
        d.seconds = 0.0
    t0 = time.perf_counter()
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    if secured:
        new, _ = SecureRound(strategy, 0.6, timeout=60, neighbours=neighbours).run(grid, 1, instructions)
    else:
        new, _ = strategy.aggregate_train(1, grid.send_and_receive(instructions))
    wall = time.perf_counter() - t0
    assert new is not None and strategy.outcome.used == m - dropping, strategy.outcome
    device_s = sum(d.seconds for d in devices.values())
    out = strategy.outcome
    return {"device_s": device_s / m, "server_s": wall - device_s, "sent": out.bytes_sent / m,
            "received": out.bytes_received / m, "weights": sum(int(np.prod(v.shape)) for k, v in
                                                             build_model(config).state_dict().items()
                                                             if k in trained_entries(build_model(config), scope))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohorts", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--scopes", nargs="+", default=["heads", "all"], choices=keys.TRAIN_SCOPES)
    ap.add_argument("--neighbours", type=int, nargs="+", default=[0, 16],
                    help="secure rounds with each device masking with every other (0) or with k neighbours")
    args = ap.parse_args(argv)
    # Messages built outside a running ServerApp need the identity Flower's runtime sets.
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    report = Report("secagg", "Secure aggregation: cost per round against the plain round")
    report.add(machine_line())
    before = load_average()
    rows = []
    for scope in args.scopes:
        for m in args.cohorts:
            plain = None
            runs = [("plain", 0)] + [(mode, k) for k in args.neighbours if k == 0 or k < m - 1
                                     for mode in ("secure", "secure, 10% drop out")]
            for mode, k in runs:
                r = one_round(m, scope, mode, k)
                plain = plain or r
                rows.append([scope, f"{r['weights']:,}", m, mode, "—" if mode == "plain" else k or "all",
                             f"{r['device_s']:.3f}", f"{r['server_s']:.2f}",
                             "—" if r is plain else
                             f"{r['device_s'] + r['server_s'] / m - plain['device_s'] - plain['server_s'] / m:+.2f}",
                             f"{r['received'] / 1024:.0f}", f"{r['received'] / plain['received']:.2f}x",
                             f"{r['sent'] / 1024:.0f}"])
                print(" | ".join(map(str, rows[-1])), flush=True)
    after = load_average()
    report.add()
    report.add(md_table(["scope", "trained weights", "devices m", "round", "neighbours", "protocol s per device",
                         "server s",
                         "added s per device (its own + server / m)", "KiB up per device", "vs plain",
                         "KiB down per device"], rows))
    report.add()
    report.add("Neighbours: the devices each one masks with and holds shares for (all: SecAgg's complete graph; "
               "k: SecAgg+'s random ring, threshold 0.6 of k + 1). Plain rounds send every array of a device's slice (untrained ones as zeros); a masked input holds "
               "only the trained weights, at their global shapes, as 8-byte words.")
    report.add()
    report.add(load_note(before, after))
    report.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
