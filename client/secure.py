"""The device's side of secure aggregation (the protocol: ``fedser.common.secagg``).

The device keeps its keys, its self-mask seed and the shares other devices gave it in the run's
``Context.state`` (the SuperNode holds it between messages; it never travels) and checks every
stage against what it agreed before:

- each stage follows the one before, in the same server round; a new setup starts afresh;
- the cohort (its neighbourhood: the devices it masks with and holds shares for) holds this device
  with its own keys, every key once, and at least t devices; at share-keys only devices announced
  at setup;
- the ciphertexts it is given come from devices of the cohort, to this device;
- at unmask it reveals the seed shares of devices the server says delivered and the key shares of
  devices the server says dropped out, never both for one device, and nothing unless at least
  t delivered: a server that asked for both could strip one device's masks.

A message that breaks one of these is declined with the reason; nothing secret is revealed.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedser.common import keys, secagg
from fedser.common.models import head_of
from fedser.common.secagg import KeyPair, Layout, SecAggError

STATE = "fedser-secagg"


def _ints(cfg: Mapping, key: str, default: list[int] | None = None) -> list[int]:
    value = cfg.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SecAggError(f"{key} must be a list of node ids")
    return [int(v) for v in value]


def _byte_list(cfg: Mapping, key: str, length: int) -> list[bytes]:
    value = cfg.get(key, [])
    if not isinstance(value, list) or len(value) != length or not all(isinstance(v, bytes) for v in value):
        raise SecAggError(f"{key} must hold {length} byte strings")
    return list(value)


def _held(state: RecordDict, server_round: int, stage: str) -> ConfigRecord:
    """This round's protocol state, which must have reached ``stage``."""
    held = state.get(STATE) if STATE in state else None
    if held is None or int(held["round"]) != server_round or held["stage"] != stage:
        where = "nothing" if held is None else f"round {int(held['round'])}, stage {held['stage']}"
        raise SecAggError(f"out of order: this step needs round {server_round} at stage {stage}; "
                          f"the device holds {where}")
    return held


def handle_stage(cfg: Mapping, state: RecordDict, node: int) -> ConfigRecord:
    """Answer a setup, share-keys or unmask instruction (``keys.SECAGG_STAGE``)."""
    stage, server_round = cfg.get(keys.SECAGG_STAGE), int(cfg[keys.SERVER_ROUND])
    if stage == "setup":
        return _setup(cfg, state, node, server_round)
    if stage == "share-keys":
        return _share_keys(cfg, state, node, server_round)
    if stage == "unmask":
        return _unmask(cfg, state, node, server_round)
    raise SecAggError(f"unknown secure-aggregation stage {stage!r}; expected one of {keys.SECAGG_STAGES}")


def _setup(cfg: Mapping, state: RecordDict, node: int, server_round: int) -> ConfigRecord:
    cohort = _ints(cfg, keys.SECAGG_NODES)
    threshold, clip_range = int(cfg[keys.SECAGG_THRESHOLD]), float(cfg[keys.SECAGG_CLIP_RANGE])
    if node not in cohort or len(set(cohort)) != len(cohort):
        raise SecAggError(f"the cohort {cohort} must list this device ({node}) and every device once")
    if not 2 <= threshold <= len(cohort):
        raise SecAggError(f"threshold {threshold} must be at least 2 and at most the cohort ({len(cohort)})")
    if not (math.isfinite(clip_range) and clip_range > 0):
        raise SecAggError(f"{keys.SECAGG_CLIP_RANGE} must be a finite number > 0, got {clip_range}")
    enc, mask = KeyPair.new(), KeyPair.new()
    state[STATE] = ConfigRecord({"round": server_round, "stage": "setup", "threshold": threshold,
                                 "clip-range": clip_range, "cohort": cohort, "enc-sk": enc.private,
                                 "enc-pk": enc.public, "mask-sk": mask.private, "mask-pk": mask.public})
    return ConfigRecord({keys.SECAGG_ENC_KEYS: enc.public, keys.SECAGG_MASK_KEYS: mask.public})


def _share_keys(cfg: Mapping, state: RecordDict, node: int, server_round: int) -> ConfigRecord:
    held = _held(state, server_round, "setup")
    nodes = _ints(cfg, keys.SECAGG_NODES)
    enc_keys = _byte_list(cfg, keys.SECAGG_ENC_KEYS, len(nodes))
    mask_keys = _byte_list(cfg, keys.SECAGG_MASK_KEYS, len(nodes))
    threshold = int(held["threshold"])
    if len(set(nodes)) != len(nodes) or node not in nodes:
        raise SecAggError(f"the devices {nodes} must list this device ({node}) and every device once")
    if not set(nodes) <= set(held["cohort"]):
        raise SecAggError(f"devices {sorted(set(nodes) - set(held['cohort']))} were not in the cohort announced "
                          "at setup")
    mine = nodes.index(node)
    if (enc_keys[mine], mask_keys[mine]) != (held["enc-pk"], held["mask-pk"]):
        raise SecAggError("the keys listed for this device are not the ones it made")
    if len(set(enc_keys + mask_keys)) != 2 * len(nodes):
        raise SecAggError("two devices list the same public key")
    if len(nodes) < threshold:
        raise SecAggError(f"{len(nodes)} devices shared keys, fewer than the threshold {threshold}")
    seed = os.urandom(32)
    seed_shares = secagg.split(seed, threshold, len(nodes))
    key_shares = secagg.split(secagg.private_scalar(held["mask-sk"]), threshold, len(nodes))
    dsts, ciphertexts = [], []
    for i, peer in enumerate(nodes):
        if peer != node:
            dsts.append(peer)
            ciphertexts.append(secagg.seal(held["enc-sk"], enc_keys[i], node, peer, seed_shares[i], key_shares[i]))
    held.update({"stage": "share-keys", "seed": seed, "nodes": nodes, "peer-enc": enc_keys, "peer-mask": mask_keys,
                 "share-of": [node], "seed-shares": [seed_shares[mine]], "key-shares": [key_shares[mine]]})
    return ConfigRecord({keys.SECAGG_DSTS: dsts, keys.SECAGG_CIPHERTEXTS: ciphertexts,
                         keys.SECAGG_SEED_HASH: secagg.commitment(seed)})


def receive_shares(cfg: Mapping, state: RecordDict, node: int) -> None:
    """Before training: keep the shares the other devices sent through the server.

    A ciphertext that does not open only means this device cannot help rebuild that sender's
    secrets; it still masks with every sender, so the pairwise masks cancel.
    """
    held = _held(state, int(cfg[keys.SERVER_ROUND]), "share-keys")
    srcs = _ints(cfg, keys.SECAGG_SRCS)
    ciphertexts = _byte_list(cfg, keys.SECAGG_CIPHERTEXTS, len(srcs))
    nodes = list(held["nodes"])
    if len(set(srcs)) != len(srcs) or node in srcs or not set(srcs) <= set(nodes):
        raise SecAggError(f"the senders {srcs} must be other devices of the cohort {nodes}, each once")
    if len(srcs) + 1 < int(held["threshold"]):
        raise SecAggError(f"{len(srcs) + 1} devices remain, fewer than the threshold {int(held['threshold'])}")
    share_of, seed_shares, key_shares = list(held["share-of"]), list(held["seed-shares"]), list(held["key-shares"])
    for src, ciphertext in zip(srcs, ciphertexts):
        try:
            seed_share, key_share = secagg.unseal(held["enc-sk"], held["peer-enc"][nodes.index(src)], src, node,
                                                  ciphertext)
        except SecAggError:
            continue
        share_of.append(src)
        seed_shares.append(seed_share)
        key_shares.append(key_share)
    held.update({"stage": "shares", "masked-with": srcs, "share-of": share_of, "seed-shares": seed_shares,
                 "key-shares": key_shares})


def padded_update(sent: Mapping[str, np.ndarray], index: Mapping[str, tuple], layout: Layout,
                  heads: set[str]) -> dict[str, np.ndarray]:
    """The device's slice placed in the global shapes: zeros outside its width and in the heads it
    did not train (they count for nothing in the mean, so they must add nothing to the sum)."""
    out = {}
    for name, shape in zip(layout.names, layout.shapes):
        padded = np.zeros(shape, dtype=np.float64)
        head = head_of(name)
        if head is None or head in heads:
            padded[index[name]] = sent[name]
        out[name] = padded
    return out


def masked_input(state: RecordDict, node: int, vector: np.ndarray) -> np.ndarray:
    """The quantized ``vector`` under this device's self-mask and pairwise masks (uint64)."""
    held = state.get(STATE) if STATE in state else None
    if held is None or held["stage"] != "shares":
        raise SecAggError("no shares were received this round: the masked input cannot be formed")
    nodes = list(held["nodes"])
    with np.errstate(over="ignore"):
        out = secagg.quantize(vector, float(held["clip-range"])) + secagg.prg(held["seed"], vector.size)
        for peer in held["masked-with"]:
            seed = secagg.mask_seed(held["mask-sk"], held["peer-mask"][nodes.index(peer)])
            out += secagg.pairwise_mask(node, peer, seed, vector.size)
    held["stage"] = "masked"
    return out


def _unmask(cfg: Mapping, state: RecordDict, node: int, server_round: int) -> ConfigRecord:
    held = _held(state, server_round, "masked")
    active, dead = _ints(cfg, keys.SECAGG_ACTIVE), _ints(cfg, keys.SECAGG_DEAD, [])
    known = set(held["masked-with"]) | {node}
    if set(active) & set(dead):
        raise SecAggError(f"devices {sorted(set(active) & set(dead))} are listed both as delivered and as dropped")
    if node not in active or not set(active) | set(dead) <= known:
        raise SecAggError(f"the delivered {active} and dropped {dead} must be devices this one masked with, "
                          "itself among the delivered")
    if len(active) < int(held["threshold"]):
        raise SecAggError(f"{len(active)} inputs delivered, fewer than the threshold {int(held['threshold'])}")
    share_of = list(held["share-of"])
    nodes, shares = [], []
    for peer, kind in [(p, "seed-shares") for p in active] + [(p, "key-shares") for p in dead]:
        if peer in share_of:
            nodes.append(peer)
            shares.append(held[kind][share_of.index(peer)])
    del state[STATE]   # one round, one use
    return ConfigRecord({keys.SECAGG_NODES: nodes, keys.SECAGG_SHARES: shares})
