"""Run settings of the ServerApp, read from ``[tool.flwr.app.config]`` / ``--run-config``."""
from __future__ import annotations

from dataclasses import dataclass, fields

from fedser.common.errors import ConfigError


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
    encoder: str = "cnn"
    seed: int = 0
    clip_norm: float = 2.0            # user-level update clipping bound C
    noise_multiplier: float = 1.0     # user-level noise multiplier z
    noise_mode: str = "distributed"   # local | distributed | none
    user_delta: float = 1e-5
    dp: bool = True                   # sample-level DP-SGD on devices
    dp_noise_multiplier: float = 0.0  # floor; each device calibrates z to its own budget above it
    dp_max_grad_norm: float = 1.0
    kws_corpus: str = ""              # public command corpus to pretrain the KWS head on
    kws_pretrain_epochs: int = 5
    eval_data: str = ""               # corpus for server-side evaluation each round
    resume: bool = False
    round_timeout: float = 600.0

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
                if typ == "bool":
                    values[name] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
                elif typ == "int":
                    values[name] = int(raw)
                elif typ == "float":
                    values[name] = float(raw)
                else:
                    values[name] = str(raw)
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
        if self.noise_mode not in ("local", "distributed", "none"):
            p.append(f"noise-mode must be local, distributed or none, got {self.noise_mode!r}")
        if not self.clip_norm > 0:
            p.append(f"clip-norm must be > 0, got {self.clip_norm}")
        if self.noise_multiplier < 0 or self.dp_noise_multiplier < 0:
            p.append("noise multipliers must be >= 0")
        if not 0 < self.user_delta < 1:
            p.append(f"user-delta must be in (0, 1), got {self.user_delta}")
        if self.local_epochs < 1 or self.batch_size < 1:
            p.append("local-epochs and batch-size must be >= 1")
        if p:
            raise ConfigError("run config: " + "; ".join(p))
