"""Attacks of the privacy audit on planted signals: each finds a leak that is there and none that is not."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedser.tools.audit.inputs import AuditInputError
from fedser.tools.audit.attacks import (
    attribute_inference,
    calibrated_attack,
    chance_band,
    chance_uars,
    disaggregate,
    loss_attack,
    observed_sums,
    roc_summary,
    speaker_scores,
)
from fedser.tools.audit.protocol import example_confidences, example_losses, first_layer_name, update_features
from fedser.common.data import TaskData


def _updates(planted: float, seed: int, n_clients: int = 32, per_client: int = 4, dim: int = 300):
    """Fake update features: class-1 clients carry ``planted`` extra in the first 12 dimensions."""
    rng = np.random.default_rng(seed)
    X, y, g = [], [], []
    for c in range(n_clients):
        label = c % 2
        voice = rng.normal(0, 0.5, dim)          # what makes one client's updates alike
        for _ in range(per_client):
            x = voice + rng.normal(0, 1.0, dim)
            x[:12] += planted * label
            X.append(x)
            y.append(label)
            g.append(f"spk{c}")
    return np.stack(X), y, g


def test_attribute_inference_finds_a_planted_attribute():
    X, y, g = _updates(planted=1.0, seed=1)
    res = attribute_inference(X, y, g, seed=0)
    assert res.n_clients == 32 and res.n_updates == 128
    assert res.uar >= 0.85
    assert res.uar_per_update >= 0.7


def test_attribute_inference_finds_nothing_in_pure_noise():
    uars = [attribute_inference(*_updates(planted=0.0, seed=s), seed=s).uar for s in range(3)]
    assert abs(float(np.mean(uars)) - 0.5) <= 0.15
    assert max(uars) <= 0.8


def test_chance_band_lies_between_pure_noise_and_a_planted_attribute():
    X, y, g = _updates(planted=1.0, seed=3, n_clients=16, per_client=2, dim=60)
    band = chance_band(X, y, g, permutations=8, seed=0)
    assert 0.5 <= band < attribute_inference(X, y, g, seed=0).uar
    with pytest.raises(AuditInputError, match="permutations"):
        chance_band(X, y, g, permutations=0)


def test_chance_uars_are_the_runs_the_band_takes_its_quantile_of():
    # Prepare
    X, y, g = _updates(planted=1.0, seed=4, n_clients=12, per_client=2, dim=40)

    # Execute
    runs = chance_uars(X, y, g, permutations=6, seed=2)

    # Assert
    assert len(runs) == 6 and all(0.0 <= u <= 1.0 for u in runs)
    assert chance_band(X, y, g, permutations=6, seed=2) == pytest.approx(float(np.quantile(runs, 0.95)))
    with pytest.raises(AuditInputError, match="permutations"):
        chance_uars(X, y, g, permutations=0)


def test_population_centring_removes_a_corpus_offset():
    """Two corpora whose updates differ by a large shared offset: centred per corpus, the planted
    attribute is still found (and a population list of the wrong length is refused)."""
    X, y, g = _updates(planted=1.0, seed=2, n_clients=40)
    pops = [("a" if int(c[3:]) < 20 else "b") for c in g]
    X = X + np.where(np.array(pops)[:, None] == "a", 6.0, -6.0) * np.r_[np.ones(40), np.zeros(X.shape[1] - 40)]
    centred = attribute_inference(X, y, g, populations=pops, seed=0)
    assert centred.uar >= 0.85
    with pytest.raises(AuditInputError, match="populations"):
        attribute_inference(X, y, g, populations=pops[:-1])


def test_attribute_inference_rejects_too_few_clients_and_mixed_labels():
    X, y, g = _updates(planted=1.0, seed=0, n_clients=3)
    with pytest.raises(AuditInputError, match="at least 2 clients of each class"):
        attribute_inference(X, y, g)
    X, y, g = _updates(planted=1.0, seed=0, n_clients=6)
    y[0] = 1 - y[0]
    with pytest.raises(AuditInputError, match="both attribute values"):
        attribute_inference(X, y, g)


def _losses(effect: float, seed: int, n: int = 600, k: int = 4):
    """Per-example losses: difficulty d_i varies a lot; members lose ``effect`` less than they would."""
    rng = np.random.default_rng(seed)
    member = rng.random(n) < 0.5
    difficulty = rng.gamma(2.0, 0.6, n)
    target = np.maximum(difficulty - effect * member + rng.normal(0, 0.05, n), 0)
    inside = rng.random((k, n)) < 0.5
    ref = np.maximum(difficulty + rng.normal(0, 0.05, (k, n)) - effect * inside, 0)
    return member.astype(int), target, ref, inside


def test_membership_attacks_find_planted_membership_and_calibration_helps():
    labels, target, ref, inside = _losses(effect=0.3, seed=0)
    loss_auc = roc_summary(labels, loss_attack(target)).auc
    cal = roc_summary(labels, calibrated_attack(-target, -ref, inside))
    assert loss_auc > 0.55
    assert cal.auc >= 0.95 and cal.auc > loss_auc + 0.2
    assert cal.tpr_at_low_fpr > 0.3


def test_membership_attacks_find_nothing_without_membership_signal():
    labels, target, ref, inside = _losses(effect=0.0, seed=1)
    assert abs(roc_summary(labels, loss_attack(target)).auc - 0.5) < 0.07
    cal = roc_summary(labels, calibrated_attack(-target, -ref, inside))
    assert abs(cal.auc - 0.5) < 0.07
    assert cal.tpr_at_low_fpr < 0.1


def test_speaker_level_aggregation_and_roc_edges():
    scores = speaker_scores([1.0, 3.0, -1.0, 0.0], ["a", "a", "b", "b"])
    assert scores == {"a": 2.0, "b": -0.5}
    perfect = roc_summary([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2])
    assert perfect.auc == 1.0 and perfect.tpr_at_low_fpr == 1.0
    with pytest.raises(AuditInputError, match="both classes"):
        roc_summary([1, 1], [0.3, 0.4])
    with pytest.raises(AuditInputError, match="do not fit"):
        calibrated_attack([0.1, 0.2], np.zeros((2, 3)), np.zeros((2, 3), bool))


def test_update_features_start_with_the_first_layer():
    upd = {"encoder.stem.conv.weight": np.ones((4, 5, 3), np.float32), "encoder.stem.conv.bias": np.zeros(4),
           "heads.emotion.weight": np.full((2, 8), 2.0)}
    assert first_layer_name(upd) == "encoder.stem.conv.weight"
    f = update_features(upd)
    # 60 first-layer values, 5 per-row sums, 5 per-row magnitudes, 3 statistics per array
    assert f.shape == (60 + 5 + 5 + 9,)
    assert np.allclose(f[60:65], 12.0) and np.allclose(f[65:70], 1.0)


class _FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.as_tensor(logits, dtype=torch.float32)

    def forward(self, x, task):
        return self.logits[x[:, 0, 0].long()]


def test_example_confidences_are_the_true_class_log_odds_even_when_p_rounds_to_one():
    logits = [[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [60.0, 0.0, 0.0]]
    data = TaskData("emotion", torch.arange(3, dtype=torch.float32).reshape(3, 1, 1), torch.tensor([0, 2, 0]),
                    ["a", "b", "c"])
    conf = example_confidences(_FixedLogits(logits), data)
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=1)
    assert conf[:2] == pytest.approx([float(torch.log(p[0, 0] / (1 - p[0, 0]))), float(np.log(0.5))], rel=1e-5)
    # p_y is 1.0 in float32 here, so log(p / (1 - p)) would be inf; the logits give 60 - log 2.
    assert conf[2] == pytest.approx(60.0 - np.log(2.0), rel=1e-5)
    losses = example_losses(_FixedLogits(logits), data)
    assert losses[1] == pytest.approx(np.log(3.0), rel=1e-5)


def _tiny_pool(n_speakers: int = 4, per_speaker: int = 6, seed: int = 0):
    from fedser.common.features import FeatureSpec
    from fedser.common.models import ModelConfig

    spec = FeatureSpec()
    g = torch.Generator().manual_seed(seed)
    n = n_speakers * per_speaker
    data = TaskData("emotion", torch.randn(n, spec.n_features(), 20, generator=g),
                    torch.arange(n) % 4, [f"s{i // per_speaker}" for i in range(n)])
    return spec, ModelConfig(n_features=spec.n_features(), width=0.25), data


def test_federated_reference_models_are_fedavg_over_the_speakers_of_their_half():
    from fedser.tools.audit.protocol import Protocol, reference_confidences, simulate_federation, subset
    from fedser.common.models import build_model
    from fedser.common.params import arrays_to_state, state_to_arrays

    spec, mc, pool = _tiny_pool()
    fed = Protocol(rounds=2, local_epochs=1, batch_size=4, dp=True, noise_multiplier=1.0)
    confs, inside = reference_confidences(mc, spec, pool, 2, epochs=1, seed=3, federation=fed)
    assert confs.shape == inside.shape == (2, len(pool))
    assert (inside.sum(axis=1) == len(pool) // 2).all() and np.isfinite(confs).all()

    # Reference 0 by hand: its half, one device per speaker, FedAvg without DP from its own init.
    half = sorted(np.flatnonzero(inside[0]).tolist())
    speakers = sorted({pool.speakers[i] for i in half})
    clients = [subset(pool, [i for i in half if pool.speakers[i] == s]) for s in speakers]
    torch.manual_seed(3000)
    model = build_model(mc)
    protocol = dataclasses.replace(fed.variant("no DP"), expected_clients=len(clients), total_clients=len(clients))
    arrays_to_state(simulate_federation(mc, spec, clients, protocol, seed=3000, init=state_to_arrays(model)), model)
    assert confs[0] == pytest.approx(example_confidences(model, pool), rel=1e-4, abs=1e-4)


def test_auc_chance_band_is_wide_for_few_speakers_and_narrow_for_many_utterances():
    from fedser.tools.audit.attacks import auc_chance_band

    few = auc_chance_band(18, 8, permutations=400)
    many = auc_chance_band(700, 300, permutations=400)
    assert 0.6 < few < 0.8
    assert 0.5 < many < 0.55
    # The band of a no-signal score: a planted perfect score lies far above it.
    assert roc_summary([1] * 18 + [0] * 8, np.r_[np.ones(18), np.zeros(8)]).auc > few
    with pytest.raises(AuditInputError, match="both classes"):
        auc_chance_band(2, 0)


def test_gradient_alignment_finds_the_examples_an_update_descended_on():
    from fedser.tools.audit.attacks import gradient_alignment

    rng = np.random.default_rng(0)
    grads = rng.normal(size=(200, 500))
    member = np.zeros(200, dtype=int)
    member[rng.choice(200, 100, replace=False)] = 1
    update = -0.01 * grads[member == 1].sum(axis=0) + rng.normal(0, 0.05, 500)   # steps down the members' loss
    assert roc_summary(member, gradient_alignment(update, grads)).auc > 0.9
    unrelated = rng.normal(size=500)
    assert abs(roc_summary(member, gradient_alignment(unrelated, grads)).auc - 0.5) < 0.1
    with pytest.raises(AuditInputError, match="do not fit"):
        gradient_alignment(np.zeros(3), np.zeros((2, 4)))


def test_example_gradients_are_each_examples_own_loss_gradient():
    from fedser.tools.audit.protocol import example_gradients
    from fedser.common.models import build_model

    spec, mc, pool = _tiny_pool()
    torch.manual_seed(0)
    model = build_model(mc)
    names = ["encoder.convs.0.conv.weight", "heads.emotion.weight"]
    grads = example_gradients(model, pool, names)
    params = dict(model.named_parameters())
    assert grads.shape == (len(pool), sum(params[n].numel() for n in names))
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(pool.feats[5:6], "emotion"), pool.y[5:6]).backward()
    expected = torch.cat([params[n].grad.reshape(-1) for n in names]).numpy()
    assert grads[5] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert not np.allclose(grads[5], grads[6])
    with pytest.raises(AuditInputError, match="no parameters"):
        example_gradients(model, pool, ["not.a.weight"])


def test_simulated_federation_samples_m_devices_per_round_as_the_server_does(monkeypatch):
    from fedser.tools.audit import protocol as proto
    from fedser.common.params import state_to_arrays
    from fedser.common.models import build_model

    spec, mc, pool = _tiny_pool(n_speakers=6, per_speaker=2)
    clients = list(proto.speaker_parts(pool).values())
    cohorts, seen = [], []
    real_fedavg = proto.fedavg

    def recording_fedavg(global_arrays, updates, weights, heads):
        cohorts.append(len(updates))
        return real_fedavg(global_arrays, updates, weights, heads)

    monkeypatch.setattr(proto, "fedavg", recording_fedavg)
    p = proto.Protocol(rounds=3, local_epochs=1, batch_size=4, dp=False, noise_mode="none", noise_multiplier=0.0,
                       expected_clients=2, total_clients=6)
    init = state_to_arrays(build_model(mc))
    final = proto.simulate_federation(mc, spec, clients, p, seed=1, init=init,
                                      on_round=lambda r, a, c: seen.append((r, a)))
    assert cohorts == [2, 2, 2]
    assert [r for r, _ in seen] == [1, 2, 3] and seen[-1][1] is final
    assert any(not np.array_equal(final[k], init[k]) for k in init)
    # m at least the number of clients: every client, every round (the audit's federations).
    cohorts.clear()
    proto.simulate_federation(mc, spec, clients, dataclasses.replace(p, rounds=1, expected_clients=9), seed=1,
                              init=init)
    assert cohorts == [6]


def _device_updates(n=12, per_device=3, dim=50, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (n, dim))        # what each device's updates share
    return base, [[b + rng.normal(0, 0.05, dim) for _ in range(per_device)] for b in base]


def test_sums_over_random_cohorts_disaggregate_into_each_devices_update():
    # Prepare: 12 devices, 36 rounds over random halves; each device's updates vary a little
    base, updates = _device_updates()
    cohorts, sums = observed_sums(updates, 36, 0.5, np.random.default_rng(1))
    # Assert: each round sums exactly the 6 updates of its cohort
    assert cohorts.shape == (36, 12) and (cohorts.sum(axis=1) == 6).all() and sums.shape == (36, 50)
    # Execute: the server's least squares over the cohorts it knows
    est = disaggregate(cohorts, sums)
    # Assert: every device's update comes back, far closer to its own than to any other's
    dist = np.linalg.norm(est[:, None, :] - base[None, :, :], axis=2)
    assert (dist.argmin(axis=1) == np.arange(12)).all()
    assert np.max(np.diag(dist)) < 0.2 * np.linalg.norm(base, axis=1).min()


def test_noise_in_the_sums_hides_the_devices_and_full_cohorts_reveal_nothing_of_one():
    base, updates = _device_updates()
    rng = np.random.default_rng(2)
    cohorts, sums = observed_sums(updates, 36, 0.5, rng)
    est = disaggregate(cohorts, sums + rng.normal(0, 50.0, sums.shape))   # noise of the sum, as z*C would be
    assert np.mean(np.linalg.norm(est - base, axis=1)) > 2 * np.mean(np.linalg.norm(base, axis=1))
    # every device in every round: one sum repeated, and the estimates are all alike
    cohorts, sums = observed_sums(updates, 36, 1.0, rng)
    est = disaggregate(cohorts, sums)
    assert np.allclose(est, est[0], atol=0.1)


def test_sums_need_devices_and_rounds_and_matching_shapes():
    with pytest.raises(AuditInputError, match="sums need"):
        observed_sums([[np.zeros(3)]], 5, 0.5, np.random.default_rng(0))
    with pytest.raises(AuditInputError, match="do not describe the same rounds"):
        disaggregate(np.ones((4, 2)), np.ones((5, 3)))


def test_attribute_inference_trains_on_shadow_updates_and_scores_other_views_of_the_targets():
    X, y, g = _updates(planted=1.0, seed=3)
    clients = sorted(set(g), key=g.index)
    rng = np.random.default_rng(4)
    # a view of each client that keeps its attribute (the mean of its updates, as sums give away) ...
    means = np.stack([X[np.asarray(g) == c].mean(axis=0) for c in clients])
    res = attribute_inference(X, y, g, seed=0, targets=means, target_clients=clients)
    assert res.n_clients == 32 and res.n_updates == 32 and res.uar >= 0.85
    # ... and one that lost it
    res = attribute_inference(X, y, g, seed=0, targets=rng.normal(0, 1, means.shape), target_clients=clients)
    assert res.uar < 0.75
    with pytest.raises(AuditInputError, match="do not match"):
        attribute_inference(X, y, g, targets=means[:, :10], target_clients=clients)
