"""The device's ClientApp (Flower Message API).

query    -> the device's profile: tier, heads it has labels for, data size, epsilon spent
train    -> DP-SGD on the sub-model for its tier; replies with a clipped, noised update
evaluate -> metrics of the global model on the device's held-back split

A broken precondition (no data, budget exhausted, an instruction it cannot use) goes
back as an error reply with a reason, never as a crash.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedser.common import keys
from fedser.common.augment import Augmenter
from fedser.common.errors import ConfigError, CorpusError, FedserError
from fedser.common.models import build_model, encoder_params_in_scope, head_of
from fedser.common.params import arrays_to_state, state_to_arrays
from fedser.common.privacy import SpendRecord, calibrate_noise, epsilon_of
from fedser.common.records import arrays_to_record, model_from_config, record_to_arrays
from fedser.common.training import TrainConfig, evaluate_task, train_task

from .device import DeviceSettings, load_local_data
from .ledger import LedgerCorruptError, PrivacyLedger, plan_spend
from .update import privatize_update

app = ClientApp()


def decline(msg: Message, code: int, reason: str) -> Message:
    return Message(error=Error(code=code, reason=f"declined ({keys.DECLINE_CODES[code]}): {reason}"), reply_to=msg)


def _settings(context: Context) -> DeviceSettings:
    return DeviceSettings.from_node_config(dict(context.node_config), dict(context.run_config))


def _ledger(settings: DeviceSettings) -> PrivacyLedger:
    return PrivacyLedger(settings.ledger, max_epsilon=settings.max_epsilon, delta=settings.delta)


def _plan_dp(ledger: PrivacyLedger, settings: DeviceSettings, data, cfg) -> tuple[float, list[SpendRecord]] | str:
    """This round's DP-SGD noise and spend, or the reason the device cannot afford the round.

    The device spreads what is left of its own budget over the rounds still planned: the noise
    is the smallest that keeps every remaining round within budget (never below the server's
    floor). A device that cannot afford even heavy noise declines.
    """
    epochs, batch_size = int(cfg[keys.LOCAL_EPOCHS]), int(cfg[keys.BATCH_SIZE])
    per_round = [plan_spend(len(data.train[t]), batch_size, epochs, 1.0) for t in data.tasks]
    rounds_left = max(1, int(cfg.get(keys.ROUNDS_LEFT, 1)))
    z = calibrate_noise(ledger.history, settings.max_epsilon, settings.delta,
                        [(r.sample_rate, r.steps * rounds_left) for r in per_round],
                        floor=float(cfg.get(keys.DP_NOISE_MULTIPLIER, 0.0)))
    if z is None:
        return (f"epsilon spent {ledger.epsilon():.2f} of budget {settings.max_epsilon} "
                f"(delta {settings.delta}) leaves too little for {rounds_left} more round(s)")
    planned = [SpendRecord(z, r.sample_rate, r.steps) for r in per_round]
    projected = epsilon_of(ledger.history + planned, settings.delta)
    if projected > settings.max_epsilon:
        return (f"this round would raise epsilon from {ledger.epsilon():.2f} to {projected:.2f}, "
                f"over the device budget {settings.max_epsilon} (delta {settings.delta})")
    return z, planned


@app.query()
def query(msg: Message, context: Context) -> Message:
    try:
        settings = _settings(context)
        cfg = msg.content[keys.CONFIG]
        _, spec = model_from_config(cfg)
        data = load_local_data(settings, spec)
    except ConfigError as exc:
        return decline(msg, keys.DECLINE_BAD_INSTRUCTION, str(exc))
    except (CorpusError, FedserError) as exc:
        return decline(msg, keys.DECLINE_NO_DATA, str(exc))
    try:
        ledger = _ledger(settings)
    except LedgerCorruptError as exc:
        # What this device has spent is unknown: it must not train until the ledger is restored.
        return decline(msg, keys.DECLINE_BUDGET, str(exc))
    if keys.LOCAL_EPOCHS in cfg and bool(cfg.get(keys.DP_ENABLED, True)):
        # The server said how it will train this round: a device that cannot afford it says so
        # now, before any model is sent to it.
        try:
            plan = _plan_dp(ledger, settings, data, cfg)
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            return decline(msg, keys.DECLINE_BAD_INSTRUCTION, str(exc))
        if isinstance(plan, str):
            return decline(msg, keys.DECLINE_BUDGET, plan)
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
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    try:
        settings = _settings(context)
        cfg = msg.content[keys.CONFIG]
        model_config, spec = model_from_config(cfg)
        width = float(cfg[keys.TIER])
        if width != settings.tier:
            raise ConfigError(f"server sent the {width} slice but this device runs tier {settings.tier}")
        scope = str(cfg.get(keys.TRAIN_SCOPE, "all"))
        model = build_model(model_config.scaled(width))
        trained = encoder_params_in_scope(model, scope)   # ConfigError for an unknown scope
        global_sub = record_to_arrays(msg.content[keys.ARRAYS])
        arrays_to_state(global_sub, model)
    except (ConfigError, KeyError, ValueError) as exc:
        return decline(msg, keys.DECLINE_BAD_INSTRUCTION, str(exc))
    try:
        data = load_local_data(settings, spec)
    except FedserError as exc:
        return decline(msg, keys.DECLINE_NO_DATA, str(exc))

    epochs = int(cfg[keys.LOCAL_EPOCHS])
    batch_size = int(cfg[keys.BATCH_SIZE])
    dp = bool(cfg.get(keys.DP_ENABLED, True))
    tasks = data.tasks
    try:
        ledger = _ledger(settings)
    except LedgerCorruptError as exc:
        return decline(msg, keys.DECLINE_BUDGET, str(exc))
    z_sample = None
    if dp:
        plan = _plan_dp(ledger, settings, data, cfg)
        if isinstance(plan, str):
            return decline(msg, keys.DECLINE_BUDGET, plan)
        z_sample, planned = plan
        # Recorded before training starts: a device killed mid-round over-counts, never under-counts.
        for spend in planned:
            ledger.record(spend, round=int(cfg[keys.SERVER_ROUND]), model_version=int(cfg[keys.MODEL_VERSION]))

    losses, steps = [], 0
    torch.manual_seed(int(cfg[keys.SERVER_ROUND]) * 7919 + int(context.node_id) % 7919)
    for task in tasks:
        tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=float(cfg[keys.LEARNING_RATE]),
                           dp=dp, noise_multiplier=z_sample, scope=scope,
                           max_grad_norm=float(cfg[keys.DP_MAX_GRAD_NORM]), delta=settings.delta)
        result = train_task(model, task, data.train[task], None, tcfg, spec, Augmenter(spec, seed=steps),
                            progress=False)
        losses.append(result.loss)
        steps += result.steps
    local = state_to_arrays(model)
    delta = {k: (local[k] - global_sub[k]).astype(np.float32) for k in global_sub}
    rng = np.random.default_rng()
    frozen = [k for k in delta if head_of(k) is None and k not in trained]
    noised, stats = privatize_update(delta, clip_norm=float(cfg[keys.CLIP_NORM]),
                                     noise_multiplier=float(cfg[keys.NOISE_MULTIPLIER]),
                                     mode=str(cfg[keys.NOISE_MODE]), expected_clients=int(cfg[keys.EXPECTED_CLIENTS]),
                                     rng=rng, frozen=frozen)
    metrics = {
        keys.NUM_EXAMPLES: sum(len(data.train[t]) for t in tasks),
        keys.LOSS: float(np.mean(losses)),
        keys.EPSILON: ledger.epsilon(),
        keys.DELTA: settings.delta,
        keys.TIER: settings.tier,
        keys.HEADS: keys.heads_to_mask(tasks),
        keys.LOCAL_STEPS: steps,
        keys.WALL_TIME: time.perf_counter() - t0,
        keys.UPDATE_NORM: float(stats.norm_before),
        keys.MODEL_VERSION: int(cfg[keys.MODEL_VERSION]),
        keys.DP_NOISE_MULTIPLIER: float(z_sample or 0.0),
    }
    for t in tasks:
        metrics[f"num-examples-{t}"] = len(data.train[t])
    return Message(RecordDict({keys.ARRAYS: arrays_to_record(noised), keys.METRICS: MetricRecord(metrics)}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        settings = _settings(context)
        cfg = msg.content[keys.CONFIG]
        model_config, spec = model_from_config(cfg)
        model = build_model(model_config)
        arrays_to_state(record_to_arrays(msg.content[keys.ARRAYS]), model)
    except (ConfigError, KeyError, ValueError) as exc:
        return decline(msg, keys.DECLINE_BAD_INSTRUCTION, str(exc))
    try:
        data = load_local_data(settings, spec)
    except FedserError as exc:
        return decline(msg, keys.DECLINE_NO_DATA, str(exc))
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
