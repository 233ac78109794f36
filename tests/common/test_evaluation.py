import numpy as np
import pytest

from fedser.common.evaluation import classification_report

NAMES = ("a", "b", "c", "d")


def test_report_on_hand_example():
    # Prepare: class 0 all right, class 1 half right, class 2 all wrong
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 1, 0, 1, 1]
    # Execute
    r = classification_report(y_true, y_pred, NAMES)
    # Assert
    assert r["accuracy"] == pytest.approx(3 / 6)
    assert r["uar"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert r["per_class_recall"] == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert r["labels"] == ["a", "b", "c"]
    assert r["confusion"] == [[2, 0, 0], [1, 1, 0], [0, 2, 0]]
    assert r["n"] == 6


def test_predicted_class_absent_from_truth_is_a_column_not_a_recall():
    r = classification_report([0, 0], [0, 3], NAMES)
    assert r["labels"] == ["a", "d"]
    assert list(r["per_class_recall"]) == ["a"]
    assert r["uar"] == pytest.approx(0.5)


def test_uar_differs_from_accuracy_on_imbalanced_data():
    y_true = [0] * 9 + [1]
    y_pred = [0] * 10
    r = classification_report(y_true, y_pred, NAMES)
    assert r["accuracy"] == pytest.approx(0.9)
    assert r["uar"] == pytest.approx(0.5)


@pytest.mark.parametrize("y_true,y_pred", [([], []), ([0, 1], [0])])
def test_bad_input_raises(y_true, y_pred):
    with pytest.raises(ValueError):
        classification_report(np.array(y_true), np.array(y_pred), NAMES)
