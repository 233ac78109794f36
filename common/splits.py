"""Speaker-independent splits and speaker-whole client partitions.

A speaker never appears in two parts: evaluation is speaker-independent, and in federated
simulation a client is a person (or a few), never a slice of one. Everything is deterministic
for a given seed and independent of the order the utterances come in.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .corpora import Utterance
from .errors import ConfigError


def _groups(utterances: Sequence[Utterance]) -> tuple[list[str], list[tuple[str, str]], np.ndarray]:
    """Speakers (sorted), label keys (sorted) and the (speakers, labels) utterance-count matrix."""
    speakers = sorted({u.speaker for u in utterances})
    keys = sorted({(u.task, u.label) for u in utterances})
    s_index = {s: i for i, s in enumerate(speakers)}
    k_index = {k: i for i, k in enumerate(keys)}
    counts = np.zeros((len(speakers), len(keys)), dtype=np.float64)
    for u in utterances:
        counts[s_index[u.speaker], k_index[(u.task, u.label)]] += 1
    return speakers, keys, counts


def _greedy_assign(
    order: Sequence[int], counts: np.ndarray, targets: np.ndarray, candidates: Sequence[int]
) -> np.ndarray:
    """Assign speakers (rows of ``counts``, in ``order``) to parts so each part's label counts
    approach its row of ``targets`` (L1 distance), every candidate part getting >= 1 speaker.

    Each speaker goes to the candidate whose L1 distance to its target grows least (ties: the
    part with the largest remaining deficit, then the lowest index). When the speakers left are
    just enough to fill the parts still empty, the speaker must go to an empty part.
    """
    current = np.zeros_like(targets)
    owner = np.full(counts.shape[0], -1, dtype=np.int64)
    empty = set(candidates)
    for position, s in enumerate(order):
        remaining = len(order) - position
        pool = sorted(empty) if remaining <= len(empty) else list(candidates)
        best, best_key = -1, None
        for p in pool:
            delta = np.abs(current[p] + counts[s] - targets[p]).sum() - np.abs(current[p] - targets[p]).sum()
            deficit = targets[p].sum() - current[p].sum()
            key = (round(delta, 9), -round(deficit, 9), p)
            if best_key is None or key < best_key:
                best, best_key = p, key
        owner[s] = best
        current[best] += counts[s]
        empty.discard(best)
    return owner


def _pick(
    utterances: Sequence[Utterance], speakers: list[str], owner: np.ndarray, n_parts: int
) -> list[list[Utterance]]:
    part_of = {s: int(owner[i]) for i, s in enumerate(speakers)}
    parts: list[list[Utterance]] = [[] for _ in range(n_parts)]
    for u in utterances:   # input order kept inside each part
        parts[part_of[u.speaker]].append(u)
    return parts


def _seeded_order(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def speaker_split(
    utterances: Sequence[Utterance], val: float = 0.1, test: float = 0.2, seed: int = 0
) -> tuple[list[Utterance], list[Utterance], list[Utterance]]:
    """Split into ``(train, val, test)`` by whole speakers, about ``val``/``test`` of the utterances.

    Speakers are visited in a seeded shuffle and each joins the part whose label counts it
    brings closest to that part's share of every label, so label balance is kept roughly and
    part sizes track the fractions. Every part with a fraction > 0 gets at least one speaker
    (train always does), so three speakers are needed for a three-way split.
    """
    problems = []
    for name, value in (("val", val), ("test", test)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value < 1):
            problems.append(f"{name} must be a fraction in [0, 1), got {value!r}")
    if not problems and val + test >= 1:
        problems.append(f"val + test must be < 1 so that training keeps speakers, got {val + test:g}")
    if problems:
        raise ConfigError("speaker_split: " + "; ".join(problems))
    fractions = (1.0 - val - test, float(val), float(test))
    needed = [i for i, f in enumerate(fractions) if f > 0]
    speakers, _keys, counts = _groups(utterances)
    if len(speakers) < len(needed):
        raise ConfigError(
            f"speaker_split: a split into {len(needed)} non-empty parts needs at least {len(needed)} speakers, "
            f"got {len(speakers)} ({', '.join(speakers) or 'no utterances'}); add speakers or set val=0"
        )
    targets = np.outer(fractions, counts.sum(axis=0))   # (3, labels)
    owner = _greedy_assign(_seeded_order(len(speakers), seed), counts, targets, needed)
    train, val_part, test_part = _pick(utterances, speakers, owner, 3)
    return train, val_part, test_part


def _dirichlet(rng: np.random.Generator, concentration: np.ndarray, prior: np.ndarray) -> np.ndarray:
    draw = rng.gamma(concentration)
    if not draw.sum() > 0:   # every gamma underflowed (tiny alpha): the limit is a one-hot draw
        draw = np.zeros_like(prior)
        draw[rng.choice(len(prior), p=prior)] = 1.0
    return draw / draw.sum()


def partition_by_speaker(
    utterances: Sequence[Utterance], n_clients: int, seed: int = 0, dirichlet_alpha: float | None = None
) -> list[list[Utterance]]:
    """Partition into ``n_clients`` lists, each holding one or more whole speakers.

    ``dirichlet_alpha=None``: speakers are dealt round-robin in a seeded shuffle (client sizes
    differ only as speakers do).

    ``dirichlet_alpha=a``: label skew. Each client k draws a label distribution
    ``q_k ~ Dir(a * L * p)`` (``p`` the corpus's label distribution over its ``L`` labels;
    this is the symmetric ``Dir(a)`` when labels are balanced, centred on ``p`` otherwise, as in
    Hsu et al. 2019) and a target of ``q_k * N / n_clients`` utterances per label. Speakers are
    then placed whole, largest first (ties in seeded order), each on the client whose L1
    distance to its target grows least, every client getting at least one speaker; a few passes
    of single-speaker moves then lower the total L1 distance further. Small ``a`` gives clients
    dominated by few labels, large ``a`` approaches the corpus distribution. Speakers who carry
    every label (acted emotion corpora) limit how much skew is reachable.
    """
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ConfigError(f"partition_by_speaker: n_clients must be an integer >= 1, got {n_clients!r}")
    if dirichlet_alpha is not None and not (math.isfinite(dirichlet_alpha) and dirichlet_alpha > 0):
        raise ConfigError(f"partition_by_speaker: dirichlet_alpha must be > 0 or None, got {dirichlet_alpha!r}")
    speakers, _keys, counts = _groups(utterances)
    if n_clients > len(speakers):
        raise ConfigError(
            f"partition_by_speaker: {n_clients} clients need at least {n_clients} speakers (whole speakers "
            f"per client), the data has {len(speakers)}; lower n_clients or add speakers"
        )
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(speakers))
    if dirichlet_alpha is None:
        owner = np.empty(len(speakers), dtype=np.int64)
        owner[shuffled] = np.arange(len(speakers)) % n_clients
        return _pick(utterances, speakers, owner, n_clients)

    totals = counts.sum(axis=0)
    prior = totals / totals.sum()
    concentration = dirichlet_alpha * len(prior) * prior
    q = np.stack([_dirichlet(rng, concentration, prior) for _ in range(n_clients)])   # (clients, labels)
    targets = q * (totals.sum() / n_clients)
    sizes = counts.sum(axis=1)
    rank = np.empty(len(speakers), dtype=np.int64)
    rank[shuffled] = np.arange(len(speakers))
    order = sorted(range(len(speakers)), key=lambda s: (-sizes[s], rank[s]))
    owner = _greedy_assign(order, counts, targets, list(range(n_clients)))
    _refine(owner, counts, targets, order)
    return _pick(utterances, speakers, owner, n_clients)


def _refine(owner: np.ndarray, counts: np.ndarray, targets: np.ndarray, order: Sequence[int], passes: int = 3) -> None:
    """Move single speakers between clients while that lowers the total L1 distance to the
    targets; a client never loses its last speaker. Updates ``owner`` in place."""
    n_clients = targets.shape[0]
    current = np.zeros_like(targets)
    np.add.at(current, owner, counts)
    members = np.bincount(owner, minlength=n_clients)
    for _ in range(passes):
        moved = False
        for s in order:
            src = owner[s]
            if members[src] == 1:
                continue
            gain_src = np.abs(current[src] - targets[src]).sum() - np.abs(current[src] - counts[s] - targets[src]).sum()
            after = np.abs(current + counts[s] - targets).sum(axis=1) - np.abs(current - targets).sum(axis=1)
            after[src] = np.inf
            dst = int(np.argmin(after))
            if after[dst] - gain_src < -1e-9:
                owner[s] = dst
                current[src] -= counts[s]
                current[dst] += counts[s]
                members[src] -= 1
                members[dst] += 1
                moved = True
        if not moved:
            break
