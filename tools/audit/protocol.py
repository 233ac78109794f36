"""The protocol a run's devices followed, and updates produced under it by the real sides' code.

A device's round is ``fedser.client.update.train_round`` (DP-SGD with the noise the device's
ledger plans, ``fedser.client.ledger.plan_round``, then clip and noise); the server combines
rounds with ``fedser.server.aggregation.aggregate``. ``device_update`` and
``simulate_federation`` call exactly those, so the attacks see what a curious server sees.
Width tiers are not simulated: every simulated device trains the full-width model.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from fedser.client.ledger import plan_round
from fedser.client.update import RoundSettings, UpdateStats, train_round
from fedser.common.augment import Augmenter
from fedser.common.data import TaskData
from fedser.common.errors import PrivacyBudgetExceeded
from fedser.common.features import FeatureSpec
from fedser.common.models import ModelConfig, build_model, head_of
from fedser.common.params import arrays_to_state, state_to_arrays
from fedser.common.privacy import (AdaptiveClip, SpendRecord, UserLevelAccountant, count_bit_std, epsilon_of,
                                   plan_spend)
from fedser.common.training import TrainConfig, train_task
from fedser.server.aggregation import ClientUpdate, aggregate, full_index
from fedser.server.settings import RunSettings

from .inputs import AuditInputError

SETTINGS = ("no DP", "sample-level DP", "user-level DP", "both")
"""The four privacy settings the audit compares (sample-level = DP-SGD, user-level = update noise)."""

DEFAULT_USER_NOISE = RunSettings.noise_multiplier   # the run default noise-multiplier, used when a run had none
DEFAULT_USER_NOISE_MODE = RunSettings.noise_mode   # and its default noise-mode
DEFAULT_CLIP_QUANTILE = RunSettings.clip_quantile   # and its default clip-quantile (adaptive clipping)


@dataclass(frozen=True)
class Protocol:
    """Everything that shapes what a device sends in one round.

    ``max_epsilon`` and ``rounds`` set the sample-level noise a device calibrates (its budget
    spread over the run's rounds, never below ``dp_noise_floor``), as the ClientApp does.
    ``expected_clients`` (m) splits distributed noise; ``total_clients`` (N) gives the user-level
    sample rate m/N for the user-level accountant.
    """

    clip_norm: float = 2.0
    noise_multiplier: float = 1.0
    noise_mode: str = "local"
    expected_clients: int = 2
    total_clients: int = 2
    dp: bool = True
    dp_noise_floor: float = 0.0
    dp_max_grad_norm: float = 1.0
    max_epsilon: float = 8.0
    delta: float = 1e-5
    user_delta: float = 1e-5
    rounds: int = 3
    local_epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 3e-3
    clip_quantile: float = DEFAULT_CLIP_QUANTILE   # > 0: C adapts to this quantile of the update norms
    clip_learning_rate: float = 0.2
    scope: str = "all"               # what devices train (run setting train-scope)

    @classmethod
    def from_run(cls, settings: Mapping, bundle_meta: Mapping, max_epsilon: float = 8.0) -> "Protocol":
        """The protocol of a run: its settings, and m and N as its user-level accountant recorded them."""
        user = ((bundle_meta or {}).get("privacy") or {}).get("user_level") or {}
        d = cls()
        m = int(user.get("clients_per_round") or settings.get("min_clients") or d.expected_clients)
        n = int(user.get("total_clients") or settings.get("total_clients") or m)
        return cls(
            clip_norm=float(settings.get("clip_norm", d.clip_norm)),
            noise_multiplier=float(settings.get("noise_multiplier", d.noise_multiplier)),
            noise_mode=str(settings.get("noise_mode", d.noise_mode)),
            expected_clients=max(1, m), total_clients=max(1, n, m),
            dp=bool(settings.get("dp", d.dp)),
            dp_noise_floor=float(settings.get("dp_noise_multiplier", d.dp_noise_floor)),
            dp_max_grad_norm=float(settings.get("dp_max_grad_norm", d.dp_max_grad_norm)),
            max_epsilon=float(max_epsilon), user_delta=float(settings.get("user_delta", d.user_delta)),
            rounds=int(settings.get("num_server_rounds", d.rounds)),
            local_epochs=int(settings.get("local_epochs", d.local_epochs)),
            batch_size=int(settings.get("batch_size", d.batch_size)),
            learning_rate=float(settings.get("learning_rate", d.learning_rate)),
            # a run that recorded no clip_quantile predates adaptive clipping: its C was fixed
            clip_quantile=float(settings.get("clip_quantile", 0.0)),
            clip_learning_rate=float(settings.get("clip_learning_rate", d.clip_learning_rate)),
            scope=str(settings.get("train_scope", d.scope)),
        )

    @property
    def user_noise(self) -> bool:
        return self.noise_mode != "none" and self.noise_multiplier > 0

    @property
    def setting(self) -> str:
        return SETTINGS[(2 if self.user_noise else 0) + (1 if self.dp else 0)]

    def variant(self, setting: str) -> "Protocol":
        """This protocol switched to one of ``SETTINGS``; user-level noise keeps the run's z and mode
        when it had them, else the project defaults (z=1, local)."""
        if setting not in SETTINGS:
            raise AuditInputError(f"setting {setting!r} must be one of {SETTINGS}")
        i = SETTINGS.index(setting)
        user, sample = bool(i & 2), bool(i & 1)
        if user:
            mode = self.noise_mode if self.noise_mode != "none" else DEFAULT_USER_NOISE_MODE
            z = self.noise_multiplier if self.noise_multiplier > 0 else DEFAULT_USER_NOISE
        else:
            mode, z = "none", 0.0
        return dataclasses.replace(self, dp=sample, noise_mode=mode, noise_multiplier=z)

    def plan(self, n: int) -> SpendRecord:
        """One round's sample-level spend of a device with ``n`` examples (as the device plans it)."""
        return plan_spend(n, self.batch_size, self.local_epochs, 1.0)

    def sample_noise(self, n: int) -> float:
        """The DP-SGD noise multiplier a fresh device with ``n`` examples plans for the whole run
        (its ledger's ``plan_round`` in the first round)."""
        return _planned_noise(self.max_epsilon, self.delta, n, self.batch_size, self.local_epochs, self.rounds,
                              self.dp_noise_floor)

    def round_settings(self) -> RoundSettings:
        """The train instruction a device gets under this protocol."""
        return RoundSettings(epochs=self.local_epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
                             dp=self.dp, dp_max_grad_norm=self.dp_max_grad_norm, clip_norm=self.clip_norm,
                             noise_multiplier=self.noise_multiplier, noise_mode=self.noise_mode,
                             expected_clients=self.expected_clients, scope=self.scope)

    def epsilons(self, n: int) -> dict[str, float]:
        """Accounted epsilons of this protocol after ``rounds`` rounds: sample-level (a device with
        ``n`` examples, Opacus RDP) and user-level (the server's accountant). ``inf`` = no guarantee."""
        sample = math.inf
        if self.dp:
            p = self.plan(n)
            sample = epsilon_of([SpendRecord(self.sample_noise(n), p.sample_rate, p.steps * self.rounds)], self.delta)
        acc = UserLevelAccountant(self.noise_multiplier if self.user_noise else 0.0,
                                  min(self.expected_clients, self.total_clients), self.total_clients)
        acc.step(self.rounds)
        return {"sample": sample, "user": acc.epsilon(self.user_delta)}


@lru_cache(maxsize=256)
def _planned_noise(budget: float, delta: float, n: int, batch_size: int, epochs: int, rounds: int,
                   floor: float) -> float:
    try:
        return plan_round([], budget, delta, [n], batch_size, epochs, rounds, floor).noise_multiplier
    except PrivacyBudgetExceeded as exc:
        raise AuditInputError(f"a device with {n} examples cannot train {rounds} round(s) within epsilon "
                              f"{budget}: {exc}; raise --max-epsilon") from exc


@dataclass
class DeviceUpdate:
    """One simulated round of one device: the update before and after clipping and noise."""

    local_delta: dict[str, np.ndarray]   # local - global, before clipping
    sent: dict[str, np.ndarray]          # what leaves the device
    stats: UpdateStats
    sample_noise: float | None           # DP-SGD noise multiplier used (None without DP)
    spend: list[SpendRecord]
    clip_bit: float | None = None        # the noised "norm <= C" under adaptive clipping


def device_update(global_arrays: Mapping[str, np.ndarray], model_config: ModelConfig, spec: FeatureSpec,
                  data: TaskData, protocol: Protocol, *, seed: int, rng: np.random.Generator,
                  settings: RoundSettings | None = None) -> DeviceUpdate:
    """One device round under ``protocol``: the device's own ``train_round`` on ``data``'s head.
    ``settings`` is the round's instruction when it is not the protocol's own (an adapted C)."""
    model = build_model(model_config)
    arrays_to_state(global_arrays, model)
    z = protocol.sample_noise(len(data)) if protocol.dp else None
    result = train_round(model, global_arrays, {data.task: data}, spec, settings or protocol.round_settings(),
                         sample_noise=z, delta=protocol.delta, rng=rng, seed=seed)
    return DeviceUpdate(result.local_delta, result.sent, result.stats, z, result.spend, result.clip_bit)


def subset(data: TaskData, idx: Sequence[int]) -> TaskData:
    """The examples ``idx`` of ``data`` (features, labels, speakers)."""
    idx_t = torch.as_tensor(list(idx), dtype=torch.long)
    return TaskData(data.task, data.feats[idx_t], data.y[idx_t], [data.speakers[i] for i in idx],
                    data.waves[idx_t] if data.waves is not None else None)


def speaker_parts(data: TaskData) -> dict[str, TaskData]:
    """``data`` split by speaker: speaker -> that speaker's examples, in order, speakers sorted."""
    by: dict[str, list[int]] = {}
    for i, spk in enumerate(data.speakers):
        by.setdefault(spk, []).append(i)
    return {spk: subset(data, idx) for spk, idx in sorted(by.items())}


def concat(parts: Sequence[TaskData]) -> TaskData:
    parts = [p for p in parts if len(p)]
    return TaskData(parts[0].task, torch.cat([p.feats for p in parts]), torch.cat([p.y for p in parts]),
                    [s for p in parts for s in p.speakers])


# ----------------------------------------------------------------------------- features of an update


def first_layer_name(arrays: Mapping[str, np.ndarray]) -> str:
    """The input layer's weight: the first weight with >= 2 dimensions in state-dict order."""
    for k, v in arrays.items():
        if k.endswith("weight") and np.ndim(v) >= 2:
            return k
    raise AuditInputError("the model has no weight matrix to attack")


def update_features(update: Mapping[str, np.ndarray], first_layer: str | None = None) -> np.ndarray:
    """Attack features of one update: the first layer's update (flattened), its per-input-row
    sums and mean magnitudes (one value per feature row, e.g. per mel band), and norm, mean and
    std of every array."""
    first_layer = first_layer or first_layer_name(update)
    w = np.asarray(update[first_layer], dtype=np.float64)
    rows = w.reshape(w.shape[0], w.shape[1], -1)            # (out, in, kernel)
    parts = [w.ravel(), rows.sum(axis=(0, 2)), np.abs(rows).mean(axis=(0, 2))]
    stats = []
    for v in update.values():
        a = np.asarray(v, dtype=np.float64).ravel()
        stats += [np.linalg.norm(a), a.mean(), a.std()]
    parts.append(np.asarray(stats))
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- membership helpers


@torch.no_grad()
def example_scores(model: torch.nn.Module, data: TaskData, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-example cross-entropy and logit-scaled confidence of ``model`` on ``data`` (eval mode),
    each shape (N,), from one pass.

    The confidence is log(p_y / (1 - p_y)), computed from the logits as
    z_y - logsumexp(z_j, j != y), so it stays exact where p_y rounds to 1.
    """
    model.eval()
    losses, confs = [], []
    for i in range(0, len(data), batch_size):
        logits = model(data.feats[i:i + batch_size], data.task)
        y = data.y[i:i + batch_size]
        losses.append(torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy())
        others = logits.scatter(1, y[:, None], float("-inf"))
        confs.append((logits.gather(1, y[:, None])[:, 0] - torch.logsumexp(others, dim=1)).numpy())
    if not losses:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(losses).astype(np.float64), np.concatenate(confs).astype(np.float64)


def example_losses(model: torch.nn.Module, data: TaskData, batch_size: int = 256) -> np.ndarray:
    """Per-example cross-entropy of ``model`` on ``data`` (eval mode), shape (N,)."""
    return example_scores(model, data, batch_size)[0]


def example_confidences(model: torch.nn.Module, data: TaskData, batch_size: int = 256) -> np.ndarray:
    """Per-example logit-scaled confidence (``example_scores``) of ``model`` on ``data``, shape (N,)."""
    return example_scores(model, data, batch_size)[1]


def example_gradients(model: torch.nn.Module, data: TaskData, names: Sequence[str]) -> np.ndarray:
    """Per-example gradients of the cross-entropy with respect to the parameters ``names`` at the
    model's current weights (eval mode: no dropout), each flattened and concatenated in that
    order: shape (N, P). ``names`` are ``state_to_arrays`` keys, the layout of an update."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise AuditInputError(f"the model has no parameters {missing[:3]}")
    model.eval()
    out = np.zeros((len(data), sum(params[n].numel() for n in names)), dtype=np.float32)
    for i in range(len(data)):
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(data.feats[i:i + 1], data.task), data.y[i:i + 1])
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        out[i] = torch.cat([(g if g is not None else torch.zeros_like(params[n])).reshape(-1)
                            for n, g in zip(names, grads)]).numpy()
    return out


def reference_confidences(model_config: ModelConfig, spec: FeatureSpec, pool: TaskData, n_models: int,
                          epochs: int, seed: int = 0, batch_size: int = 16, lr: float = 3e-3, augment: bool = True,
                          progress: bool = False, federation: Protocol | None = None,
                          init: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Confidences (``example_confidences``) of ``n_models`` reference models, each trained (no DP)
    on a random half of ``pool``.

    Calibration works best when the reference models train like the target: ``augment=False``
    for a target trained without augmentation, and ``federation`` for a federated target: each
    reference model is then a FedAvg federation (``simulate_federation``) under that protocol
    without DP, one device per speaker of its half; ``epochs``, ``batch_size``, ``lr`` and
    ``augment`` are ignored. ``init``: the model every reference starts from (the target's own
    starting model, e.g. after public pretraining), else a fresh random one each.

    Returns ``(confidences (K, N), trained_on (K, N) bool)``. An example's OUT models
    (``~trained_on``) never saw it: their confidence is the example's difficulty for the
    calibrated attack.
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    n = len(pool)
    confs = np.zeros((n_models, n))
    inside = np.zeros((n_models, n), dtype=bool)
    for k in tqdm(range(n_models), desc="reference models", disable=not progress, unit="model"):
        idx = rng.permutation(n)[: n // 2]
        inside[k, idx] = True
        torch.manual_seed(seed * 1000 + k)
        model = build_model(model_config)
        if init is not None:
            arrays_to_state(init, model)
        if federation is not None:
            clients = list(speaker_parts(subset(pool, sorted(idx.tolist()))).values())
            protocol = dataclasses.replace(federation.variant("no DP"), expected_clients=len(clients),
                                           total_clients=len(clients))
            arrays_to_state(simulate_federation(model_config, spec, clients, protocol, seed=seed * 1000 + k,
                                                init=state_to_arrays(model)), model)
        else:
            cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed * 1000 + k)
            train_task(model, pool.task, subset(pool, sorted(idx)), None, cfg, spec,
                       Augmenter(spec, seed=k) if augment else None, progress=False)
        confs[k] = example_confidences(model, pool)
    return confs, inside


def fedavg(global_arrays: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]],
           weights: Sequence[float], heads: Sequence[set[str]]) -> dict[str, np.ndarray]:
    """The server's aggregation (``fedser.server.aggregation.aggregate``) of full-width updates:
    each weighted by its examples, each head averaged over the devices that trained it."""
    clients = [ClientUpdate(node_id=i, delta=dict(u), index=full_index(global_arrays), num_examples=int(w),
                            heads=set(h), width=1.0) for i, (u, w, h) in enumerate(zip(updates, weights, heads))]
    new_state, _ = aggregate(global_arrays, clients, head_of)
    return new_state


def simulate_federation(model_config: ModelConfig, spec: FeatureSpec, clients: Sequence[TaskData],
                        protocol: Protocol, *, seed: int = 0, progress: bool = False,
                        init: Mapping[str, np.ndarray] | None = None,
                        on_round: Callable[[int, dict[str, np.ndarray], float], None] | None = None,
                        ) -> dict[str, np.ndarray]:
    """``protocol.rounds`` rounds of federated training in this process, each update made by
    ``device_update`` and combined by the server's aggregation (``fedavg``). Each round samples
    ``protocol.expected_clients`` of the clients uniformly without replacement (all of them when
    it is at least their number), as the server's sampling does. With ``protocol.clip_quantile``
    the bound C adapts as the server's strategy adapts it (the same ``AdaptiveClip`` and noise).
    ``on_round(rnd, arrays, clip_norm)`` sees the global model after each round (1-based) and the
    C its devices clipped to. For benchmarks and the audit's reference federations: the real run
    goes through Flower."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    arrays = dict(init) if init is not None else state_to_arrays(build_model(model_config))
    rng = np.random.default_rng(seed)
    sampler = np.random.default_rng(seed + 1)
    m = min(protocol.expected_clients, len(clients))
    # As the server: C adapts only under user-level noise (RunSettings.adapts_clip).
    adaptive = AdaptiveClip(protocol.clip_norm, protocol.clip_quantile, protocol.clip_learning_rate) \
        if protocol.clip_quantile > 0 and protocol.user_noise else None
    for rnd in tqdm(range(protocol.rounds), desc=f"federation ({protocol.setting})", disable=not progress,
                    unit="round"):
        cohort = range(len(clients)) if m >= len(clients) else sorted(sampler.choice(len(clients), m, replace=False))
        settings = protocol.round_settings()
        if adaptive is not None:
            z = protocol.noise_multiplier
            settings = dataclasses.replace(
                settings, clip_norm=adaptive.clip_norm, noise_multiplier=AdaptiveClip.update_noise(z, m),
                clip_count_std=count_bit_std(z, protocol.noise_mode, m))
        ups = [device_update(arrays, model_config, spec, clients[i], protocol, seed=seed + 7919 * rnd + i,
                             rng=rng, settings=settings) for i in cohort]
        arrays = fedavg(arrays, [u.sent for u in ups], [len(clients[i]) for i in cohort],
                        [{clients[i].task} for i in cohort])
        if adaptive is not None:
            adaptive.step([u.clip_bit for u in ups])
        if on_round is not None:
            on_round(rnd + 1, arrays, settings.clip_norm)
    return arrays
