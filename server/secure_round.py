"""A training round under secure aggregation: the stages of ``fedser.common.secagg`` through the Grid.

``SecureRound.run`` takes the round's train instructions (``HeteroFedAvg.configure_train``) and
sends, to the devices still in the round at each step:

1. setup (query): the device's neighbourhood, the threshold t and the quantizer's range -> two
   public keys each;
2. share keys (query): the neighbours' public keys -> ciphertexts for each neighbour, and a hash
   of the device's self-mask seed;
3. the train instructions, each with the ciphertexts addressed to its device -> masked inputs,
   validated by the strategy as any reply is (all but the numbers, which nobody can read);
4. unmask (query): which neighbours delivered, which dropped out -> the survivors' shares.

A neighbourhood is the whole cohort by default (SecAgg); with ``neighbours`` = k it is the device
and k others on SecAgg+'s random ring (``secagg.neighbourhoods``), so a device's work and the
shares a secret needs grow with k instead of the cohort, and t is a share of the neighbourhood.

The server then rebuilds each delivered device's self-mask seed (checked against its hash) and
each dropped device's mask key (checked against its public key), removes those masks and hands
the sum to ``HeteroFedAvg.aggregate_sum``. Nothing here ever holds a device's update: only
masked inputs, shares and the sum.

A round in which fewer than t devices remain at any step, or whose secrets cannot be rebuilt,
is aborted: the model stays as it was and, since no sum was revealed, the user-level accountant
is not charged (devices that trained have charged their own sample-level ledgers).
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from fedser.common import keys, secagg

from .strategy import HeteroFedAvg

log = logging.getLogger("fedser.server")


def _node_list(value: object) -> list[int] | None:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None
    return [int(v) for v in value]


def _bytes_list(value: object, length: int) -> list[bytes] | None:
    if not isinstance(value, list) or len(value) != length or not all(isinstance(v, bytes) for v in value):
        return None
    return list(value)


def _rebuild_key(shares: list[bytes], threshold: int, public: bytes) -> bytes | None:
    """A dropped device's mask private key from shares of its scalar, checked against its public key."""
    scalar = secagg.reconstruct(shares, threshold,
                                lambda k: secagg.public_key_of(secagg.private_from_scalar(k)) == public)
    return None if scalar is None else secagg.private_from_scalar(scalar)


class SecureRound:
    """One training round of ``strategy`` (built with ``secure=True``) under secure aggregation."""

    def __init__(self, strategy: HeteroFedAvg, threshold: float, timeout: float, neighbours: int = 0):
        if not strategy.secure:
            raise ValueError("SecureRound needs a strategy built with secure=True")
        secagg.threshold_for(2, threshold)   # ConfigError for a fraction outside (0, 1]
        secagg.check_degree(neighbours)
        self.strategy = strategy
        self.threshold = threshold
        self.timeout = timeout
        self.neighbours = neighbours
        self._rng = random.SystemRandom()   # the graph must not be predictable from earlier rounds

    # ---- one stage: a query to each device, its valid replies -------------------------------
    def _ask(self, grid: Grid, server_round: int, stage: str, per_node: Mapping[int, dict]) -> dict[int, ConfigRecord]:
        out = self.strategy.outcome
        base = {**self.strategy.base_config(server_round), keys.SECAGG_STAGE: stage}
        messages = {}
        for node, extra in per_node.items():
            record = ConfigRecord({**base, **extra})
            out.bytes_sent += record.count_bytes()
            messages[node] = Message(RecordDict({keys.CONFIG: record}), message_type=MessageType.QUERY,
                                     dst_node_id=node)
        sent = {m.metadata.message_id: n for n, m in messages.items() if m.metadata.message_id}
        answers: dict[int, ConfigRecord] = {}
        answered = set()
        for reply in grid.send_and_receive(list(messages.values()), timeout=self.timeout):
            node = reply.metadata.src_node_id
            if node not in messages:
                node = sent.get(reply.metadata.reply_to_message_id, node)
            if node not in messages or node in answered:
                continue
            answered.add(node)
            if reply.has_error():
                reason = f"secure aggregation {stage}: {reply.error.reason or f'error code {reply.error.code}'}"
                (out.declined if reply.error.code in keys.DECLINE_CODES else out.failed).append((node, reason))
                log.warning("round %s: node %s: %s", server_round, node, reason)
                continue
            record = reply.content.get(keys.SECAGG) if keys.SECAGG in reply.content else None
            if not isinstance(record, ConfigRecord):
                self._fail(server_round, node, stage, f"no ConfigRecord {keys.SECAGG!r} in the reply")
                continue
            out.bytes_received += record.count_bytes()
            answers[node] = record
        for node in sorted(set(messages) - answered):
            self._fail(server_round, node, stage, "no reply within the round timeout")
        return answers

    def _fail(self, server_round: int, node: int, stage: str, reason: str) -> None:
        self.strategy.outcome.failed.append((node, f"secure aggregation {stage}: {reason}"))
        log.warning("round %s: node %s: secure aggregation %s: %s", server_round, node, stage, reason)

    def _abort(self, server_round: int, reason: str) -> tuple[None, MetricRecord]:
        out = self.strategy.outcome
        out.used, out.secure_aborted = 0, reason
        self.strategy.pending, self.strategy.masked = [], {}
        log.warning("round %s: secure aggregation aborted: %s; the model is unchanged and no sum was revealed",
                    server_round, reason)
        return None, MetricRecord({"updates": 0})

    # ---- the round ----------------------------------------------------------------------------
    def run(self, grid: Grid, server_round: int,
            messages: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        s = self.strategy
        t0 = time.perf_counter()
        instructions = {m.metadata.dst_node_id: m for m in messages}
        cohort = sorted(instructions)
        if len(cohort) < 2:
            return self._abort(server_round, f"{len(cohort)} device(s) in the cohort; a secure sum needs at least 2")
        near = secagg.neighbourhoods(cohort, self.neighbours, self._rng)
        t = secagg.threshold_for(len(near[cohort[0]]), self.threshold)   # every neighbourhood is the same size
        s.outcome.secure_threshold = t

        # 1. setup: public keys; each device learns its neighbourhood (the whole cohort by default)
        setup = self._ask(grid, server_round, "setup", {
            n: {keys.SECAGG_NODES: near[n], keys.SECAGG_THRESHOLD: t, keys.SECAGG_CLIP_RANGE: s.secure_clip_range}
            for n in cohort})
        enc, mask = {}, {}
        for node, record in setup.items():
            e, m = record.get(keys.SECAGG_ENC_KEYS), record.get(keys.SECAGG_MASK_KEYS)
            if not (isinstance(e, bytes) and isinstance(m, bytes) and secagg.is_public_key(e)
                    and secagg.is_public_key(m)):
                self._fail(server_round, node, "setup", "the reply does not hold two P-384 public keys")
                continue
            enc[node], mask[node] = e, m
        everyone = list(enc.values()) + list(mask.values())
        for node in [n for n in enc if everyone.count(enc[n]) > 1 or everyone.count(mask[n]) > 1]:
            self._fail(server_round, node, "setup", "a public key another device also sent")
            del enc[node], mask[node]
        keyed = sorted(enc)
        if len(keyed) < t:
            return self._abort(server_round, f"{len(keyed)} device(s) sent keys, fewer than the threshold {t}")

        # 2. share keys: ciphertexts routed, never read
        peers = {n: [k for k in near[n] if k in enc] for n in keyed}   # keyed neighbours, the device included
        shared = self._ask(grid, server_round, "share-keys", {
            n: {keys.SECAGG_NODES: peers[n], keys.SECAGG_ENC_KEYS: [enc[k] for k in peers[n]],
                keys.SECAGG_MASK_KEYS: [mask[k] for k in peers[n]]} for n in keyed})
        routed: dict[int, dict[int, bytes]] = {}     # addressee -> sender -> ciphertext
        seed_hash: dict[int, bytes] = {}
        for node, record in shared.items():
            dsts = _node_list(record.get(keys.SECAGG_DSTS))
            cts = _bytes_list(record.get(keys.SECAGG_CIPHERTEXTS), len(dsts or []))
            digest = record.get(keys.SECAGG_SEED_HASH)
            if dsts is None or cts is None or sorted(dsts) != [k for k in peers[node] if k != node] \
                    or not (isinstance(digest, bytes) and len(digest) == 32):
                self._fail(server_round, node, "share-keys",
                           "the reply must hold one ciphertext for each other device of its neighbourhood and a "
                           "32-byte seed hash")
                continue
            seed_hash[node] = digest
            for dst, ct in zip(dsts, cts):
                routed.setdefault(dst, {})[node] = ct
        holders = sorted(seed_hash)
        if len(holders) < t:
            return self._abort(server_round, f"{len(holders)} device(s) shared keys, fewer than the threshold {t}")

        # 3. train: each instruction carries the shares addressed to its device
        trained = []
        for node in holders:
            srcs = [k for k in near[node] if k in seed_hash and k != node]
            m = instructions[node]
            cfg = ConfigRecord({**m.content[keys.CONFIG], keys.SECAGG_SRCS: srcs,
                                keys.SECAGG_CIPHERTEXTS: [routed[node][k] for k in srcs]})
            trained.append(Message(RecordDict({keys.ARRAYS: m.content[keys.ARRAYS], keys.CONFIG: cfg}),
                                   message_type=MessageType.TRAIN, dst_node_id=node))
        s.expect_replies(trained)
        s.aggregate_train(server_round, grid.send_and_receive(trained, timeout=self.timeout))
        delivered = sorted(u.node_id for u in s.pending)
        dropped = [n for n in holders if n not in delivered]
        s.outcome.secure_dropped = len(dropped)
        if len(delivered) < t:
            return self._abort(server_round, f"{len(delivered)} masked input(s) arrived, fewer than the threshold {t}")

        # 4. unmask: each device is told which of its own neighbours delivered or dropped out
        delivered_set, dropped_set = set(delivered), set(dropped)
        unmasked = self._ask(grid, server_round, "unmask", {
            n: {keys.SECAGG_ACTIVE: [k for k in near[n] if k in delivered_set],
                **({keys.SECAGG_DEAD: dead} if (dead := [k for k in near[n] if k in dropped_set]) else {})}
            for n in delivered})
        seed_shares: dict[int, list[bytes]] = {n: [] for n in delivered}
        key_shares: dict[int, list[bytes]] = {n: [] for n in dropped}
        for node, record in unmasked.items():
            of = _node_list(record.get(keys.SECAGG_NODES)) if keys.SECAGG_NODES in record else []
            shares = _bytes_list(record.get(keys.SECAGG_SHARES, []), len(of or []))
            if of is None or shares is None or not set(of) <= set(delivered) | set(dropped):
                self._fail(server_round, node, "unmask", "the reply must hold shares of delivered or dropped devices")
                continue
            for peer, share in zip(of, shares):
                (seed_shares if peer in seed_shares else key_shares)[peer].append(share)
        if len(unmasked) < t:
            return self._abort(server_round, f"{len(unmasked)} device(s) sent their shares, fewer than the threshold {t}")
        seeds = {n: secagg.reconstruct(seed_shares[n], t, lambda b, n=n: secagg.commitment(b) == seed_hash[n])
                 for n in delivered}
        mask_keys = {n: _rebuild_key(key_shares[n], t, mask[n]) for n in dropped}
        lost = sorted(n for n, v in {**seeds, **mask_keys}.items() if v is None)
        if lost:
            return self._abort(server_round, f"the secrets of device(s) {lost} could not be rebuilt from their shares")

        size = s.layout.size
        total = np.zeros(size, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for node in delivered:
                total += s.masked[node] - secagg.prg(seeds[node], size)
            for gone, key in mask_keys.items():
                for node in (k for k in near[gone] if k in delivered_set):   # those that masked with it
                    total -= secagg.pairwise_mask(node, gone, secagg.mask_seed(key, mask[node]), size)
        s.masked = {}
        s.outcome.secure_seconds = time.perf_counter() - t0
        return s.aggregate_sum(server_round, total)
