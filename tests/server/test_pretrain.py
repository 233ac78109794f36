"""Server-side pretraining on public speech (``kws-corpus``, ``public-corpus``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedser.common.errors import ConfigError
from fedser.common.features import FeatureSpec
from fedser.common.models import ModelConfig, build_model
from fedser.common.params import state_to_arrays
from fedser.server.pretrain import PublicCorpus, pretrain

SPEC = FeatureSpec()


def test_a_corpus_with_both_labels_pretrains_the_encoder_and_both_heads(tiny_corpus):
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_features=SPEC.n_features()))
    before = state_to_arrays(model)
    public = [PublicCorpus(str(tiny_corpus / "commands"), ("kws",), "kws-corpus"),
              PublicCorpus(str(tiny_corpus / "emotion"))]

    reports = pretrain(model, public, SPEC, epochs=2)

    after = state_to_arrays(model)
    assert set(reports) == {"emotion", "kws"}
    for part in ("encoder.", "heads.emotion.", "heads.kws."):
        assert any(not np.array_equal(after[k], before[k]) for k in after if k.startswith(part)), part
    assert all(p.requires_grad for p in model.parameters())


def test_a_kws_corpus_without_commands_is_refused_by_its_setting_name(tiny_corpus):
    model = build_model(ModelConfig(n_features=SPEC.n_features()))
    with pytest.raises(ConfigError, match=r"kws-corpus .*emotion.*: no keyword utterances"):
        pretrain(model, [PublicCorpus(str(tiny_corpus / "emotion"), ("kws",), "kws-corpus")], SPEC, epochs=1)


def test_validation_speakers_with_a_single_label_are_not_used_to_stop_training(tiny_corpus, monkeypatch):
    # Prepare: whatever the split, the held-out speakers say only one word.
    import fedser.server.pretrain as pretrain_module

    def one_label_split(utts, val, test, seed):
        word = utts[0].label
        return [u for u in utts if u.label != word], [u for u in utts if u.label == word], []

    monkeypatch.setattr(pretrain_module, "speaker_split", one_label_split)
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_features=SPEC.n_features()))

    # Execute
    reports = pretrain(model, [PublicCorpus(str(tiny_corpus / "commands"), ("kws",), "kws-corpus")], SPEC, epochs=2)

    # Assert: trained on every speaker, without a validation score to report
    assert reports == {"kws": {}}
