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


def test_the_servers_features_come_from_its_cache_in_later_runs(tiny_corpus, tmp_path, monkeypatch):
    # Prepare: a first run fills the server's feature cache (run setting feature-cache)
    from fedser.server.app import FederatedRun
    from fedser.server.settings import RunSettings

    settings = RunSettings.from_run_config({"run-dir": str(tmp_path / "run"), "feature-cache": str(tmp_path / "cache"),
                                           "eval-data": str(tiny_corpus / "emotion")})
    first = FederatedRun(settings)
    torch.manual_seed(0)
    pretrain(build_model(first.model_config), [PublicCorpus(str(tiny_corpus / "commands"), ("kws",), "kws-corpus")],
             first.spec, epochs=1, cache=first.cache)

    def no_front_end(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr("fedser.common.data.FrontEnd", no_front_end)

    # Execute: the next run over the same corpora
    again = FederatedRun(settings)
    pretrain(build_model(again.model_config), [PublicCorpus(str(tiny_corpus / "commands"), ("kws",), "kws-corpus")],
             again.spec, epochs=1, cache=again.cache)

    # Assert: the evaluation corpus is the same, read from the cache
    assert set(again.evaluator.data) == {"emotion"}
    torch.testing.assert_close(again.evaluator.data["emotion"].feats, first.evaluator.data["emotion"].feats)
