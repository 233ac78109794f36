"""The aggregation server's ServerApp (Flower Message API) and its round loop.

Each round: sample nodes, send each its tier's slice, validate and aggregate replies
(HeteroFedAvg), federated evaluation, optional server-side evaluation, user-level
accounting, then an atomic checkpoint, metrics and plots. ``resume`` continues after the
last complete round.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedser.common import keys
from fedser.common.bundle import Bundle, save_bundle
from fedser.common.cache import FeatureCache
from fedser.common.data import HEAD_CLASSES
from fedser.common.errors import ConfigError
from fedser.common.fsutil import atomic_write
from fedser.common.features import spec_for
from fedser.common.models import ModelConfig, build_model
from fedser.common.params import state_to_arrays
from fedser.common.privacy import AdaptiveClip, UserLevelAccountant
from fedser.common.records import arrays_to_record, record_to_arrays

from .checkpoint import CHECKPOINT_FILE, ServerState, load_checkpoint, save_checkpoint, save_initial_model
from .pretrain import PublicCorpus, pretrain
from .report import write_metrics, write_plots
from .server_eval import ServerEvaluator
from .settings import RUN_COMPLETE, RUN_FAILED, RunSettings
from .robust import TrimmedMeanHeteroFedAvg
from .secure_round import SecureRound
from .strategy import HeteroFedAvg

log = logging.getLogger("fedser.server")
RUN_SETTINGS_FILE = "run_settings.json"
app = ServerApp()


def _progress(run_dir: Path, text: str) -> None:
    """One line per event, in the log and in progress.log (read by `fedser demo` for live progress)."""
    log.info(text)
    with open(run_dir / "progress.log", "a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {text}\n")


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    try:
        FederatedRun(settings).execute(grid)
    except Exception as exc:
        if Path(settings.run_dir).is_dir():
            _progress(Path(settings.run_dir), f"{RUN_FAILED}: {type(exc).__name__}: {exc}")
        raise


class FederatedRun:
    def __init__(self, settings: RunSettings):
        self.s = settings
        self.run_dir = Path(settings.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.spec = spec_for(settings.features)
        self.model_config = ModelConfig(encoder=settings.encoder, n_features=self.spec.n_features())
        rule, extra = HeteroFedAvg, {}
        if settings.aggregation == "trimmed-mean":
            rule, extra = TrimmedMeanHeteroFedAvg, {"trim": settings.aggregation_trim}
        self.strategy = rule(
            self.model_config, self.spec, clip_norm=settings.clip_norm, noise_multiplier=settings.noise_multiplier,
            noise_mode=settings.noise_mode, fraction_train=settings.fraction_train,
            fraction_evaluate=settings.fraction_evaluate,
            min_train_nodes=settings.min_clients, min_available_nodes=settings.min_clients,
            min_evaluate_nodes=settings.min_clients, connect_timeout=settings.connect_timeout,
            train_settings={keys.LOCAL_EPOCHS: settings.local_epochs, keys.BATCH_SIZE: settings.batch_size,
                            keys.LEARNING_RATE: settings.learning_rate,
                            keys.DP_ENABLED: settings.dp, keys.DP_NOISE_MULTIPLIER: settings.dp_noise_multiplier,
                            "num-rounds": settings.num_server_rounds,
                            keys.DP_MAX_GRAD_NORM: settings.dp_max_grad_norm, keys.TRAIN_SCOPE: settings.train_scope,
                            "timeout": settings.round_timeout},
            adaptive_clip=AdaptiveClip(settings.clip_norm, settings.clip_quantile, settings.clip_learning_rate)
            if settings.adapts_clip else None, secure=settings.secure_aggregation, **extra)
        self.secure_round = SecureRound(self.strategy, settings.secure_aggregation_threshold, settings.round_timeout,
                                        settings.secure_aggregation_neighbours) if settings.secure_aggregation else None
        self.cache = FeatureCache(settings.feature_cache or None)
        self.evaluator = ServerEvaluator(settings.eval_data, self.spec, self.cache) if settings.eval_data else None

    def _initial_state(self, grid: Grid) -> ServerState:
        torch.manual_seed(self.s.seed)
        model = build_model(self.model_config)
        public = ([PublicCorpus(self.s.kws_corpus, ("kws",), "kws-corpus")] if self.s.kws_corpus else []) + \
            ([PublicCorpus(self.s.public_corpus)] if self.s.public_corpus else [])
        if public:
            _progress(self.run_dir, "pretraining on public speech: " + ", ".join(c.path for c in public))
            reports = pretrain(model, public, self.spec, epochs=self.s.kws_pretrain_epochs, seed=self.s.seed,
                               cache=self.cache)
            _progress(self.run_dir, "pretrained " + "; ".join(
                f"{t}: validation accuracy {r['accuracy']:.3f}" if r else f"{t}: too few public speakers to validate"
                for t, r in reports.items()))
            if "kws" in reports:
                self.strategy.kws_head_version = 1
        total = self.s.total_clients or max(self.s.min_clients, len(list(grid.get_node_ids())))
        per_round = max(1, min(total, math.ceil(self.s.fraction_train * total)))
        accountant = UserLevelAccountant(self.s.noise_multiplier if self.s.noise_mode != "none" else 0.0,
                                         per_round, total)
        return ServerState(round=0, arrays=state_to_arrays(model), strategy=self.strategy.state_dict(),
                           accountant=accountant.state_dict(), rows=[])

    def execute(self, grid: Grid) -> None:
        if not self.s.resume and (self.run_dir / CHECKPOINT_FILE).exists():
            # Starting afresh over a run would discard its model while devices' ledgers keep its spend.
            raise ConfigError(f"{self.run_dir} already holds a run; resume it (resume=true, fedser-server start "
                              "--resume) or choose another run directory")
        state = load_checkpoint(self.run_dir) if self.s.resume else None
        if state is not None:
            _progress(self.run_dir, f"resuming after round {state.round}")
        else:
            if self.s.resume:
                _progress(self.run_dir, "resume requested but no checkpoint yet: starting at round 1")
            state = self._initial_state(grid)
            save_initial_model(self.run_dir, state.arrays)
            save_checkpoint(self.run_dir, state)
        # The protocol in readable form, so `fedser audit` can replay it as devices ran it.
        atomic_write(self.run_dir / RUN_SETTINGS_FILE,
                     lambda f: f.write(json.dumps(dataclasses.asdict(self.s), indent=2).encode()))
        self.strategy.load_state_dict(state.strategy)
        accountant = UserLevelAccountant(1.0, 1, 1)
        accountant.load_state_dict(state.accountant)
        arrays = arrays_to_record(state.arrays)
        rows = list(state.rows)
        for rnd in range(state.round + 1, self.s.num_server_rounds + 1):
            t0 = time.perf_counter()
            _progress(self.run_dir, f"round {rnd}/{self.s.num_server_rounds}: training")
            instructions = list(self.strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
            if self.secure_round is not None:
                new_arrays, train_metrics = self.secure_round.run(grid, rnd, instructions)
            else:
                replies = grid.send_and_receive(instructions, timeout=self.s.round_timeout)
                new_arrays, train_metrics = self.strategy.aggregate_train(rnd, replies)
            t_train = time.perf_counter() - t0
            out = self.strategy.outcome
            if new_arrays is not None:
                arrays = new_arrays
            if out.used and math.isfinite(out.noise_multiplier):
                accountant.step(noise_multiplier=out.noise_multiplier,
                                sample_rate=min(1.0, out.sampled / accountant.total_clients))
            elif out.used:
                # No user-level noise: the guarantee is gone, and the report must say so.
                accountant.step(noise_multiplier=0.0)
            fed_eval = None
            if self.s.evaluates_on_devices(rnd):
                eval_replies = grid.send_and_receive(
                    self.strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid), timeout=self.s.round_timeout)
                fed_eval = self.strategy.aggregate_evaluate(rnd, eval_replies)
            t_eval = time.perf_counter() - t0 - t_train
            user_eps = accountant.epsilon(self.s.user_delta) if accountant.history else 0.0
            row = {"round": rnd, "seconds": time.perf_counter() - t0, "train-seconds": t_train, "eval-seconds": t_eval,
                   "model-version": self.strategy.model_version, "kws-head-version": self.strategy.kws_head_version,
                   "clients-sampled": out.sampled, "clients-used": out.used, "clients-rejected": len(out.rejected),
                   "clients-declined": len(out.declined), "clients-failed": len(out.failed),
                   "evaluations-rejected": len(out.eval_rejected),
                   "bytes-sent": out.bytes_sent, "bytes-received": out.bytes_received,
                   "train-loss": out.train_loss, "round-noise-multiplier": out.noise_multiplier,
                   "clip-norm": out.clip_norm,
                   **({"secagg-threshold": out.secure_threshold, "secagg-dropped": out.secure_dropped,
                       "secagg-aborted": out.secure_aborted, "secagg-seconds": out.secure_seconds}
                      if self.secure_round is not None else {}),
                   "user-epsilon": user_eps, "user-delta": self.s.user_delta,
                   "max-device-epsilon": out.max_device_epsilon}
            if fed_eval is not None:
                row.update({k: float(v) for k, v in fed_eval.items()})
            if self.evaluator is not None:
                row.update({f"server-{k}": v for k, v in self.evaluator.evaluate(record_to_arrays(arrays),
                                                                                  self.model_config).items()})
            rows.append(row)
            state = ServerState(round=rnd, arrays=record_to_arrays(arrays), strategy=self.strategy.state_dict(),
                                accountant=accountant.state_dict(), rows=rows)
            save_checkpoint(self.run_dir, state)
            self._report(rows, accountant)
            shown = {k: row[k] for k in row if k.endswith("accuracy") or k.endswith("uar")}
            _progress(self.run_dir, f"round {rnd}/{self.s.num_server_rounds} done in {row['seconds']:.1f}s: "
                      f"{out.used} update(s), {len(out.rejected)} rejected, {len(out.declined)} declined, "
                      f"{len(out.failed)} failed; "
                      f"user eps {user_eps:.2f}; "
                      + " ".join(f"{k}={v:.3f}" for k, v in shown.items()))
        self._final_bundle(record_to_arrays(arrays), accountant, rows)
        _progress(self.run_dir, RUN_COMPLETE)

    def _report(self, rows: list[dict], accountant: UserLevelAccountant) -> None:
        summary = {"rounds": len(rows), **{f"user-{k}": v for k, v in accountant.summary(self.s.user_delta).items()
                                           if k in ("epsilon", "delta", "note", "sample_rate", "total_clients")},
                   "rejections": sum(r.get("stage", "train") == "train" for r in self.strategy.rejections),
                   "evaluation-rejections": sum(r.get("stage") == "evaluate" for r in self.strategy.rejections)}
        write_metrics(self.run_dir, rows, summary)
        write_plots(self.run_dir, rows)

    def _final_bundle(self, arrays: dict, accountant: UserLevelAccountant, rows: list[dict]) -> None:
        model = build_model(self.model_config)
        from fedser.common.params import arrays_to_state
        arrays_to_state(arrays, model)
        privacy = {"user_level": accountant.summary(self.s.user_delta),
                   "sample_level": {"enabled": self.s.dp, "noise_multiplier_floor": self.s.dp_noise_multiplier,
                                    "max_grad_norm": self.s.dp_max_grad_norm,
                                    "max_device_epsilon": max((r.get("max-device-epsilon", 0.0) for r in rows),
                                                              default=0.0),
                                    "note": "each device's epsilon is accounted in its own ledger"}}
        meta = {"mode": "federated", "model_version": self.strategy.model_version,
                "kws_head_version": self.strategy.kws_head_version, "privacy": privacy,
                "rounds": len(rows), "corpus": {"description": "device data (never seen by the server)",
                                                "kws_pretraining": self.s.kws_corpus or None,
                                                "public_pretraining": self.s.public_corpus or None}}
        labels = {t: list(HEAD_CLASSES[t]) for t in ("emotion", "kws")}
        save_bundle(Bundle.from_model(model, self.model_config, self.spec, labels, meta), self.run_dir)
