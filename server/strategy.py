"""``HeteroFedAvg``: Flower's FedAvg extended to devices that differ in compute, labels and data.

Built on ``flwr.serverapp.strategy.FedAvg`` (node sampling, message construction,
logging are Flower's). What it adds:

- a *profile* query to each node the first time it is sampled (tier, heads it has labels
  for, data size), so each node receives the nested width slice for its tier;
- validation of every reply (declared shapes and dtypes before decoding, NaN/Inf, keys,
  norm bound, staleness, example counts against the profile, evaluation scores);
  rejected replies are logged with their reasons and never touch the model or the figures,
  and no reply, however malformed, ends the round;
- example-count weights capped at a multiple of the cohort's lower median, so no device
  steers the model (or the reported noise multiplier) by claiming more data;
- per-element aggregation over exactly the clients that trained each element
  (``fedser.server.aggregation``), with the KWS head versioned separately;
- the user-level noise multiplier each round actually carried, for the accountant.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedser.common import keys, secagg
from fedser.common.features import FeatureSpec
from fedser.common.models import ModelConfig, build_model, head_of, trained_entries
from fedser.common.privacy import (AdaptiveClip, combined_noise_multiplier, count_bit_std, max_expected_norm,
                                   update_noise_std)
from fedser.common.records import arrays_to_record, model_to_config, record_to_arrays
from fedser.common.secagg import Layout
from fedser.common.slicing import slice_index, slice_state

from .aggregation import (EVAL_WEIGHT_CAP_FACTOR, WEIGHT_CAP_FACTOR, AggregationStats, ClientUpdate, aggregate,
                          aggregate_sum, capped_weights)
from .sampling import sample_nodes
from .user_privacy import Contribution, round_noise_multiplier
from .validation import (TaskScore, UpdateNoise, decode_update, expected_shapes, validate_evaluation,
                         validate_update)

log = logging.getLogger("fedser.server")

NO_PROFILE_REPLY = "no answer to the profile query within the round timeout"
NO_TRAIN_REPLY = "no training reply within the round timeout"

def _is_number(value: object) -> bool:
    """A scalar metric (MetricRecord values may also be lists)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class NodeProfile:
    tier: float
    heads: list[str]
    num_examples: int
    declined: str | None = None      # last decline reason (budget, no data), if any
    epsilon: float = 0.0             # sample-level epsilon the device last reported (its ledger)


@dataclass
class RoundOutcome:
    """What one training round did, for reports and the accountant."""

    sampled: int = 0
    used: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)        # training replies
    eval_rejected: list[tuple[int, str]] = field(default_factory=list)   # evaluation replies
    capped: list[tuple[int, int, int]] = field(default_factory=list)     # (node, claimed, weight used)
    declined: list[tuple[int, str]] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    noise_multiplier: float = math.inf
    bytes_sent: int = 0
    bytes_received: int = 0
    kws_contributors: int = 0
    emotion_contributors: int = 0
    max_device_epsilon: float = 0.0
    train_loss: float = float("nan")
    clip_norm: float = 0.0           # the bound C devices clipped to this round
    # Secure aggregation: shares needed (t), devices that shared keys but sent no input, why the
    # round was aborted (no sum revealed), and the seconds its four stages took.
    secure_threshold: int = 0
    secure_dropped: int = 0
    secure_aborted: str = ""
    secure_seconds: float = 0.0


class HeteroFedAvg(FedAvg):
    """Heterogeneous FedAvg over width tiers, label sets and data sizes.

    Parameters beyond FedAvg's: the global ``model_config`` and ``feature_spec``; user-level
    update privacy ``clip_norm`` (C), ``noise_multiplier`` (z) and ``noise_mode``
    (local | distributed | none); the per-round ``train_settings`` sent to devices
    (local epochs, batch size, learning rate, DP-SGD noise and gradient bound). With
    ``adaptive_clip`` C starts at ``clip_norm`` and follows a quantile of the update norms
    (:class:`fedser.common.privacy.AdaptiveClip`): devices send a noised bit "norm <= C" and the
    update noise rises so that the round, bits included, is accounted at z. With ``secure``
    replies are masked inputs whose sum only is revealed (:meth:`aggregate_sum`), and every
    device weighs the same.
    """

    def __init__(self, model_config: ModelConfig, feature_spec: FeatureSpec, *, clip_norm: float,
                 noise_multiplier: float, noise_mode: str, train_settings: dict,
                 fraction_train: float = 1.0, min_train_nodes: int = 2, min_available_nodes: int = 2,
                 fraction_evaluate: float = 1.0, min_evaluate_nodes: int = 2, max_staleness: int = 0,
                 connect_timeout: float = math.inf, weight_cap: int | None = WEIGHT_CAP_FACTOR,
                 adaptive_clip: AdaptiveClip | None = None, secure: bool = False):
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes, weighted_by_key=keys.NUM_EXAMPLES,
                         arrayrecord_key=keys.ARRAYS, configrecord_key=keys.CONFIG)
        problems = []
        if not clip_norm > 0:
            problems.append(f"clip_norm must be > 0, got {clip_norm}")
        if noise_mode not in keys.NOISE_MODES:
            problems.append(f"noise_mode must be one of {', '.join(keys.NOISE_MODES)}, got {noise_mode!r}")
        if not noise_multiplier >= 0:
            problems.append(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if not 0 < fraction_train <= 1:
            problems.append(f"fraction_train must be in (0, 1], got {fraction_train}")
        if min_train_nodes < 1:
            problems.append(f"min_train_nodes must be >= 1, got {min_train_nodes}")
        if max_staleness < 0:
            problems.append(f"max_staleness must be >= 0, got {max_staleness}")
        if not connect_timeout > 0:
            problems.append(f"connect_timeout must be > 0 seconds, got {connect_timeout}")
        if problems:
            raise ValueError("HeteroFedAvg: " + "; ".join(problems))
        self.model_config = model_config
        self.feature_spec = feature_spec
        self._fixed_clip = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier) if noise_mode != "none" else 0.0
        self.noise_mode = noise_mode
        self.adaptive_clip = adaptive_clip
        if adaptive_clip is not None:
            adaptive_clip.clip_norm = self._fixed_clip   # it starts at the run's C
        # This round's update noise multiplier (above z under adaptive clipping) and bit noise std.
        self._update_noise = self.noise_multiplier
        self._bit_std: float | None = None
        self._bits: dict[int, float] = {}
        self.train_settings = dict(train_settings)
        # What devices train (and noise) under the run's scope; the rest must arrive as zeros.
        self.trained_entries = frozenset(trained_entries(
            build_model(model_config), str(self.train_settings.get(keys.TRAIN_SCOPE, "all"))))
        self.max_staleness = max_staleness
        self.connect_timeout = float(connect_timeout)
        # None weighs devices by the counts they claim, as plain FedAvg does (for comparison only).
        self.weight_cap = weight_cap
        self.profiles: dict[int, NodeProfile] = {}
        self.model_version = 0
        self.kws_head_version = 0
        self.rejections: list[dict] = []      # (round, node, reasons) log kept in the checkpoint
        self._global: dict[str, np.ndarray] | None = None
        self._sent_tiers: dict[int, float] = {}
        self._sent_messages: list[Message] = []
        self._expected_clients = 1
        self.outcome = RoundOutcome()
        # Secure aggregation: replies carry masked inputs (``fedser.server.secure_round`` unmasks
        # their sum); every device counts once, so the server cannot weigh one above the others' noise.
        self.secure = bool(secure)
        self.layout: Layout | None = None
        self.pending: list[ClientUpdate] = []
        self.masked: dict[int, np.ndarray] = {}

    @property
    def clip_norm(self) -> float:
        """This round's clipping bound C: the adapted one, or the run's fixed one."""
        return self.adaptive_clip.clip_norm if self.adaptive_clip is not None else self._fixed_clip

    # ---- state (checkpointed with the model) ------------------------------------------------
    def state_dict(self) -> dict:
        return {"model_version": self.model_version, "kws_head_version": self.kws_head_version,
                "profiles": {str(k): asdict(v) for k, v in self.profiles.items()},
                "rejections": self.rejections, "clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict) -> None:
        self.model_version = int(state["model_version"])
        self.kws_head_version = int(state["kws_head_version"])
        self.profiles = {int(k): NodeProfile(**v) for k, v in state.get("profiles", {}).items()}
        self.rejections = list(state.get("rejections", []))
        if self.adaptive_clip is not None and "clip_norm" in state:
            # An adapted C resumes where it was; a fixed one stays what the run configures.
            self.adaptive_clip.clip_norm = float(state["clip_norm"])

    def summary(self) -> None:
        super().summary()
        log.info("HeteroFedAvg: C=%s z=%s mode=%s tiers=%s", self.clip_norm, self.noise_multiplier,
                 self.noise_mode, keys.TIERS)

    # ---- helpers ------------------------------------------------------------------------------
    def base_config(self, server_round: int) -> dict:
        return {**model_to_config(self.model_config, self.feature_spec),
                keys.SERVER_ROUND: server_round, keys.MODEL_VERSION: self.model_version,
                keys.KWS_HEAD_VERSION: self.kws_head_version}

    def profile_nodes(self, node_ids: Iterable[int], grid: Grid, server_round: int, timeout: float,
                      plan: dict | None = None) -> None:
        """Ask nodes not yet profiled (or that declined before) for their tier, heads and size.

        ``plan`` (the round's training settings) lets a device check its privacy budget before
        the server sends it a model: an exhausted device then declines here, with one small
        query per round, instead of receiving a model slice it cannot train on.
        """
        todo = [n for n in node_ids if n not in self.profiles or self.profiles[n].declined]
        if not todo:
            return
        cfg = ConfigRecord({**(plan or {}), **self.base_config(server_round)})
        msgs = [Message(RecordDict({keys.CONFIG: cfg}), message_type=MessageType.QUERY, dst_node_id=n)
                for n in todo]
        answered = set()
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                self.profiles[node] = NodeProfile(1.0, [], 0, declined=reply.error.reason)
                log.warning("node %s declined to profile: %s", node, reply.error.reason)
                continue
            try:
                m = reply.content[keys.METRICS]
                tier = float(m[keys.TIER])
                heads = keys.mask_to_heads(int(m[keys.HEADS]))
                num_examples, epsilon = int(m[keys.NUM_EXAMPLES]), float(m.get(keys.EPSILON, 0.0))
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                # A device that cannot say what it is does not train; it is asked again next round.
                reason = f"malformed profile reply: {exc!r}"
                self.profiles[node] = NodeProfile(1.0, [], 0, declined=reason)
                log.warning("node %s: %s", node, reason)
                continue
            if tier not in keys.TIERS:
                self.profiles[node] = NodeProfile(1.0, [], 0, declined=f"unknown tier {tier}")
                continue
            self.profiles[node] = NodeProfile(tier, heads, num_examples, epsilon=epsilon)
        for node in set(todo) - answered:
            self.profiles[node] = NodeProfile(1.0, [], 0, declined=NO_PROFILE_REPLY)
            log.warning("node %s did not answer the profile query within %.0f s", node, timeout)

    # ---- training -----------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.outcome = RoundOutcome()
        self._global = record_to_arrays(arrays)
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, self.min_train_nodes),
                                   max_wait=self.connect_timeout)
        base = {**self.base_config(server_round), **dict(config), **self.train_settings,
                keys.CLIP_NORM: self.clip_norm, keys.NOISE_MULTIPLIER: self.noise_multiplier,
                keys.NOISE_MODE: self.noise_mode}
        base.pop("timeout", None)
        base[keys.ROUNDS_LEFT] = max(1, int(base.pop("num-rounds", server_round)) - server_round + 1)
        plan = {k: base[k] for k in (keys.LOCAL_EPOCHS, keys.BATCH_SIZE, keys.DP_ENABLED, keys.DP_NOISE_MULTIPLIER,
                                     keys.ROUNDS_LEFT, keys.NOISE_MODE, keys.NOISE_MULTIPLIER, keys.TRAIN_SCOPE)
                if k in base}
        self.profile_nodes(node_ids, grid, server_round, timeout=float(self.train_settings.get("timeout", 600)),
                           plan=plan)
        usable = [n for n in node_ids if n in self.profiles and not self.profiles[n].declined]
        for n in node_ids:
            if n in usable:
                continue
            if n in self.profiles and self.profiles[n].declined != NO_PROFILE_REPLY:
                self.outcome.declined.append((n, self.profiles[n].declined))
            else:   # silent: one timeout is all it costs; it is asked again next round
                self.outcome.failed.append((n, NO_PROFILE_REPLY))
        self._expected_clients = max(1, len(usable))
        self.outcome.sampled = len(node_ids)
        self.outcome.clip_norm = self.clip_norm
        base[keys.EXPECTED_CLIENTS] = self._expected_clients
        self._bits = {}
        self.pending, self.masked = [], {}
        if self.adaptive_clip is not None:
            self._update_noise = AdaptiveClip.update_noise(self.noise_multiplier, self._expected_clients)
            self._bit_std = count_bit_std(self.noise_multiplier, self.noise_mode, self._expected_clients)
            base[keys.NOISE_MULTIPLIER] = self._update_noise
            base[keys.CLIP_COUNT_STD] = self._bit_std
        if self.secure:
            shapes = {k: np.shape(v) for k, v in self._global.items()}
            self.layout = Layout.of(shapes, self.trained_entries, with_bit=self._bit_std is not None)
        messages, self._sent_tiers = [], {}
        for n in usable:
            tier = self.profiles[n].tier
            sub = slice_state(self._global, self.model_config, tier)
            record = arrays_to_record(sub)
            self.outcome.bytes_sent += record.count_bytes()
            self._sent_tiers[n] = tier
            content = RecordDict({keys.ARRAYS: record, keys.CONFIG: ConfigRecord({**base, keys.TIER: tier})})
            messages.append(Message(content, message_type=MessageType.TRAIN, dst_node_id=n))
        log.info("round %s: training on %s node(s) (tiers %s)", server_round, len(messages),
                 sorted(self._sent_tiers.values()))
        self._sent_messages = messages
        return messages

    def expect_replies(self, messages: list[Message]) -> None:
        """The train instructions actually sent (a subset of ``configure_train``'s, with more config):
        their devices alone owe a reply."""
        self._sent_messages = messages
        self._sent_tiers = {m.metadata.dst_node_id: self._sent_tiers[m.metadata.dst_node_id] for m in messages}

    def _addressee(self, reply: Message) -> int:
        """The node a reply concerns: errors such as "Node Unavailable" come from the SuperLink
        itself, so they are matched to the instruction they answer."""
        src = reply.metadata.src_node_id
        if src in self._sent_tiers:
            return src
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent_messages if m.metadata.message_id}
        return sent.get(reply.metadata.reply_to_message_id, src)

    def _reject(self, server_round: int, node: int, reasons: list[str], stage: str = "train") -> None:
        """Count, keep (checkpointed) and log one rejected reply of ``stage`` "train" or "evaluate"."""
        counted = self.outcome.rejected if stage == "train" else self.outcome.eval_rejected
        counted.append((node, "; ".join(reasons)))
        self.rejections.append({"round": server_round, "node": node, "stage": stage, "reasons": reasons})
        what = "update" if stage == "train" else "evaluation"
        log.warning("round %s: rejected %s from node %s: %s", server_round, what, node, "; ".join(reasons))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, cap the claimed example counts, aggregate the rest.

        A reply that cannot even be read is rejected like any other bad reply: whatever one
        device sends, the round completes with the others. The capped counts
        (:func:`fedser.server.aggregation.capped_weights`) are both the aggregation weights
        and the weights of the user-level noise multiplier, so the accountant is told about
        the aggregation that actually happened.
        """
        assert self._global is not None, "configure_train must run first"
        accepted: list[ClientUpdate] = []
        losses: list[float] = []
        seen: set[int] = set()
        answered: set[int] = set()
        for reply in replies:
            node = _source(reply)
            try:
                node = self._addressee(reply)
                answered.add(node)
                read = self._read_train_reply(server_round, node, reply, seen)
            except Exception as exc:  # one malformed reply must not end the run
                self._reject(server_round, node, [f"reply could not be processed: {type(exc).__name__}: {exc}"])
                continue
            if read is not None:
                accepted.append(read[0])
                if read[1] is not None:
                    losses.append(read[1])
        for node in sorted(set(self._sent_tiers) - answered):
            # Flower returns what arrived by the round timeout; a silent device is a failed one.
            self.outcome.failed.append((node, NO_TRAIN_REPLY))
            log.warning("round %s: node %s: %s", server_round, node, NO_TRAIN_REPLY)
        counts = [u.num_examples for u in accepted]
        if self.secure:   # every device counts once: the server cannot weigh one above the others' noise
            weights = [1] * len(accepted)
        else:
            weights = capped_weights(counts, self.weight_cap) if self.weight_cap is not None else counts
        updates = []
        for u, w in zip(accepted, weights):
            if w < u.num_examples and not self.secure:
                self.outcome.capped.append((u.node_id, u.num_examples, w))
                log.info("round %s: node %s claims %s examples; weighted as %s (%s x the cohort's lower "
                         "median)", server_round, u.node_id, u.num_examples, w, self.weight_cap)
            updates.append(replace(u, num_examples=w))
        self.outcome.used = len(updates)
        self.outcome.max_device_epsilon = max((p.epsilon for p in self.profiles.values()), default=0.0)
        self.outcome.train_loss = float(np.mean(losses)) if losses else float("nan")
        if not updates:
            log.warning("round %s: no valid update; the global model is unchanged", server_round)
            return None, MetricRecord({"updates": 0})
        if self.secure:
            # Only their sum can be read: fedser.server.secure_round unmasks it, then aggregate_sum.
            self.pending = updates
            return None, None
        new_state, stats = self.combine(updates)
        return self._finish(server_round, updates, new_state, stats,
                            [self._bits[u.node_id] for u in updates] if self.adaptive_clip is not None else None)

    def aggregate_sum(self, server_round: int, total: np.ndarray) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new model from the unmasked sum (quantized words, mod 2**64) of :attr:`pending`'s inputs.

        Each element's mean is the sum over the devices whose slice and heads cover it divided by
        their number (the server knows each device's tier and heads). A sum no honest cohort can
        produce (a device sent words beyond the quantizer's range) leaves the model unchanged;
        it was revealed all the same, so the round is still accounted.
        """
        assert self.layout is not None and self._global is not None, "configure_train must run first"
        updates = self.pending
        if not secagg.in_range(total, len(updates)):
            reason = "the unmasked sum lies outside what quantized inputs can add up to: a masked input was malformed"
            self.outcome.used = len(updates)
            self.outcome.noise_multiplier = self._round_noise_multiplier(updates)
            self.rejections.append({"round": server_round, "node": -1, "stage": "train", "reasons": [reason]})
            log.warning("round %s: %s; the global model is unchanged", server_round, reason)
            return None, MetricRecord({"updates": 0})
        sums, bit_sum = self.layout.unflatten(secagg.dequantize_sum(total, self.secure_clip_range, len(updates)))
        new_state, stats = aggregate_sum(self._global, sums, updates, head_of)
        return self._finish(server_round, updates, new_state, stats, bit_sum)

    @property
    def secure_clip_range(self) -> float:
        """This round's quantizer range for masked inputs: a clipped update's elements, their noise, the clip bit."""
        return secagg.clamp_range(self.clip_norm, self.update_noise_std, self._bit_std)

    @property
    def update_noise_std(self) -> float:
        """This round's per-element std of one device's update noise."""
        return update_noise_std(self.clip_norm, self._update_noise, self.noise_mode, self._expected_clients)

    def _round_noise_multiplier(self, updates: list[ClientUpdate]) -> float:
        contributions = [Contribution(weight=w, width=u.width, heads=frozenset(u.heads), noise_std=self.update_noise_std)
                         for u, w in zip(updates, self.accounting_weights(updates))]
        z = round_noise_multiplier(contributions, self.clip_norm)
        if self.adaptive_clip is not None:
            # The released count is the sum of the used updates' bits: its noise is theirs together.
            z = combined_noise_multiplier(z, (self._bit_std or 0.0) * math.sqrt(len(updates)))
        return z

    def _finish(self, server_round: int, updates: list[ClientUpdate], new_state: dict[str, np.ndarray],
                stats: AggregationStats, bits) -> tuple[ArrayRecord, MetricRecord]:
        """Account, adapt C and move to ``new_state``; ``bits`` is each update's clip bit, or their sum."""
        self.outcome.used = len(updates)
        self.outcome.noise_multiplier = self._round_noise_multiplier(updates)
        if self.adaptive_clip is not None:
            self.adaptive_clip.step_sum(float(np.sum(bits)), len(updates))
            log.info("round %s: %.1f of %s updates within C=%.4g (noised); C -> %.4g", server_round,
                     float(np.sum(bits)), len(updates), self.outcome.clip_norm, self.clip_norm)
        self.outcome.kws_contributors = stats.head_contributors.get("kws", 0)
        self.outcome.emotion_contributors = stats.head_contributors.get("emotion", 0)
        self.model_version += 1
        if self.outcome.kws_contributors:
            self.kws_head_version += 1
        self._global = new_state
        metrics = {**stats.to_metrics(), "updates": len(updates)}
        return arrays_to_record(new_state), MetricRecord(metrics)

    def combine(self, updates: list[ClientUpdate]) -> tuple[dict[str, np.ndarray], AggregationStats]:
        """The new global state from this round's validated updates (weights already capped):
        the per-element, sample-weighted mean. Robust rules override this."""
        return aggregate(self._global, updates, head_of)

    def accounting_weights(self, updates: list[ClientUpdate]) -> list[float]:
        """How much each update counts in :meth:`combine`, for the user-level accountant."""
        return [float(u.num_examples) for u in updates]

    def _read_train_reply(self, server_round: int, node: int, reply: Message,
                          seen: set[int]) -> tuple[ClientUpdate, float | None] | None:
        """One training reply as an update (with its loss), or None once it is counted as
        declined, failed or rejected. The update carries the count the device claims."""
        if reply.has_error():
            reason = reply.error.reason or f"error code {reply.error.code}"
            if reply.error.code in keys.DECLINE_CODES:
                self.outcome.declined.append((node, reason))
                if reply.error.code == keys.DECLINE_BUDGET and node in self.profiles:
                    self.profiles[node].declined = reason
            else:
                self.outcome.failed.append((node, reason))
            log.warning("round %s: node %s: %s", server_round, node, reason)
            return None
        tier = self._sent_tiers.get(node)
        if tier is None:
            self._reject(server_round, node, ["reply from a node that was not sent a training instruction"])
            return None
        if node in seen:
            # aggregate() refuses a node twice; one reply per instruction is all a node may send.
            self._reject(server_round, node, ["a second reply from this node in this round"])
            return None
        seen.add(node)
        try:
            record, m = reply.content[keys.ARRAYS], reply.content[keys.METRICS]
            if not isinstance(record, ArrayRecord) or not isinstance(m, MetricRecord):
                raise TypeError(f"expected an ArrayRecord {keys.ARRAYS!r} and a MetricRecord {keys.METRICS!r}, "
                                f"got {type(record).__name__} and {type(m).__name__}")
        except (KeyError, TypeError, ValueError) as exc:
            self._reject(server_round, node, [f"malformed reply: {exc}"])
            return None
        self.outcome.bytes_received += record.count_bytes()
        index = slice_index(self.model_config, tier)
        if self.secure:
            # A masked input is uniform noise to the server: only its form can be checked.
            shapes, dtype, noise, bound = {keys.MASKED: (self.layout.size,)}, np.uint64, None, None
        else:
            shapes, dtype = expected_shapes(index), np.float32
            noise = UpdateNoise(self.trained_entries, self.update_noise_std, self.clip_norm)
            n_noisy = max(1, int(sum(int(np.prod(s)) for k, s in shapes.items() if k in noise.trained)))
            bound = max_expected_norm(self.clip_norm, self._update_noise, self.noise_mode,
                                      self._expected_clients, n_noisy)
        # Declared shapes and dtypes are checked before anything is decoded.
        arrays, reasons = decode_update(record, shapes, dtype)
        unreadable = set(record.keys()) - set(arrays)
        profile = self.profiles.get(node)
        reasons += validate_update(arrays, {k: s for k, s in shapes.items() if k not in unreadable}, dtype=dtype,
                                   max_norm=bound, current_model_version=self.model_version,
                                   reply_model_version=m.get(keys.MODEL_VERSION),
                                   num_examples=m.get(keys.NUM_EXAMPLES), heads_mask=m.get(keys.HEADS),
                                   max_staleness=self.max_staleness,
                                   profiled_examples=profile.num_examples if profile is not None else None,
                                   noise=noise)
        reported_tier = m.get(keys.TIER)
        if reported_tier is not None and not _is_number(reported_tier):
            reasons.append(f"tier {reported_tier!r} in the reply is not a number")
        elif reported_tier is not None and float(reported_tier) != tier:
            reasons.append(f"reply claims tier {reported_tier} but was sent the {tier} slice")
        if keys.LOSS in m and not (_is_number(m[keys.LOSS]) and math.isfinite(m[keys.LOSS])):
            # the round's reported loss is the mean over the used replies: one NaN would make it NaN
            reasons.append(f"metric {keys.LOSS!r} must be a finite number; got {m[keys.LOSS]!r}")
        if keys.EPSILON in m and not (_is_number(m[keys.EPSILON]) and m[keys.EPSILON] >= 0):
            reasons.append(f"metric {keys.EPSILON!r} must be a number >= 0; got {m[keys.EPSILON]!r}")
        if self._bit_std is not None and not self.secure:
            reasons += _clip_bit_problems(m.get(keys.CLIP_BIT), self._bit_std)
        claimed = m.get(keys.NUM_EXAMPLES)
        if profile is not None and _is_number(claimed) and claimed > profile.num_examples:
            # An honest device whose data grew since it was profiled says so in a fresh profile
            # next round; until then its count is not believed.
            profile.declined = (f"trained on {claimed} examples after profiling {profile.num_examples}; "
                                "profiled again")
        if reasons:
            self._reject(server_round, node, reasons)
            return None
        heads = set(keys.mask_to_heads(int(m[keys.HEADS])))
        if self.secure:
            self.masked[node] = arrays.pop(keys.MASKED)
        update = ClientUpdate(node_id=node, delta=arrays, index=index, num_examples=int(m[keys.NUM_EXAMPLES]),
                              heads=heads, width=tier)
        if keys.EPSILON in m and profile is not None:
            profile.epsilon = float(m[keys.EPSILON])
        if self._bit_std is not None and not self.secure:
            self._bits[node] = float(m[keys.CLIP_BIT])
        return update, (float(m[keys.LOSS]) if keys.LOSS in m else None)

    # ---- evaluation: every node gets the full global model (inference needs all of it) ------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_evaluate)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, self.min_evaluate_nodes),
                                   max_wait=self.connect_timeout)
        # A device that failed this round (silent, or no training reply) is not waited for again.
        failed = {n for n, _ in self.outcome.failed}
        node_ids = [n for n in node_ids if n not in failed]
        cfg = ConfigRecord({**self.base_config(server_round), **dict(config)})
        self.outcome.bytes_sent += arrays.count_bytes() * len(node_ids)
        return [Message(RecordDict({keys.ARRAYS: arrays, keys.CONFIG: cfg}), message_type=MessageType.EVALUATE,
                        dst_node_id=n) for n in node_ids]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted means per task over the nodes that have that task.

        Every reply is validated first (:func:`fedser.server.validation.validate_evaluation`);
        one that is malformed, lacks its metrics or reports a NaN or out-of-range score is
        rejected with its reason and not averaged, and nothing one reply does ends the round.
        The counts are weights, and claims, so each is capped twice:

        - by the node's profile: a device evaluates on the clips it holds back and trains on
          the rest, so with the default holdout (a fifth) it evaluates on about a quarter of
          its training count, and on no more than that count for any holdout up to one half.
          A count above the profiled training count is weighted as that count; nodes not yet
          profiled (profiles come from training rounds) have only the cohort cap;
        - across the nodes evaluating a task, by :func:`fedser.server.aggregation.capped_weights`
          at ``EVAL_WEIGHT_CAP_FACTOR`` x the lower median, so no node outweighs the others by
          claiming more.

        ``<task>-n`` reports the weights the means were taken with.
        """
        scored: list[tuple[int, dict[str, TaskScore]]] = []
        seen: set[int] = set()
        for reply in replies:
            node = _source(reply)
            try:
                if reply.has_error():
                    log.warning("round %s: evaluation on node %s failed: %s", server_round, node, reply.error.reason)
                    continue
                if node in seen:
                    self._reject(server_round, node, ["a second evaluation reply from this node in this round"],
                                 stage="evaluate")
                    continue
                seen.add(node)
                try:
                    m = reply.content[keys.METRICS]
                except KeyError:
                    self._reject(server_round, node, [f"malformed evaluation reply: no MetricRecord {keys.METRICS!r}"],
                                 stage="evaluate")
                    continue
                if not isinstance(m, MetricRecord):
                    self._reject(server_round, node, [f"malformed evaluation reply: {keys.METRICS!r} is a "
                                                      f"{type(m).__name__}, not a MetricRecord"], stage="evaluate")
                    continue
                scores, reasons = validate_evaluation(m)
            except Exception as exc:  # one malformed reply must not end the run
                self._reject(server_round, node, [f"evaluation reply could not be processed: "
                                                  f"{type(exc).__name__}: {exc}"], stage="evaluate")
                continue
            if reasons:
                self._reject(server_round, node, reasons, stage="evaluate")
                continue
            scored.append((node, scores))
        out: dict[str, float] = {}
        for task in keys.TASKS:
            entries = [(node, scores[task]) for node, scores in scored if task in scores]
            if not entries:
                continue
            weights = capped_weights([self._profiled_cap(node, n) for node, (n, _, _) in entries],
                                     EVAL_WEIGHT_CAP_FACTOR)
            total = float(sum(weights))
            for position, metric in ((1, keys.ACCURACY), (2, keys.UAR)):
                out[f"{task}-{metric}"] = sum(w * e[1][position] for w, e in zip(weights, entries)) / total
            out[f"{task}-n"] = total
        return MetricRecord(out) if out else None

    def _profiled_cap(self, node: int, n: int) -> int:
        """``n`` evaluation examples capped at the node's profiled training count, when known."""
        profile = self.profiles.get(node)
        if profile is None or profile.num_examples <= 0:
            return n
        return min(n, profile.num_examples)


def _source(reply: object) -> int:
    """The node a reply says it comes from, or -1 when it does not even say that."""
    try:
        return int(reply.metadata.src_node_id)
    except Exception:  # an object that is not a Flower Message
        return -1


# A bit plus its noise lies within this many noise stds of {0, 1} but with odds of about 1e-15.
CLIP_BIT_TAIL_STDS = 8.0


def _clip_bit_problems(bit, std: float) -> list[str]:
    """Why an adaptive-clipping bit cannot be counted (missing, not a number, or further from
    {0, 1} than its noise allows, which a device pushing C would need)."""
    if bit is None:
        return [f"no {keys.CLIP_BIT!r} metric: this run adapts its clipping bound and needs each device's bit"]
    if not (_is_number(bit) and math.isfinite(bit)):
        return [f"metric {keys.CLIP_BIT!r} must be a finite number; got {bit!r}"]
    slack = CLIP_BIT_TAIL_STDS * std
    if not -slack <= bit <= 1.0 + slack:
        return [f"metric {keys.CLIP_BIT!r} = {bit:.4g} lies outside [{-slack:.3g}, {1 + slack:.3g}], "
                f"beyond what a bit with noise std {std:.3g} reaches"]
    return []
