import numpy as np
import pytest
import torch

from fedser.common.bundle import BUNDLE_FILE, Bundle, load_bundle, save_bundle
from fedser.common.errors import BundleError
from fedser.common.features import FeatureSpec
from fedser.common.models import ModelConfig, build_model

N_FEATURES = ModelConfig().n_features  # rows of the default features


def _bundle(encoder="cnn") -> Bundle:
    torch.manual_seed(0)
    cfg = ModelConfig(encoder=encoder)
    return Bundle.from_model(build_model(cfg), cfg, FeatureSpec(), {"kws": ["yes", "no"]},
                             {"model_version": 3, "kws_head_version": 2, "privacy": {"epsilon": 1.5}})


@pytest.mark.parametrize("encoder", ["cnn", "crnn"])
def test_round_trip_keeps_weights_spec_labels_and_meta(tmp_path, encoder):
    b = _bundle(encoder)
    save_bundle(b, tmp_path)
    back = load_bundle(tmp_path)
    assert back.model_config == b.model_config
    assert back.feature_spec == b.feature_spec
    assert back.labels == {"kws": ["yes", "no"]}
    assert back.meta["model_version"] == 3 and back.meta["privacy"] == {"epsilon": 1.5}
    assert back.tasks == ["kws"]
    for k, v in b.state.items():
        np.testing.assert_array_equal(back.state[k], v)
    x = torch.randn(2, N_FEATURES, 101)
    torch.testing.assert_close(back.build_model()(x, "kws"), b.build_model()(x, "kws"))


def test_missing_bundle_names_the_path(tmp_path):
    with pytest.raises(BundleError, match="no model bundle"):
        load_bundle(tmp_path)


def test_truncated_bundle_is_a_clear_error(tmp_path):
    path = save_bundle(_bundle(), tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated or corrupt"):
        load_bundle(path)


def test_bundle_without_feature_spec_names_what_is_missing(tmp_path):
    path = save_bundle(_bundle(), tmp_path)
    payload = torch.load(path, weights_only=True)
    del payload["feature_spec"]
    torch.save(payload, path)
    with pytest.raises(BundleError, match="missing feature_spec"):
        load_bundle(tmp_path / BUNDLE_FILE)


def test_newer_bundle_version_is_refused(tmp_path):
    path = save_bundle(_bundle(), tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, path)
    with pytest.raises(BundleError, match="newer"):
        load_bundle(path)
