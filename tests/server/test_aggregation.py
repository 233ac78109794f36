"""Heterogeneous FedAvg: hand-computed cases, error cases, and properties against oracles."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.server.strategy.aggregate import aggregate as flwr_aggregate
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from hypothesis import given, settings
from hypothesis import strategies as st

from fedser.server.aggregation import ClientUpdate, aggregate, aggregate_sum, capped_weights, full_index


def head_of(name: str) -> str | None:
    """The fedser naming rule (``heads.<task>.``), kept local so these tests stand alone."""
    for head in ("emotion", "kws"):
        if name.startswith(f"heads.{head}."):
            return head
    return None


def ix(*axes):
    return np.ix_(*(np.asarray(a) for a in axes))


# ---------------------------------------------------------------- hand-computed


def _two_client_case():
    """Two tiers (0.5 and 0.25 of a tiny model) and different heads; values chosen by hand."""
    global_state = {
        "encoder.weight": np.arange(8, dtype=np.float32).reshape(4, 2),
        "encoder.bias": np.array([10, 20, 30, 40], dtype=np.float32),
        "heads.emotion.weight": np.full((3, 4), 5.0, dtype=np.float32),
        "heads.kws.weight": np.full((2, 4), -1.0, dtype=np.float32),
    }
    a = ClientUpdate(
        node_id="a",
        delta={
            "encoder.weight": np.array([[1.0], [1.0]], dtype=np.float32),
            "encoder.bias": np.array([1.0, 1.0], dtype=np.float32),
            "heads.emotion.weight": np.full((3, 2), 2.0, dtype=np.float32),
            "heads.kws.weight": np.full((2, 2), 3.0, dtype=np.float32),
        },
        index={
            "encoder.weight": ix([0, 1], [0]),
            "encoder.bias": ix([0, 1]),
            "heads.emotion.weight": ix([0, 1, 2], [0, 1]),
            "heads.kws.weight": ix([0, 1], [0, 1]),
        },
        num_examples=1,
        heads={"emotion", "kws"},
        width=0.5,
    )
    b = ClientUpdate(
        node_id="b",
        delta={
            "encoder.weight": np.array([[5.0]], dtype=np.float32),
            "encoder.bias": np.array([9.0], dtype=np.float32),
            "heads.emotion.weight": np.full((3, 1), 6.0, dtype=np.float32),
            # b has no command labels: whatever it sends for the KWS head must be ignored.
            "heads.kws.weight": np.full((2, 1), 100.0, dtype=np.float32),
        },
        index={
            "encoder.weight": ix([0], [0]),
            "encoder.bias": ix([0]),
            "heads.emotion.weight": ix([0, 1, 2], [0]),
            "heads.kws.weight": ix([0, 1], [0]),
        },
        num_examples=3,
        heads={"emotion"},
        width=0.25,
    )
    return global_state, [a, b]


def test_two_clients_different_widths_and_heads_exact_values():
    # Prepare
    global_state, updates = _two_client_case()
    before = {k: v.copy() for k, v in global_state.items()}

    # Execute
    new, stats = aggregate(global_state, updates, head_of)

    # Assert: element [0,0] is covered by both: (1*1 + 3*5) / 4 = 4; [1,0] only by a.
    np.testing.assert_array_equal(
        new["encoder.weight"], np.array([[4, 1], [3, 3], [4, 5], [6, 7]], dtype=np.float32)
    )
    # bias[0]: (1*1 + 3*9) / 4 = 7; bias[1]: a only; bias[2:] untouched.
    np.testing.assert_array_equal(new["encoder.bias"], np.array([17, 21, 30, 40], dtype=np.float32))
    # emotion column 0: (1*2 + 3*6) / 4 = 5; column 1: a only (+2); columns 2-3 untouched.
    np.testing.assert_array_equal(
        new["heads.emotion.weight"], np.array([[10, 7, 5, 5]] * 3, dtype=np.float32)
    )
    # KWS head: only a trained it, so b's 100s never enter the mean.
    np.testing.assert_array_equal(
        new["heads.kws.weight"], np.array([[2, 2, -1, -1]] * 2, dtype=np.float32)
    )
    for name, value in new.items():
        assert value.dtype == np.float32 and value.shape == before[name].shape
        assert not np.shares_memory(value, global_state[name])
        np.testing.assert_array_equal(global_state[name], before[name])  # input not modified


def test_two_clients_stats():
    # Prepare
    global_state, updates = _two_client_case()

    # Execute
    _, stats = aggregate(global_state, updates, head_of)

    # Assert
    np.testing.assert_array_equal(stats.coverage["encoder.weight"], [[2, 0], [1, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(stats.coverage["heads.kws.weight"], [[1, 1, 0, 0]] * 2)
    assert stats.fraction_updated["encoder.weight"] == pytest.approx(2 / 8)
    assert stats.fraction_updated["heads.emotion.weight"] == pytest.approx(6 / 12)
    assert stats.head_contributors == {"encoder": 2, "emotion": 2, "kws": 1}
    assert stats.tier_contributors == {0.5: 1, 0.25: 1}
    assert stats.num_updates == 2 and stats.total_examples == 4
    assert stats.overall_fraction_updated() == pytest.approx((2 + 2 + 6 + 4) / (8 + 4 + 12 + 8))
    metrics = stats.to_metrics()
    assert metrics["agg-contributors-kws"] == 1.0 and metrics["agg-updates"] == 2.0
    assert all(isinstance(v, float) for v in metrics.values())


def test_server_lr_scales_the_averaged_step():
    # Prepare
    global_state, updates = _two_client_case()

    # Execute
    new, _ = aggregate(global_state, updates, head_of, server_lr=0.5)

    # Assert: step at encoder.weight[0,0] is 4, halved; untouched elements stay.
    assert new["encoder.weight"][0, 0] == 2.0
    assert new["encoder.weight"][1, 0] == 2.5
    assert new["encoder.weight"][3, 1] == 7.0


def test_non_contiguous_index_is_honoured():
    # Prepare: a client covering rows 0 and 2 only (not a prefix), next to a full-width one.
    global_state = {"encoder.w": np.zeros((3, 2), dtype=np.float32)}
    sparse = ClientUpdate(1, {"encoder.w": np.full((2, 1), 4.0, np.float32)},
                          {"encoder.w": ix([2, 0], [1])}, 1, {"emotion"}, 0.5)
    dense = ClientUpdate(2, {"encoder.w": np.ones((3, 2), np.float32)},
                         full_index(global_state), 1, {"emotion"}, 1.0)

    # Execute
    new, stats = aggregate(global_state, [sparse, dense], head_of)

    # Assert: rows 0 and 2 of column 1 average (4 + 1) / 2; the rest is dense only.
    np.testing.assert_array_equal(new["encoder.w"], [[1, 2.5], [1, 1], [1, 2.5]])
    np.testing.assert_array_equal(stats.coverage["encoder.w"], [[1, 2], [1, 1], [1, 2]])


def test_no_updates_leaves_model_unchanged():
    # Prepare
    global_state, _ = _two_client_case()

    # Execute
    new, stats = aggregate(global_state, [], head_of)

    # Assert
    for name in global_state:
        np.testing.assert_array_equal(new[name], global_state[name])
        assert not np.shares_memory(new[name], global_state[name])
    assert stats.overall_fraction_updated() == 0.0
    assert stats.head_contributors == {"encoder": 0, "emotion": 0, "kws": 0}


def _reference(state, updates):
    """Straightforward float64 scatter per client (no grouping, no batching)."""
    out = {}
    for name, g in state.items():
        acc = np.zeros(g.shape)
        weight = np.zeros(g.shape)
        for u in updates:
            if head_of(name) in (None, *u.heads):
                acc[u.index[name]] += u.num_examples * u.delta[name].astype(np.float64)
                weight[u.index[name]] += u.num_examples
        step = np.divide(acc, weight, out=np.zeros(g.shape), where=weight > 0)
        out[name] = (g + step).astype(np.float32)
    return out


def test_many_clients_sharing_tier_indices_match_reference():
    # Prepare: 200 clients in 3 tiers x 3 head sets, several batches per group; the GRU-like
    # gate layout [0 1 | 4 5 | 8 9] is not contiguous and takes the gather/scatter path.
    rng = np.random.default_rng(7)
    state = {
        "encoder.conv": rng.standard_normal((8, 4, 3)).astype(np.float32),
        "encoder.gru": rng.standard_normal((12, 8)).astype(np.float32),
        "heads.emotion.weight": rng.standard_normal((9, 8)).astype(np.float32),
        "heads.kws.weight": rng.standard_normal((12, 8)).astype(np.float32),
    }
    gates = {1.0: np.arange(12), 0.5: np.array([0, 1, 4, 5, 8, 9]), 0.25: np.array([0, 4, 8])}
    tiers = {}
    for w in (1.0, 0.5, 0.25):
        k8, k4 = int(8 * w), max(1, int(4 * w))
        tiers[w] = {
            "encoder.conv": ix(np.arange(k8), np.arange(k4), np.arange(3)),
            "encoder.gru": ix(gates[w], np.arange(k8)),
            "heads.emotion.weight": ix(np.arange(9), np.arange(k8)),
            "heads.kws.weight": ix(np.arange(12), np.arange(k8)),
        }
        for index in tiers[w].values():
            for a in index:
                a.flags.writeable = False
    heads_cycle = [{"emotion"}, {"kws"}, {"emotion", "kws"}]
    updates = []
    for i in range(200):
        w = (1.0, 0.5, 0.25)[i % 3]
        index = tiers[w]
        delta = {n: rng.standard_normal(tuple(np.size(a) for a in index[n])).astype(np.float32)
                 for n in state}
        updates.append(ClientUpdate(i, delta, index, int(rng.integers(1, 5000)), heads_cycle[(i // 3) % 3], w))

    # Execute (twice: the second call reuses the cached index analysis)
    first, stats = aggregate(state, updates, head_of)
    second, _ = aggregate(state, updates, head_of)

    # Assert
    expected = _reference(state, updates)
    for name in state:
        np.testing.assert_allclose(first[name], expected[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(second[name], first[name])
    full_width = sum(u.width == 1.0 for u in updates)
    assert stats.coverage["encoder.gru"][0, 0] == 200 and stats.coverage["encoder.gru"][2, 0] == full_width
    kws_clients = sum("kws" in u.heads for u in updates)
    assert stats.coverage["heads.kws.weight"][0, 0] == kws_clients


def test_new_read_only_index_objects_are_analysed_afresh():
    # Prepare: short-lived read-only index arrays; CPython reuses their addresses (ids).
    state = {"encoder.w": np.zeros(4, dtype=np.float32)}
    results = []

    # Execute
    for i in range(40):
        axis = np.array([i % 4])
        axis.flags.writeable = False
        update = ClientUpdate(i, {"encoder.w": np.ones(1, np.float32)}, {"encoder.w": (axis,)}, 1, set(), 0.25)
        new, _ = aggregate(state, [update], head_of)
        results.append(int(np.flatnonzero(new["encoder.w"])[0]))
        del axis, update

    # Assert
    assert results == [i % 4 for i in range(40)]


def test_changed_writable_index_is_not_served_from_cache():
    # Prepare: the same writable index array object, changed between two calls.
    state = {"encoder.w": np.zeros(4, dtype=np.float32)}
    axis = np.array([0, 1])
    update = ClientUpdate(1, {"encoder.w": np.ones(2, np.float32)}, {"encoder.w": (axis,)}, 1, set(), 0.5)
    first, _ = aggregate(state, [update], head_of)

    # Execute
    axis[:] = [2, 3]
    second, _ = aggregate(state, [update], head_of)

    # Assert
    np.testing.assert_array_equal(first["encoder.w"], [1, 1, 0, 0])
    np.testing.assert_array_equal(second["encoder.w"], [0, 0, 1, 1])


# ---------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda u: u.delta.update({"encoder.bias": np.ones(3, np.float32)}), "has shape (3,)"),
        (lambda u: u.delta.pop("heads.emotion.weight"), "no delta for 'heads.emotion.weight'"),
        (lambda u: u.delta.update({"encoder.extra": np.ones(1, np.float32)}), "encoder.extra"),
        (lambda u: setattr(u, "num_examples", 0), "num_examples must be a positive integer"),
        (lambda u: u.index.update({"encoder.bias": ix([0, 9])}), "outside [0, 3]"),
        (lambda u: u.index.update({"encoder.bias": ix([1, 1])}), "repeats elements"),
        (lambda u: u.delta["encoder.bias"].__setitem__(0, np.nan), "non-finite"),
    ],
)
def test_malformed_update_raises_naming_the_problem(mutate, message):
    # Prepare
    global_state, updates = _two_client_case()
    mutate(updates[0])

    # Execute / Assert
    with pytest.raises(ValueError, match="cannot aggregate") as excinfo:
        aggregate(global_state, updates, head_of)
    assert message in str(excinfo.value)


def test_untrained_head_may_be_absent():
    # Prepare: b trained only the emotion head and sends no KWS arrays at all.
    global_state, updates = _two_client_case()
    del updates[1].delta["heads.kws.weight"], updates[1].index["heads.kws.weight"]

    # Execute
    new, _ = aggregate(global_state, updates, head_of)

    # Assert
    np.testing.assert_array_equal(new["heads.kws.weight"], [[2, 2, -1, -1]] * 2)


def test_duplicate_node_and_bad_server_lr_are_rejected():
    # Prepare
    global_state, updates = _two_client_case()
    updates[1].node_id = updates[0].node_id

    # Execute / Assert
    with pytest.raises(ValueError, match="appears twice") as excinfo:
        aggregate(global_state, updates, head_of, server_lr=0.0)
    assert "server_lr must be a finite number > 0" in str(excinfo.value)


# ---------------------------------------------------------------- properties

WIDTHS = (1.0, 0.5, 0.25)
HEAD_SETS = ({"emotion"}, {"kws"}, {"emotion", "kws"})
values = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def models(draw):
    """A tiny multi-task model: 1-3 encoder arrays, one array per head, 0-3 dims each."""
    names = [f"encoder.l{i}" for i in range(draw(st.integers(1, 3)))]
    names += ["heads.emotion.weight", "heads.kws.weight"]
    state = {}
    for name in names:
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
        n = math.prod(shape)
        flat = draw(st.lists(values, min_size=n, max_size=n))
        state[name] = np.asarray(flat, dtype=np.float32).reshape(shape)
    return state


def _prefix_index(state, width):
    """HeteroFL nested slice: the first ceil(width * d) entries of every axis."""
    return {
        name: np.ix_(*(np.arange(max(1, math.ceil(width * d))) for d in a.shape))
        for name, a in state.items()
    }


@st.composite
def subset_index(draw, shape):
    """Any non-empty subset per axis, in any order (exercises the non-slice path)."""
    axes = []
    for d in shape:
        chosen = draw(st.lists(st.integers(0, d - 1), min_size=1, max_size=d, unique=True))
        axes.append(np.asarray(chosen))
    return np.ix_(*axes)


@st.composite
def updates_for(draw, state, *, full=False, both_heads=False, min_size=1, max_size=5):
    n_clients = draw(st.integers(min_size, max_size))
    # Clients of one tier share index objects, as slice_index hands them out (batched path).
    shared = {w: _prefix_index(state, w) for w in WIDTHS}
    updates = []
    for i in range(n_clients):
        width = 1.0 if full else draw(st.sampled_from(WIDTHS))
        if full or draw(st.booleans()):
            index = shared[width]
        else:
            index = {name: draw(subset_index(a.shape)) for name, a in state.items()}
        delta = {}
        for name, a in state.items():
            shape = tuple(np.size(x) for x in index[name])
            n = math.prod(shape)
            delta[name] = np.asarray(draw(st.lists(values, min_size=n, max_size=n)),
                                     dtype=np.float32).reshape(shape)
        heads = {"emotion", "kws"} if both_heads else set(draw(st.sampled_from(HEAD_SETS)))
        updates.append(ClientUpdate(i, delta, index, draw(st.integers(1, 1000)), heads, width))
    return updates


def _oracle(state, updates):
    """Per-element definition, element by element in plain Python (slow, obviously right)."""
    out = {}
    for name, g in state.items():
        head = head_of(name)
        new = g.astype(np.float64).copy()
        for pos in np.ndindex(g.shape):
            num = den = 0.0
            for u in updates:
                if head is not None and head not in u.heads:
                    continue
                axes = [np.asarray(a).reshape(-1) for a in u.index[name]]
                local = []
                for p, ax in zip(pos, axes):
                    hit = np.flatnonzero(ax == p)
                    if hit.size == 0:
                        break
                    local.append(int(hit[0]))
                else:
                    num += u.num_examples * float(u.delta[name][tuple(local)])
                    den += u.num_examples
            if den > 0:
                new[pos] += num / den
        out[name] = new
    return out


def _covered(state, updates):
    masks = {}
    for name, g in state.items():
        mask = np.zeros(g.shape, dtype=bool)
        for u in updates:
            if head_of(name) is None or head_of(name) in u.heads:
                mask[u.index[name]] = True
        masks[name] = mask
    return masks


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_full_width_both_heads_equals_flower_fedavg(data):
    # Prepare
    state = data.draw(models())
    updates = data.draw(updates_for(state, full=True, both_heads=True))
    names = list(state)
    weights = [[np.asarray(state[k] + u.delta[k]) for k in names] for u in updates]
    replies = [
        RecordDict({
            "arrays": ArrayRecord({k: Array(w) for k, w in zip(names, ws)}),
            "metrics": MetricRecord({"num-examples": u.num_examples}),
        })
        for ws, u in zip(weights, updates)
    ]

    # Execute
    new, stats = aggregate(state, updates, head_of)
    legacy = flwr_aggregate([(ws, u.num_examples) for ws, u in zip(weights, updates)])
    message_api = aggregate_arrayrecords(replies, "num-examples")

    # Assert
    for k, expected in zip(names, legacy):
        np.testing.assert_allclose(new[k], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(new[k], message_api[k].numpy(), rtol=1e-5, atol=1e-5)
        assert np.all(stats.coverage[k] == len(updates))
        assert stats.fraction_updated[k] == (1.0 if state[k].size else 0.0)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_matches_per_element_oracle(data):
    # Prepare
    state = data.draw(models())
    updates = data.draw(updates_for(state))

    # Execute
    new, stats = aggregate(state, updates, head_of)

    # Assert
    expected = _oracle(state, updates)
    masks = _covered(state, updates)
    for name in state:
        np.testing.assert_allclose(new[name], expected[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(stats.coverage[name] > 0, masks[name])


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_the_mean_from_the_padded_sum_alone_is_the_mean_of_the_updates_each_counted_once(data):
    # Prepare: what secure aggregation reveals, the sum of the updates padded to the global shapes
    state = data.draw(models())
    updates = [replace(u, num_examples=1) for u in data.draw(updates_for(state))]
    sums = {}
    for name, g in state.items():
        total = np.zeros(g.shape)
        for u in updates:
            if (head_of(name) is None or head_of(name) in u.heads) and name in u.delta:
                total[u.index[name]] += u.delta[name]
        sums[name] = total

    # Execute
    new, stats = aggregate_sum(state, sums, updates, head_of)
    reference, ref_stats = aggregate(state, updates, head_of)

    # Assert: the same model and coverage as aggregating each update with weight 1
    for name in state:
        np.testing.assert_allclose(new[name], reference[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(stats.coverage[name], ref_stats.coverage[name])
    assert stats.head_contributors == ref_stats.head_contributors


def test_a_sum_of_the_wrong_shape_or_with_nan_is_refused():
    state = {"w": np.zeros((2, 2), np.float32)}
    update = ClientUpdate(1, {}, full_index(state), 1, {"emotion"}, 1.0)
    with pytest.raises(ValueError, match="has shape"):
        aggregate_sum(state, {"w": np.zeros(3)}, [update], head_of)
    with pytest.raises(ValueError, match="non-finite"):
        aggregate_sum(state, {"w": np.full((2, 2), np.nan)}, [update], head_of)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_never_covered_element_never_changes(data):
    # Prepare
    state = data.draw(models())
    updates = data.draw(updates_for(state, min_size=0))

    # Execute
    new, _ = aggregate(state, updates, head_of)

    # Assert: bit for bit, not merely close.
    for name, mask in _covered(state, updates).items():
        np.testing.assert_array_equal(new[name][~mask], state[name][~mask])


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_client_order_does_not_matter(data):
    # Prepare
    state = data.draw(models())
    updates = data.draw(updates_for(state, min_size=2))
    shuffled = data.draw(st.permutations(updates))

    # Execute
    new, stats = aggregate(state, updates, head_of)
    new_shuffled, stats_shuffled = aggregate(state, shuffled, head_of)

    # Assert: float64 sums in another order may differ in the last float32 bit at most.
    for name in state:
        np.testing.assert_allclose(new_shuffled[name], new[name], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(stats_shuffled.coverage[name], stats.coverage[name])


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_emotion_only_client_never_changes_kws_head(data):
    # Prepare
    state = data.draw(models())
    others = data.draw(updates_for(state, min_size=0, max_size=4))
    [emotion_only] = data.draw(updates_for(state, min_size=1, max_size=1))
    emotion_only.heads = {"emotion"}
    emotion_only.node_id = "emotion-only"

    # Execute
    alone, _ = aggregate(state, [emotion_only], head_of)
    with_it, _ = aggregate(state, [*others, emotion_only], head_of)
    without, _ = aggregate(state, others, head_of)

    # Assert
    np.testing.assert_array_equal(alone["heads.kws.weight"], state["heads.kws.weight"])
    np.testing.assert_array_equal(with_it["heads.kws.weight"], without["heads.kws.weight"])


# ---------------------------------------------------------------- capped weights


@pytest.mark.parametrize("counts, weights", [
    ([10, 20, 5], [10, 10, 5]),                     # above the lower median counts as it; below keeps its count
    ([1, 3], [1, 1]),
    ([10] * 9 + [10 ** 6], [10] * 10),              # the liar counts as a typical honest device
    ([10, 10 ** 6], [10, 10]),                      # two devices: the lower median is the honest one
    ([7], [7]),
    ([], []),
])
def test_capped_weights_bound_each_claim_at_the_lower_median(counts, weights):
    # Execute / Assert
    assert capped_weights(counts) == weights


def test_a_larger_factor_keeps_an_ordinary_spread_exact_and_still_bounds_the_liar():
    # Execute / Assert
    assert capped_weights([10, 20, 5], factor=4) == [10, 20, 5]
    assert capped_weights([10] * 9 + [10 ** 6], factor=4) == [10] * 9 + [40]


@pytest.mark.parametrize("counts, factor", [([3, 0], 4), ([3, -1], 4), ([3, 2.5], 4), ([3, True], 4), ([3], 0)])
def test_capped_weights_refuses_what_is_not_a_count(counts, factor):
    # Execute / Assert
    with pytest.raises(ValueError, match="factor|positive integers"):
        capped_weights(counts, factor)


@settings(max_examples=100, deadline=None)
@given(counts=st.lists(st.integers(1, 10 ** 6), min_size=1, max_size=30))
def test_no_device_holds_more_weight_than_the_bound_allows(counts):
    # Execute
    weights = capped_weights(counts)
    # Assert: never above the claim, and no one device above 1 / (1 + ceil((m - 1) / 2)) of the total
    m = len(counts)
    assert all(1 <= w <= n for w, n in zip(weights, counts))
    assert max(weights) / sum(weights) <= 1 / (1 + math.ceil((m - 1) / 2)) + 1e-12
