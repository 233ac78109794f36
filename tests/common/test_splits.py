"""common.splits: speaker-independent splits and speaker-whole client partitions."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedser.common.corpora import Utterance
from fedser.common.errors import ConfigError
from fedser.common.splits import partition_by_speaker, speaker_split
from fedser.common.taxonomy import EMOTIONS, KEYWORDS


def utterances(spec: list[tuple[str, str, int]]) -> list[Utterance]:
    """(speaker, label, count) triples -> utterances; keyword labels get task kws."""
    out = []
    for speaker, label, count in spec:
        task = "kws" if label in KEYWORDS else "emotion"
        out.extend(Utterance(f"/d/{speaker}/{label}/{i}.wav", label, speaker, task, "test") for i in range(count))
    return out


def single_label_speakers(n_speakers: int, labels=("yes", "no", "up", "down"), per=5) -> list[Utterance]:
    return utterances([(f"s{i:03d}", labels[i % len(labels)], per) for i in range(n_speakers)])


def speakers_of(part) -> set[str]:
    return {u.speaker for u in part}


# Random corpora: speakers with a few utterances each, mixed labels and tasks.
corpus_strategy = st.lists(
    st.tuples(st.integers(0, 29), st.sampled_from(EMOTIONS + KEYWORDS[:4]), st.integers(1, 4)),
    min_size=1, max_size=60,
).map(lambda rows: utterances([(f"spk{s}", label, n) for s, label, n in rows]))


# ----------------------------------------------------------------------------- speaker_split

@settings(max_examples=60, deadline=None)
@given(corpus=corpus_strategy, seed=st.integers(0, 2**16), val=st.sampled_from([0.0, 0.1, 0.25]),
       test=st.sampled_from([0.1, 0.2, 0.4]))
def test_speaker_split_properties(corpus, seed, val, test):
    n_speakers = len(speakers_of(corpus))
    needed = 2 + (val > 0)
    if n_speakers < needed:
        with pytest.raises(ConfigError):
            speaker_split(corpus, val=val, test=test, seed=seed)
        return
    # Execute
    parts = speaker_split(corpus, val=val, test=test, seed=seed)
    again = speaker_split(list(reversed(corpus)), val=val, test=test, seed=seed)
    # Assert: no speaker in two parts, nothing lost or duplicated, required parts non-empty.
    train, val_part, test_part = (speakers_of(p) for p in parts)
    assert not (train & val_part) and not (train & test_part) and not (val_part & test_part)
    assert Counter(u for p in parts for u in p) == Counter(corpus)
    assert train and test_part and (bool(val_part) == (val > 0))
    # Deterministic, and independent of the order the utterances come in.
    assert [speakers_of(p) for p in again] == [train, val_part, test_part]


def test_speaker_split_sizes_track_the_fractions():
    # Prepare: 40 speakers x 10 utterances.
    corpus = single_label_speakers(40, per=10)
    # Execute
    train, val, test = speaker_split(corpus, val=0.1, test=0.2, seed=3)
    # Assert
    assert len(train) == 280 and len(val) == 40 and len(test) == 80


def test_speaker_split_keeps_every_label_in_every_part():
    # Prepare: each speaker says one word only, so balance has to come from the assignment.
    corpus = single_label_speakers(40, per=5)
    # Execute
    parts = speaker_split(corpus, val=0.1, test=0.2, seed=0)
    # Assert
    for part in parts:
        assert {u.label for u in part} == {"yes", "no", "up", "down"}


def test_speaker_split_seed_changes_the_split():
    # Prepare
    corpus = single_label_speakers(30)
    # Execute
    tests = {frozenset(speakers_of(speaker_split(corpus, seed=s)[2])) for s in range(5)}
    # Assert
    assert len(tests) > 1


def test_speaker_split_with_three_speakers_fills_every_part():
    # Prepare
    corpus = utterances([("a", "happy", 50), ("b", "sad", 3), ("c", "angry", 1)])
    # Execute
    parts = speaker_split(corpus, val=0.1, test=0.2)
    # Assert
    assert all(len(speakers_of(p)) == 1 for p in parts)


def test_speaker_split_with_two_speakers_is_a_clear_config_error():
    # Prepare
    corpus = utterances([("a", "happy", 5), ("b", "sad", 5)])
    # Execute
    with pytest.raises(ConfigError) as info:
        speaker_split(corpus)
    # Assert
    assert "at least 3 speakers" in str(info.value) and "got 2" in str(info.value)


@pytest.mark.parametrize("val,test", [(-0.1, 0.2), (0.5, 0.5), (0.1, 1.0), (float("nan"), 0.2)])
def test_speaker_split_rejects_bad_fractions(val, test):
    # Execute / Assert
    with pytest.raises(ConfigError, match="speaker_split"):
        speaker_split(single_label_speakers(10), val=val, test=test)


# ----------------------------------------------------------------------------- partition_by_speaker

@settings(max_examples=60, deadline=None)
@given(corpus=corpus_strategy, seed=st.integers(0, 2**16), n_clients=st.integers(1, 12),
       alpha=st.sampled_from([None, 0.05, 1.0, 100.0]))
def test_partition_properties(corpus, seed, n_clients, alpha):
    n_speakers = len(speakers_of(corpus))
    if n_clients > n_speakers:
        with pytest.raises(ConfigError):
            partition_by_speaker(corpus, n_clients, seed=seed, dirichlet_alpha=alpha)
        return
    # Execute
    clients = partition_by_speaker(corpus, n_clients, seed=seed, dirichlet_alpha=alpha)
    again = partition_by_speaker(list(reversed(corpus)), n_clients, seed=seed, dirichlet_alpha=alpha)
    # Assert: n non-empty clients of whole speakers, nothing lost, deterministic.
    assert len(clients) == n_clients and all(clients)
    owners = Counter(s for c in clients for s in speakers_of(c))
    assert set(owners.values()) == {1}
    assert Counter(u for c in clients for u in c) == Counter(corpus)
    assert [speakers_of(c) for c in again] == [speakers_of(c) for c in clients]


def test_iid_partition_deals_speakers_evenly():
    # Prepare
    corpus = single_label_speakers(23)
    # Execute
    clients = partition_by_speaker(corpus, 5, seed=1)
    # Assert
    assert sorted(len(speakers_of(c)) for c in clients) == [4, 4, 5, 5, 5]


def label_skew(clients) -> float:
    """Mean L1 distance between each client's label distribution and the overall one."""
    labels = sorted({u.label for c in clients for u in c})
    overall = Counter(u.label for c in clients for u in c)
    g = np.array([overall[l] for l in labels], float)
    g /= g.sum()
    distances = []
    for client in clients:
        counts = Counter(u.label for u in client)
        v = np.array([counts[l] for l in labels], float)
        distances.append(np.abs(v / v.sum() - g).sum())
    return float(np.mean(distances))


def test_small_dirichlet_alpha_skews_labels_more_than_large_alpha():
    # Prepare: 120 speakers, one word each, 6 words.
    corpus = single_label_speakers(120, labels=("yes", "no", "up", "down", "left", "right"), per=4)
    # Execute
    skew = {alpha: np.mean([label_skew(partition_by_speaker(corpus, 10, seed=s, dirichlet_alpha=alpha))
                            for s in range(3)]) for alpha in (0.1, 1.0, 100.0)}
    # Assert: the L1 distance can reach 2 * (1 - 1/6) = 1.67 for single-word clients.
    assert skew[0.1] > 0.7             # clients dominated by a few words
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.1           # clients close to the corpus distribution


def test_partition_with_more_clients_than_speakers_is_a_config_error():
    # Execute
    with pytest.raises(ConfigError) as info:
        partition_by_speaker(single_label_speakers(4), 5)
    # Assert
    assert "5 clients" in str(info.value) and "has 4" in str(info.value)


@pytest.mark.parametrize("n_clients,alpha", [(0, None), (2.5, None), (2, 0.0), (2, -1.0)])
def test_partition_rejects_bad_arguments(n_clients, alpha):
    # Execute / Assert
    with pytest.raises(ConfigError, match="partition_by_speaker"):
        partition_by_speaker(single_label_speakers(10), n_clients, dirichlet_alpha=alpha)
