"""Property tests: invariance under strictly increasing transforms and under permutations, and symmetry."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from invert_ad.metrics import aupro, auroc, average_precision, f1_max

SETTINGS = settings(max_examples=40, deadline=None)

scored_labels = st.integers(min_value=2, max_value=40).flatmap(
    lambda n: st.tuples(
        arrays(np.int64, n, elements=st.integers(-20, 20)),
        arrays(np.bool_, n).filter(lambda labels: 0 < labels.sum() < labels.size),
        st.randoms(use_true_random=False),
    )
)


def increasing(x):
    """Strictly increasing and exact in float64 on small integers."""
    return x.astype(np.float64) ** 3 + 2.0 * x


@SETTINGS
@given(scored_labels)
@pytest.mark.parametrize("metric", [auroc, average_precision, f1_max])
def test_invariant_under_increasing_transforms(metric, case):
    scores, labels, _ = case
    assert metric(increasing(scores), labels) == pytest.approx(metric(scores, labels), abs=1e-12)
    assert metric(3.0 * scores + 7.0, labels) == pytest.approx(metric(scores, labels), abs=1e-12)


@SETTINGS
@given(scored_labels)
@pytest.mark.parametrize("metric", [auroc, average_precision, f1_max])
def test_invariant_under_permutation(metric, case):
    scores, labels, random = case
    order = np.array(random.sample(range(scores.size), scores.size))
    assert metric(scores[order], labels[order]) == pytest.approx(metric(scores, labels), abs=1e-12)


@SETTINGS
@given(scored_labels)
def test_auroc_of_reversed_scores_is_the_complement(case):
    scores, labels, _ = case
    assert auroc(-scores, labels) == pytest.approx(1.0 - auroc(scores, labels), abs=1e-12)


maps_and_masks = st.integers(min_value=1, max_value=4).flatmap(
    lambda n: st.tuples(
        arrays(np.int64, (n, 5, 5), elements=st.integers(-5, 5)),
        arrays(np.bool_, (n, 5, 5)).filter(lambda masks: 0 < masks.sum() < masks.size),
        st.randoms(use_true_random=False),
    )
)


@SETTINGS
@given(maps_and_masks)
def test_aupro_invariances(case):
    maps, masks, random = case
    value = aupro(maps, masks)
    assert 0.0 <= value <= 1.0
    assert aupro(increasing(maps), masks) == pytest.approx(value, abs=1e-12)
    order = np.array(random.sample(range(len(maps)), len(maps)))
    assert aupro(maps[order], masks[order]) == pytest.approx(value, abs=1e-12)
    # Rotating every image moves the pixels but keeps each region's pixels together.
    assert aupro(np.rot90(maps, axes=(1, 2)), np.rot90(masks, axes=(1, 2))) == pytest.approx(value, abs=1e-12)
