"""The device's ClientApp (Flower Message API).

query    -> the device's profile: tier, heads it has labels for, data size, epsilon spent
train    -> one device round (``fedser.client.update.train_round``): DP-SGD on the sub-model for
            its tier, then a clipped, noised update
evaluate -> metrics of the global model on the device's held-back split

Every instruction is checked against the device owner's privacy policy (``fedser.client.policy``)
before anything else happens. A broken precondition (outside the policy, no data, budget
exhausted, an instruction it cannot use) goes back as an error reply with a reason, never as a
crash (:func:`replies_declines`).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedser.common import keys
from fedser.common.encoders import EncoderResourceError, check_available
from fedser.common.errors import ConfigError, FedserError, PrivacyBudgetExceeded
from fedser.common.features import FeatureSpec
from fedser.common.models import ModelConfig, build_model, encoder_params_in_scope, trained_entries
from fedser.common.params import arrays_to_state
from fedser.common.records import arrays_to_record, model_from_config, record_to_arrays
from fedser.common.secagg import Layout
from fedser.common.slicing import slice_index
from fedser.common.training import evaluate_task

from .device import LocalData, DeviceSettings, load_local_data
from . import secure
from .ledger import LedgerCorruptError, PrivacyLedger, RoundPlan
from .update import RoundSettings, train_round

app = ClientApp()


def decline(msg: Message, code: int, reason: str) -> Message:
    return Message(error=Error(code=code, reason=f"declined ({keys.DECLINE_CODES[code]}): {reason}"), reply_to=msg)


class Declined(Exception):
    """Ends a handler with a decline reply (``keys.DECLINE_*`` code and reason)."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code


@contextmanager
def declining(code: int, *errors: type[BaseException]) -> Iterator[None]:
    """Inside, any of ``errors`` ends the handler with a decline of ``code`` that quotes the error."""
    try:
        yield
    except errors as exc:
        raise Declined(code, str(exc)) from exc


def replies_declines(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Turn a ``Declined`` raised by ``handler`` into the error reply the server expects."""
    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Declined as d:
            return decline(msg, d.code, str(d))
    return wrapped


def _instruction(msg: Message, context: Context) -> tuple[DeviceSettings, dict, ModelConfig, FeatureSpec]:
    """The device's settings and the instruction's config, model config and feature spec."""
    with declining(keys.DECLINE_BAD_INSTRUCTION, ConfigError, KeyError, ValueError):
        settings = DeviceSettings.from_node_config(dict(context.node_config), dict(context.run_config))
        cfg = msg.content[keys.CONFIG]
        model_config, spec = model_from_config(cfg)
    # The features the server asks for must be ones this device can compute (its installed encoders).
    with declining(keys.DECLINE_BAD_INSTRUCTION, EncoderResourceError):
        for kind in spec.frozen_kinds():
            check_available(kind)
    return settings, cfg, model_config, spec


def _local_data(settings: DeviceSettings, spec: FeatureSpec) -> LocalData:
    with declining(keys.DECLINE_NO_DATA, FedserError):
        return load_local_data(settings, spec)


def _ledger(settings: DeviceSettings) -> PrivacyLedger:
    # A ledger that cannot be read means what this device has spent is unknown: it must not
    # train until the ledger is restored.
    with declining(keys.DECLINE_BUDGET, LedgerCorruptError):
        return PrivacyLedger(settings.ledger, max_epsilon=settings.max_epsilon, delta=settings.delta)


def _within_policy(settings: DeviceSettings, instruction: RoundSettings) -> None:
    """Decline an instruction outside the owner's policy, naming every way it is."""
    reasons = settings.policy.violations(instruction)
    if reasons:
        raise Declined(keys.DECLINE_POLICY, "; ".join(reasons))


def _plan(ledger: PrivacyLedger, settings: DeviceSettings, data: LocalData, cfg) -> RoundPlan:
    """This round's DP-SGD noise and spend from the ledger, or a budget decline."""
    with declining(keys.DECLINE_BAD_INSTRUCTION, ConfigError, KeyError, TypeError, ValueError):
        counts = [len(data.train[t]) for t in data.tasks]
        epochs, batch_size = int(cfg[keys.LOCAL_EPOCHS]), int(cfg[keys.BATCH_SIZE])
        rounds_left = int(cfg.get(keys.ROUNDS_LEFT, 1))
        floor = settings.policy.dp_noise_floor(float(cfg.get(keys.DP_NOISE_MULTIPLIER, 0.0)))
    with declining(keys.DECLINE_BUDGET, PrivacyBudgetExceeded):
        return ledger.plan_round(counts, batch_size, epochs, rounds_left, floor)


@app.query()
@replies_declines
def query(msg: Message, context: Context) -> Message:
    settings, cfg, _, spec = _instruction(msg, context)
    if keys.SECAGG_STAGE in cfg:
        with declining(keys.DECLINE_BAD_INSTRUCTION, ConfigError, KeyError, TypeError, ValueError):
            reply = secure.handle_stage(cfg, context.state, int(context.node_id))
        return Message(RecordDict({keys.SECAGG: reply}), reply_to=msg)
    # A query that says how the coming round will train lets a device that will not follow it,
    # or cannot afford it, say so now, before any model is sent to it.
    announced = None
    if keys.LOCAL_EPOCHS in cfg:
        with declining(keys.DECLINE_BAD_INSTRUCTION, ConfigError, KeyError, TypeError, ValueError):
            announced = RoundSettings.announced(cfg)
        _within_policy(settings, announced)
    data = _local_data(settings, spec)
    ledger = _ledger(settings)
    if announced is not None and announced.dp:
        _plan(ledger, settings, data, cfg)
    metrics = {
        keys.TIER: settings.tier,
        keys.HEADS: keys.heads_to_mask(data.tasks),
        keys.NUM_EXAMPLES: sum(len(data.train[t]) for t in data.tasks),
        keys.EPSILON: ledger.epsilon(),
        "max-epsilon": settings.max_epsilon,
        "skipped-files": len(data.skipped),
    }
    return Message(RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.train()
@replies_declines
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    settings, cfg, model_config, spec = _instruction(msg, context)
    with declining(keys.DECLINE_BAD_INSTRUCTION, ConfigError, KeyError, ValueError):
        width = float(cfg[keys.TIER])
        if width != settings.tier:
            raise ConfigError(f"server sent the {width} slice but this device runs tier {settings.tier}")
        round_settings = RoundSettings.from_config(cfg)
        model = build_model(model_config.scaled(width))
        global_sub = record_to_arrays(msg.content[keys.ARRAYS])
        arrays_to_state(global_sub, model)
        encoder_params_in_scope(model, round_settings.scope)   # ConfigError for an unknown scope
    _within_policy(settings, round_settings)
    secured = keys.SECAGG_SRCS in cfg
    if secured:   # before any budget is spent: an instruction the protocol refuses costs nothing
        with declining(keys.DECLINE_BAD_INSTRUCTION, ConfigError, KeyError, TypeError, ValueError):
            secure.receive_shares(cfg, context.state, int(context.node_id))
    data = _local_data(settings, spec)
    ledger = _ledger(settings)
    sample_noise = None
    if round_settings.dp:
        # One critical section: no other agent on this ledger plans or records between this plan
        # and its record (the lock re-reads the ledger, which may raise LedgerCorruptError).
        with declining(keys.DECLINE_BUDGET, LedgerCorruptError), ledger.round_lock():
            plan = _plan(ledger, settings, data, cfg)
            sample_noise = plan.noise_multiplier
            # Recorded before training starts: a device killed mid-round over-counts, never under-counts.
            for spend in plan.spend:
                ledger.record(spend, round=int(cfg[keys.SERVER_ROUND]), model_version=int(cfg[keys.MODEL_VERSION]))

    result = train_round(model, global_sub, {t: data.train[t] for t in data.tasks}, spec, round_settings,
                         sample_noise=sample_noise, delta=settings.delta, rng=np.random.default_rng())
    metrics = {
        keys.NUM_EXAMPLES: sum(len(data.train[t]) for t in data.tasks),
        keys.EPSILON: ledger.epsilon(),
        keys.DELTA: settings.delta,
        keys.TIER: settings.tier,
        keys.HEADS: keys.heads_to_mask(data.tasks),
        keys.LOCAL_STEPS: result.steps,
        keys.WALL_TIME: time.perf_counter() - t0,
        keys.MODEL_VERSION: int(cfg[keys.MODEL_VERSION]),
        keys.DP_NOISE_MULTIPLIER: float(sample_noise or 0.0),
    }
    if not round_settings.protects_users:
        # The loss says something about this device's data; it is only sent when nothing else
        # the device sends is protected either.
        metrics[keys.LOSS] = float(np.mean(result.losses))
    for t in data.tasks:
        metrics[f"num-examples-{t}"] = len(data.train[t])
    if secured:
        # The update and the clip bit travel only inside the masked sum.
        layout = Layout.of({k: v.shape for k, v in build_model(model_config).state_dict().items()},
                           trained_entries(model, round_settings.scope), result.clip_bit is not None)
        padded = secure.padded_update(result.sent, slice_index(model_config, width), layout, set(data.tasks))
        with declining(keys.DECLINE_BAD_INSTRUCTION, ConfigError):
            masked = secure.masked_input(context.state, int(context.node_id), layout.flatten(padded, result.clip_bit))
        record = ArrayRecord({keys.MASKED: Array(masked)})
    else:
        if result.clip_bit is not None:
            metrics[keys.CLIP_BIT] = result.clip_bit
        record = arrays_to_record(result.sent)
    return Message(RecordDict({keys.ARRAYS: record, keys.METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
@replies_declines
def evaluate(msg: Message, context: Context) -> Message:
    settings, _, model_config, spec = _instruction(msg, context)
    with declining(keys.DECLINE_BAD_INSTRUCTION, ConfigError, KeyError, ValueError):
        model = build_model(model_config)
        arrays_to_state(record_to_arrays(msg.content[keys.ARRAYS]), model)
    data = _local_data(settings, spec)
    metrics: dict[str, float | int] = {keys.NUM_EXAMPLES: 0}
    for task in data.tasks:
        held = data.holdout.get(task)
        if held is None or len(held) == 0:
            continue
        report = evaluate_task(model, held)
        metrics[f"{task}-n"] = report["n"]
        metrics[f"{task}-{keys.ACCURACY}"] = report["accuracy"]
        metrics[f"{task}-{keys.UAR}"] = report["uar"]
        metrics[keys.NUM_EXAMPLES] += report["n"]
    return Message(RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=msg)
