"""Inference speed settings agree with the eager fp32 path: torch.compile, channels-last, bf16 autocast.

The eager path's values are checked against closed forms elsewhere (tests/unit/core); here each setting is
compared with it on real lite0 features of real tire images. Compiling costs 10-40 s on CPU, so the compiled
detector is built once per module.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from invert_ad.acceleration import (
    COMPILE_MODES,
    check_autocast_dtype,
    check_compile_mode,
    compile_function,
    pad_batch,
)
from invert_ad.models import create_denoiser
from invert_ad.scorer import InversionScorer


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_compile_mode_and_dtype_are_validated() -> None:
    assert check_compile_mode(None) is None
    for mode in COMPILE_MODES:
        assert check_compile_mode(mode) == mode
    with pytest.raises(ValueError, match="compile_mode must be None or one of default, reduce-overhead"):
        check_compile_mode("fast")
    assert check_autocast_dtype("bfloat16") is torch.bfloat16
    assert check_autocast_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match=r"'bfloat16' or 'float16'; got torch\.float32"):
        check_autocast_dtype(torch.float32)
    model = create_denoiser("mlp", in_channels=4, grid_size=2, hidden_size=8, depth=1)
    with pytest.raises(ValueError, match="compile_mode"):
        InversionScorer(model, DDPMScheduler(), compile_mode="turbo")


def test_a_bad_setting_leaves_the_detector_as_it_was(detector) -> None:
    before = detector.inference_settings()
    with pytest.raises(ValueError, match="compile_mode"):
        detector.optimize(compile_mode="turbo", channels_last=True)
    with pytest.raises(ValueError, match="autocast dtype"):
        detector.optimize(autocast_dtype="int8")
    with pytest.raises(ValueError, match="compile batch_size must be a positive int"):
        detector.optimize(compile_mode="default", compile_batch_size=0)
    assert detector.inference_settings() == before


def test_padding_to_the_compiled_batch_size(monkeypatch) -> None:
    seen: list[tuple[int, ...]] = []

    def fake_compile(fn, mode, dynamic):  # records what the compiled graph would see, runs fn eagerly
        assert mode == "default" and dynamic is False

        def graph(x):
            seen.append(tuple(x.shape))
            return fn(x)

        return graph

    monkeypatch.setattr(torch, "compile", fake_compile)
    double = compile_function(lambda x: 2 * x, "default", batch_size=4)
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(double(x), 2 * x)  # padded to 4 rows, the extra row dropped
    assert torch.equal(double(x[:1]), 2 * x[:1])
    assert torch.equal(double(torch.ones(6, 2)), 2 * torch.ones(6, 2))  # larger: run as it is
    assert seen == [(4, 2), (4, 2), (6, 2)]
    assert torch.equal(pad_batch(x, 5)[3:], x[2:].expand(2, 2)) and pad_batch(x, 2) is x


@pytest.fixture(scope="module")
def detector(make_detector):
    return make_detector("gaussian-residual-conv", scoring="hybrid")


@pytest.fixture(scope="module")
def eager_scores(detector, tire_images):
    out = detector.score(tire_images["test"])
    return out.raw_score, out.raw_map


def test_channels_last_backbone_matches_contiguous(detector, tire_images, eager_scores) -> None:
    detector.optimize(channels_last=True)
    try:
        out = detector.score(tire_images["test"])
        kernels = [p for p in detector.feature_extractor.parameters() if p.dim() == 4 and p.shape[-1] > 1]
        assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    finally:
        detector.optimize()
    assert relative_error(out.raw_score, eager_scores[0]) < 1e-5
    assert relative_error(out.raw_map, eager_scores[1]) < 1e-5


def test_bf16_autocast_stays_close_and_keeps_float32_outputs(detector, tire_images, eager_scores) -> None:
    images = tire_images["test"]
    features = detector.extract(images)
    detector.optimize(autocast_dtype="bfloat16")
    try:
        denoiser_only = detector.score(images)
        same_features = detector.extract(images)
        detector.optimize(autocast_dtype=torch.bfloat16, autocast_backbone=True)
        low = detector.extract(images)
        both = detector.score(images)
    finally:
        detector.optimize()
    assert detector.scorer.autocast_dtype is None  # optimize() with no arguments restores the eager fp32 path
    assert torch.equal(same_features, features)  # the backbone stays fp32 unless asked
    assert 0 < relative_error(denoiser_only.raw_score, eager_scores[0]) < 0.02
    assert low.dtype == torch.float32 and both.raw_score.dtype == torch.float32
    assert 0.01 < relative_error(low, features) < 0.25  # bf16's 8-bit mantissa, compounded over the backbone


@pytest.mark.long
def test_compiled_detector_matches_eager_across_batch_sizes(detector, tire_images, eager_scores) -> None:
    images = tire_images["test"]
    detector.optimize(compile_mode="default")
    try:
        whole = detector.score(images)
        first, rest = detector.score(images[:4]), detector.score(images[4:])  # two more shapes: recompiles
        with pytest.raises(ValueError, match="in \\[0, 1\\]"):  # the value check runs outside the graph
            detector.score(images * 3)
        latents = detector.scorer.latents(detector.extract(images), batch_size=4)
    finally:
        detector.optimize()
    assert detector.scorer.compile_mode is None and detector._backbone is detector.feature_extractor
    assert relative_error(whole.raw_score, eager_scores[0]) < 1e-5
    assert relative_error(whole.raw_map, eager_scores[1]) < 1e-5
    split = torch.cat([first.raw_score, rest.raw_score])
    assert relative_error(split, eager_scores[0]) < 1e-5
    eager_latents = detector.scorer.latents(detector.extract(images))
    assert relative_error(latents, eager_latents) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_outputs_survive_later_batches(make_detector, tire_images) -> None:
    detector = make_detector("gaussian-residual-conv", scoring="hybrid")
    features = detector.extract(tire_images["test"]).cuda()
    detector.scorer.denoiser.cuda()
    eager = detector.scorer.latents(features, batch_size=2)
    detector.scorer.compile("reduce-overhead")
    graphed = detector.scorer.latents(features, batch_size=2)  # three replays of one graph, then cat
    assert relative_error(graphed, eager) < 1e-4
