"""Image-level AUROC, AP and F1-max against scikit-learn, hand-made cases and input validation."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from invert_ad.metrics import auroc, average_precision, f1_max


def sklearn_f1_max(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return f1.max()


def random_case(seed, n, levels):
    """Scores with many ties (``levels`` distinct values, or continuous when None) and random labels."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[:2] = [False, True]
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    if levels is not None:
        scores = np.round(scores * levels / 4) / levels
    return scores, labels


@pytest.mark.parametrize("levels", [None, 2, 5, 40])
@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_with_ties(seed, levels):
    scores, labels = random_case(seed, n=300, levels=levels)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert f1_max(scores, labels) == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-12)


def test_hand_computed_example():
    # Pairs (anomalous, normal): 0.35 beats 0.1 only, 0.8 beats both -> AUROC 3/4.
    # Thresholds 0.8, 0.4, 0.35: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 + 1/2 * 2/3.
    # F1 = 2 TP / (TP + FP + P): 2/3 at 0.8, 1/2 at 0.4, 4/5 at 0.35.
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    assert auroc(scores, labels) == pytest.approx(0.75)
    assert average_precision(scores, labels) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert f1_max(scores, labels) == pytest.approx(0.8)


def test_ties_across_classes_count_half():
    assert auroc([1.0, 1.0], [0, 1]) == pytest.approx(0.5)
    assert auroc([0.0, 1.0, 1.0, 2.0], [0, 0, 1, 1]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)


def test_accepts_torch_and_bool_and_float_labels():
    scores, labels = random_case(0, n=50, levels=None)
    expected = auroc(scores, labels)
    assert auroc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(expected)
    assert auroc(scores.astype(np.float32), labels.astype(np.float32)) == pytest.approx(expected, abs=1e-6)
    assert auroc(torch.from_numpy(scores).to(torch.bfloat16), labels.astype(int)) == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, 0.2, 0.3], [0, 1], "differ in length"),
        ([[0.1, 0.2]], [[0, 1]], "1-D"),
        ([0.1, 0.2, 0.3], [0, 1, 2], "binary"),
        ([0.1, 0.2, 0.3], [0, 1, -1], "binary"),
        ([0.1, float("nan"), 0.3], [0, 1, 1], "NaN or infinite"),
        ([0.1, float("inf"), 0.3], [0, 1, 1], "NaN or infinite"),
        ([0.1, 0.2, 0.3], [1, 1, 1], "only anomalous"),
        ([0.1, 0.2, 0.3], [0, 0, 0], "only normal"),
        (["a", "b"], [0, 1], "real numbers"),
    ],
)
@pytest.mark.parametrize("metric", [auroc, average_precision, f1_max])
def test_invalid_inputs_raise(metric, scores, labels, message):
    with pytest.raises(ValueError, match=message):
        metric(scores, labels)
