"""Training and prediction for one head of a ``MultiTaskNet``, with optional Opacus DP-SGD.

The same loop serves the centralized baseline (``fedser train``), the server's KWS head
pretraining and every device's local training. With DP the Opacus accountant is seeded
with the spend already recorded (``prior_history``), so the epsilon it reports covers
everything spent, not one call.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .augment import Augmenter
from .data import TaskData
from .errors import ConfigError
from .evaluation import classification_report
from .features import FeatureSpec, FrontEnd
from .keys import TRAIN_SCOPES
from .models import encoder_params_in_scope, head_of
from .privacy import SpendRecord


GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ew", "ghost")
# DP-SGD wants large batches (its noise on the mean gradient is z*C/B) but per-sample gradients
# cost memory per example: larger logical batches are computed in physical chunks of this size
# (Opacus' batch splitting; the same step, the same privacy accounting).
MAX_PHYSICAL_BATCH = 64
# Ghost clipping keeps no per-example gradients (two T x T Gram matrices per example and layer
# instead), so its chunks can be larger: fewer, larger matrix products.
MAX_PHYSICAL_BATCH_GHOST = 256


def resolve_grad_sample_mode(mode: str, model: nn.Module, scope: str = "all") -> str:
    """``"auto"`` becomes the encoder's own fastest mode ("hooks" when part of the encoder is
    fixed: hooks skip frozen layers); explicit modes pass through."""
    if mode != "auto":
        return mode
    if scope != "all":
        return "hooks"
    encoder = getattr(model, "encoder", None)
    return getattr(encoder, "grad_sample_mode", "hooks")


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    optimizer: str = "adam"             # "adam" or "sgd" (momentum 0.9)
    weight_decay: float = 1e-4
    patience: int = 6                   # epochs without validation improvement before stopping
    seed: int = 0
    # Sample-level DP-SGD (Opacus). dp=False trains without noise.
    dp: bool = False
    noise_multiplier: float | None = None   # given directly, or derived from target_epsilon
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    # Opacus per-sample gradients: "hooks", "functorch", "ew", "ghost" (norms only, then a second
    # backward pass; ``fedser.common.dp_norms``), or "auto" (the encoder's fastest).
    grad_sample_mode: str = "auto"
    # Which encoder weights train with the head (``keys.TRAIN_SCOPES``): "all", "norms" (the
    # normalisation layers' scale and shift) or "heads" (none). On a device whose encoder was
    # pretrained on public speech, DP-SGD's noise then falls on a few thousand weights instead
    # of the whole network.
    scope: str = "all"
    # Dropout and augmentation. None: on in plain training, off under DP-SGD, whose noise already
    # regularises: with them, DP-SGD at epsilon 8 lost 2.2 more KWS points and 6.7 more RAVDESS UAR
    # points (three seeds, bench/bench_encoders.py's DP rows).
    regularize: bool | None = None

    @property
    def regularizing(self) -> bool:
        return (not self.dp) if self.regularize is None else self.regularize

    def validate(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.scope not in TRAIN_SCOPES:
            problems.append(f"scope must be one of {', '.join(TRAIN_SCOPES)}, got {self.scope!r}")
        if self.optimizer not in ("adam", "sgd"):
            problems.append(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.dp:
            if self.noise_multiplier is None and self.target_epsilon is None:
                problems.append("dp needs noise_multiplier or target_epsilon")
            if self.target_epsilon is not None and not self.target_epsilon > 0:
                problems.append(f"target_epsilon must be > 0, got {self.target_epsilon}")
            if not 0 < self.delta < 1:
                problems.append(f"delta must be in (0, 1), got {self.delta}")
            if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
                problems.append(f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, "
                                f"got {self.grad_sample_mode!r}")
            if not self.max_grad_norm > 0:
                problems.append(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if problems:
            raise ConfigError("training settings: " + "; ".join(problems))


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)   # one row per epoch
    best_epoch: int = 0
    best_score: float = float("nan")
    steps: int = 0
    spend: list[SpendRecord] = field(default_factory=list)   # DP spend of this call only
    epsilon: float | None = None        # accountant's epsilon over prior + this spend
    noise_multiplier: float | None = None
    loss: float = float("nan")          # mean training loss of the last epoch
    seconds: float = 0.0


def _empty_dp_batch(params: Sequence[nn.Parameter]) -> None:
    """Zero gradients for an empty Poisson batch (per-example ones for Opacus' optimizer, the
    summed one for ghost clipping's), so that its step is the noise alone, as DP-SGD's is. Without
    them Opacus' optimizers raise on the missing gradients; and a step skipped instead would tell
    that no example was drawn."""
    for p in params:
        p.grad_sample = p.new_zeros((0, *p.shape))
        p.grad = torch.zeros_like(p)


def class_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Balanced weights N / (K * n_c) over the K present classes (as scikit-learn's "balanced"),
    so rare classes count as much as common ones, which is what UAR measures; absent classes get 0."""
    counts = torch.bincount(y, minlength=n_classes).float()
    present = counts > 0
    return torch.where(present, counts.sum() / (counts.clamp(min=1) * present.sum()), torch.zeros_like(counts))


def _freeze_all_but(model: nn.Module, task: str, scope: str) -> dict[str, bool]:
    """Only the trained head and the encoder weights in ``scope`` take gradients; Opacus needs that."""
    encoder = encoder_params_in_scope(model, scope)
    saved = {}
    for name, p in model.named_parameters():
        saved[name] = p.requires_grad
        head = head_of(name)
        if (head is not None and head != task) or (head is None and name not in encoder):
            p.requires_grad_(False)
    return saved


def _restore_requires_grad(model: nn.Module, saved: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(saved.get(name, True))


@torch.no_grad()
def predict(model: nn.Module, task: str, feats: torch.Tensor, allowed: Sequence[int] | None = None,
            batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 class and its probability for each row of ``feats`` (N, F, frames).

    ``allowed`` restricts predictions to those class indices (evaluation over the classes a
    model was trained on and the test corpus has).
    """
    model.eval()
    preds, probs = [], []
    mask = None
    for i in range(0, feats.shape[0], batch_size):
        logits = model(feats[i:i + batch_size], task)
        if allowed is not None:
            if mask is None:
                mask = torch.full((logits.shape[1],), float("-inf"))
                mask[list(allowed)] = 0.0
            logits = logits + mask
        p = torch.softmax(logits, dim=1)
        conf, idx = p.max(dim=1)
        preds.append(idx.numpy())
        probs.append(conf.numpy())
    if not preds:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    return np.concatenate(preds), np.concatenate(probs)


def evaluate_task(model: nn.Module, data: TaskData, allowed: Sequence[int] | None = None) -> dict:
    pred, _ = predict(model, data.task, data.feats, allowed)
    return classification_report(data.y.numpy(), pred, data.class_names)


def _dropout_off(model: nn.Module) -> None:
    """Dropout layers pass their input through (eval mode) while the rest of ``model`` trains."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()


def train_task(model: nn.Module, task: str, train: TaskData, val: TaskData | None, cfg: TrainConfig,
               spec: FeatureSpec, augmenter: Augmenter | None = None,
               prior_history: Sequence[SpendRecord] = (), progress: bool = True,
               on_improve: Callable[[nn.Module, dict], None] | None = None) -> TrainResult:
    """Train ``model``'s encoder and ``task`` head in place.

    With ``val`` the best validation epoch is kept and training stops early after
    ``cfg.patience`` epochs without improvement; without it all epochs run and the final
    state is kept (a device's local round).

    With ``cfg.dp`` the Opacus accountant starts from ``prior_history`` and the returned
    ``spend`` lists what this call added (recorded by the caller before anything is sent).
    """
    cfg.validate()
    if len(train) == 0:
        raise ConfigError(f"no {task} training examples")
    torch.manual_seed(cfg.seed)
    n_classes = len(train.class_names)
    if not cfg.regularizing:
        augmenter = None
    # Waveform augmentation re-extracts features every step: affordable for the spectral kinds,
    # not for frozen encoders (and per-speaker statistics would no longer match).
    use_waves = augmenter is not None and train.waves is not None and not spec.frozen_kinds() \
        and spec.normalize != "speaker"
    inputs = train.waves if use_waves else train.feats
    dataset = TensorDataset(inputs, train.y)
    batch_size = min(cfg.batch_size, len(dataset))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    frontend = FrontEnd(spec) if use_waves else None
    saved_grad = _freeze_all_but(model, task, cfg.scope)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Under DP-SGD each example's gradient must depend on that example alone, or adding one would
    # move the others' contributions and the sensitivity would exceed the clip: balanced class
    # weights are counted over the whole dataset and normalised over the batch, so DP trains an
    # unweighted loss (same test figures: RAVDESS 0.508, KWS 0.934 over three seeds, either way).
    criterion = nn.CrossEntropyLoss(weight=None if cfg.dp else class_weights(train.y, n_classes))
    result = TrainResult()
    engine = None
    net: nn.Module = model
    model.train()   # Opacus refuses a model left in eval mode (e.g. by an earlier evaluate_task)
    if cfg.dp:
        from opacus import PrivacyEngine
        from .privacy import noise_for_budget

        # Opacus' Poisson loader samples each example with rate 1 / len(loader); account with exactly that.
        sample_rate = 1.0 / len(loader)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "secure RNG turned off": a known, documented trade-off on devices
            engine = PrivacyEngine(accountant="rdp")
        engine.accountant.history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in prior_history]
        z = cfg.noise_multiplier
        if z is None:
            z = noise_for_budget(cfg.target_epsilon, cfg.delta, sample_rate, cfg.epochs * len(loader))
        mode = resolve_grad_sample_mode(cfg.grad_sample_mode, model, cfg.scope)
        if mode == "ghost":
            from . import dp_norms  # noqa: F401  (registers the Conv1d norm sampler with Opacus)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                noise_multiplier=z, max_grad_norm=cfg.max_grad_norm, poisson_sampling=True, grad_sample_mode=mode)
        if mode == "ghost":   # ghost clipping also wraps the loss: its backward() runs both passes
            net, optimizer, criterion, loader = private
        else:
            net, optimizer, loader = private
        result.noise_multiplier = float(z)
        logical_steps = len(loader)
        physical = MAX_PHYSICAL_BATCH_GHOST if mode == "ghost" else MAX_PHYSICAL_BATCH
        if batch_size > physical:
            from opacus.utils.batch_memory_manager import wrap_data_loader

            loader = wrap_data_loader(data_loader=loader, max_batch_size=physical, optimizer=optimizer)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    best_state = copy.deepcopy(model.state_dict())
    best = -1.0
    stale = 0
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"train {task}", disable=not progress, unit="epoch")
    try:
        for epoch in bar:
            net.train()
            if not cfg.regularizing:
                _dropout_off(model)
            total, seen, steps = 0.0, 0, 0
            for xb, yb in loader:
                steps += 1
                if xb.shape[0] == 0:  # Poisson sampling can draw an empty batch; it still counts as a step
                    optimizer.zero_grad()
                    if cfg.dp:
                        _empty_dp_batch(trainable)
                    optimizer.step()
                    continue
                if use_waves:
                    with torch.no_grad():
                        xb = frontend(augmenter.waves(xb))
                if augmenter is not None:
                    with torch.no_grad():
                        xb = augmenter.features(xb)
                optimizer.zero_grad()
                loss = criterion(net(xb, task), yb)
                with warnings.catch_warnings():
                    # Opacus' hooks fire on inputs without grad (features); harmless and expected.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                optimizer.step()
                total += loss.item() * xb.shape[0]
                seen += xb.shape[0]
            scheduler.step()
            if cfg.dp:
                steps = logical_steps  # optimizer steps, not the physical chunks they were computed in
            result.steps += steps
            if cfg.dp:
                result.spend.append(SpendRecord(result.noise_multiplier, sample_rate, steps))
            row = {"epoch": epoch, "train_loss": total / max(seen, 1)}
            result.loss = row["train_loss"]
            if val is not None and len(val) > 0:
                report = evaluate_task(model, val)
                row.update(val_accuracy=report["accuracy"], val_uar=report["uar"])
                score = report["uar"]
            else:
                score = float(epoch)  # no validation: the latest epoch is the one kept
            if engine is not None and (progress or val is not None):
                # A per-epoch figure for the progress bar and the learning curve; a device's round
                # (no validation, no bar) needs only the final one.
                row["epsilon"] = engine.accountant.get_epsilon(cfg.delta)
            result.history.append(row)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k != "epoch"})
            if score > best:
                best, stale = score, 0
                result.best_epoch, result.best_score = epoch, score
                best_state = copy.deepcopy(model.state_dict())
                if on_improve is not None:
                    on_improve(model, row)
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    finally:
        if engine is not None and hasattr(net, "_close"):
            net._close()  # remove Opacus hooks so the plain model is reusable
        _restore_requires_grad(model, saved_grad)
    model.load_state_dict(best_state)
    if engine is not None:
        result.epsilon = float(engine.accountant.get_epsilon(cfg.delta))
    result.seconds = time.perf_counter() - t0
    return result
