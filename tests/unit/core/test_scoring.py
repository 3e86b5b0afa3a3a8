"""Scorers checked against numpy on hand-made latents."""

import math

import numpy as np
import pytest
import torch

from invert_ad.scoring import (
    HybridScorer,
    MaxMinScorer,
    NLLScorer,
    NotFittedError,
    Scorer,
    create_scorer,
    hybrid_from_components,
    list_scorers,
    register_scorer,
)


def np_norm_map(z):
    return np.sqrt((z**2).sum(axis=1))


@pytest.fixture
def latents():
    return torch.randn(6, 5, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_hand_made_latent():
    z = torch.zeros(1, 2, 2, 2)
    z[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # norm 5 at (0, 0), zero elsewhere
    out = NLLScorer().score(z)
    assert out.raw_map[0].tolist() == [[5.0, 0.0], [0.0, 0.0]]
    assert out.raw_score.item() == pytest.approx(0.5 * 25 + 4 * math.log(2 * math.pi), rel=1e-6)
    assert MaxMinScorer().score(z).raw_score.item() == 5.0


def test_nll_and_maxmin_against_numpy(latents):
    z = latents.numpy()
    nll = 0.5 * (z**2).reshape(6, -1).sum(1) + 0.5 * z[0].size * np.log(2 * np.pi)
    np.testing.assert_allclose(NLLScorer().score(latents).components["nll"].numpy(), nll, rtol=1e-12)
    maps = np_norm_map(z)
    np.testing.assert_allclose(NLLScorer().score(latents).raw_map.numpy(), maps, rtol=1e-6)
    spread = maps.reshape(6, -1).max(1) - maps.reshape(6, -1).min(1)
    np.testing.assert_allclose(MaxMinScorer().score(latents).raw_score.numpy(), spread, rtol=1e-5)


def np_terms(z):
    maps = np_norm_map(z).reshape(len(z), -1)
    return 0.5 * (z**2).reshape(len(z), -1).sum(1), maps.max(1) - maps.min(1)


def test_hybrid_standardize_against_numpy(latents):
    train, test = latents[:4], latents[4:] * 3
    scorer = HybridScorer().fit(train)
    nll_tr, mm_tr = np_terms(train.numpy())
    nll_te, mm_te = np_terms(test.numpy())
    expected = (nll_te - nll_tr.mean()) / nll_tr.std(ddof=1) + (mm_te - mm_tr.mean()) / mm_tr.std(ddof=1)
    np.testing.assert_allclose(scorer.score(test).raw_score.numpy(), expected, rtol=1e-5)


def test_hybrid_minmax_and_transductive(latents):
    nll, mm = np_terms(latents.numpy())
    expected = (nll - nll.min()) / (nll.max() - nll.min()) + (mm - mm.min()) / (mm.max() - mm.min())
    out = HybridScorer(normalization="test-minmax").score(latents)
    np.testing.assert_allclose(out.raw_score.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(
        hybrid_from_components(out.components["nll"], out.components["maxmin"]).numpy(), expected, rtol=1e-10
    )
    fitted = HybridScorer(normalization="minmax").fit(latents)
    np.testing.assert_allclose(fitted.score(latents).raw_score.numpy(), expected, rtol=1e-5)


def test_hybrid_needs_fit_and_round_trips(latents):
    scorer = HybridScorer()
    with pytest.raises(NotFittedError, match="fit"):
        scorer.score(latents)
    scorer.fit(latents)
    clone = HybridScorer(**scorer.get_config())
    clone.load_state_dict(scorer.state_dict())
    torch.testing.assert_close(clone.score(latents).raw_score, scorer.score(latents).raw_score)
    with pytest.raises(ValueError, match="location"):
        clone.load_state_dict({"location": torch.zeros(3)})
    with pytest.raises(ValueError, match="two normal samples"):
        HybridScorer().fit(latents[:1])


def test_registry():
    assert {"nll", "maxmin", "hybrid", "irf", "reconstruction", "max"} <= set(list_scorers())
    assert create_scorer("irf").latent == "irf"
    assert create_scorer("reconstruction").latent == "reconstruction"
    with pytest.raises(ValueError, match="unknown scoring 'bogus'"):
        create_scorer("bogus")
    with pytest.raises(ValueError, match="latent"):
        NLLScorer(latent="pixels")

    class Mean(Scorer):
        name = "mean-test"

        def score(self, latents):
            maps = latents.abs().mean(1)
            return type(NLLScorer().score(latents))(maps.flatten(1).mean(1), maps)

    register_scorer("mean-test", Mean)
    assert isinstance(create_scorer("mean-test"), Mean)
    with pytest.warns(UserWarning, match="registered again"):
        register_scorer("mean-test", Mean)
