"""Server-side pretraining on public speech it is given (``kws-corpus``, ``public-corpus``).

Public data, so no DP is needed here. The encoder and the heads the public corpora have labels
for are trained centrally, with the same augmentation as ``fedser train``; devices then
fine-tune them federatedly (with ``train-scope=heads`` only the heads, under DP-SGD, on this
encoder).

With labels for both tasks, each task trains the encoder and its head in turn; every head but
the last is then refitted on the final encoder (encoder fixed), so no head is left reading
features the encoder no longer produces.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from fedser.common.augment import Augmenter
from fedser.common.cache import FeatureCache
from fedser.common.corpora import Utterance, load_corpus
from fedser.common.data import build_task_data
from fedser.common.errors import ConfigError
from fedser.common.features import FeatureSpec
from fedser.common.keys import TASKS
from fedser.common.models import MultiTaskNet
from fedser.common.splits import speaker_split
from fedser.common.training import TrainConfig, evaluate_task, train_task

log = logging.getLogger("fedser.server")

PATIENCE = 15   # epochs without validation improvement before a pretraining task stops (as `fedser train`)


@dataclass(frozen=True)
class PublicCorpus:
    path: str
    tasks: tuple[str, ...] = TASKS   # which of its labels the server may train on
    setting: str = "public-corpus"   # the run setting it came from (named in errors)


def public_utterances(corpora: list[PublicCorpus]) -> dict[str, list[Utterance]]:
    """Task -> utterances over every corpus (only the tasks each one is given for)."""
    by_task: dict[str, list[Utterance]] = {}
    for c in corpora:
        corpus = load_corpus(c.path)
        found = [u for u in corpus.utterances if u.task in c.tasks]
        if not found:
            wanted = " or ".join("keyword" if t == "kws" else "emotion" for t in c.tasks)
            raise ConfigError(f"{c.setting} {c.path}: no {wanted} utterances (detected {corpus.name})")
        for u in found:
            by_task.setdefault(u.task, []).append(u)
    return by_task


def pretrain(model: MultiTaskNet, corpora: list[PublicCorpus], spec: FeatureSpec, epochs: int,
             seed: int = 0, cache: FeatureCache | None = None) -> dict[str, dict]:
    """Train ``model``'s encoder and heads in place on public corpora; returns task -> validation report."""
    by_task = public_utterances(corpora)
    tasks = [t for t in TASKS if t in by_task]
    data = {}
    for task in tasks:
        utts = by_task[task]
        train_u, val_u = utts, []
        if len({u.speaker for u in utts}) >= 3:
            train_u, val_u, _ = speaker_split(utts, val=0.15, test=0.0, seed=seed)
            if len({u.label for u in val_u}) < 2:
                # A validation speaker with one label (a slice of background noise, say) would stop
                # training on a meaningless score: train on everyone, all epochs, instead.
                train_u, val_u = utts, []
        data[task] = (build_task_data(train_u, spec, task, cache, keep_waves=True, progress=False),
                      build_task_data(val_u, spec, task, cache, progress=False) if val_u else None)
    cfg = TrainConfig(epochs=epochs, patience=PATIENCE, seed=seed)
    for task in tasks:
        train, val = data[task]
        train_task(model, task, train, val, cfg, spec, Augmenter(spec, seed=seed), progress=False)
    refit = TrainConfig(epochs=epochs, patience=PATIENCE, seed=seed, scope="heads")
    for task in tasks[:-1]:
        train, val = data[task]
        train_task(model, task, train, val, refit, spec, Augmenter(spec, seed=seed), progress=False)
    reports = {}
    for task in tasks:
        train, val = data[task]
        reports[task] = evaluate_task(model, val) if val is not None and len(val) else {}
        log.info("pretrained %s on %s public clips: validation accuracy %s, UAR %s", task, len(train),
                 reports[task].get("accuracy"), reports[task].get("uar"))
    return reports
