"""Exported pipelines (TorchScript, ONNX): parity with PyTorch, metadata, bad files."""
import json

import numpy as np
import pytest
import torch

from fedser.common.bundle import BUNDLE_FILE, Bundle, load_bundle, save_bundle
from fedser.tools.cli import main
from fedser.tools.commands.export import verification_clips
from fedser.common.errors import BundleError
from fedser.client.runtime import OnnxRuntime, TorchRuntime, open_model
from fedser.common.export_format import EXPORT_VERSION, METADATA_KEY, DFTFrontEnd, detect_kind, inference_copy
from fedser.tools.export import export_bundle, set_onnx_metadata, verify_export
from fedser.common.features import FeatureSpec, FrontEnd, spec_for
from fedser.common.models import ModelConfig, build_model
from fedser.common.taxonomy import EMOTIONS, KEYWORDS

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

META = {"model_version": 7, "kws_head_version": 3, "privacy": {"user_level": {"epsilon": 2.5}},
        "corpus": {"description": "device data"}}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Batch-1 streaming is fastest on one thread (as devices run it); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The default (a head over the frozen public encoders: normalised features in) and a recurrent
# from-scratch encoder over log-mel (waveform in, front end inside the graph).
ENCODER_FEATURES = {"tcn": FeatureSpec(), "crnn": spec_for("logmel")}


def make_bundle(encoder: str = "tcn", seed: int = 0, labels=None) -> Bundle:
    torch.manual_seed(seed)
    spec = ENCODER_FEATURES[encoder]
    cfg = ModelConfig(encoder=encoder, n_features=spec.n_features())
    labels = labels or {"kws": list(KEYWORDS[:10]) + ["_unknown_"], "emotion": list(EMOTIONS[:8])}
    return Bundle.from_model(build_model(cfg), cfg, spec, labels, META)


@pytest.fixture(scope="module")
def clips(tiny_corpus):
    """Real (synthesized speech) clips of both tasks, as `fedser export` picks them."""
    waves, source = verification_clips(make_bundle(), [str(tiny_corpus / "commands"), str(tiny_corpus / "emotion")], 6)
    assert set(waves) == {"kws", "emotion"} and "synthetic" not in source
    return waves, source


@pytest.fixture(scope="module")
def exports(clips, tmp_path_factory):
    """(bundle, {(encoder, format): path}) for both encoders and both formats."""
    out = tmp_path_factory.mktemp("exports")
    waves, source = clips
    made = {}
    for encoder in ENCODER_FEATURES:
        bundle = make_bundle(encoder)
        for fmt, suffix in (("torchscript", ".pt"), ("onnx", ".onnx")):
            result = export_bundle(bundle, fmt, out / f"{encoder}{suffix}", waves, source)
            assert result.verification.ok
            made[encoder, fmt] = (bundle, result.path)
    return made


@pytest.mark.parametrize("encoder", list(ENCODER_FEATURES))
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_pytorch_on_any_length_and_batch(exports, encoder, fmt):
    bundle, path = exports[encoder, fmt]
    reference, exported = TorchRuntime(bundle, path), open_model(path)
    rng = np.random.default_rng(1)
    for batch, seconds in ((1, 1.0), (3, 0.37), (2, 3.2)):
        waves = (0.1 * rng.standard_normal((batch, int(seconds * 16000)))).astype(np.float32)
        ref, got = reference.probs(waves), exported.probs(waves)
        for task, n in (("emotion", 9), ("kws", 12)):
            assert got[task].shape == (batch, n)
            np.testing.assert_allclose(got[task], ref[task], atol=1e-4)
            np.testing.assert_array_equal(got[task].argmax(1), ref[task].argmax(1))


def test_exported_file_carries_spec_labels_versions_and_verification(exports):
    bundle, path = exports["tcn", "onnx"]
    rt = open_model(path)
    assert rt.kind == "onnx" and rt.spec == bundle.feature_spec
    assert rt.labels == bundle.labels
    assert rt.classes == {"emotion": EMOTIONS, "kws": KEYWORDS}
    assert rt.meta["model_version"] == 7 and rt.meta["kws_head_version"] == 3
    assert rt.meta["privacy"] == META["privacy"]
    check = rt.export_info["verification"]
    assert check["ok"] and check["top1_agreement"] == {"kws": 1.0, "emotion": 1.0}
    assert max(check["max_abs_diff"].values()) <= check["atol"]


def test_untrained_classes_get_probability_zero(exports):
    bundle, path = exports["tcn", "torchscript"]
    probs = open_model(path).probs(np.zeros(16000, dtype=np.float32) + 0.01)
    assert probs["kws"][0, KEYWORDS.index("_silence_")] == 0.0     # not in the bundle's kws labels
    assert probs["emotion"][0, EMOTIONS.index("boredom")] == 0.0
    np.testing.assert_allclose(probs["kws"].sum(), 1.0, rtol=1e-5)


def test_verification_reports_a_mismatch(exports, clips):
    bundle, path = exports["tcn", "onnx"]
    other = TorchRuntime(make_bundle("tcn", seed=1), path)  # different weights
    check = verify_export(other, open_model(path), clips[0], "test clips")
    assert not check.ok
    assert any("max abs difference" in p for p in check.problems)


def test_dft_front_end_matches_the_stft_front_end():
    rng = np.random.default_rng(0)
    wave = torch.from_numpy((0.2 * rng.standard_normal((2, 12345))).astype(np.float32))
    for spec in (spec_for("logmel"), FeatureSpec(kinds=("logmel", "mfcc", "chroma"), win_length=512),
                 FeatureSpec(n_fft=400, win_length=300, hop_length=100, n_mels=32)):
        ref, got = FrontEnd(spec)(wave), DFTFrontEnd(spec)(wave)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_inference_copy_swaps_dpgru_for_gru_with_the_same_outputs():
    model = build_model(ModelConfig(encoder="crnn", n_features=40)).eval()
    copy = inference_copy(model)
    assert type(copy.encoder.gru) is torch.nn.GRU
    x = torch.randn(2, 40, 77)
    with torch.no_grad():
        torch.testing.assert_close(copy(x, "kws"), model(x, "kws"), atol=1e-5, rtol=0)


def test_cli_export_writes_a_verified_file(tmp_path, tiny_corpus, capsys):
    save_bundle(make_bundle(), tmp_path / "run")
    out = tmp_path / "model.onnx"
    rc = main(["export", str(tmp_path / "run"), "--format", "onnx", "--out", str(out),
               "--data", str(tiny_corpus / "commands"), "--clips", "4", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(out) and report["size_bytes"] == out.stat().st_size
    assert report["verification"]["ok"] and report["verification"]["clips"]["kws"] == 4
    assert detect_kind(out) == "onnx" and not list(tmp_path.glob(".export-*"))


def test_cli_export_without_a_corpus_verifies_on_synthetic_signals(tmp_path, capsys):
    save_bundle(make_bundle(), tmp_path)
    rc = main(["export", str(tmp_path), "--format", "torchscript", "--out", str(tmp_path / "m.pt"), "--clips", "3"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "synthetic" in captured.err and "top-1 agreement 100%" in captured.out


@pytest.mark.parametrize("key", ["torchscript", "onnx"])
def test_truncated_export_is_a_clear_error(exports, tmp_path, key):
    _, path = exports["tcn", key]
    cut = tmp_path / path.name
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BundleError, match="truncated or corrupt"):
        open_model(cut)


def test_onnx_without_fedser_metadata_says_what_is_missing(exports, tmp_path):
    _, path = exports["tcn", "onnx"]
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(path.read_bytes())
    set_onnx_metadata(bare, None)
    with pytest.raises(BundleError, match="no fedser metadata"):
        open_model(bare)


@pytest.mark.parametrize("change,match", [
    (lambda m: m.pop("feature_spec"), "missing feature_spec"),
    (lambda m: m.update(version=EXPORT_VERSION + 1), "newer"),
    (lambda m: m["feature_spec"].update(n_fft=-3), "feature_spec in the metadata is invalid"),
])
def test_bad_export_metadata_is_named(exports, tmp_path, change, match):
    _, path = exports["tcn", "onnx"]
    meta = json.loads(OnnxRuntime(path).session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    change(meta)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(path.read_bytes())
    set_onnx_metadata(bad, meta)
    with pytest.raises(BundleError, match=match):
        open_model(bad)


def test_unknown_model_content_is_refused(tmp_path):
    junk = tmp_path / "model.bin"
    junk.write_bytes(b"hello, not a model")
    with pytest.raises(BundleError, match="not a fedser bundle, TorchScript or ONNX"):
        open_model(junk)


def test_bundle_stores_class_order_and_checks_it(tmp_path):
    path = save_bundle(make_bundle(), tmp_path)
    assert load_bundle(path).classes == {"emotion": EMOTIONS, "kws": KEYWORDS}
    payload = torch.load(path, weights_only=True)
    payload["classes"] = json.dumps({"kws": ["yes", "no"]})
    torch.save(payload, path)
    with pytest.raises(BundleError, match="kws head has 12 outputs but 2 class names"):
        load_bundle(tmp_path / BUNDLE_FILE)


def test_bundle_without_class_order_uses_the_taxonomy(tmp_path):
    path = save_bundle(make_bundle(), tmp_path)
    payload = torch.load(path, weights_only=True)
    del payload["classes"]
    torch.save(payload, path)
    assert load_bundle(path).classes["kws"] == KEYWORDS
    assert load_bundle(path).meta["fedser_version"]
