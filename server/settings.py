"""Run settings of the ServerApp, read from ``[tool.flwr.app.config]`` / ``--run-config``."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from fedser.common.errors import ConfigError
from fedser.common.features import spec_for
from fedser.common.keys import NOISE_MODES, TRAIN_SCOPES, parse_tiers
from fedser.common.secagg import check_degree

_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")

# The ServerApp's last progress line (progress.log): ``fedser-server start`` watches for them.
RUN_COMPLETE = "run complete"
RUN_FAILED = "run failed"
RUN_ENDED = (RUN_COMPLETE, RUN_FAILED)


def _convert(raw: object, typ: str) -> object:
    """``raw`` as ``typ`` ("bool", "int", "float" or "str"); ValueError when it is not one.

    Nothing is guessed: "flase" is not False, 2.5 is not the int 2, and True is not a number.
    """
    if typ == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text not in _TRUE + _FALSE:
            raise ValueError(raw)
        return text in _TRUE
    if typ in ("int", "float") and isinstance(raw, bool):
        raise ValueError(raw)
    if typ == "int":
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError(raw)
        return int(raw)
    if typ == "float":
        return float(raw)
    return str(raw)


# Run settings that name a corpus folder or manifest (resolved and checked where a run is started).
CORPUS_SETTINGS = ("kws-corpus", "public-corpus", "eval-data")


@dataclass(frozen=True)
class RunSettings:
    run_dir: str
    num_server_rounds: int = 3
    min_clients: int = 2
    fraction_train: float = 1.0
    total_clients: int = 0            # population N for user-level accounting; 0 = nodes connected
    local_epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 3e-3
    encoder: str = "tcn"              # the trainable model over the features (fedser.common.models.ENCODERS)
    features: str = "speech-embedding,egemaps"   # FeatureSpec kinds, comma-separated (frozen public encoders)
    seed: int = 0
    clip_norm: float = 2.0            # user-level update clipping bound C (the first round's, when adapted)
    # Adaptive clipping (Andrew et al. 2021): 0 keeps C fixed; a value in (0, 1) moves C each round
    # towards that quantile of the update norms, from noised bits the devices send (accounted). On by
    # default: a fixed C = 2 was 10x the norm of a head's update, so its noise was 10x what was needed
    # (bench/results/population.md). Only with user-level noise on (``adapts_clip``).
    clip_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    noise_multiplier: float = 1.0     # user-level noise multiplier z
    # local | distributed | none. Local by default: without secure aggregation the server reads each
    # update, and only local noise gives each one the full z*C (distributed gives it z*C/sqrt(m)).
    noise_mode: str = "local"
    # Secure aggregation (fedser.common.secagg): the server learns only the sum of each round's
    # updates, which is what distributed noise needs. A share of the cohort (above one half) must
    # stay to the end of a round for its sum to be revealed.
    secure_aggregation: bool = False
    secure_aggregation_threshold: float = 0.6
    # 0: every device masks with every other (SecAgg). k (even): with k others on a random ring
    # (SecAgg+), so a round's cost grows with k, not the cohort; t is then a share of k + 1.
    secure_aggregation_neighbours: int = 0
    user_delta: float = 1e-5
    dp: bool = True                   # sample-level DP-SGD on devices
    dp_noise_multiplier: float = 0.0  # floor; each device calibrates z to its own budget above it
    dp_max_grad_norm: float = 1.0
    train_scope: str = "all"          # "norms" / "heads": devices fine-tune part of a pretrained model
    kws_corpus: str = ""              # public command corpus to pretrain the encoder + KWS head on
    public_corpus: str = ""           # public speech to pretrain the encoder + every head it has labels for
    kws_pretrain_epochs: int = 60     # epochs of that pretraining (early stopping on public speakers)
    eval_data: str = ""               # corpus for server-side evaluation each round
    feature_cache: str = ""           # folder caching the server's features (eval-data, public speech); "" = none
    resume: bool = False
    round_timeout: float = 600.0
    connect_timeout: float = 3600.0   # seconds a round waits for min-clients devices to be connected
    fraction_evaluate: float = 1.0    # share of nodes asked to evaluate each round
    evaluate_every: int = 1           # devices evaluate every N rounds and after the last; 0: after the last only
    aggregation: str = "fedavg"       # "fedavg" (capped sample weights) or "trimmed-mean" (fedser.server.robust)
    aggregation_trim: float = 0.2     # share trimmed from each end per element by "trimmed-mean"
    # Simulation (virtual clients without --node-config data): client partition-id i reads
    # <partitions-dir>/device-<i>/data.csv, runs tier i-th of partition-tiers (in turn) and
    # has partition-max-epsilon as its sample-level budget; partition-require-dp is its privacy
    # policy's DP-SGD requirement (a real device's owner sets that on the device).
    partitions_dir: str = ""
    partition_tiers: str = "1.0"
    partition_max_epsilon: float = 8.0
    partition_require_dp: bool = True

    @property
    def adapts_clip(self) -> bool:
        """Whether C adapts: a clip-quantile is set and there is user-level noise. Adapting exists to
        spend less noise; without noise it would only clip away half of every round's signal."""
        return self.clip_quantile > 0 and self.noise_mode != "none" and self.noise_multiplier > 0

    def evaluates_on_devices(self, rnd: int) -> bool:
        """Whether round ``rnd`` ends with federated evaluation (the last round always does)."""
        every = self.evaluate_every
        return rnd == self.num_server_rounds or (every > 0 and rnd % every == 0)

    @classmethod
    def from_run_config(cls, run_config: dict) -> "RunSettings":
        """Map kebab-case run-config keys onto the fields, validating every value."""
        values, problems = {}, []
        known = {f.name: f for f in fields(cls)}
        for key, raw in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                continue  # Flower's own keys (num-server-rounds is ours too)
            typ = known[name].type
            try:
                values[name] = _convert(raw, typ)
            except (TypeError, ValueError):
                problems.append(f"{key}={raw!r} is not a valid {typ}")
        if not values.get("run_dir"):
            problems.append("run-dir is required (where checkpoints, metrics and the final model go)")
        if problems:
            raise ConfigError("run config: " + "; ".join(problems))
        s = cls(**values)
        s.validate()
        return s

    def validate(self) -> None:
        p = []
        if self.num_server_rounds < 1:
            p.append(f"num-server-rounds must be >= 1, got {self.num_server_rounds}")
        if self.min_clients < 1:
            p.append(f"min-clients must be >= 1, got {self.min_clients}")
        if not 0 < self.fraction_train <= 1:
            p.append(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if self.train_scope not in TRAIN_SCOPES:
            p.append(f"train-scope must be one of {', '.join(TRAIN_SCOPES)}, got {self.train_scope!r}")
        elif self.train_scope != "all" and not (self.kws_corpus or self.public_corpus):
            p.append(f"train-scope={self.train_scope} needs kws-corpus or public-corpus: without public "
                     "pretraining the fixed encoder weights would stay at their random initialisation")
        try:
            spec_for(self.features)
        except ConfigError as exc:
            p.append(f"features={self.features!r}: {exc}")
        if self.noise_mode not in NOISE_MODES:
            p.append(f"noise-mode must be one of {', '.join(NOISE_MODES)}, got {self.noise_mode!r}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            p.append(f"clip-norm must be a finite number > 0, got {self.clip_norm}")
        if not 0 <= self.clip_quantile < 1:
            p.append(f"clip-quantile must be in [0, 1) (0 keeps clip-norm fixed), got {self.clip_quantile}")
        if not (math.isfinite(self.clip_learning_rate) and self.clip_learning_rate > 0):
            p.append(f"clip-learning-rate must be a finite number > 0, got {self.clip_learning_rate}")
        for key, value in (("noise-multiplier", self.noise_multiplier),
                           ("dp-noise-multiplier", self.dp_noise_multiplier)):
            if not (math.isfinite(value) and value >= 0):
                p.append(f"{key} must be a finite number >= 0, got {value}")
        if not 0 < self.user_delta < 1:
            p.append(f"user-delta must be in (0, 1), got {self.user_delta}")
        if self.local_epochs < 1 or self.batch_size < 1:
            p.append("local-epochs and batch-size must be >= 1")
        if self.total_clients < 0:
            p.append(f"total-clients must be >= 0 (0 = the nodes connected), got {self.total_clients}")
        for key, value in (("learning-rate", self.learning_rate), ("dp-max-grad-norm", self.dp_max_grad_norm),
                           ("round-timeout", self.round_timeout)):
            if not (math.isfinite(value) and value > 0):
                p.append(f"{key} must be a finite number > 0, got {value}")
        if self.kws_pretrain_epochs < 1:
            p.append(f"kws-pretrain-epochs must be >= 1, got {self.kws_pretrain_epochs}")
        if not (self.connect_timeout > 0):
            p.append(f"connect-timeout must be > 0 seconds, got {self.connect_timeout}")
        if not 0.5 < self.secure_aggregation_threshold <= 1:
            p.append("secure-aggregation-threshold must be in (0.5, 1] (above one half, so no two disjoint "
                     f"groups of devices can each reveal a secret), got {self.secure_aggregation_threshold}")
        try:
            check_degree(self.secure_aggregation_neighbours)
        except ConfigError as exc:
            p.append(str(exc))
        if self.secure_aggregation and self.aggregation != "fedavg":
            p.append(f"aggregation={self.aggregation} needs each update, and secure aggregation reveals only "
                     "their sum: use aggregation=fedavg with secure-aggregation")
        if self.secure_aggregation and self.min_clients < 2:
            p.append("secure-aggregation needs min-clients >= 2: the sum of one update is that update")
        if self.aggregation not in ("fedavg", "trimmed-mean"):
            p.append(f"aggregation must be fedavg or trimmed-mean, got {self.aggregation!r}")
        if not 0 <= self.aggregation_trim < 0.5:
            p.append(f"aggregation-trim must be in [0, 0.5), got {self.aggregation_trim}")
        if not 0 < self.fraction_evaluate <= 1:
            p.append(f"fraction-evaluate must be in (0, 1], got {self.fraction_evaluate}")
        if self.evaluate_every < 0:
            p.append(f"evaluate-every must be >= 0 (0: after the last round only), got {self.evaluate_every}")
        try:
            parse_tiers(self.partition_tiers)
        except ConfigError as exc:
            p.append(f"partition-tiers: {exc}")
        if not (math.isfinite(self.partition_max_epsilon) and self.partition_max_epsilon > 0):
            p.append(f"partition-max-epsilon must be a finite number > 0, got {self.partition_max_epsilon}")
        if p:
            raise ConfigError("run config: " + "; ".join(p))
