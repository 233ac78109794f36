"""Server-side KWS head pretraining on a public command corpus it is given.

Public data, so no DP is needed here: the encoder and the KWS head are trained
centrally, then fine-tuned federatedly by devices that have command labels.
"""
from __future__ import annotations

import logging

from fedser.common.corpora import load_corpus
from fedser.common.data import build_task_data
from fedser.common.errors import ConfigError
from fedser.common.features import FeatureSpec
from fedser.common.models import MultiTaskNet
from fedser.common.splits import speaker_split
from fedser.common.training import TrainConfig, evaluate_task, train_task

log = logging.getLogger("fedser.server")


def pretrain_kws_head(model: MultiTaskNet, corpus_path: str, spec: FeatureSpec, epochs: int = 5,
                      seed: int = 0) -> dict:
    """Train ``model``'s encoder + KWS head in place; returns validation metrics."""
    corpus = load_corpus(corpus_path)
    utts = [u for u in corpus.utterances if u.task == "kws"]
    if not utts:
        raise ConfigError(f"--kws-corpus {corpus_path}: no keyword utterances (detected {corpus.name})")
    train_u, val_u, _ = speaker_split(utts, val=0.15, test=0.0, seed=seed) if len({u.speaker for u in utts}) >= 3 \
        else (utts, [], [])
    train = build_task_data(train_u, spec, "kws", progress=False)
    val = build_task_data(val_u, spec, "kws", progress=False) if val_u else None
    result = train_task(model, "kws", train, val, TrainConfig(epochs=epochs, seed=seed), spec, progress=False)
    report = evaluate_task(model, val) if val is not None and len(val) else {}
    log.info("KWS head pretrained on %s (%s clips, %s epochs): val accuracy %s", corpus_path, len(train),
             len(result.history), report.get("accuracy"))
    return report
