"""The espeak-ng demo corpus: layout, audio format, determinism, prosody, errors, CLI."""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedser.tools import synth
from fedser.tools.commands import synth as synth_command
from fedser.common.errors import ConfigError

TINY = dict(n_speakers=2, emotions=("neutral", "sad", "angry"), statements=1, repetitions=2,
            command_words=("yes", "no"), command_repetitions=1, unknown_words=("bed",),
            unknown_repetitions=1, noise_seconds=2.0, progress=False)

RAVDESS_NAME = re.compile(r"^03-01-(0[1-8])-0[12]-(0[12])-(\d\d)-(\d\d)\.wav$")
SC_NAME = re.compile(r"^([0-9a-f]{8})_nohash_(\d+)\.wav$")


def _espeak_available() -> bool:
    try:
        synth.locate_espeak()
    except ConfigError:
        return False
    return True


needs_espeak = pytest.mark.skipif(not _espeak_available(), reason="espeak-ng not installed")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> synth.SynthReport:
    return synth.synthesize_corpus(tmp_path_factory.mktemp("synth") / "corpus", **TINY)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.wav"))}


def _emotion_files(report: synth.SynthReport, emotion: str) -> list[Path]:
    code = f"{synth.EMOTION_CODES[emotion]:02d}"
    return [p for p in Path(report.emotion_dir).rglob("*.wav") if p.name.split("-")[2] == code]


@needs_espeak
def test_emotion_part_follows_ravdess_naming(tiny):
    # Prepare
    root = Path(tiny.emotion_dir)
    # Execute
    files = sorted(root.rglob("*.wav"))
    parsed = [(p.parent.name, RAVDESS_NAME.match(p.name)) for p in files]
    # Assert
    assert len(files) == tiny.n_emotion_files == 2 * 3 * 1 * 2
    assert all(m is not None for _, m in parsed), [p.name for p in files]
    assert all(folder == f"Actor_{m.group(4)}" for folder, m in parsed)
    codes = {m.group(1) for _, m in parsed}
    assert codes == {"01", "04", "05"}   # neutral, sad, angry
    assert {m.group(4) for _, m in parsed} == {"01", "02"}


@needs_espeak
def test_commands_part_follows_speech_commands_naming(tiny):
    # Prepare
    root = Path(tiny.commands_dir)
    # Execute
    folders = {p.name for p in root.iterdir() if p.is_dir()}
    clips = [p for p in root.rglob("*.wav") if p.parent.name != synth.NOISE_DIR]
    noise = sorted(p.name for p in (root / synth.NOISE_DIR).iterdir())
    # Assert
    assert folders == {"yes", "no", "bed", synth.NOISE_DIR}
    assert len(clips) == tiny.n_command_files == 2 * (2 * 1 + 1 * 1)
    assert all(SC_NAME.match(p.name) for p in clips), [p.name for p in clips]
    assert {SC_NAME.match(p.name).group(1) for p in clips} == {s.hash for s in tiny.speakers}
    assert noise == sorted(f"{k}.wav" for k in synth.NOISE_KINDS)


@needs_espeak
def test_files_are_16k_mono_pcm16_and_commands_are_one_second_centred(tiny):
    # Prepare
    files = sorted(Path(tiny.out_dir).rglob("*.wav"))
    # Execute
    infos = {p: sf.info(p) for p in files}
    # Assert
    assert all((i.samplerate, i.channels, i.subtype) == (16000, 1, "PCM_16") for i in infos.values())
    for p, info in infos.items():
        if p.parent.parent.name == "commands" and p.parent.name != synth.NOISE_DIR:
            assert info.frames == 16000
            x, _ = sf.read(p)
            energy = x ** 2
            centre = float(np.sum(np.arange(len(x)) * energy) / np.sum(energy)) / 16000
            assert abs(centre - 0.5) < 0.15, (p, centre)
        elif p.parent.name == synth.NOISE_DIR:
            assert info.frames == 2 * 16000
        else:
            x, _ = sf.read(p)
            assert 0.5 < info.duration < 6.0 and np.abs(x).max() > 0.01


@needs_espeak
def test_speakers_alternate_male_female_with_distinct_voices(tiny):
    # Execute
    speakers = tiny.speakers
    # Assert
    assert [s.actor for s in speakers] == [1, 2]
    assert [s.gender for s in speakers] == ["male", "female"]
    assert len({s.voice for s in speakers}) == 2 and len({s.hash for s in speakers}) == 2


@needs_espeak
def test_same_seed_gives_same_bytes_and_another_seed_does_not(tiny, tmp_path):
    # Execute
    again = synth.synthesize_corpus(tmp_path / "again", workers=1, **TINY)
    other = synth.synthesize_corpus(tmp_path / "other", **{**TINY, "seed": 1, "noise_seconds": 0})
    # Assert
    first = _digests(Path(tiny.out_dir))
    assert _digests(Path(again.out_dir)) == first
    second = _digests(Path(other.out_dir))
    emotion = {k: v for k, v in first.items() if k.startswith("emotion")}
    assert all(second.get(k) != v for k, v in emotion.items())


@needs_espeak
def test_emotions_differ_in_loudness_and_duration(tiny):
    # Prepare
    def stats(emotion):
        waves = [sf.read(p)[0] for p in _emotion_files(tiny, emotion)]
        rms_db = [20 * np.log10(np.sqrt(np.mean(x ** 2))) for x in waves]
        return float(np.mean(rms_db)), float(np.mean([len(x) / 16000 for x in waves]))

    # Execute
    angry_db, angry_s = stats("angry")
    sad_db, sad_s = stats("sad")
    neutral_db, _ = stats("neutral")
    # Assert
    assert angry_db > neutral_db > sad_db
    assert angry_db - sad_db > 6.0
    assert sad_s > angry_s * 1.2


@needs_espeak
def test_manifest_marks_the_synthesis_complete(tiny):
    # Execute
    complete = synth.is_complete(tiny.out_dir)
    # Assert
    assert complete
    assert tiny.bytes_written == sum(p.stat().st_size for p in Path(tiny.out_dir).rglob("*.wav"))
    assert tiny.audio_seconds > 0


@needs_espeak
def test_loaders_detect_both_parts(tiny):
    # Prepare
    corpora = pytest.importorskip("fedser.common.corpora")
    # Execute
    emotion = corpora.load_corpus(tiny.emotion_dir)
    commands = corpora.load_corpus(tiny.commands_dir)
    # Assert
    assert emotion.name == "ravdess" and not emotion.skipped
    assert set(emotion.labels("emotion")) == {"neutral", "sad", "angry"}
    assert len(emotion.speakers()) == 2
    assert commands.name == "speech_commands" and not commands.skipped
    assert {"yes", "no", "_unknown_"} <= set(commands.labels("kws"))


@needs_espeak
def test_occupied_folder_needs_overwrite_and_a_manifest(tiny, tmp_path):
    # Prepare
    foreign = tmp_path / "foreign"
    (foreign / "emotion").mkdir(parents=True)
    (foreign / "emotion" / "keep.txt").write_text("user data")
    # Execute / Assert: an earlier synthesis is kept unless overwrite is asked for
    with pytest.raises(ConfigError, match="overwrite"):
        synth.synthesize_corpus(tiny.out_dir, **TINY)
    # a folder fedser did not write is never deleted
    with pytest.raises(ConfigError, match="refusing"):
        synth.synthesize_corpus(foreign, overwrite=True, **TINY)
    assert (foreign / "emotion" / "keep.txt").exists()


@needs_espeak
def test_overwrite_replaces_an_earlier_synthesis(tmp_path):
    # Prepare
    out = tmp_path / "c"
    synth.synthesize_corpus(out, **{**TINY, "n_speakers": 2})
    # Execute
    report = synth.synthesize_corpus(out, overwrite=True, **{**TINY, "n_speakers": 1, "noise_seconds": 0})
    # Assert: nothing of the larger first run is left behind
    assert sorted(p.name for p in (out / "emotion").iterdir()) == ["Actor_01"]
    assert len(list(out.rglob("*.wav"))) == report.n_emotion_files + report.n_command_files


def test_bad_settings_are_all_reported_at_once(tmp_path):
    # Execute
    with pytest.raises(ConfigError) as err:
        synth.synthesize_corpus(tmp_path / "x", n_speakers=0, emotions=("angry", "bored"), statements=3,
                                command_words=("yes", "../up"), progress=False)
    # Assert
    message = str(err.value)
    for fragment in ("n_speakers", "bored", "statements", "../up"):
        assert fragment in message
    assert not (tmp_path / "x").exists()


def test_missing_espeak_says_how_to_install(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)   # import now raises ImportError
    monkeypatch.setattr(synth.ctypes.util, "find_library", lambda name: None)
    # Execute
    with pytest.raises(ConfigError) as err:
        synth.synthesize_corpus(tmp_path / "x", **TINY)
    # Assert
    assert "pip install espeakng-loader" in str(err.value)
    assert "apt-get install espeak-ng" in str(err.value)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", synth.NOISE_KINDS)
def test_noise_has_requested_length_level_and_is_seeded(kind):
    # Execute
    x = synth.make_noise(kind, 1.5, seed=3)
    y = synth.make_noise(kind, 1.5, seed=3)
    z = synth.make_noise(kind, 1.5, seed=4)
    # Assert
    assert x.shape == (24000,) and x.dtype == np.float32
    assert 20 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2))) == pytest.approx(-30.0, abs=0.1)
    assert np.array_equal(x, y) and not np.array_equal(x, z)


def test_coloured_noise_puts_more_power_in_low_frequencies():
    # Prepare
    def low_share(kind):
        power = np.abs(np.fft.rfft(synth.make_noise(kind, 4.0, seed=0))) ** 2
        freqs = np.fft.rfftfreq(64000, 1 / 16000)
        return power[freqs < 500].sum() / power.sum()

    # Execute
    white, pink, brown = low_share("white_noise"), low_share("pink_noise"), low_share("brown_noise")
    # Assert
    assert white < pink < brown


def test_make_speakers_is_seeded_and_alternates_gender():
    # Execute
    a, b, c = synth.make_speakers(6, seed=0), synth.make_speakers(6, seed=0), synth.make_speakers(6, seed=1)
    # Assert
    assert a == b and a != c
    assert [s.gender for s in a] == ["male", "female"] * 3
    male = {s.voice.split("+")[1] for s in a if s.gender == "male"}
    assert male <= set(synth.MALE_VARIANTS)


@needs_espeak
def test_cli_subcommand_writes_corpus_and_prints_summary(tmp_path, capsys):
    # Prepare
    parser = argparse.ArgumentParser()
    synth_command.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "cli"), "--speakers", "1", "--emotions", "neutral,happy",
                              "--statements", "1", "--repetitions", "1", "--command-repetitions", "1",
                              "--unknown-words", "cat", "--noise-seconds", "1", "--quiet"])
    # Execute
    code = synth_command.run(args)
    # Assert
    assert code == 0
    out = capsys.readouterr().out
    assert "2 emotion clips" in out and "11 command clips" in out
    assert len(list((tmp_path / "cli" / "emotion" / "Actor_01").glob("*.wav"))) == 2
