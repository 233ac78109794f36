"""Server checkpoints: everything needed to continue a run after a crash.

Written after every complete round, atomically (temp file, fsync, rename), so a server
killed mid-round resumes from the last complete round and no round is counted twice.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedser.common.errors import FedserError
from fedser.common.fsutil import atomic_write

CHECKPOINT_FILE = "checkpoint.pt"
# The model every device started from (after the server's public pretraining, if any): what an
# audit's reference federations start from, so they differ from the run only in its members.
INITIAL_MODEL_FILE = "initial_model.npz"


@dataclass
class ServerState:
    round: int                              # last complete round (0 = none yet)
    arrays: dict[str, np.ndarray]           # global model
    strategy: dict                          # HeteroFedAvg.state_dict()
    accountant: dict                        # UserLevelAccountant.state_dict()
    rows: list[dict] = field(default_factory=list)   # per-round metrics so far


def save_checkpoint(run_dir: str | Path, state: ServerState) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / CHECKPOINT_FILE
    payload = {
        "round": state.round,
        # np.ascontiguousarray makes 0-d arrays 1-d; the reshape keeps every shape as it was.
        "arrays": {k: torch.from_numpy(np.ascontiguousarray(v).reshape(np.shape(v)))
                   for k, v in state.arrays.items()},
        "meta": json.dumps({"strategy": state.strategy, "accountant": state.accountant, "rows": state.rows},
                           default=float),
    }
    return atomic_write(target, lambda f: torch.save(payload, f))


def load_checkpoint(run_dir: str | Path) -> ServerState | None:
    """The last complete round's state, or None when the run has no checkpoint yet."""
    target = Path(run_dir) / CHECKPOINT_FILE
    if not target.exists():
        return None
    try:
        payload = torch.load(target, map_location="cpu", weights_only=True)
        meta = json.loads(payload["meta"])
        return ServerState(round=int(payload["round"]),
                           arrays={k: v.numpy() for k, v in payload["arrays"].items()},
                           strategy=meta["strategy"], accountant=meta["accountant"], rows=meta["rows"])
    except Exception as exc:
        raise FedserError(f"{target}: checkpoint unreadable ({exc}); move it away to start the run afresh") from exc


def save_initial_model(run_dir: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write the run's starting model as a plain ``.npz`` (no pickle; any tool can read it)."""
    target = Path(run_dir) / INITIAL_MODEL_FILE
    return atomic_write(target, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def load_initial_model(run_dir: str | Path) -> dict[str, np.ndarray] | None:
    """The run's starting model, or None for a run that did not record one."""
    target = Path(run_dir) / INITIAL_MODEL_FILE
    if not target.exists():
        return None
    try:
        with np.load(target, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:
        raise FedserError(f"{target}: unreadable ({exc}); it records the run's starting model") from exc
