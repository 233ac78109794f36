"""FeatureSpec round trip and validation, FrontEnd shapes and librosa parity, fit_length."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import librosa
import numpy as np
import pytest
import torch

from fedser.common.errors import ConfigError
from fedser.common.features import FeatureSpec, FrontEnd, fit_length, spec_for

SR = 16000
# Parity tolerances of raw (pre-normalisation) features against librosa, float32 input.
LOGMEL_ATOL_DB = 0.01
MFCC_ATOL = 0.01
CHROMA_ATOL = 1e-4


def _test_wave(seconds: float = 1.3, seed: int = 0) -> np.ndarray:
    """A chirp over most of the band, some noise, and a stretch of digital silence."""
    rng = np.random.default_rng(seed)
    y = 0.5 * librosa.chirp(fmin=100, fmax=6000, sr=SR, duration=seconds)
    y = y + 0.05 * rng.standard_normal(y.size)
    y[:2000] = 0.0
    return y.astype(np.float32)


def _librosa_kw(spec: FeatureSpec) -> dict:
    return dict(
        sr=spec.sample_rate,
        n_fft=spec.n_fft,
        win_length=spec.win_length,
        hop_length=spec.hop_length,
        center=True,
        pad_mode="constant",
    )


# -- FeatureSpec ---------------------------------------------------------------


def test_spec_round_trip_through_json_dict():
    # Prepare
    spec = FeatureSpec(normalize="utterance", kinds=("mfcc", "chroma", "logmel"), n_mels=64, n_mfcc=13, emotion_seconds=4.5)

    # Execute
    back = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))

    # Assert
    assert back == spec
    assert back.fingerprint() == spec.fingerprint()
    assert isinstance(back.kinds, tuple)


def test_fingerprint_is_stable_and_changes_with_any_field():
    # Prepare
    base = FeatureSpec()

    # Execute
    same = FeatureSpec().fingerprint()
    other = FeatureSpec(hop_length=128).fingerprint()

    # Assert
    assert base.fingerprint() == same
    assert len(same) == 16 and int(same, 16) >= 0
    assert other != same


def test_from_dict_collects_every_problem_with_allowed_values():
    # Prepare
    bad = {
        "kinds": ["logmel", "spectrogram"],
        "n_fft": 512,
        "win_length": 1024,
        "n_mels": 0,
        "kws_seconds": -1,
        "normalize": "global",
        "colour": "blue",
    }

    # Execute
    with pytest.raises(ConfigError) as info:
        FeatureSpec.from_dict(bad)

    # Assert
    msg = str(info.value)
    for expected in (
        "'spectrogram'",
        "logmel, mfcc, chroma",
        "win_length",
        "n_mels",
        "kws_seconds",
        "normalize",
        "utterance, none",
        "colour: unknown field",
    ):
        assert expected in msg
    assert not any(problem.startswith("n_fft") for problem in msg.split(": ", 1)[1].split("; "))


@pytest.mark.parametrize(
    "field, value",
    [
        ("kinds", ()),
        ("kinds", "logmel"),
        ("kinds", ("logmel", "logmel")),
        ("sample_rate", 16000.5),
        ("hop_length", True),
        ("n_mfcc", 41),
        ("emotion_seconds", float("nan")),
    ],
)
def test_constructor_rejects_bad_values(field, value):
    # Execute / Assert
    with pytest.raises(ConfigError, match=field):
        FeatureSpec(**{field: value})


def test_numpy_values_become_plain_python():
    # Prepare
    spec = FeatureSpec(kinds=["logmel"], n_mels=np.int64(64), kws_seconds=1)

    # Execute
    blob = json.dumps(spec.to_dict())

    # Assert
    assert type(spec.n_mels) is int and type(spec.kws_seconds) is float
    assert spec == FeatureSpec(kinds=("logmel",), n_mels=64)
    assert FeatureSpec.from_dict(json.loads(blob)).fingerprint() == spec.fingerprint()


def test_sizes():
    # Prepare
    spec = FeatureSpec(normalize="utterance", kinds=("logmel", "mfcc", "chroma"), n_mels=40, n_mfcc=20, n_chroma=12)

    # Execute / Assert
    assert spec.n_features() == 72
    assert spec.clip_samples("kws") == 16000
    assert spec.clip_samples("emotion") == 48000
    assert spec.n_frames(16000) == 101
    with pytest.raises(ConfigError, match="kws, emotion"):
        spec.clip_samples("speaker")


# -- FrontEnd ------------------------------------------------------------------


def test_front_end_shapes_for_batch_and_single_clip():
    # Prepare
    spec = FeatureSpec(normalize="utterance", kinds=("logmel", "mfcc", "chroma"))
    fe = FrontEnd(spec)
    batch = torch.from_numpy(np.stack([_test_wave(1.0, s) for s in range(3)]))

    # Execute
    out = fe(batch)
    single = fe(batch[0])

    # Assert
    assert out.shape == (3, spec.n_features(), spec.n_frames(16000))
    assert out.dtype == torch.float32
    assert single.shape == (1, spec.n_features(), spec.n_frames(16000))
    assert torch.allclose(single[0], out[0], atol=1e-4)
    assert torch.isfinite(out).all()


def test_kinds_are_stacked_in_the_given_order():
    # Prepare
    wave = torch.from_numpy(_test_wave())
    chroma_first = FrontEnd(FeatureSpec(kinds=("chroma", "logmel"), normalize="none"))

    # Execute
    out = chroma_first(wave)[0]

    # Assert
    assert torch.allclose(out[:12], chroma_first.raw("chroma", wave)[0])
    assert torch.allclose(out[12:], chroma_first.raw("logmel", wave)[0])


def test_utterance_normalisation_is_per_clip_and_gain_invariant():
    # Prepare
    fe = FrontEnd(FeatureSpec(normalize="utterance", kinds=("logmel", "mfcc")))
    wave = torch.from_numpy(_test_wave())
    other = torch.from_numpy(_test_wave(seed=7)) * 0.01

    # Execute
    alone = fe(wave)[0]
    louder = fe(wave * 8.0)[0]
    in_batch = fe(torch.stack([wave, other]))[0]

    # Assert: zero mean, unit variance per row; a gain change (a different microphone)
    # and the other clips of the batch do not change a clip's features.
    assert alone.mean(dim=-1).abs().max() < 1e-4
    assert (alone.std(dim=-1, unbiased=False) - 1).abs().max() < 1e-3
    assert torch.allclose(alone, louder, atol=1e-3)
    assert torch.allclose(alone, in_batch, atol=1e-4)


def test_silence_gives_finite_features():
    # Prepare
    fe = FrontEnd(FeatureSpec(normalize="utterance", kinds=("logmel", "mfcc", "chroma")))

    # Execute
    out = fe(torch.zeros(2, 8000))

    # Assert
    assert torch.isfinite(out).all()
    assert out.abs().max() == 0


@pytest.mark.parametrize("spec_kw", [{}, {"n_fft": 400, "win_length": 400, "hop_length": 128, "n_mels": 64}])
def test_raw_logmel_and_mfcc_match_librosa(spec_kw):
    # Prepare
    spec = FeatureSpec(kinds=("logmel",), **spec_kw)
    fe = FrontEnd(spec)
    y = _test_wave()
    kw = _librosa_kw(spec)
    mel = librosa.feature.melspectrogram(y=y, n_mels=spec.n_mels, power=2.0, htk=False, norm="slaney", **kw)
    ref_logmel = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=80.0)
    ref_mfcc = librosa.feature.mfcc(y=y, n_mfcc=spec.n_mfcc, n_mels=spec.n_mels, dct_type=2, norm="ortho", **kw)

    # Execute
    logmel = fe.raw("logmel", torch.from_numpy(y))[0].numpy()
    mfcc = fe.raw("mfcc", torch.from_numpy(y))[0].numpy()

    # Assert
    assert logmel.shape == ref_logmel.shape == (spec.n_mels, spec.n_frames(y.size))
    np.testing.assert_allclose(logmel, ref_logmel, rtol=0, atol=LOGMEL_ATOL_DB)
    assert mfcc.shape == ref_mfcc.shape
    np.testing.assert_allclose(mfcc, ref_mfcc, rtol=0, atol=MFCC_ATOL)


def test_raw_chroma_matches_librosa():
    # Prepare
    spec = FeatureSpec(normalize="utterance", kinds=("chroma",))
    fe = FrontEnd(spec)
    y = _test_wave()
    ref = librosa.feature.chroma_stft(y=y, n_chroma=spec.n_chroma, tuning=0.0, norm=np.inf, **_librosa_kw(spec))

    # Execute
    chroma = fe.raw("chroma", torch.from_numpy(y))[0].numpy()

    # Assert
    assert chroma.shape == ref.shape
    np.testing.assert_allclose(chroma, ref, rtol=0, atol=CHROMA_ATOL)


def test_front_end_exports_with_dynamic_batch_and_length():
    # Prepare
    fe = FrontEnd(FeatureSpec(normalize="utterance", kinds=("logmel", "mfcc", "chroma"))).eval()
    batch = torch.from_numpy(np.stack([_test_wave(1.0, s) for s in range(2)]))
    dims = ({0: torch.export.Dim("batch", max=4096), 1: torch.export.Dim("time", min=1024, max=SR * 600)},)

    # Execute
    exported = torch.export.export(fe, (batch,), dynamic_shapes=dims).module()
    other = torch.from_numpy(np.stack([_test_wave(0.7, s) for s in range(3)]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(fe)

    # Assert
    assert torch.allclose(exported(other), fe(other), atol=1e-5)
    assert torch.allclose(scripted(other), fe(other), atol=1e-5)


def test_buffers_follow_the_module():
    # Prepare
    fe = FrontEnd(FeatureSpec(normalize="utterance", kinds=("logmel", "mfcc", "chroma")))

    # Execute
    names = {name for name, _ in fe.named_buffers()}

    # Assert
    assert {"dct_mat", "chroma_fb", "mel_scale.fb", "spectrogram.window"} <= names
    assert fe.chroma_fb.shape == (12, 257)
    assert fe.dct_mat.shape == (40, 20)


def test_chroma_filterbank_is_built_on_first_use_without_chroma_in_the_spec():
    # Prepare
    wave = torch.from_numpy(np.random.default_rng(3).standard_normal(16000).astype(np.float32))
    without = FrontEnd(FeatureSpec(normalize="utterance", kinds=("logmel",)))
    with_chroma = FrontEnd(FeatureSpec(normalize="utterance", kinds=("logmel", "chroma")))

    # Execute
    empty_before = without.chroma_fb.numel() == 0
    chroma = without.raw("chroma", wave)

    # Assert
    assert empty_before
    assert torch.equal(without.chroma_fb, with_chroma.chroma_fb)
    assert torch.allclose(chroma, with_chroma.raw("chroma", wave))


def test_default_front_end_does_not_load_numba():
    # librosa's filterbank module loads numba (~190 MB): a device on the default features never pays it.
    code = ("import sys; from fedser.common.features import FeatureSpec, FrontEnd; "
            "FrontEnd(FeatureSpec()); print('numba' in sys.modules)")

    # Execute
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


# -- fit_length ----------------------------------------------------------------


def test_fit_length_center_crop_and_pad():
    # Prepare
    wave = np.arange(10, dtype=np.float32)

    # Execute
    cropped = fit_length(wave, 4, "center")
    padded = fit_length(wave, 14, "center")
    start = fit_length(wave, 14, "start")

    # Assert
    np.testing.assert_array_equal(cropped, [3, 4, 5, 6])
    np.testing.assert_array_equal(padded, [0, 0, *range(10), 0, 0])
    np.testing.assert_array_equal(start, [*range(10), 0, 0, 0, 0])
    assert cropped.dtype == np.float32
    cropped[0] = -1
    assert wave[3] == 3  # a new array, not a view


def test_fit_length_random_is_seeded_and_covers_offsets():
    # Prepare
    wave = np.arange(1, 11, dtype=np.float32)

    # Execute
    crops = [fit_length(wave, 4, "random", np.random.default_rng(s)) for s in range(40)]
    again = [fit_length(wave, 4, "random", np.random.default_rng(s)) for s in range(40)]
    pads = [fit_length(wave, 13, "random", np.random.default_rng(s)) for s in range(40)]

    # Assert
    starts = {int(c[0]) - 1 for c in crops}
    assert starts == set(range(7))
    assert all(np.array_equal(a, b) for a, b in zip(crops, again))
    assert all(np.array_equal(c, np.arange(c[0], c[0] + 4)) for c in crops)
    assert {int(np.argmax(p > 0)) for p in pads} == {0, 1, 2, 3}
    assert all(p.sum() == wave.sum() for p in pads)


def test_fit_length_rejects_unknown_mode():
    # Execute / Assert
    with pytest.raises(ConfigError, match="center, random, start"):
        fit_length(np.zeros(10, np.float32), 5, "middle")


def test_waveform_kind_is_the_clip_itself_and_stacks_with_nothing():
    spec = spec_for("waveform")
    wave = torch.from_numpy(_test_wave(0.5))

    out = FrontEnd(spec)(wave)

    assert out.shape == (1, 1, wave.numel()) == (1, spec.n_features(), spec.n_frames(wave.numel()))
    assert abs(float(out.mean())) < 1e-4 and abs(float(out.std(unbiased=False)) - 1) < 1e-3  # per clip
    with pytest.raises(ConfigError, match="stacks with no other kind"):
        FeatureSpec(kinds=("waveform", "logmel"))
