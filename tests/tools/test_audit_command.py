"""``fedser audit`` end to end on a small run directory built from synthesized speech, and its input errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedser.tools.audit.inputs import AuditInputError
from fedser.tools.audit.inputs import EMODB_GENDER, load_gender_csv, load_run, speaker_genders
from fedser.tools.cli import main
from fedser.common.corpora import Utterance


@pytest.fixture(scope="module")
def run_dir(tiny_corpus, tmp_path_factory) -> Path:
    """A finished 'federated run': final model, run settings, metrics, device manifests and ledgers."""
    from fedser.client.ledger import PrivacyLedger
    from fedser.common.bundle import Bundle, save_bundle
    from fedser.common.corpora import load_corpus, write_manifest
    from fedser.common.data import HEAD_CLASSES, build_task_data
    from fedser.common.features import FeatureSpec
    from fedser.common.models import ModelConfig, build_model
    from fedser.common.privacy import SpendRecord
    from fedser.common.training import TrainConfig, train_task

    root = tmp_path_factory.mktemp("audit-run")
    corpus = load_corpus(tiny_corpus / "emotion")
    speakers = corpus.speakers()
    spec = FeatureSpec()
    mc = ModelConfig(n_features=spec.n_features())
    members = [u for u in corpus.utterances if u.speaker in speakers[:2]]
    for i, spk in enumerate(speakers[:2]):
        write_manifest([u for u in members if u.speaker == spk], root / "devices" / f"device-{i}" / "data.csv")
    write_manifest([u for u in corpus.utterances if u.speaker in speakers[2:]], root / "devices" / "test.csv")
    from fedser.common.params import state_to_arrays
    from fedser.server.checkpoint import save_initial_model

    torch.manual_seed(0)
    model = build_model(mc)
    save_initial_model(root, state_to_arrays(model))   # as the ServerApp records the devices' start
    train_task(model, "emotion", build_task_data(members, spec, "emotion", progress=False), None,
               TrainConfig(epochs=1, batch_size=8), spec, progress=False)
    meta = {"mode": "federated", "rounds": 2, "privacy": {"user_level": {
        "epsilon": float("inf"), "delta": 1e-5, "clients_per_round": 2, "total_clients": 2}}}
    save_bundle(Bundle.from_model(model, mc, spec, {"emotion": list(HEAD_CLASSES["emotion"])}, meta), root)
    (root / "run_settings.json").write_text(json.dumps({
        "run_dir": str(root), "num_server_rounds": 2, "min_clients": 2, "local_epochs": 1, "batch_size": 8,
        "learning_rate": 0.003, "encoder": "tcn", "clip_norm": 2.0, "noise_multiplier": 0.0, "noise_mode": "none",
        "user_delta": 1e-5, "dp": True, "dp_noise_multiplier": 0.0, "dp_max_grad_norm": 1.0}))
    eps = []
    for i in range(2):
        led = PrivacyLedger(root / "devices" / f"device-{i}" / "ledger.json", max_epsilon=8.0, delta=1e-5)
        for rnd in (1, 2):
            led.record(SpendRecord(1.5 + i, 0.5, 2), round=rnd, model_version=rnd)
        eps.append(led.epsilon())
    (root / "metrics.json").write_text(json.dumps({"summary": {"rounds": 2}, "rounds": [
        {"round": 1, "max-device-epsilon": 0.0}, {"round": 2, "max-device-epsilon": max(eps)}]}))
    return root


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory) -> Path:
    """One feature cache for every audit of this module: each clip is featurised once."""
    return tmp_path_factory.mktemp("audit-cache")


def _argv(run_dir, out, data, cache, *extra):
    return ["audit", str(run_dir), "--data", str(data), "--out", str(out), "--settings", "none,both",
            "--updates-per-speaker", "2", "--reference-models", "1", "--cache",
            str(cache), "--quiet", *extra]


@pytest.fixture(scope="module")
def audit_out(run_dir, tiny_corpus, feature_cache, tmp_path_factory) -> Path:
    """``fedser audit`` run once on the run directory; the tests read its report."""
    root = tmp_path_factory.mktemp("audit-out")
    genders = root / "genders.csv"
    genders.write_text("speaker,gender\n01,male\n02,female\n03,m\n04,f\n")
    out = root / "audit"
    assert main(_argv(run_dir, out, tiny_corpus / "emotion", feature_cache, "--gender-csv", str(genders),
                      "--chance-permutations", "2")) == 0
    return out


def test_fedser_audit_writes_the_report(audit_out):
    out = audit_out
    text = (out / "audit.md").read_text()
    assert "| attribute inference (gender) from updates | no DP | UAR over 4 target clients |" in text
    assert "| attribute inference (gender) from updates | both | UAR" in text
    assert "membership (sample level, emotion), loss threshold" in text
    assert "difficulty-calibrated confidence" in text
    assert "| membership (sample level, emotion) from updates, gradient alignment | no DP | ROC AUC (" in text
    assert "TPR at 1% FPR" in text
    assert "**FAIL**" not in text
    assert text.count("| ledger epsilon |") == 2 and "| ledger epsilon = reported | run | pass |" in text
    assert (out / "roc_membership_emotion.png").stat().st_size > 1000
    assert "sample-level epsilon" in text and "inf (no guarantee)" in text
    assert "genders shuffled" in text
    assert "federations of the run's protocol without DP" in text and "initial_model.npz" in text
    # A membership AUC's chance column is the luck band for its counts, above 0.5 with few speakers.
    auc_rows = [line for line in text.splitlines() if line.startswith("| membership") and "| ROC AUC (" in line]
    assert auc_rows and all(float(line.rstrip(" |").rsplit("|", 1)[1]) > 0.5 for line in auc_rows)


def test_fedser_audit_writes_the_table_as_json_rows_a_script_can_check(audit_out):
    rows = json.loads((audit_out / "audit.json").read_text())
    text = (audit_out / "audit.md").read_text()
    assert rows and all(set(r) >= {"setting", "attack", "metric", "value", "luck_band"} for r in rows)
    assert all(isinstance(r["value"], float) and (r["luck_band"] is None or isinstance(r["luck_band"], float))
               for r in rows)
    settings = {r["setting"] for r in rows}
    # --settings none,both; the run itself is sample-level; fedser's defaults are both (DP-SGD + user noise)
    assert settings == {"no-dp", "both", "sample-level", "defaults"}
    gender = {r["setting"]: r for r in rows if r["attack"] == "attribute-gender" and r["metric"] == "uar"}
    assert set(gender) == {"no-dp", "both", "defaults"}
    assert gender["defaults"]["value"] == gender["both"]["value"]
    assert all(r["luck_band"] is not None for r in gender.values())  # measured by shuffling genders
    # the same attack on what secure aggregation shows: per-round sums, disaggregated
    sums = {r["setting"]: r for r in rows if r["attack"] == "attribute-gender-sums"}
    assert set(sums) == {"no-dp", "both", "defaults"} and all(0 <= r["value"] <= 1 for r in sums.values())
    assert "from per-round sums (secure aggregation)" in text and "disaggregated by least squares" in text
    membership = [r for r in rows if r["attack"] == "membership" and r["metric"] == "auc"]
    assert {r["setting"] for r in membership} == {"no-dp", "both", "defaults", "sample-level"}
    assert all(r["luck_band"] is not None for r in membership)
    # every number in the JSON is one the markdown table shows
    for r in rows:
        assert f"| {r['value']:.3f} |" in text


def test_audit_input_errors(run_dir, tiny_corpus, feature_cache, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_argv(tmp_path / "missing", out, tiny_corpus / "emotion", feature_cache)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(_argv(tmp_path, out, tiny_corpus / "emotion", feature_cache)) == 2
    assert "not a federated run directory" in capsys.readouterr().err
    # speakers whose gender nobody knows: the Speech Commands part holds no emotion speakers
    assert main(_argv(run_dir, out, tiny_corpus / "commands", feature_cache)) == 2
    assert "--gender-csv" in capsys.readouterr().err
    # one speaker of each gender known: too few for a shadow/target split
    few = tmp_path / "few.csv"
    few.write_text("speaker,gender\n01,m\n02,f\n")
    manifest = tmp_path / "two.csv"
    from fedser.common.corpora import load_corpus, write_manifest
    write_manifest([u for u in load_corpus(tiny_corpus / "emotion").utterances if u.speaker in ("01", "02")],
                   manifest)
    assert main(_argv(run_dir, out, manifest, feature_cache, "--gender-csv", str(few))) == 2
    assert "too few speakers" in capsys.readouterr().err
    assert main(_argv(run_dir, out, tiny_corpus / "emotion", feature_cache, "--settings", "all")) == 2


def test_run_directory_errors(run_dir, tmp_path):
    import shutil

    no_model = tmp_path / "no-model"
    no_model.mkdir()
    (no_model / "metrics.json").write_text("{}")
    with pytest.raises(AuditInputError, match="no final model"):
        load_run(no_model)
    no_settings = tmp_path / "no-settings"
    shutil.copytree(run_dir, no_settings)
    (no_settings / "run_settings.json").unlink()
    with pytest.raises(AuditInputError, match="run_settings.json"):
        load_run(no_settings)
    other = tmp_path / "other-encoder"
    shutil.copytree(run_dir, other)
    s = json.loads((other / "run_settings.json").read_text())
    (other / "run_settings.json").write_text(json.dumps({**s, "encoder": "crnn"}))
    with pytest.raises(AuditInputError, match="encoder"):
        load_run(other)


def test_mismatched_feature_spec_is_refused(run_dir, tmp_path):
    import shutil

    from fedser.common.bundle import load_bundle, save_bundle
    from fedser.common.features import FeatureSpec

    bad = tmp_path / "bad-spec"
    shutil.copytree(run_dir, bad)
    b = load_bundle(bad)
    spec = FeatureSpec.from_dict({**b.feature_spec.to_dict(), "kinds": ["speech-embedding"]})  # 96 rows, not 184
    b.feature_spec = spec
    save_bundle(b, bad)
    with pytest.raises(AuditInputError, match="FeatureSpec"):
        load_run(bad)


def test_gender_table_and_csv(tmp_path):
    def u(corpus, spk):
        return Utterance(f"/x/{corpus}{spk}.wav", "neutral", spk, "emotion", corpus)

    got = speaker_genders([u("ravdess", "ravdess:01"), u("ravdess", "ravdess:02"), u("emodb", "emodb:03"),
                           u("emodb", "emodb:08"), u("tess", "OAF")])
    assert got == {"ravdess:01": "m", "ravdess:02": "f", "emodb:03": "m", "emodb:08": "f"}
    assert sorted(EMODB_GENDER.values()).count("m") == 5
    csv = tmp_path / "g.csv"
    csv.write_text("speaker,gender\nOAF,female\n")
    assert speaker_genders([u("tess", "OAF")], load_gender_csv(csv)) == {"OAF": "f"}
    csv.write_text("speaker,gender\nOAF,x\n,m\n")
    with pytest.raises(AuditInputError, match="row 2.*row 3"):
        load_gender_csv(csv)
    csv.write_text("name,sex\nOAF,f\n")
    with pytest.raises(AuditInputError, match="header"):
        load_gender_csv(csv)


def test_demo_report_links_the_audit(tmp_path):
    from fedser.tools.commands.demo import report

    (tmp_path / "metrics.json").write_text(json.dumps({"summary": {"user-epsilon": 1.5, "user-delta": 1e-5},
                                                       "rounds": [{"round": 1, "seconds": 2.0}]}))
    assert "Privacy audit" not in report(tmp_path)
    text = report(tmp_path, tmp_path / "audit" / "audit.md")
    assert "[audit/audit.md](audit/audit.md)" in text
    outside = tmp_path.parent / "elsewhere" / "audit.md"
    assert f"]({outside})" in report(tmp_path, outside)


def test_reference_federations_start_from_the_runs_initial_model(monkeypatch):
    # Prepare: a pool of two speakers; simulate_federation replaced by a recorder
    from fedser.common.data import TaskData
    from fedser.common.features import FeatureSpec
    from fedser.common.models import ModelConfig, build_model
    from fedser.common.params import state_to_arrays
    from fedser.tools.audit import protocol as audit_protocol

    spec = FeatureSpec()
    mc = ModelConfig(n_features=spec.n_features())
    frames = spec.n_frames(spec.clip_samples("emotion"))
    pool = TaskData(task="emotion", feats=torch.randn(8, spec.n_features(), frames), y=torch.arange(8) % 4,
                    speakers=["a", "b"] * 4)
    torch.manual_seed(1)
    initial = state_to_arrays(build_model(mc))
    seen = []

    def record(model_config, spec, clients, protocol, seed=0, progress=False, init=None):
        seen.append(init)
        return dict(init)

    monkeypatch.setattr(audit_protocol, "simulate_federation", record)
    run = audit_protocol.Protocol(rounds=1, local_epochs=1)

    # Execute
    audit_protocol.reference_confidences(mc, spec, pool, 2, 1, federation=run, init=initial)

    # Assert: both references started from the run's model, not from a random one each
    assert len(seen) == 2
    for got in seen:
        assert set(got) == set(initial) and all(np.array_equal(got[k], initial[k]) for k in initial)


def test_an_initial_model_of_another_run_is_refused(run_dir, tmp_path):
    # Prepare: a copy of the run whose initial model lacks an array of the final one
    import shutil

    from fedser.server.checkpoint import INITIAL_MODEL_FILE, load_initial_model, save_initial_model
    from fedser.tools.audit.inputs import AuditInputError, load_run

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    arrays = load_initial_model(copy)
    save_initial_model(copy, dict(list(arrays.items())[1:]))

    # Execute / Assert
    with pytest.raises(AuditInputError, match="different runs"):
        load_run(copy)
    (copy / INITIAL_MODEL_FILE).write_bytes(b"not a zip")
    with pytest.raises(AuditInputError, match="unreadable"):
        load_run(copy)
