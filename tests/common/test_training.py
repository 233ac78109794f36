import numpy as np
import pytest
import torch

from fedser.common.data import TaskData
from fedser.common.errors import ConfigError
from fedser.common.features import FeatureSpec
from fedser.common.models import ModelConfig, build_model, encoder_params_in_scope
from fedser.common.privacy import SpendRecord, epsilon_of
from fedser.common.training import TrainConfig, class_weights, evaluate_task, predict, train_task

N_FEATURES = ModelConfig().n_features  # rows of the default features

SPEC = FeatureSpec()


def separable(n=96, classes=(0, 1, 2), seed=0, task="kws") -> TaskData:
    """Class k has a modulation in feature rows 10k..10k+5: easy, but only if the model learns.

    (A constant offset would not do: the model removes each feature row's mean per utterance.)
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([classes[i % len(classes)] for i in range(n)])
    x = torch.randn(n, N_FEATURES, 101, generator=g)
    wave = 2.0 * torch.sin(torch.arange(101) * 0.5)
    for i, c in enumerate(y.tolist()):
        x[i, 10 * (c % 4): 10 * (c % 4) + 5] += wave
    return TaskData(task, x, y, [f"s{i % 8}" for i in range(n)])


def test_learns_a_separable_task_and_keeps_the_other_head_untouched():
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("heads.emotion.")}
    result = train_task(model, "kws", separable(), separable(seed=1), TrainConfig(epochs=8, batch_size=32),
                        SPEC, progress=False)
    report = evaluate_task(model, separable(seed=2))
    assert report["accuracy"] > 0.9
    assert result.best_epoch >= 1 and len(result.history) >= 1
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v)
    assert all(p.requires_grad for p in model.parameters())  # restored after training


@pytest.mark.parametrize("scope", ["heads", "norms"])
@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_only_the_head_and_the_scopes_encoder_weights_move(dp, scope):
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    in_scope = encoder_params_in_scope(model, scope)
    cfg = TrainConfig(epochs=6, batch_size=32, lr=1e-2, scope=scope, dp=dp, noise_multiplier=0.5 if dp else None)
    result = train_task(model, "kws", separable(), None, cfg, SPEC, progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith("heads.kws.")} | in_scope
    assert all(p.requires_grad for p in model.parameters())
    assert (result.steps > 0) and (len(result.spend) == (6 if dp else 0))


def test_train_scopes_name_the_encoder_weights_a_device_trains():
    model = build_model(ModelConfig())
    encoder = {n for n, _ in model.named_parameters() if n.startswith("encoder.")}
    norms = encoder_params_in_scope(model, "norms")
    assert encoder_params_in_scope(model, "all") == encoder
    assert encoder_params_in_scope(model, "heads") == set()
    assert norms and norms < encoder
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n.rsplit(".", 1)[0]], torch.nn.GroupNorm) for n in norms)
    with pytest.raises(ConfigError, match="train scope 'encoder'"):
        encoder_params_in_scope(model, "encoder")


def test_dp_training_reports_the_accountants_epsilon_over_prior_spend():
    torch.manual_seed(0)
    data = separable(n=64)
    cfg = TrainConfig(epochs=2, batch_size=16, dp=True, noise_multiplier=1.0, max_grad_norm=1.0)
    fresh = train_task(build_model(ModelConfig()), "kws", data, None, cfg, SPEC, progress=False)
    assert fresh.steps == sum(r.steps for r in fresh.spend) == 2 * 4
    assert fresh.epsilon == pytest.approx(epsilon_of(fresh.spend, 1e-5), rel=1e-6)
    prior = [SpendRecord(1.0, 0.25, 40)]
    later = train_task(build_model(ModelConfig()), "kws", data, None, cfg, SPEC, prior_history=prior, progress=False)
    assert later.epsilon == pytest.approx(epsilon_of(prior + later.spend, 1e-5), rel=1e-6)
    assert later.epsilon > fresh.epsilon


class CountingAugmenter:
    def __init__(self):
        self.calls = 0

    def features(self, x):
        self.calls += 1
        return x


@pytest.mark.parametrize("dp,regularize,expected", [
    (False, None, True), (True, None, False), (True, True, True), (False, False, False)],
    ids=["plain", "dp-sgd", "dp-sgd-forced-on", "plain-forced-off"])
def test_dropout_and_augmentation_are_off_under_dp_unless_asked_for(dp, regularize, expected):
    torch.manual_seed(0)
    model = build_model(ModelConfig(dropout=0.5))
    modes = []
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(lambda m, inputs, out: modes.append(m.training))
    augmenter = CountingAugmenter()
    cfg = TrainConfig(epochs=1, batch_size=16, dp=dp, noise_multiplier=1.0 if dp else None, regularize=regularize)
    train_task(model, "kws", separable(n=32), None, cfg, SPEC, augmenter, progress=False)
    assert modes and set(modes) == {expected}
    assert (augmenter.calls > 0) == expected


def test_dp_with_target_epsilon_stays_within_it():
    cfg = TrainConfig(epochs=2, batch_size=16, dp=True, target_epsilon=4.0, delta=1e-5)
    r = train_task(build_model(ModelConfig()), "kws", separable(n=64), None, cfg, SPEC, progress=False)
    assert 0 < r.epsilon <= 4.0 * 1.02


def test_predict_respects_allowed_classes():
    model = build_model(ModelConfig())
    pred, prob = predict(model, "kws", torch.randn(20, N_FEATURES, 101), allowed=[3, 7])
    assert set(pred.tolist()) <= {3, 7}
    assert np.all((prob > 0) & (prob <= 1))


def test_class_weights_are_inverse_frequency_over_present_classes():
    w = class_weights(torch.tensor([0, 0, 0, 1]), 3)
    assert w[2] == 0
    assert w[1] == pytest.approx(3 * w[0])
    assert float(3 * w[0] + 1 * w[1]) == pytest.approx(4.0)  # total weight = number of examples


@pytest.mark.parametrize("kwargs,match", [
    ({"epochs": 0}, "epochs"), ({"lr": -1}, "lr"), ({"dp": True}, "noise_multiplier or target_epsilon"),
    ({"dp": True, "target_epsilon": 1, "delta": 2}, "delta"), ({"optimizer": "rmsprop"}, "optimizer"),
])
def test_bad_training_settings_are_named(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs).validate()


def test_empty_training_data_is_a_clear_error():
    empty = TaskData("kws", torch.zeros(0, N_FEATURES, 101), torch.zeros(0, dtype=torch.long), [])
    with pytest.raises(ConfigError, match="no kws training examples"):
        train_task(build_model(ModelConfig()), "kws", empty, None, TrainConfig(epochs=1), SPEC, progress=False)


def _clipped_gradient(model, mode: str, x, y) -> dict[str, torch.Tensor]:
    """The clipped, averaged gradient Opacus' optimizer hands to the update, noise off."""
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("heads.emotion"))
    import fedser.common.dp_norms  # noqa: F401  (the Conv1d norm sampler ghost clipping needs)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    criterion = torch.nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        private = engine.make_private(
            module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(x, y), batch_size=len(x)),
            criterion=criterion, noise_multiplier=0.0, max_grad_norm=0.05, poisson_sampling=False,
            grad_sample_mode=mode)
        net, optimizer = private[:2]
        if mode == "ghost":
            criterion = private[2]
        optimizer.zero_grad()
        criterion(net(x, "kws"), y).backward()
        optimizer.pre_step()  # per-sample clipping and aggregation, without the (zero) noise step
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    if hasattr(net, "_close"):
        net._close()
    return grads


def _assert_same_clipped_gradients_as_hooks(encoder: str, mode: str | None) -> None:
    """``mode`` (None: what "auto" resolves to for ``encoder``) clips as Opacus' hooks do."""
    from fedser.common.training import resolve_grad_sample_mode

    cfg = ModelConfig(encoder=encoder, n_features=8, width=0.5)
    torch.manual_seed(0)
    x, y = torch.randn(6, 8, 40), torch.tensor([0, 1, 2, 3, 4, 5])
    torch.manual_seed(1)
    reference = _clipped_gradient(build_model(cfg), "hooks", x, y)
    torch.manual_seed(1)
    model = build_model(cfg)
    if mode is None:
        mode = resolve_grad_sample_mode("auto", model)
        assert mode == model.encoder.grad_sample_mode
    other = _clipped_gradient(model, mode, x, y)
    assert reference.keys() == other.keys() and reference
    for name in reference:
        torch.testing.assert_close(other[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("encoder", ["cnn", "crnn", "tcn"])
def test_auto_grad_sample_mode_gives_the_same_clipped_gradients_as_hooks(encoder):
    _assert_same_clipped_gradients_as_hooks(encoder, None)


@pytest.mark.parametrize("encoder", ["tcn", "cnn"])
def test_ghost_clipping_gives_the_same_clipped_gradients_as_per_example_gradients(encoder):
    _assert_same_clipped_gradients_as_hooks(encoder, "ghost")


@pytest.mark.parametrize("conv", [dict(), dict(stride=2), dict(dilation=2, padding=2), dict(padding=0, bias=True),
                                  dict(groups=2), dict(padding="same")])
def test_conv1d_ghost_norms_are_the_norms_of_each_examples_own_gradient(conv):
    from fedser.common.dp_norms import conv1d_norm_sample

    torch.manual_seed(0)
    options = dict(kernel_size=3, padding=1, bias=False) | conv
    layer = torch.nn.Conv1d(4, 6, **options)
    x = torch.randn(5, 4, 11)
    g = torch.randn_like(layer(x))
    expected = {p: [] for p in layer.parameters()}
    for i in range(len(x)):
        layer.zero_grad()
        layer(x[i:i + 1]).backward(g[i:i + 1])
        for p in layer.parameters():
            expected[p].append(p.grad.norm())
    norms = conv1d_norm_sample(layer, [x], g)
    assert set(norms) == set(layer.parameters())
    for p, values in expected.items():
        torch.testing.assert_close(norms[p], torch.stack(values), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["hooks", "ew", "ghost"])
def test_an_empty_poisson_batch_still_gets_its_noise(mode):
    # A step that left the model unchanged would tell that no example was drawn.
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    import fedser.common.dp_norms  # noqa: F401
    from fedser.common.training import _empty_dp_batch

    torch.manual_seed(0)
    model = build_model(ModelConfig(n_features=8, width=0.25))
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("heads.emotion"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    data = DataLoader(TensorDataset(torch.randn(4, 8, 20), torch.zeros(4, dtype=torch.long)), batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.SGD(trainable, lr=1.0), data_loader=data,
            criterion=torch.nn.CrossEntropyLoss(), noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)
    optimizer = private[1]
    optimizer.zero_grad()
    _empty_dp_batch(trainable)
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(trainable, before)), "every trained weight carries noise"


def test_explicit_grad_sample_mode_passes_through_and_unknown_is_named():
    from fedser.common.training import resolve_grad_sample_mode

    assert resolve_grad_sample_mode("functorch", build_model(ModelConfig(n_features=8))) == "functorch"
    with pytest.raises(ConfigError, match="grad_sample_mode"):
        TrainConfig(dp=True, noise_multiplier=1.0, grad_sample_mode="fast").validate()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_large_dp_batches_computed_in_chunks_give_the_same_model_and_spend(monkeypatch, mode):
    import fedser.common.training as training

    data = separable(n=64)

    def run(max_physical: int):
        monkeypatch.setattr(training, "MAX_PHYSICAL_BATCH", max_physical)
        monkeypatch.setattr(training, "MAX_PHYSICAL_BATCH_GHOST", max_physical)
        torch.manual_seed(0)
        model = build_model(ModelConfig(n_features=N_FEATURES, width=0.25, dropout=0.0))
        cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-2, dp=True, noise_multiplier=0.0, max_grad_norm=0.5,
                          seed=3, grad_sample_mode=mode)
        result = train_task(model, "kws", data, None, cfg, SPEC, progress=False)
        return model.state_dict(), result

    whole, r_whole = run(64)
    chunked, r_chunked = run(8)

    assert r_chunked.steps == r_whole.steps == 4, "spend counts optimizer steps, not physical chunks"
    assert [s.as_tuple() for s in r_chunked.spend] == [s.as_tuple() for s in r_whole.spend]
    assert r_chunked.epsilon == r_whole.epsilon
    torch.manual_seed(0)
    initial = build_model(ModelConfig(n_features=N_FEATURES, width=0.25, dropout=0.0)).state_dict()
    moved = [k for k in whole if not torch.equal(whole[k], initial[k])]
    assert moved, "training changed the model"
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_dp_step_is_the_mean_of_each_examples_own_unweighted_gradient():
    # Imbalanced labels: balanced class weights would scale examples by their class's count in the
    # dataset and by the batch's total weight, so one example's gradient would depend on the others
    # and the clip would no longer bound what adding it changes. With nothing clipped (C huge), no
    # noise and every example in the batch (q = 1), one SGD step must be -lr * mean of the plain
    # per-example gradients.
    data = separable(n=20, classes=(0, 0, 0, 1))
    torch.manual_seed(0)
    model = build_model(ModelConfig(dropout=0.0))
    reference = build_model(ModelConfig(dropout=0.0))
    reference.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in model.named_parameters() if k.startswith("heads.kws.")}
    cfg = TrainConfig(epochs=1, batch_size=len(data), lr=0.5, optimizer="sgd", weight_decay=0.0, dp=True,
                      noise_multiplier=0.0, max_grad_norm=1e6)
    train_task(model, "kws", data, None, cfg, SPEC, progress=False)
    loss = torch.nn.functional.cross_entropy(reference(data.feats, "kws"), data.y)
    loss.backward()
    for name, p in reference.named_parameters():
        if name in before:
            torch.testing.assert_close(dict(model.named_parameters())[name], before[name] - 0.5 * p.grad,
                                       rtol=1e-4, atol=1e-6)
