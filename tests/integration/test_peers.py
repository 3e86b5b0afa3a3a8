"""Checkpoints written by other detectors' own code reproduce those networks' outputs through this library.

Every folder under ``../shared/peers`` (or ``$INVERT_AD_PEERS``) holds a checkpoint saved by a peer's code, the
``config.json`` it was run with, a ``README.md`` and ``reference.safetensors`` (inputs and the peer's own
outputs). Each test reads only that folder: it builds the model from the checkpoint and ``config.json`` through
the public loaders, reproduces every reference output single-threaded in float32 within the tolerance the
README states, and scores a few images end to end with :class:`~invert_ad.InversionScorer`.

Tolerance. A README records the largest difference between float32 runs of the peer's own code (1 vs 2
threads) and allows "roughly 1e-6 relative to the largest value" across devices; the tolerance of a tensor is
the larger of the two. The references were computed on another machine, whose float32 kernels round
differently from this one's, so float32 outputs must match to :data:`FLOAT32_FACTOR` times that; where the
reference network can be evaluated in float64 here, that evaluation must match to the tolerance itself, which
separates rounding from a wrong architecture (a wrong one misses by orders of magnitude).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from invert_ad import InversionScorer
from invert_ad.adapters import (
    DDADAdapter,
    DiADAdapter,
    DiffusionADAdapter,
    load_official_invad,
    official_invad_scheduler,
)
from invert_ad.adapters.diad import normalise_images
from invert_ad.io import load_tensors
from invert_ad.scoring import HybridScorer

pytestmark = pytest.mark.integration

PEERS = Path(os.environ.get("INVERT_AD_PEERS", Path(__file__).resolve().parents[2].parent / "shared" / "peers"))
FLOAT32_FACTOR = 4.0
"""float32 outputs here vs the references (measured: at most 2.3 x the README tolerance)."""

_DIFF = re.compile(r"`(\w+)` (?:max \|diff\| ([0-9.eE+-]+)|bit-identical) \(max \|value\| ([0-9.eE+-]+)\)")
_RELATIVE = re.compile(r"roughly ([0-9.eE+-]+) relative to the largest value")


def _folders() -> list[Path]:
    if not PEERS.is_dir():
        return []
    return sorted(p for p in PEERS.iterdir() if (p / "config.json").is_file())


FOLDERS = _folders()


class Peer:
    """One fixture folder: its config, reference tensors and tolerances."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = json.loads((folder / "config.json").read_text())
        self.ref = load_tensors(folder / "reference.safetensors")
        self.checkpoint = folder / self.config["checkpoint_file"]
        readme = (folder / "README.md").read_text()
        self.observed: dict[str, float] = {}
        for name, diff, _ in _DIFF.findall(readme):
            self.observed[name] = max(self.observed.get(name, 0.0), float(diff or 0.0))
        relative = _RELATIVE.search(readme)
        assert relative, f"{folder}/README.md states no relative tolerance"
        self.relative = float(relative.group(1))

    def tolerance(self, name: str, factor: float = 1.0) -> float:
        """``factor`` x max(observed run-to-run difference, relative x max |reference|)."""
        largest = float(self.ref[name].abs().max())
        return factor * max(self.observed.get(name, 0.0), self.relative * largest)

    def check(
        self, name: str, value: torch.Tensor, *, float64: bool = False, expected: torch.Tensor | None = None
    ) -> None:
        """``value`` against reference ``name`` (or ``expected``, a part of it), within its tolerance."""
        part = expected is not None
        expected = self.ref[name] if expected is None else expected
        assert value.shape == expected.shape, (name, tuple(value.shape), tuple(expected.shape))
        diff = float((value.double() - expected.double()).abs().max())
        tol = self.tolerance(name, 1.0 if float64 else FLOAT32_FACTOR)
        name = f"{name} (part)" if part else name
        print(f"{self.folder.name}: {name}{' (float64)' if float64 else ''} max |diff| {diff:.3g}, tolerance {tol:.3g}")
        assert diff <= tol, f"{self.folder.name} {name}: max |diff| {diff:.3g} > tolerance {tol:.3g}"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- per peer: load, reproduce, score
def _pixel(peer: Peer, adapter: Any) -> None:
    ref = peer.ref
    x0 = adapter.encode(ref["images"])
    assert torch.equal(x0, ref["x"]), "input normalisation"
    assert float((adapter.alphas_cumprod - ref["alphas_cumprod"].double()).abs().max()) < 1e-6
    timesteps, mixed = ref["timesteps"].long(), ref["timesteps_mixed"].long()
    batch, k = len(x0), len(timesteps)
    with torch.no_grad():  # every reference call in one batch: K uniform calls, then the mixed one
        t = torch.cat([timesteps.repeat_interleave(batch), mixed])
        eps = adapter(x0.repeat(k + 1, 1, 1, 1), t)
        peer.check("eps", eps[: k * batch].reshape(ref["eps"].shape))
        peer.check("eps_mixed", eps[k * batch :])
        adapter.double()  # one sample in float64
        eps64 = adapter(x0[:1].double(), int(timesteps[-1]))
        peer.check("eps", eps64, float64=True, expected=ref["eps"][-1][:1])
        adapter.float()
    _score_end_to_end(adapter, ref["images"][:2])


def _ddad(peer: Peer) -> None:
    _pixel(peer, DDADAdapter.from_checkpoint(peer.checkpoint, peer.folder / "config.json"))


def _diffusionad(peer: Peer) -> None:
    adapter = DiffusionADAdapter.from_checkpoint(peer.checkpoint)  # its args are in the file
    configured = DiffusionADAdapter.from_checkpoint(peer.checkpoint, peer.folder / "config.json")
    assert repr(adapter.model) == repr(configured.model)
    _pixel(peer, adapter)


def _diad(peer: Peer) -> None:
    ref = peer.ref
    context = ref["context"]
    adapter = DiADAdapter.from_checkpoint(peer.checkpoint, peer.folder / "config.json", context=context[:1])
    assert adapter.scaling_factor == peer.config["scale_factor"] and adapter.only_mid_control
    assert float((adapter.alphas_cumprod - ref["alphas_cumprod"].double()).abs().max()) < 1e-6
    images = ref["images"]
    assert float((normalise_images(images, adapter.hint_normalisation) - ref["hint"]).abs().max()) < 1e-6
    with torch.no_grad():
        posterior = adapter.vae.encode(normalise_images(images, adapter.image_normalisation)).latent_dist
        peer.check("posterior_mean", posterior.mean)
        peer.check("posterior_std", posterior.std)
        peer.check("latent_mode", adapter.encode(images))
        x = ref["x"]
        eps = torch.stack([adapter.eps(x, int(t), hint=images, context=context) for t in ref["timesteps"]])
        peer.check("eps", eps)
        peer.check("eps_mixed", adapter.eps(x, ref["timesteps_mixed"], hint=images, context=context))
        adapter.double()
        eps64 = adapter.eps(x.double(), int(ref["timesteps"][-1]), hint=images.double(), context=context.double())
        peer.check("eps", eps64, float64=True, expected=ref["eps"][-1])
        adapter.float()
    _score_end_to_end(adapter, images)


def _invad(peer: Peer) -> None:
    ref = peer.ref
    recorded = {**peer.config.get("defaults_in_effect", {}), **peer.config.get("diffusion_config", {})}
    model = load_official_invad(peer.checkpoint, num_heads=int(recorded.get("num_heads", 8)))
    scheduler = official_invad_scheduler()
    assert torch.equal(scheduler.alphas_cumprod, ref["alphas_cumprod"])
    features = ref["features"]
    with torch.no_grad():
        eps = torch.stack([model(features, torch.full((len(features),), int(t))).sample for t in ref["timesteps"]])
        peer.check("eps", eps)
        mixed = model(features[: len(ref["timesteps_mixed"])], ref["timesteps_mixed"]).sample
        peer.check("eps_mixed", mixed)
    steps = int(peer.config["evaluation"]["eval_step"])
    scorer = InversionScorer(
        model, scheduler, timesteps=f"official:{steps}", scoring=HybridScorer(normalization="test-minmax")
    )
    assert list(scorer.grid.call_points) == ref["inversion_timesteps"].tolist()
    out = scorer.score(features)
    peer.check("latents", out.latent)
    peer.check("nll", out.components["nll"])
    peer.check("maxmin", out.components["maxmin"])
    peer.check("hybrid", out.raw_score)
    maps = F.interpolate(out.raw_map[:, None], size=ref["anomaly_maps"].shape[-2:], mode="bilinear")[:, 0]
    peer.check("anomaly_maps", maps)
    scorer64 = InversionScorer(model.double(), scheduler, timesteps=f"official:{steps}", scoring="nll")
    # The official float64 run keeps its timestep embedding in float32 (config.json "float64"), as FeatureDiT does;
    # float32 cos / sin of arguments up to 999 round differently on AVX2 and AVX-512 kernels (about 1e-6 relative in
    # eps, measured 7.7e-6 on an AVX-512 Xeon against 4.0e-6 allowed), so these references carry float32 error.
    with torch.no_grad():
        eps64 = torch.stack([model(features.double(), int(t)).sample for t in ref["timesteps"]])
        peer.check("eps_f64", eps64, float64=False)
    peer.check("latents_f64", scorer64.invert(features.double()), float64=False)


BUILDERS: dict[str, Callable[[Peer], None]] = {
    "DDAD": _ddad,
    "DiffusionAD": _diffusionad,
    "DiAD": _diad,
    "InversionAD": _invad,
}


def _score_end_to_end(adapter: Any, images: torch.Tensor) -> None:
    """Fit a hybrid scorer on some images and score others through the adapter's conditioning."""
    scorer = InversionScorer(adapter, adapter.scheduler, timesteps=1, scoring="hybrid")
    normal = images.flip(-1)
    with adapter.condition(normal) as x0:
        scorer.fit(x0)
    with adapter.condition(images) as x0:
        out = scorer.score(x0)
    assert out.raw_score.shape == (len(images),) and torch.isfinite(out.raw_score).all()
    pixel = adapter.to_pixel_map(out.raw_map, images.shape[-2:])
    assert pixel.shape == (len(images), *images.shape[-2:]) and torch.isfinite(pixel).all()
    assert math.isfinite(float(out.latent.abs().max()))


@pytest.mark.skipif(not FOLDERS, reason=f"no peer folders under {PEERS} (set INVERT_AD_PEERS)")
@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_peer_checkpoint_reproduces_its_network(folder: Path) -> None:
    peer = Peer(folder)
    name = str(peer.config["peer"]).split()[0]
    assert name in BUILDERS, f"{folder}: unknown peer {peer.config['peer']!r}; known: {sorted(BUILDERS)}"
    BUILDERS[name](peer)


def test_skips_only_without_folders() -> None:
    """The reason printed when nothing runs names the folder searched."""
    if FOLDERS:
        assert all((p / "reference.safetensors").is_file() and (p / "README.md").is_file() for p in FOLDERS)
    else:
        pytest.skip(f"no peer folders under {PEERS} (set INVERT_AD_PEERS)")
