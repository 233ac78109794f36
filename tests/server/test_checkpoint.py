"""Server checkpoints: round trips, atomic replacement, and clear errors for damaged files."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedser.common.errors import FedserError
from fedser.server import checkpoint as ckpt
from fedser.server.checkpoint import CHECKPOINT_FILE, ServerState, load_checkpoint, save_checkpoint


def _state(round_: int = 2, fill: float = 0.0) -> ServerState:
    rng = np.random.default_rng(round_)
    arrays = {
        "encoder.stem.conv.weight": rng.standard_normal((4, 3, 2)).astype(np.float32) + fill,
        "encoder.stem.norm.bias": rng.standard_normal(4).astype(np.float32) + fill,
        "heads.kws.weight": np.asfortranarray(rng.standard_normal((12, 8)).astype(np.float32)),
        "temperature": np.array(0.5 + fill, dtype=np.float32),   # 0-d must stay 0-d
    }
    strategy = {"model_version": round_, "kws_head_version": 1,
                "profiles": {"7": {"tier": 0.5, "heads": ["kws"], "num_examples": 12, "declined": None,
                                   "epsilon": 0.25}},
                "rejections": [{"round": 1, "node": 9, "reasons": ["update L2 norm 9 exceeds the bound 2"]}]}
    accountant = {"noise_multiplier": 1.0, "clients_per_round": 2, "total_clients": 4, "accountant": "rdp",
                  "history": [{"noise_multiplier": 1.0, "sample_rate": 0.5, "steps": round_}]}
    rows = [{"round": r, "user-epsilon": 0.5 * r, "train-loss": float("nan"),
             "round-noise-multiplier": math.inf, "bytes-sent": 1000 * r, "np-float": np.float32(0.25)}
            for r in range(1, round_ + 1)]
    return ServerState(round=round_, arrays=arrays, strategy=strategy, accountant=accountant, rows=rows)


def test_a_saved_checkpoint_loads_back_equal(tmp_path):
    # Prepare
    state = _state()
    # Execute
    path = save_checkpoint(tmp_path, state)
    back = load_checkpoint(tmp_path)
    # Assert
    assert path == tmp_path / CHECKPOINT_FILE
    assert back.round == 2
    assert list(back.arrays) == list(state.arrays)
    for name, a in state.arrays.items():
        assert back.arrays[name].dtype == np.float32
        assert back.arrays[name].shape == a.shape
        np.testing.assert_array_equal(back.arrays[name], a)
    assert back.strategy == state.strategy
    assert back.accountant == state.accountant
    assert [r["round"] for r in back.rows] == [1, 2]
    assert math.isnan(back.rows[0]["train-loss"]) and back.rows[0]["round-noise-multiplier"] == math.inf
    assert back.rows[1]["np-float"] == 0.25


def test_no_checkpoint_yet_is_none(tmp_path):
    # Execute / Assert
    assert load_checkpoint(tmp_path) is None
    assert load_checkpoint(tmp_path / "never-created") is None


def test_save_creates_the_run_directory(tmp_path):
    # Execute
    save_checkpoint(tmp_path / "a" / "b", _state())
    # Assert
    assert load_checkpoint(tmp_path / "a" / "b").round == 2


def test_a_newer_save_replaces_the_older_and_leaves_no_temp_file(tmp_path):
    # Prepare
    save_checkpoint(tmp_path, _state(round_=1))
    # Execute
    save_checkpoint(tmp_path, _state(round_=2, fill=1.0))
    # Assert
    assert load_checkpoint(tmp_path).round == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]


def test_a_leftover_temp_file_of_a_killed_save_does_not_break_load(tmp_path):
    # Prepare: a complete checkpoint, then the half-written temp file of a save killed mid-write
    save_checkpoint(tmp_path, _state(round_=3))
    (tmp_path / ".checkpoint-abc123.tmp").write_bytes(b"PK\x03\x04 half a zip")
    # Execute
    back = load_checkpoint(tmp_path)
    # Assert
    assert back.round == 3


def test_a_save_that_fails_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    # Prepare
    save_checkpoint(tmp_path, _state(round_=1))

    def broken_save(payload, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    # Execute
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, _state(round_=2))
    monkeypatch.undo()
    # Assert
    assert load_checkpoint(tmp_path).round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not-a-checkpoint"])
def test_a_damaged_checkpoint_raises_a_fedser_error_naming_the_file(tmp_path, damage):
    # Prepare
    save_checkpoint(tmp_path, _state())
    target = tmp_path / CHECKPOINT_FILE
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "garbage":
        target.write_bytes(b"\x00\x01 this is not a torch file" * 10)
    elif damage == "empty":
        target.write_bytes(b"")
    else:  # a readable torch file without the checkpoint's parts
        torch.save({"weights": torch.zeros(2)}, target)
    # Execute / Assert
    with pytest.raises(FedserError) as info:
        load_checkpoint(tmp_path)
    assert str(target) in str(info.value)
    assert "move it away" in str(info.value)
