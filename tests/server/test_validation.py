"""Update validation: every reason collected, and a rejected reply never reaches the model."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from flwr.app import Array
from flwr.common.constant import SType

from fedser.common.errors import UpdateRejected
from fedser.server.aggregation import ClientUpdate, aggregate
from fedser.common.privacy import global_norm
from fedser.server.validation import (UpdateNoise, decode_update, expected_shapes, validate_evaluation,
                                     validate_update)


def head_of(name: str) -> str | None:
    for head in ("emotion", "kws"):
        if name.startswith(f"heads.{head}."):
            return head
    return None


GLOBAL = {
    "encoder.weight": np.zeros((4, 4), dtype=np.float32),
    "heads.emotion.weight": np.zeros((9, 4), dtype=np.float32),
    "heads.kws.weight": np.zeros((12, 4), dtype=np.float32),
}
# Width-0.5 tier: half of every scaled axis (class axes are not scaled).
HALF_INDEX = {
    "encoder.weight": np.ix_(np.arange(2), np.arange(2)),
    "heads.emotion.weight": np.ix_(np.arange(9), np.arange(2)),
    "heads.kws.weight": np.ix_(np.arange(12), np.arange(2)),
}
EXPECTED = expected_shapes(HALF_INDEX)
HEADS = ("heads.emotion.weight", "heads.kws.weight")


def _delta(value: float = 0.01) -> dict[str, np.ndarray]:
    return {name: np.full(shape, value, dtype=np.float32) for name, shape in EXPECTED.items()}


def _validate(arrays, **overrides):
    kwargs = dict(
        max_norm=1.0,
        current_model_version=5,
        reply_model_version=5,
        num_examples=32,
        heads_mask=3,
    )
    kwargs.update(overrides)
    return validate_update(arrays, EXPECTED, **kwargs)


def test_expected_shapes_from_index():
    # Execute / Assert
    assert EXPECTED == {
        "encoder.weight": (2, 2),
        "heads.emotion.weight": (9, 2),
        "heads.kws.weight": (12, 2),
    }


def test_valid_update_has_no_reasons():
    # Execute
    reasons = _validate(_delta(), num_examples=32.0, heads_mask=1)  # metrics may arrive as floats

    # Assert
    assert reasons == []


def _set(name, index, value):
    return lambda arrays: arrays[name].__setitem__(index, value)


def _replace(name, value):
    return lambda arrays: arrays.update({name: value})


def _keep(arrays):
    return None


@pytest.mark.parametrize(
    ("change", "overrides", "fragment"),
    [
        (_set("encoder.weight", (0, 0), np.nan), {}, "1 NaN/Inf value"),
        (_set("heads.kws.weight", (1, 1), -np.inf), {}, "'heads.kws.weight' has 1 NaN/Inf"),
        (_replace("encoder.extra", np.zeros(2, np.float32)), {}, "unknown array 'encoder.extra'"),
        (lambda arrays: arrays.pop("heads.kws.weight"), {}, "missing array 'heads.kws.weight'"),
        (_replace("encoder.weight", np.zeros((4, 4), np.float32)), {}, "shape (4, 4); expected (2, 2)"),
        (_replace("encoder.weight", np.zeros((2, 2), np.float64)), {}, "dtype float64; expected float32"),
        (_replace("encoder.weight", np.ones((2, 2), np.float32)), {}, "exceeds the bound 1 (clipping norm"),
        (_keep, {"reply_model_version": 3}, "stale update: trained on model version 3, current is 5"),
        (_keep, {"reply_model_version": 6}, "newer than the current 5"),
        (_keep, {"reply_model_version": None}, "model version in the reply must be an integer"),
        (_keep, {"num_examples": 0}, "num_examples must be a positive integer; got 0"),
        (_keep, {"num_examples": -4}, "num_examples must be a positive integer"),
        (_keep, {"num_examples": 2.5}, "num_examples must be a positive integer"),
        (_keep, {"num_examples": 10**9}, "implausible for one device"),
        (_keep, {"heads_mask": 0}, "heads mask 0 is invalid"),
        (_keep, {"heads_mask": 4}, "heads mask 4 is invalid"),
        (_keep, {"heads_mask": None}, "heads mask None is invalid"),
        # a run training only the heads: the encoder must arrive as zeros
        (_keep, {"noise": UpdateNoise(frozenset(HEADS), 0.0, 1.0)},
         "'encoder.weight' is outside the run's train scope but changed"),
    ],
)
def test_each_defect_is_named(change, overrides, fragment):
    # Prepare
    arrays = _delta()
    change(arrays)

    # Execute
    reasons = _validate(arrays, **overrides)

    # Assert: exactly this one defect is reported.
    assert len(reasons) == 1, reasons
    assert fragment in reasons[0]


def test_an_update_that_carries_the_runs_noise_and_zeros_outside_its_scope_is_valid():
    # Prepare: the run trains the heads only and adds noise of std 0.5 to them
    rng = np.random.default_rng(0)
    arrays = {k: (rng.normal(0.0, 0.5, v.shape) if k in HEADS else np.zeros_like(v)).astype(np.float32)
              for k, v in _delta().items()}
    # Execute
    reasons = _validate(arrays, max_norm=None, noise=UpdateNoise(frozenset(HEADS), 0.5, 1.0))
    # Assert
    assert reasons == []


def test_an_update_without_the_runs_noise_is_refused_array_by_array_and_as_a_whole():
    # Prepare: the run adds noise of std 0.5 to both arrays; one arrives without it, the other noised
    shapes = {"encoder.weight": (2000,), "heads.kws.weight": (3000,)}
    noise = UpdateNoise(frozenset(shapes), 0.5, 1.0)
    arrays = {"encoder.weight": np.full(2000, 0.01, dtype=np.float32),
              "heads.kws.weight": np.random.default_rng(0).normal(0.0, 0.5, 3000).astype(np.float32)}
    # Execute
    reasons = validate_update(arrays, shapes, max_norm=None, current_model_version=5, reply_model_version=5,
                              num_examples=32, heads_mask=1, noise=noise)
    # Assert
    assert [r.split(" does not")[0] for r in reasons if "does not carry" in r] == ["array 'encoder.weight'"]
    assert any(r.startswith("update does not look like the noise") for r in reasons)


def test_all_reasons_are_collected():
    # Prepare: five independent defects in one reply.
    arrays = _delta()
    arrays["encoder.weight"][0, 0] = np.nan
    arrays["heads.emotion.weight"] = arrays["heads.emotion.weight"].astype(np.float64)
    del arrays["heads.kws.weight"]

    # Execute
    reasons = _validate(arrays, reply_model_version=1, num_examples=0, heads_mask=8)

    # Assert
    joined = " | ".join(reasons)
    for fragment in ("NaN/Inf", "dtype float64", "missing array", "stale update", "num_examples", "heads mask"):
        assert fragment in joined
    assert len(reasons) == 6


def test_staleness_allowance_and_norm_options():
    # Execute / Assert: one version behind passes with max_staleness=1; no norm check with None.
    assert _validate(_delta(), reply_model_version=4, max_staleness=1) == []
    assert _validate(_delta(10.0), max_norm=None) == []
    assert _validate(_delta(10.0))  # the same update is over the default bound
    with pytest.raises(ValueError, match="max_norm"):
        _validate(_delta(), max_norm=-1.0)


def test_norm_bound_tolerates_float32_rounding_only():
    # Prepare: an update clipped to exactly norm 1 in float32.
    arrays = _delta(1.0)
    scale = np.float32(1.0 / global_norm(arrays))
    clipped = {k: v * scale for k, v in arrays.items()}

    # Execute / Assert
    assert _validate(clipped) == []
    assert _validate({k: v * np.float32(1.001) for k, v in clipped.items()})


def test_rejected_update_never_changes_the_model():
    # Prepare: three replies, one of them poisoned with NaN and a huge value.
    index = HALF_INDEX
    good_a = ClientUpdate("a", _delta(0.1), index, 10, {"emotion", "kws"}, 0.5)
    good_b = ClientUpdate("b", _delta(-0.2), index, 30, {"emotion"}, 0.5)
    bad_delta = _delta(0.1)
    bad_delta["encoder.weight"][:] = 1e6
    bad_delta["heads.emotion.weight"][0, 0] = np.nan
    bad = ClientUpdate("bad", bad_delta, index, 20, {"emotion", "kws"}, 0.5)
    replies = [good_a, bad, good_b]

    # Execute: the caller validates, drops rejected replies, aggregates the rest.
    verdicts = {
        u.node_id: validate_update(u.delta, EXPECTED, max_norm=2.0, current_model_version=1,
                                   reply_model_version=1, num_examples=u.num_examples, heads_mask=3)
        for u in replies
    }
    accepted = [u for u in replies if not verdicts[u.node_id]]
    filtered, _ = aggregate(GLOBAL, accepted, head_of)
    without, _ = aggregate(GLOBAL, [good_a, good_b], head_of)

    # Assert
    assert verdicts["a"] == [] and verdicts["b"] == []
    assert len(verdicts["bad"]) == 2  # NaN, and the norm of the finite part
    with pytest.raises(UpdateRejected, match="NaN/Inf"):
        raise UpdateRejected(verdicts["bad"])
    for name in GLOBAL:
        np.testing.assert_array_equal(filtered[name], without[name])
    # And if the caller forgot to filter, aggregation refuses rather than writing NaN.
    with pytest.raises(ValueError, match="non-finite"):
        aggregate(GLOBAL, replies, head_of)


# ---------------------------------------------------------------- decoding a reply's arrays


def _record(arrays: dict[str, np.ndarray]) -> dict[str, Array]:
    return {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}


def _header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"shape": shape, "fortran_order": False, "descr": descr})
    return buffer.getvalue()


def test_decode_update_returns_every_array_of_a_well_formed_reply():
    # Prepare: one array in Fortran order, which np.save marks in its header
    delta = _delta(0.25)
    record = _record(delta)
    record["encoder.weight"] = Array(np.asfortranarray(np.arange(4, dtype=np.float32).reshape(2, 2)))
    # Execute
    arrays, reasons = decode_update(record, EXPECTED)
    # Assert
    assert reasons == [] and list(arrays) == sorted(delta)
    np.testing.assert_array_equal(arrays["encoder.weight"], np.arange(4, dtype=np.float32).reshape(2, 2))
    np.testing.assert_array_equal(arrays["heads.kws.weight"], delta["heads.kws.weight"])


@pytest.mark.parametrize("array, fragment", [
    pytest.param(Array(dtype="float32", shape=(2, 2), stype=SType.NUMPY, data=b""), "carries 0 bytes", id="empty"),
    pytest.param(Array(dtype="float32", shape=(2, 2), stype=SType.NUMPY, data=_header((2 ** 45,)) + bytes(16)),
                 "npy header says shape (35184372088832,)", id="huge-header"),
    pytest.param(Array(dtype="float32", shape=(2, 2), stype=SType.NUMPY, data=_header((2, 2), "<f8") + bytes(16)),
                 "dtype float64", id="header-dtype"),
    pytest.param(Array(dtype="float32", shape=(2, 2), stype=SType.NUMPY, data=_header((2, 2)) + bytes(12)),
                 "bytes", id="truncated"),
    pytest.param(Array(dtype="float32", shape=(2, 2), stype=SType.NUMPY, data=b"\x93NUMPY\x01\x00" + bytes(24)),
                 "npy header cannot be read", id="garbage-header"),
    pytest.param(Array(dtype="float32", shape=(2, 2), stype="torch", data=bytes(100)), "serialization type",
                 id="stype"),
    pytest.param(Array(np.zeros((2, 2), dtype=np.float64)), "has dtype float64; expected float32", id="dtype"),
    pytest.param(Array(np.zeros((2, 3), dtype=np.float32)), "has shape (2, 3); expected (2, 2) for this tier",
                 id="shape"),
])
def test_decode_update_rejects_an_array_that_disagrees_with_its_slice_before_decoding_it(array, fragment):
    # Prepare
    record = _record(_delta())
    record["encoder.weight"] = array
    # Execute
    arrays, reasons = decode_update(record, EXPECTED)
    # Assert: named, not decoded, and the other arrays are still read
    assert len(reasons) == 1 and "'encoder.weight'" in reasons[0] and fragment in reasons[0]
    assert sorted(arrays) == ["heads.emotion.weight", "heads.kws.weight"]


def test_decode_update_names_unknown_arrays_and_leaves_missing_ones_to_validate_update():
    # Prepare
    record = _record(_delta())
    del record["heads.kws.weight"]
    record["encoder.backdoor"] = Array(np.zeros(3, dtype=np.float32))
    # Execute
    arrays, reasons = decode_update(record, EXPECTED)
    # Assert
    assert reasons == ["unknown array 'encoder.backdoor': not part of this client's sub-model"]
    assert sorted(arrays) == ["encoder.weight", "heads.emotion.weight"]


def test_a_count_above_the_profiled_count_is_a_reason():
    # Execute
    reasons = _validate(_delta(), num_examples=33, profiled_examples=32)
    # Assert
    assert reasons == ["num_examples 33 is more than the 32 training examples the device reported in its profile"]
    assert _validate(_delta(), num_examples=32, profiled_examples=32) == []


# ---------------------------------------------------------------- evaluation replies


def test_a_valid_evaluation_gives_its_scores_per_task():
    # Execute
    scores, reasons = validate_evaluation({"num-examples": 7, "emotion-n": 5, "emotion-accuracy": 0.6,
                                           "emotion-uar": 0.5, "kws-n": 0, "kws-accuracy": math.nan})
    # Assert: a task with no examples is not scored, whatever its figures say
    assert reasons == [] and scores == {"emotion": (5, 0.6, 0.5)}


@pytest.mark.parametrize("metrics, fragment", [
    ({"emotion-n": 5, "emotion-accuracy": math.nan, "emotion-uar": 0.5}, "emotion-accuracy must be a finite"),
    ({"emotion-n": 5, "emotion-accuracy": 0.5}, "emotion-uar must be a finite number in [0, 1]; got None"),
    ({"kws-n": 5, "kws-accuracy": -0.1, "kws-uar": 0.5}, "kws-accuracy"),
    ({"kws-n": 5, "kws-accuracy": 0.5, "kws-uar": [0.5]}, "kws-uar"),
    ({"emotion-n": 1e9, "emotion-accuracy": 0.5, "emotion-uar": 0.5}, "implausible for one device (limit 1000000)"),
    ({"emotion-n": -1, "emotion-accuracy": 0.5, "emotion-uar": 0.5}, "emotion-n must be an integer >= 0"),
    ({"emotion-n": 2.5, "emotion-accuracy": 0.5, "emotion-uar": 0.5}, "emotion-n must be an integer >= 0"),
    ({"num-examples": math.inf}, "num-examples must be an integer >= 0"),
])
def test_an_invalid_evaluation_has_a_reason_and_no_scores(metrics, fragment):
    # Execute
    scores, reasons = validate_evaluation(metrics)
    # Assert
    assert scores == {} and any(fragment in r for r in reasons), reasons
