"""Tests of fedser.common.models: config round trips, shapes, DP-readiness, parameter budget."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from opacus import GradSampleModule, PrivacyEngine
from opacus.layers import DPGRU
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from fedser.common import models
from fedser.common.errors import ConfigError
from fedser.common.models import (
    ENCODERS,
    ModelConfig,
    build_model,
    count_parameters,
    head_of,
    register_encoder,
    stats_pool,
)

N_FEATURES = ModelConfig().n_features  # rows of the default features

WIDTHS = (1.0, 0.5, 0.25)
ALL = [(enc, w) for enc in sorted(ENCODERS) for w in WIDTHS]


FROM_SCRATCH = ("cnn", "crnn")
# Feature rows each encoder is built for: log-mel for the from-scratch CNNs, one waveform row for m5.
NATURAL_ROWS = {"cnn": 40, "crnn": 40, "m5": 1}


def _model(encoder: str, width: float = 1.0, seed: int = 0, **kw) -> models.MultiTaskNet:
    torch.manual_seed(seed)
    return build_model(ModelConfig(encoder=encoder, width=width, **kw))


# --------------------------------------------------------------------------- config


valid_configs = st.builds(
    ModelConfig,
    encoder=st.sampled_from(sorted(ENCODERS)),
    n_features=st.integers(1, 128),
    width=st.sampled_from(WIDTHS) | st.floats(0.01, 1.0),
    n_emotions=st.integers(2, 20),
    n_keywords=st.integers(2, 40),
    dropout=st.floats(0.0, 0.9),
    group_size=st.sampled_from((1, 2, 4, 8)),
    cmn=st.booleans(),
)


@given(valid_configs)
def test_config_dict_round_trip(cfg):
    # Execute
    back = ModelConfig.from_dict(cfg.to_dict())
    # Assert
    assert back == cfg


def test_config_from_dict_fills_defaults_and_accepts_int_width():
    cfg = ModelConfig.from_dict({"encoder": "crnn", "width": 1})
    assert cfg == ModelConfig(encoder="crnn")
    assert isinstance(cfg.width, float)


def test_config_from_dict_names_every_bad_field():
    # Prepare
    bad = {"encoder": "transformer", "n_features": 0, "width": 1.5, "n_emotions": True, "dropout": 1.0, "colour": "red"}
    # Execute
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(bad)
    # Assert
    message = str(info.value)
    for field in ("encoder", "n_features", "width", "n_emotions", "dropout", "colour"):
        assert field in message
    assert "n_keywords:" not in message


def test_config_rejects_min_units_off_the_group_grid():
    with pytest.raises(ConfigError, match="min_units"):
        ModelConfig(group_size=4, min_units=6)


def test_scaled_changes_only_width():
    cfg = ModelConfig(encoder="crnn", n_features=72, n_emotions=7)
    half = cfg.scaled(0.5)
    assert half.width == 0.5
    assert {**half.to_dict(), "width": 1.0} == cfg.to_dict()
    assert half.scaled(1.0) == cfg


@given(n=st.integers(1, 512), w1=st.floats(0.01, 1.0), w2=st.floats(0.01, 1.0), gs=st.sampled_from((1, 2, 4, 8)))
def test_units_are_monotone_and_on_the_group_grid(n, w1, w2, gs):
    # Prepare
    small, big = sorted((w1, w2))
    cfg = ModelConfig(group_size=gs, min_units=2 * gs)
    # Execute
    k_small, k_big = cfg.scaled(small).units(n), cfg.scaled(big).units(n)
    # Assert
    assert k_small <= k_big
    assert k_small % gs == 0 and k_small >= 2 * gs


def test_units_hand_examples():
    cfg = ModelConfig()  # group size 4, at least 8
    assert [cfg.units(n) for n in (16, 24, 96)] == [16, 24, 96]
    assert [cfg.scaled(0.5).units(n) for n in (16, 24, 96)] == [8, 12, 48]
    assert [cfg.scaled(0.25).units(n) for n in (16, 24, 48, 96)] == [8, 8, 12, 24]


def test_register_encoder_refuses_a_taken_name():
    with pytest.raises(ConfigError, match="cnn"):
        register_encoder("cnn")(models.TCResNet)


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_default_encoders_stay_under_100k_parameters(encoder):
    assert count_parameters(_model(encoder, n_features=NATURAL_ROWS.get(encoder, 184))) < 100_000


def test_parameter_table_in_docstring_matches_the_models():
    # Prepare: rows like "``cnn``    66,629     17,821     6,357"
    rows = re.findall(r"``(\w+)``\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)", models.__doc__)
    documented = {enc: [int(c.replace(",", "")) for c in counts] for enc, *counts in rows}
    # Execute
    measured = {enc: [count_parameters(_model(enc, w, n_features=NATURAL_ROWS.get(enc, 184)))
                      for w in WIDTHS] for enc in ENCODERS}
    # Assert
    assert documented == measured


def test_count_parameters_parts_add_up():
    m = _model("crnn")
    total = count_parameters(m)
    assert count_parameters(m, "encoder") + count_parameters(m, "heads") == total
    assert count_parameters(m, "emotion") == m.embed_dim * 9 + 9
    assert count_parameters(m, "kws") == m.embed_dim * 12 + 12
    with pytest.raises(ConfigError, match="part"):
        count_parameters(m, "decoder")


def test_head_of_names():
    assert head_of("heads.emotion.weight") == "emotion"
    assert head_of("heads.kws.bias") == "kws"
    assert head_of("_module.heads.kws.weight") == "kws"
    assert head_of("encoder.gru.weight_ih_l0") is None
    assert head_of("encoder.heads.kws") is None
    assert head_of("heads.other.weight") is None


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_every_parameter_is_encoder_or_one_head(encoder):
    names = [n for n, _ in _model(encoder).named_parameters()]
    heads = {n: head_of(n) for n in names}
    assert {n for n, h in heads.items() if h == "emotion"} == {"heads.emotion.weight", "heads.emotion.bias"}
    assert {n for n, h in heads.items() if h == "kws"} == {"heads.kws.weight", "heads.kws.bias"}
    assert all(n.startswith("encoder.") for n, h in heads.items() if h is None)


def test_crnn_uses_dpgru_and_no_batchnorm():
    m = _model("crnn")
    kinds = {type(mod) for mod in m.modules()}
    assert DPGRU in kinds
    assert torch.nn.GRU not in kinds
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in m.modules())


@pytest.mark.parametrize("encoder,width", ALL)
def test_group_norms_have_fixed_group_size(encoder, width):
    modules = list(_model(encoder, width).modules())
    norms = [mod for mod in modules if isinstance(mod, torch.nn.GroupNorm)]
    assert norms or encoder == "gru"  # the recurrent head has no normalisation layer
    assert all(n.num_channels == 4 * n.num_groups for n in norms)
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in modules)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize(
    "encoder,width,frames",
    [(e, w, 101) for e, w in ALL] + [(e, 1.0, t) for e in sorted(ENCODERS) for t in (1, 7, 301, 1000)],
)
def test_forward_shapes_for_each_task_and_length(encoder, width, frames):
    # Prepare
    m = _model(encoder, width).eval()
    x = torch.randn(3 if frames <= 301 else 1, N_FEATURES, frames)
    # Execute
    with torch.no_grad():
        emotion, kws, emb = m(x, "emotion"), m(x, "kws"), m.embed(x)
    # Assert
    assert emotion.shape == (len(x), 9) and kws.shape == (len(x), 12)
    assert emb.shape == (len(x), m.embed_dim)
    assert torch.isfinite(emotion).all() and torch.isfinite(kws).all()


def test_forward_rejects_wrong_feature_count_and_unknown_task():
    m = _model("cnn")
    with pytest.raises(ValueError, match=str(N_FEATURES)):
        m(torch.randn(2, 39, 101), "kws")
    with pytest.raises(ValueError):
        m(torch.randn(N_FEATURES, 101), "kws")
    with pytest.raises(ConfigError, match="task"):
        m(torch.randn(2, N_FEATURES, 101), "speaker")


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_batch_items_are_independent(encoder):
    # GroupNorm and pooling must not mix samples (per-sample gradients rely on it).
    m = _model(encoder).eval()
    x = torch.randn(4, N_FEATURES, 101)
    with torch.no_grad():
        together = m(x, "kws")
        alone = torch.cat([m(x[i : i + 1], "kws") for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_mean_removal_ignores_a_constant_offset_per_feature(encoder):
    m = _model(encoder, cmn=True).eval()
    x = torch.randn(2, N_FEATURES, 101)
    offset = torch.randn(1, N_FEATURES, 1) * 5
    with torch.no_grad():
        torch.testing.assert_close(m(x + offset, "emotion"), m(x, "emotion"), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("encoder,task", [(e, t) for e in sorted(ENCODERS) for t in ("emotion", "kws")])
def test_forward_leaves_the_other_head_out_of_autograd(encoder, task):
    # Prepare
    m = _model(encoder)
    other = "kws" if task == "emotion" else "emotion"
    # Execute
    m(torch.randn(2, N_FEATURES, 101), task).sum().backward()
    # Assert
    assert all(p.grad is None for p in m.heads[other].parameters())
    assert all(p.grad is not None for p in m.heads[task].parameters())
    assert all(p.grad is not None for p in m.encoder.parameters())


def test_stream_step_carries_the_gru_state():
    # Prepare
    m = _model("crnn").eval()
    x = torch.randn(2, N_FEATURES, 101)
    with torch.no_grad():
        # Execute
        whole = m(x, "kws")
        first, h = m.stream_step(x, "kws")
        second, h2 = m.stream_step(x, "kws", h)
    # Assert: one chunk from a zero state is the plain forward; the state changes the next chunk
    torch.testing.assert_close(first, whole)
    assert h.shape == (1, 2, m.encoder.hidden_size) and h2.shape == h.shape
    assert not torch.allclose(second, first)


def test_stream_step_needs_a_recurrent_encoder():
    with pytest.raises(ConfigError, match="crnn"):
        _model("cnn").stream_step(torch.randn(1, N_FEATURES, 101), "kws")


# --------------------------------------------------------------------------- Opacus


@pytest.mark.parametrize("encoder,width", ALL)
def test_every_model_passes_the_opacus_validator(encoder, width):
    m = _model(encoder, width)
    assert ModuleValidator.validate(m, strict=True) == []


@pytest.mark.parametrize("encoder,task", [(e, t) for e in sorted(ENCODERS) for t in ("emotion", "kws")])
def test_dp_sgd_step_with_the_other_head_frozen(encoder, task):
    # Prepare
    torch.manual_seed(0)
    m = _model(encoder)
    other = "kws" if task == "emotion" else "emotion"
    m.heads[other].requires_grad_(False)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    n_classes = m.cfg.n_classes(task)
    data = TensorDataset(torch.randn(8, N_FEATURES, 101), torch.randint(0, n_classes, (8,)))
    optimizer = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # secure-RNG and backward-hook notices
        engine = PrivacyEngine(accountant="rdp")
        private, optimizer, loader = engine.make_private(
            module=m,
            optimizer=optimizer,
            data_loader=DataLoader(data, batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode="hooks",
        )
        # Execute
        x, y = next(iter(loader))
        optimizer.zero_grad()
        F.cross_entropy(private(x, task), y).backward()
        optimizer.step()
    # Assert
    changed = {n for n, p in m.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {n for n in before if head_of(n) in (None, task)}
    assert engine.get_epsilon(1e-5) > 0


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_opacus_per_sample_gradients_match_a_per_sample_loop(encoder, mode):
    # Prepare: the slow oracle is one backward pass per sample.
    rows = NATURAL_ROWS.get(encoder, N_FEATURES)
    m = _model(encoder, dropout=0.0, n_features=rows)
    m.heads["emotion"].requires_grad_(False)
    x, y = torch.randn(3, rows, 1600 if encoder == "m5" else 61), torch.randint(0, 12, (3,))
    expected = []
    for i in range(3):
        m.zero_grad()
        F.cross_entropy(m(x[i : i + 1], "kws"), y[i : i + 1], reduction="sum").backward()
        expected.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    m.zero_grad()
    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        gsm = GradSampleModule(m, loss_reduction="sum", force_functorch=mode == "functorch")
        F.cross_entropy(gsm(x, "kws"), y, reduction="sum").backward()
    # Assert
    for n, p in m.named_parameters():
        if not p.requires_grad:
            assert getattr(p, "grad_sample", None) is None
            continue
        oracle = torch.stack([e[n] for e in expected])
        torch.testing.assert_close(p.grad_sample, oracle, rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_state_holds_every_tensor_once(encoder):
    # DPGRU registers each weight under two names; the model's state keeps one.
    state = _model(encoder).state_dict()
    assert len({v.data_ptr() for v in state.values()}) == len(state)
    assert sum(v.numel() for v in state.values()) == count_parameters(_model(encoder))


def test_crnn_state_uses_nn_gru_names_and_loads_inside_opacus_wrapper():
    # Prepare
    m = _model("crnn")
    gru_keys = [k for k in m.state_dict() if ".gru." in k]
    values = {k: torch.randn_like(v) for k, v in m.state_dict().items()}
    wrapped = GradSampleModule(m)
    # Execute
    wrapped.load_state_dict({f"_module.{k}": v for k, v in values.items()})
    # Assert
    assert gru_keys == [f"encoder.gru.{n}_l0" for n in ("weight_ih", "bias_ih", "weight_hh", "bias_hh")]
    assert torch.equal(m.encoder.gru.l0.hh.weight, values["encoder.gru.weight_hh_l0"])
    assert list(wrapped.state_dict()) == [f"_module.{k}" for k in values]


def test_stats_pool_is_mean_and_population_std_with_exact_gradients():
    # Prepare
    h = torch.randn(3, 5, 9, dtype=torch.float64, requires_grad=True)

    # Execute
    pooled = stats_pool(h)

    # Assert
    expected = torch.cat([h.mean(dim=-1), (h.var(dim=-1, unbiased=False) + 1e-5).sqrt()], dim=1)
    assert pooled.shape == (3, 10)
    assert torch.allclose(pooled, expected)
    assert torch.autograd.gradcheck(stats_pool, (h,))
