"""Empirical DP checks: they pass on the device's own code and catch wrong noise, missing clipping and
tampered ledgers."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedser.client.ledger import PrivacyLedger
from fedser.tools.audit.inputs import AuditInputError
from fedser.tools.audit.dpchecks import (
    check_clipping,
    check_ledger,
    check_noise,
    check_noise_std,
    expected_std,
    noise_residuals,
)
from fedser.client.update import privatize_update
from fedser.common.privacy import SpendRecord

SHAPES = {"a": (40, 30), "b": (500,), "c": (8, 8, 4)}


def _deltas(n: int, seed: int, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    return [{k: (rng.normal(0, scale, s)).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)]


@pytest.mark.parametrize("mode,z,m", [("local", 1.0, 1), ("distributed", 1.0, 8), ("none", 0.0, 1)])
def test_checks_pass_on_privatize_update(mode, z, m):
    rng = np.random.default_rng(0)
    pairs = [(d, privatize_update(d, 2.0, z, mode, m, rng)[0]) for d in _deltas(6, 1)]
    assert check_clipping(pairs, 2.0, z, mode, m).passed
    res = check_noise(pairs, 2.0, z, mode, m)
    assert res.passed, res.detail
    if z:
        assert res.values["measured"] == pytest.approx(expected_std(2.0, z, mode, m), rel=0.02)


def test_noise_check_catches_a_wrong_std():
    rng = np.random.default_rng(3)
    deltas = _deltas(4, 2)
    s = expected_std(2.0, 1.0, "distributed", 4)
    # 10 % too little noise, as if the device divided by sqrt(m) once too often in some corner
    pairs = [(d, privatize_update(d, 2.0, 0.9, "distributed", 4, rng)[0]) for d in deltas]
    res = check_noise(pairs, 2.0, 1.0, "distributed", 4)
    assert not res.passed and res.values["p_chi2"] < 1e-6
    # local noise sent where distributed was promised: sqrt(m) times too much
    pairs = [(d, privatize_update(d, 2.0, 1.0, "local", 1, rng)[0]) for d in deltas]
    assert not check_noise(pairs, 2.0, 1.0, "distributed", 4).passed
    # right variance, wrong distribution (uniform): the KS test rejects it
    r = rng.uniform(-math.sqrt(3) * s, math.sqrt(3) * s, 50_000)
    res = check_noise_std(r, s)
    assert not res.passed and res.values["p_ks"] < 1e-3 and res.values["p_chi2"] > 1e-3


def test_clipping_check_catches_an_unclipped_update():
    rng = np.random.default_rng(4)
    deltas = _deltas(3, 5)
    unclipped = [(d, {k: (v + rng.normal(0, 0.5, v.shape)).astype(np.float32) for k, v in d.items()}) for d in deltas]
    assert not check_clipping(unclipped, 2.0, 1.0, "local", 4).passed
    assert not check_clipping([(d, d) for d in deltas], 2.0, 0.0, "none", 1).passed
    clipped = [(d, privatize_update(d, 2.0, 0.0, "none", 1, rng)[0]) for d in deltas]
    assert check_clipping(clipped, 2.0, 0.0, "none", 1).passed


def test_noise_residuals_reclip_independently():
    d = {"w": np.array([3.0, 4.0])}
    r = noise_residuals([(d, {"w": np.array([0.6, 0.8])})], clip_norm=1.0)
    assert np.allclose(r, 0.0)
    with pytest.raises(AuditInputError, match="too few"):
        check_noise_std(np.zeros(10), 1.0)


@pytest.fixture
def ledger(tmp_path):
    led = PrivacyLedger(tmp_path / "device-0" / "ledger.json", max_epsilon=50.0, delta=1e-5)
    for rnd, (z, q, steps) in enumerate([(1.1, 0.2, 10), (1.1, 0.2, 10), (0.9, 0.25, 8)], start=1):
        led.record(SpendRecord(z, q, steps), round=rnd, model_version=rnd)
    return led


def test_ledger_epsilon_matches_an_independent_recomputation(ledger):
    res = check_ledger(ledger.path, 1e-5, reported_epsilon=ledger.epsilon())
    assert res.passed, res.detail
    assert res.values["epsilon_rdp"] == pytest.approx(ledger.epsilon(), rel=1e-6)
    assert res.values["epsilon_prv"] is None or res.values["epsilon_prv"] <= res.values["epsilon_rdp"]


def test_ledger_check_catches_tampering(ledger):
    reported = ledger.epsilon()
    state = json.loads(ledger.path.read_text())
    state["entries"][0]["steps"] = 1                      # edited, checksum left as it was
    ledger.path.write_text(json.dumps(state))
    res = check_ledger(ledger.path, 1e-5, reported_epsilon=reported, prv=False)
    assert not res.passed and "checksum" in res.detail

    # edited with a recomputed checksum: the replayed epsilon no longer matches what was reported
    import hashlib
    canonical = json.dumps(state["entries"], sort_keys=True, separators=(",", ":"))
    state["sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    ledger.path.write_text(json.dumps(state))
    res = check_ledger(ledger.path, 1e-5, reported_epsilon=reported, prv=False)
    assert not res.passed and "checksum" not in res.detail and "!= reported" in res.detail


def test_ledger_check_rejects_non_ledgers(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{\"format\": \"something else\"}")
    with pytest.raises(AuditInputError, match="not a fedser privacy ledger"):
        check_ledger(p, 1e-5)
