"""``fedser partition``: speaker-whole device manifests, a held-out test manifest, a summary."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from fedser.tools.cli import main
from fedser.common.partitions import PARTITIONS_FILE, device_manifest, read_partitions
from fedser.tools.commands.partition import partition_corpus
from fedser.common.corpora import Corpus, Utterance, load_corpora, load_corpus
from fedser.common.keys import parse_tiers
from fedser.common.errors import ConfigError


def _corpus(n_speakers: int, per: int = 4) -> Corpus:
    labels = ("yes", "no", "up", "down")
    utts = [Utterance(f"/d/s{s}/{i}.wav", labels[(s + i) % 4], f"s{s}", "kws", "test")
            for s in range(n_speakers) for i in range(per)]
    return Corpus("test", "/d", utts)


def _speakers(path) -> set[str]:
    return {u.speaker for u in load_corpus(path).utterances} if path.stat().st_size else set()


def test_cli_partitions_tiny_corpus_by_speaker(tiny_corpus, tmp_path, capsys):
    # Prepare
    data = [str(tiny_corpus / "commands"), str(tiny_corpus / "emotion")]
    corpus = load_corpora(data)
    out = tmp_path / "parts"
    # Execute
    rc = main(["partition", *sum((["--data", d] for d in data), []), "--clients", "3", "--test", "0.25",
               "--out", str(out)])
    printed = capsys.readouterr().out
    # Assert: N device manifests + test manifest that together hold every utterance once,
    # no speaker in two of them, and a summary table naming each device.
    assert rc == 0
    manifests = [device_manifest(out, i) for i in range(3)]
    assert all(m.is_file() for m in manifests) and (out / "test.csv").is_file()
    groups = [_speakers(m) for m in manifests] + [_speakers(out / "test.csv")]
    assert all(groups[:3]) and groups[3], "every device and the test split hold a speaker"
    assert sum(len(g) for g in groups) == len(set().union(*groups)) == len(corpus.speakers())
    loaded = [u for m in [*manifests, out / "test.csv"] for u in load_corpus(m).utterances]
    assert Counter((u.path, u.label, u.task) for u in loaded) == \
        Counter((u.path, u.label, u.task) for u in corpus.utterances)
    for i in range(3):
        assert f"| device-{i} |" in printed
    assert "test (held out)" in printed
    meta = read_partitions(out)
    assert meta["num-partitions"] == 3
    assert [d["utterances"] for d in meta["devices"]] == [len(load_corpus(m).utterances) for m in manifests]


def test_partition_is_deterministic_and_copies_no_audio(tmp_path):
    corpus = _corpus(10)
    a = partition_corpus(corpus, tmp_path / "a", 4, test=0.2, seed=3)
    b = partition_corpus(corpus, tmp_path / "b", 4, test=0.2, seed=3)
    assert [p.read_text() for p in a.devices] == [p.read_text() for p in b.devices]
    assert a.test.read_text() == b.test.read_text()
    assert {p.suffix for p in (tmp_path / "a").rglob("*") if p.is_file()} == {".csv", ".json"}


def test_summary_counts_labels_per_device(tmp_path):
    result = partition_corpus(_corpus(6, per=4), tmp_path, 3, test=0.0, seed=0)
    rows = result.device_rows()
    assert result.test is None and not (tmp_path / "test.csv").exists()
    assert [r["speakers"] for r in rows] == [2, 2, 2]
    assert all(sum(r["labels"]["kws"].values()) == r["utterances"] == 8 for r in rows)


def test_dirichlet_alpha_skews_labels(tmp_path):
    # Single-label speakers: with a tiny alpha most devices hold few distinct labels.
    labels = ("yes", "no", "up", "down")
    utts = [Utterance(f"/d/s{s}/{i}.wav", labels[s % 4], f"s{s}", "kws", "test") for s in range(40) for i in range(3)]
    skewed = partition_corpus(Corpus("t", "/d", utts), tmp_path / "skew", 8, test=0.0, seed=1, dirichlet_alpha=0.05)
    even = partition_corpus(Corpus("t", "/d", utts), tmp_path / "even", 8, test=0.0, seed=1)
    n_labels = lambda res: sum(len(r["labels"]["kws"]) for r in res.device_rows())  # noqa: E731
    assert n_labels(skewed) < n_labels(even)


def test_too_many_clients_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="only 4 training speakers"):
        partition_corpus(_corpus(5), tmp_path, 5, test=0.2, seed=0)


def test_stale_devices_from_a_larger_partition_are_refused(tmp_path):
    partition_corpus(_corpus(8), tmp_path, 6, test=0.0)
    with pytest.raises(ConfigError, match="device-4"):
        partition_corpus(_corpus(8), tmp_path, 3, test=0.0)
    # Re-partitioning into as many devices (or more) is fine.
    partition_corpus(_corpus(8), tmp_path, 6, test=0.0, seed=1)


def test_read_partitions_reports_missing_manifests(tmp_path):
    partition_corpus(_corpus(6), tmp_path, 3, test=0.0)
    device_manifest(tmp_path, 1).unlink()
    with pytest.raises(ConfigError, match="missing"):
        read_partitions(tmp_path)
    with pytest.raises(ConfigError, match=PARTITIONS_FILE):
        read_partitions(tmp_path / "nowhere")


def test_partitions_json_round_trips(tmp_path):
    result = partition_corpus(_corpus(6), tmp_path, 2, test=0.2, seed=5, sources=["x", "y"])
    meta = json.loads((tmp_path / PARTITIONS_FILE).read_text())
    assert meta["seed"] == 5 and meta["sources"] == ["x", "y"] and meta["num-partitions"] == 2
    assert meta["test-speakers"] == len({u.speaker for u in result.test_utterances}) >= 1


@pytest.mark.parametrize("text,expected", [("1.0", [1.0]), ("1.0,0.5,0.25", [1.0, 0.5, 0.25]), (" 0.5 , 1 ", [0.5, 1.0])])
def test_parse_tiers(text, expected):
    assert parse_tiers(text) == expected


@pytest.mark.parametrize("text", ["", "0.3", "1.0,x", "2"])
def test_parse_tiers_rejects(text):
    with pytest.raises(ConfigError):
        parse_tiers(text)


def test_a_public_share_is_set_apart_without_changing_the_test_speakers(tmp_path):
    corpus = _corpus(20)
    plain = partition_corpus(corpus, tmp_path / "plain", 4, test=0.2, seed=0)
    result = partition_corpus(corpus, tmp_path / "public", 4, test=0.2, seed=0, public=0.2)
    def speakers(utts):
        return {u.speaker for u in utts}

    public, test = speakers(result.public_utterances), speakers(result.test_utterances)
    devices = set().union(*(speakers(p) for p in result.parts))
    assert result.public == tmp_path / "public" / "public.csv" and result.public.stat().st_size > 0
    assert test == speakers(plain.test_utterances)
    assert public and not public & test and not public & devices
    assert len(public | test | devices) == 20
    meta = read_partitions(tmp_path / "public")
    assert meta["public-manifest"] == "public.csv" and meta["public-speakers"] == len(public)
    assert plain.public is None and not (tmp_path / "plain" / "public.csv").exists()


@pytest.mark.parametrize("share", [-0.1, 0.8, 1.0])
def test_a_public_share_that_leaves_no_device_speakers_is_refused(tmp_path, share):
    with pytest.raises(ConfigError, match="--public"):
        partition_corpus(_corpus(20), tmp_path, 4, test=0.2, public=share)
