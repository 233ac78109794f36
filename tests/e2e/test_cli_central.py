"""End-to-end: synthesize a tiny corpus, train one epoch centrally, evaluate, check RUN_DIR."""
import json

import pytest

from fedser.common.bundle import load_bundle
from fedser.tools.cli import main


@pytest.fixture(scope="module")
def kws_run(tiny_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("kws-run")
    rc = main(["train", "--task", "kws", "--data", str(tiny_corpus / "commands"), "--out", str(run),
               "--epochs", "1", "--quiet", "--cache", str(run.parent / "cache")])
    assert rc == 0
    return run


def test_train_writes_bundle_metrics_and_plots(kws_run):
    for name in ("model.fedser", "metrics.json", "learning_curve.png", "confusion.png"):
        assert (kws_run / name).stat().st_size > 0, name
    metrics = json.loads((kws_run / "metrics.json").read_text())
    assert metrics["task"] == "kws" and metrics["mode"] == "centralized"
    assert len(metrics["history"]) == 1
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert metrics["split"]["train_speakers"] > 0 and metrics["split"]["test_speakers"] > 0
    bundle = load_bundle(kws_run)
    assert bundle.tasks == ["kws"] and bundle.meta["mode"] == "centralized"
    assert bundle.feature_spec.n_features() == bundle.model_config.n_features


def test_evaluate_prints_one_json_object(kws_run, tiny_corpus, capsys):
    capsys.readouterr()
    rc = main(["evaluate", str(kws_run), "--data", str(tiny_corpus / "commands"), "--json", "--quiet",
               "--include-train-speakers"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    report = json.loads(out[0])
    for key in ("accuracy", "uar", "weighted_f1", "per_class_recall", "confusion", "n", "labels", "skipped"):
        assert key in report
    assert report["n"] > 0 and report["task"] == "kws"


def test_evaluate_excludes_training_speakers_by_default(kws_run, tiny_corpus, capsys):
    main(["evaluate", str(kws_run), "--data", str(tiny_corpus / "commands"), "--json", "--quiet"])
    held_out = json.loads(capsys.readouterr().out)
    main(["evaluate", str(kws_run), "--data", str(tiny_corpus / "commands"), "--json", "--quiet",
          "--include-train-speakers"])
    everyone = json.loads(capsys.readouterr().out)
    assert held_out["n"] < everyone["n"]


def test_dp_training_reports_accounted_epsilon(tiny_corpus, tmp_path):
    rc = main(["train", "--task", "emotion", "--data", str(tiny_corpus / "emotion"), "--out", str(tmp_path),
               "--epochs", "1", "--dp", "--target-epsilon", "5", "--quiet", "--cache", "none"])
    assert rc == 0
    privacy = json.loads((tmp_path / "metrics.json").read_text())["privacy"]
    assert 0 < privacy["epsilon"] <= 5.0 * 1.02 and privacy["delta"] == 1e-5
    settings = json.loads((tmp_path / "metrics.json").read_text())["train_config"]
    assert (settings["batch_size"], settings["lr"]) == (256, 1e-2), "DP-SGD's own defaults"
    assert load_bundle(tmp_path).meta["privacy"]["epsilon"] == privacy["epsilon"]


def test_evaluating_a_head_the_model_lacks_is_a_clear_error(kws_run, tiny_corpus, capsys):
    rc = main(["evaluate", str(kws_run), "--data", str(tiny_corpus / "emotion"), "--quiet"])
    assert rc == 2
    assert "kws" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["train", "--task", "kws", "--data", "/nonexistent/corpus", "--out", "X"], "no such file"),
    (["train", "--task", "kws", "--data", ".", "--out", "X", "--dp"], "--target-epsilon"),
    (["evaluate", "/nonexistent/run", "--data", "."], "no model bundle"),
    (["train", "--task", "kws", "--data", ".", "--out", "X", "--batch-size", "0"], "--batch-size"),
    (["train", "--task", "kws", "--data", ".", "--out", "X", "--lr", "-1"], "--lr"),
])
def test_bad_invocations_exit_2_with_a_reason(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_train_defaults_differ_under_dp_and_given_values_win():
    import argparse

    from fedser.tools.commands.train import DP_EPOCHS, PLAIN_EPOCHS, add_arguments, training_defaults

    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--task", "kws", "--data", ".", "--out", "X"]
    plain = training_defaults(p.parse_args(base))
    dp = training_defaults(p.parse_args(base + ["--dp", "--target-epsilon", "8"]))
    assert plain[0] == PLAIN_EPOCHS and dp[0] == DP_EPOCHS > PLAIN_EPOCHS
    assert dp[1] > plain[1], "DP-SGD trains larger batches"
    given = training_defaults(p.parse_args(base + ["--dp", "--epochs", "7", "--batch-size", "5", "--lr", "0.1"]))
    assert given == (7, 5, 0.1)
