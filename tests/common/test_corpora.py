"""common.taxonomy + common.corpora: every layout in its own naming, manifests, merging, real data."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedser.common import audio, corpora, taxonomy
from fedser.common.corpora import Corpus, Layout, Utterance, load_corpora, load_corpus
from fedser.common.errors import ConfigError, CorpusError

TONE = (0.1 * np.sin(2 * np.pi * 440 * np.arange(800) / 16000)).astype(np.float32)   # 50 ms


def write(path: Path, seconds: float | None = None) -> Path:
    """A tiny valid audio file (format from the extension), ``seconds`` long when given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = TONE if seconds is None else np.zeros(int(seconds * 16000), np.float32)
    sf.write(path, data, 16000)
    return path


# ----------------------------------------------------------------------------- taxonomy

def test_every_corpus_table_maps_onto_the_canonical_taxonomy():
    # Prepare
    tables = [taxonomy.RAVDESS_EMOTIONS, taxonomy.CREMA_D_EMOTIONS, taxonomy.TESS_EMOTIONS,
              taxonomy.EMODB_EMOTIONS, taxonomy.EMOTION_SYNONYMS]
    # Execute
    targets = {v for table in tables for v in table.values()}
    keyword_targets = set(taxonomy.KEYWORD_SYNONYMS.values())
    # Assert
    assert targets <= set(taxonomy.EMOTIONS)
    assert keyword_targets == set(taxonomy.KEYWORDS)
    assert set(taxonomy.RAVDESS_EMOTIONS.values()) == set(taxonomy.EMOTIONS) - {"boredom"}


def test_emotion_and_keyword_synonyms_are_disjoint_so_the_task_can_be_inferred():
    # Assert
    assert not set(taxonomy.EMOTION_SYNONYMS) & set(taxonomy.KEYWORD_SYNONYMS)


@pytest.mark.parametrize("label,task,expected", [
    ("Anger", None, ("emotion", "angry")),
    ("pleasant surprise", None, ("emotion", "surprised")),
    ("YES", None, ("kws", "yes")),
    ("silence", None, ("kws", "_silence_")),
    ("happy", "kws", None),
    ("gibberish", None, None),
])
def test_canonical_maps_synonyms_and_infers_the_task(label, task, expected):
    # Execute / Assert
    assert taxonomy.canonical(label, task) == expected


def test_utterance_rejects_a_label_outside_the_taxonomy():
    # Execute / Assert
    with pytest.raises(ConfigError, match="not a canonical emotion label"):
        Utterance("a.wav", "joy", "s1", "emotion", "manifest")


# ----------------------------------------------------------------------------- registry

def test_registry_holds_every_layout_with_a_detector():
    # Assert
    assert set(corpora.LAYOUTS) >= {"speech_commands", "ravdess", "crema_d", "tess", "emodb", "manifest"}
    assert all(callable(layout.detect) and callable(layout.load) for layout in corpora.LAYOUTS.values())


def test_a_registered_layout_is_detected_and_a_duplicate_name_is_refused(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setattr(corpora, "LAYOUTS", dict(corpora.LAYOUTS))
    write(tmp_path / "spk1__calm.wav")

    def detect(root, files):
        return sum("__" in f.stem for f in files) / max(1, len(files))

    def load(root, files):
        utts = [Utterance(str(f), f.stem.split("__")[1], f.stem.split("__")[0], "emotion", "toy") for f in files]
        return Corpus("toy", str(root), utts, [])

    corpora.register_layout(Layout("toy", "<speaker>__<emotion>.wav", detect, load))
    # Execute
    corpus = load_corpus(tmp_path)
    # Assert
    assert corpus.name == "toy" and corpus.utterances[0].label == "calm"
    with pytest.raises(ConfigError, match="already registered"):
        corpora.register_layout(Layout("toy", "", detect, load))


# ----------------------------------------------------------------------------- Speech Commands

def make_speech_commands(root: Path, silence_folder: bool = False) -> None:
    speakers = ["0a7c2a8d", "0b09edd3", "1c1ff4a1"]
    for word, takes in (("yes", 3), ("no", 2), ("up", 1), ("bed", 2), ("wow", 1)):
        for i in range(takes):
            write(root / word / f"{speakers[i]}_nohash_{i}.wav")
    write(root / "_background_noise_" / "white_noise.wav", seconds=3.0)
    write(root / "_background_noise_" / "pink_noise.wav", seconds=1.5)
    (root / "_background_noise_" / "README.md").write_text("noise")
    (root / "validation_list.txt").write_text("yes/0a7c2a8d_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("no/0a7c2a8d_nohash_0.wav\n")
    write(root / "yes" / "odd_name.wav")        # no _nohash_: skipped
    write(root / "stray.wav")                  # not in a class folder: skipped
    if silence_folder:
        write(root / "_silence_" / "1037.wav")
        write(root / "_silence_" / "1041.wav")


def test_speech_commands_twelve_class_labels_and_speakers(tmp_path):
    # Prepare
    make_speech_commands(tmp_path)
    # Execute
    corpus = load_corpus(tmp_path)
    # Assert
    assert corpus.name == "speech_commands" and corpus.tasks() == {"kws"}
    assert corpus.labels("kws") == ["yes", "no", "up", "_unknown_", "_silence_"]
    words = [u for u in corpus.utterances if u.label != "_silence_"]
    assert Counter(u.label for u in words) == {"yes": 3, "no": 2, "up": 1, "_unknown_": 3}
    assert {u.speaker for u in words} == {"0a7c2a8d", "0b09edd3", "1c1ff4a1"}
    assert sorted(Path(p).name for p, _ in corpus.skipped) == ["odd_name.wav", "stray.wav"]


def test_speech_commands_cuts_silence_from_background_noise_when_no_silence_folder(tmp_path):
    # Prepare
    make_speech_commands(tmp_path)
    # Execute
    corpus = load_corpus(tmp_path)
    again = load_corpus(tmp_path)
    # Assert: as many clips as the average command word (yes 3, no 2, up 1 -> 2), 1 s each, inside the file.
    silence = [u for u in corpus.utterances if u.label == "_silence_"]
    assert len(silence) == 2
    for u in silence:
        assert u.duration == 1.0 and 0.0 <= u.offset <= audio.duration_of(u.path) - 1.0
        assert u.speaker == f"noise-{Path(u.path).stem}"
    assert not any(Path(u.path).parent.name == "_background_noise_" and u.label != "_silence_"
                   for u in corpus.utterances)   # the noise files themselves are not utterances
    assert again.utterances == corpus.utterances
    clip = audio.load(silence[0].path, offset=silence[0].offset, duration=silence[0].duration)
    assert len(clip) == 16000


def test_speech_commands_uses_the_silence_folder_when_present(tmp_path):
    # Prepare
    make_speech_commands(tmp_path, silence_folder=True)
    # Execute
    corpus = load_corpus(tmp_path)
    # Assert
    silence = [u for u in corpus.utterances if u.label == "_silence_"]
    assert sorted(Path(u.path).name for u in silence) == ["1037.wav", "1041.wav"]
    assert all(u.duration is None and u.speaker.startswith("silence-") for u in silence)


def test_speech_commands_test_set_unknown_folder_takes_the_speaker_before_nohash(tmp_path):
    # Prepare
    write(tmp_path / "yes" / "0a7c2a8d_nohash_0.wav")
    write(tmp_path / "_unknown_" / "backward_0c540988_nohash_0.flac")
    # Execute
    corpus = load_corpus(tmp_path)
    # Assert
    unknown = [u for u in corpus.utterances if u.label == "_unknown_"]
    assert [(u.speaker, Path(u.path).suffix) for u in unknown] == [("0c540988", ".flac")]


# ----------------------------------------------------------------------------- emotion corpora

def test_ravdess_in_actor_folders_a_wrapper_and_the_root(tmp_path):
    # Prepare
    write(tmp_path / "Audio_Speech_Actors_01-24" / "Actor_01" / "03-01-05-01-02-01-01.wav")
    write(tmp_path / "Audio_Speech_Actors_01-24" / "Actor_02" / "03-01-08-02-01-01-02.flac")
    write(tmp_path / "03-02-03-01-01-01-03.wav")     # song, straight in the root
    write(tmp_path / "Actor_01" / "01-01-05-01-02-01-01.wav")   # audio-video modality: skipped
    write(tmp_path / "Actor_01" / "03-01-09-01-02-01-01.wav")   # no emotion 09: skipped
    # Execute
    corpus = load_corpus(tmp_path)
    # Assert
    assert corpus.name == "ravdess"
    got = sorted((u.speaker, u.label, u.task) for u in corpus.utterances)
    assert got == [("01", "angry", "emotion"), ("02", "surprised", "emotion"), ("03", "happy", "emotion")]
    reasons = " ".join(r for _, r in corpus.skipped)
    assert "modality 01" in reasons and "emotion code 09" in reasons


def test_crema_d(tmp_path):
    # Prepare
    for name in ("1001_DFA_ANG_XX", "1001_IEO_HAP_HI", "1002_TIE_FEA_LO", "1002_MTI_NEU_XX", "1003_DFA_XYZ_XX"):
        write(tmp_path / "AudioWAV" / f"{name}.wav")
    # Execute
    corpus = load_corpus(tmp_path)
    # Assert
    assert corpus.name == "crema_d"
    assert sorted((u.speaker, u.label) for u in corpus.utterances) == [
        ("1001", "angry"), ("1001", "happy"), ("1002", "fearful"), ("1002", "neutral")]
    assert len(corpus.skipped) == 1 and "XYZ" in corpus.skipped[0][1]


def test_tess(tmp_path):
    # Prepare
    write(tmp_path / "OAF_angry" / "OAF_back_angry.wav")
    write(tmp_path / "OAF_Pleasant_surprise" / "OAF_bath_ps.wav")
    write(tmp_path / "YAF_fear" / "YAF_youth_fear.wav")
    write(tmp_path / "YAF_disgust" / "YAF_chair_disgust.wav")
    # Execute
    corpus = load_corpus(tmp_path)
    # Assert
    assert corpus.name == "tess"
    assert sorted((u.speaker, u.label) for u in corpus.utterances) == [
        ("OAF", "angry"), ("OAF", "surprised"), ("YAF", "disgust"), ("YAF", "fearful")]


def test_emodb_under_wav_with_every_emotion_letter(tmp_path):
    # Prepare
    letters = "WLEAFTN"
    for i, letter in enumerate(letters):
        write(tmp_path / "wav" / f"{3 + i % 2:02d}a0{i}{letter}a.wav")
    write(tmp_path / "wav" / "03a01Xa.wav")   # no emotion X: skipped
    # Execute
    corpus = load_corpus(tmp_path)
    # Assert
    assert corpus.name == "emodb"
    assert corpus.labels("emotion") == ["neutral", "happy", "sad", "angry", "fearful", "disgust", "boredom"]
    assert corpus.speakers() == ["03", "04"]
    assert len(corpus.skipped) == 1


# ----------------------------------------------------------------------------- manifest

def test_manifest_relative_paths_synonyms_and_task_defaults(tmp_path):
    # Prepare
    write(tmp_path / "clips" / "a.wav")
    write(tmp_path / "clips" / "b.flac")
    write(tmp_path / "clips" / "c.ogg")
    other = write(tmp_path / "elsewhere" / "d.wav")
    manifest = tmp_path / "clips" / "list.csv"
    manifest.write_text(
        "path,label,speaker,task\n"
        "a.wav,Anger,alice,\n"
        "b.flac,yes,bob,\n"
        "c.ogg,silence,bob,kws\n"
        f"{other},pleasant surprise,carol,emotion\n"
        "missing.wav,sad,carol,\n"
    )
    # Execute
    corpus = load_corpus(manifest)
    # Assert
    assert corpus.name == "manifest"
    assert [(Path(u.path).name, u.label, u.task, u.speaker) for u in corpus.utterances] == [
        ("a.wav", "angry", "emotion", "alice"), ("b.flac", "yes", "kws", "bob"),
        ("c.ogg", "_silence_", "kws", "bob"), ("d.wav", "surprised", "emotion", "carol")]
    assert corpus.utterances[0].path == str((tmp_path / "clips" / "a.wav").absolute())
    assert len(corpus.skipped) == 1 and "row 6" in corpus.skipped[0][1]


def test_manifest_unknown_labels_are_collected_with_row_numbers(tmp_path):
    # Prepare
    write(tmp_path / "a.wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,speaker\na.wav,joyous,s1\na.wav,happy,s1\na.wav,joyous,s2\na.wav,yes,s3,dance\n"
                        "a.wav,happy,\n")
    # Execute
    with pytest.raises(CorpusError) as info:
        load_corpus(manifest)
    # Assert
    message = str(info.value)
    assert "label 'joyous'" in message and "rows 2, 4" in message
    assert "empty speaker (row 6)" in message
    assert str(manifest) in message


def test_manifest_without_header_is_refused(tmp_path):
    # Prepare
    manifest = tmp_path / "m.csv"
    manifest.write_text("a.wav,happy,s1\n")
    # Execute / Assert
    with pytest.raises(CorpusError, match="header lacks column"):
        load_corpus(manifest)


# ----------------------------------------------------------------------------- folders that are not corpora

def test_empty_folder_is_a_corpus_error(tmp_path):
    # Execute / Assert
    with pytest.raises(CorpusError, match="no audio files"):
        load_corpus(tmp_path)


def test_folder_matching_no_layout_lists_what_was_looked_for(tmp_path):
    # Prepare
    for name in ("hello.wav", "world.wav", "x.flac"):
        write(tmp_path / name)
    # Execute
    with pytest.raises(CorpusError) as info:
        load_corpus(tmp_path)
    # Assert
    message = str(info.value)
    for name in ("speech_commands", "ravdess", "crema_d", "tess", "emodb", "manifest"):
        assert name in message


def test_missing_path_is_a_corpus_error(tmp_path):
    # Execute / Assert
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(tmp_path / "nowhere")


def test_a_single_audio_file_is_not_a_corpus(tmp_path):
    # Prepare
    path = write(tmp_path / "03a01Fa.wav")
    # Execute / Assert
    with pytest.raises(CorpusError, match="is a file"):
        load_corpus(path)


def test_speech_commands_inside_a_wrapper_folder_is_found(tmp_path):
    # Prepare: an unpacked archive folder around the corpus.
    make_speech_commands(tmp_path / "speech_commands_v0.02")
    # Execute
    corpus = load_corpus(tmp_path)
    # Assert
    assert corpus.name == "speech_commands"
    assert corpus.root == str((tmp_path / "speech_commands_v0.02").absolute())


def test_detected_layout_with_no_usable_file_is_a_corpus_error(tmp_path):
    # Prepare
    write(tmp_path / "01-01-05-01-02-01-01.wav")   # RAVDESS name, but audio-video modality
    # Execute / Assert
    with pytest.raises(CorpusError, match="looks like ravdess"):
        load_corpus(tmp_path)


# ----------------------------------------------------------------------------- merging

def test_load_corpora_prefixes_speakers_and_keeps_both_tasks(tmp_path):
    # Prepare
    write(tmp_path / "rav" / "Actor_03" / "03-01-05-01-02-01-03.wav")
    write(tmp_path / "emo" / "wav" / "03a01Wa.wav")
    write(tmp_path / "sc" / "yes" / "03_nohash_0.wav")
    # Execute
    merged = load_corpora([tmp_path / "rav", tmp_path / "emo", tmp_path / "sc", tmp_path / "rav"])
    # Assert
    assert merged.name == "ravdess+emodb+speech_commands"
    assert merged.speakers() == ["emodb:03", "ravdess:03", "speech_commands:03"]
    assert len(merged) == 3   # the RAVDESS folder given twice is counted once
    assert merged.tasks() == {"emotion", "kws"}
    assert len(merged.filter("kws")) == 1 and merged.filter("kws").labels("kws") == ["yes"]
    assert merged.root.split(os.pathsep)[0] == str((tmp_path / "rav").absolute())


# ----------------------------------------------------------------------------- real corpus

@pytest.mark.corpus
def test_real_speech_commands_is_detected_with_twelve_classes(shared_data):
    # Execute
    corpus = load_corpus(shared_data / "speech_commands")
    # Assert
    assert corpus.name == "speech_commands"
    assert corpus.labels("kws") == list(taxonomy.KEYWORDS)
    assert not corpus.skipped
    assert all(Path(u.path).suffix == ".flac" for u in corpus.utterances)
    assert "_background_noise_" not in {Path(u.path).parent.name for u in corpus.utterances}
    real_speakers = [s for s in corpus.speakers() if not s.startswith("silence-")]
    assert 100 <= len(real_speakers) <= 200


@pytest.mark.corpus
def test_real_speech_commands_without_silence_folder_cuts_it_from_noise(shared_data, tmp_path):
    # Prepare: the same corpus minus _silence_, as links (nothing is copied).
    source = shared_data / "speech_commands"
    for folder in source.iterdir():
        if folder.is_dir() and folder.name != "_silence_":
            (tmp_path / folder.name).symlink_to(folder, target_is_directory=True)
    # Execute
    corpus = load_corpus(tmp_path)
    # Assert
    counts = corpus.label_counts("kws")
    words = [counts[w] for w in taxonomy.COMMAND_WORDS]
    assert counts["_silence_"] == round(sum(words) / len(words))
    silence = [u for u in corpus.utterances if u.label == "_silence_"]
    assert {Path(u.path).parent.name for u in silence} == {"_background_noise_"}
    assert len({u.speaker for u in silence}) == 6


@pytest.mark.corpus
def test_real_ravdess_has_16_actors_and_8_emotions(shared_data):
    # Execute
    corpus = load_corpus(shared_data / "ravdess")
    # Assert
    assert corpus.name == "ravdess" and len(corpus) == 960
    assert corpus.labels("emotion") == ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]
    assert corpus.speakers() == [f"{i:02d}" for i in range(1, 17)]


@pytest.mark.corpus
def test_real_emodb_has_10_speakers_and_7_emotions(shared_data):
    # Execute
    corpus = load_corpus(shared_data / "emodb")
    # Assert
    assert corpus.name == "emodb" and len(corpus) == 535
    assert set(corpus.labels("emotion")) == {"angry", "boredom", "disgust", "fearful", "happy", "sad", "neutral"}
    assert corpus.speakers() == ["03", "08", "09", "10", "11", "12", "13", "14", "15", "16"]


@pytest.mark.corpus
def test_real_files_decode_to_16k_mono(shared_data):
    # Prepare
    corpus = load_corpus(shared_data / "emodb")
    # Execute
    wave = audio.load(corpus.utterances[0].path)
    # Assert
    assert wave.dtype == np.float32 and wave.ndim == 1 and len(wave) > 16000 // 2
    assert np.abs(wave).max() > 0.01
