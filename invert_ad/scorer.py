"""InversionScorer: a denoiser, its schedule, an inversion grid and a scorer, tied together.

It works on feature maps ``(B, C, h, w)`` in the denoiser's space. Turning images into features is the job
of :mod:`invert_ad.features`; :class:`invert_ad.pipeline.AnomalyDetector` composes both with calibration.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .acceleration import autocast, check_autocast_dtype, check_compile_mode, compile_function
from .adapters.diffusers import denoiser_in_channels, make_eps_fn
from .hub import load_json, model_class, resolve_model_dir, scheduler_class
from .inversion import add_noise, ddim_integrate, one_step_irf
from .io import atomic_save_tensors, atomic_write_json, load_tensors
from .schedule import InversionGrid, alphas_cumprod_of, prediction_type_of, resolve_grid, spaced_grid
from .scoring import Scorer, create_scorer, load_map_statistic, scorer_class

CONFIG_NAME = "scorer_config.json"
STATE_NAME = "scorer_state.safetensors"
MAP_STATISTIC_DIR = "map_statistic"

__all__ = ["InversionScorer", "ScoreOutput", "first_tensor"]


@dataclass(frozen=True)
class ScoreOutput:
    """Scores of a batch of feature maps.

    Attributes:
        image_scores: ``(B,)`` float32, higher is more anomalous.
        anomaly_maps: ``(B, h, w)`` float32 on the feature grid, higher is more anomalous.
        latents: ``(B, C, h, w)``, the latent the scorer read (final inverted latent, IRF field, or
            reconstruction residual ``x0 - x0hat``).
        components: raw per-image statistics by name, each ``(B,)``.
    """

    image_scores: torch.Tensor
    anomaly_maps: torch.Tensor
    latents: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)


def first_tensor(module: Any) -> torch.Tensor | None:
    """The first parameter, else the first buffer, of a module (``None`` for plain callables)."""
    for attribute in ("parameters", "buffers"):
        tensors = getattr(module, attribute, None)
        found = next(iter(tensors()), None) if callable(tensors) else None
        if found is not None:
            return found
    return None


class InversionScorer:
    """Reconstruction-free anomaly scoring by deterministic DDIM inversion (InvAD) or one step (OSD-IRF).

    Args:
        denoiser: a diffusers ``UNet2DModel`` / ``DiTTransformer2DModel`` / ``ModelMixin``, a learned-sigma
            model (``2C`` outputs), or any callable ``f(x, t) -> eps``.
        scheduler: a diffusers scheduler with ``alphas_cumprod`` (DDPM, DDIM, ...). Only ``alphas_cumprod`` and
            ``config.prediction_type`` are read.
        timesteps: the inversion grid: ``"paper"`` (points 0, 333, 666, 999), ``"official"`` (calls at 0, 500,
            999, terminal alpha-bar 0), an int S, a spacing ``"quad"`` / ``"quad:5"`` (uniform, quad, cube,
            exp), a list of points or an :class:`~invert_ad.schedule.InversionGrid`.
        scoring: a registered name (``nll``, ``maxmin``, ``hybrid``, ``max``, ``irf``, ``reconstruction``) or a
            :class:`~invert_ad.scoring.Scorer`.
        irf_timestep: t of the one-step IRF latent.
        reconstruction_timestep: noise level t_r of the reconstruction baseline.
        reconstruction_steps: denoising calls of the baseline (default: the grid's number of calls, at most
            ``reconstruction_timestep``).
        reconstruction_seed: seed of the baseline's fixed noise.
        autocast_dtype: run the denoiser under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16`` on
            CUDA); the ODE update stays in the features' dtype.
        compile_mode: ``torch.compile`` the whole latent computation (all network calls and ODE updates of a
            batch in one graph) with this mode; ``"reduce-overhead"`` replays it as one CUDA graph on a GPU.
            See :mod:`invert_ad.acceleration`. Neither this nor ``autocast_dtype`` is saved.
        map_statistic: a fitted statistic of the features, ``f(features (B, C, h, w)) -> (B, h, w)``, that forms
            the anomaly maps instead of the scorer's latent map (the image score still comes from the latent),
            e.g. :class:`~invert_ad.scoring.feature_maps.MahalanobisMap`. Saved with the model.

    Example:
        >>> scorer = InversionScorer(unet, DDPMScheduler(), timesteps="paper", scoring="hybrid")
        >>> scorer.fit(normal_features)                  # hybrid normalisation on normal data only
        >>> out = scorer.score(features)                 # out.image_scores (B,), out.anomaly_maps (B, h, w)
    """

    def __init__(
        self,
        denoiser: Any,
        scheduler: Any,
        *,
        timesteps: Any = "paper",
        scoring: str | Scorer = "hybrid",
        irf_timestep: int = 500,
        reconstruction_timestep: int = 500,
        reconstruction_steps: int | None = None,
        reconstruction_seed: int = 0,
        autocast_dtype: torch.dtype | str | None = None,
        compile_mode: str | None = None,
        map_statistic: Any | None = None,
    ) -> None:
        if not callable(denoiser):
            raise TypeError(f"denoiser must be a model or a callable f(x, t), got {type(denoiser).__name__}")
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.alphas_cumprod = alphas_cumprod_of(scheduler)
        self.prediction_type = prediction_type_of(scheduler)
        num_train_timesteps = len(self.alphas_cumprod)
        self.grid: InversionGrid = resolve_grid(timesteps, num_train_timesteps)
        self._grid_alpha_bars = self.grid.alpha_bars(self.alphas_cumprod)  # constants, also for tracing
        self.scorer: Scorer = create_scorer(scoring) if isinstance(scoring, str) else scoring
        if not isinstance(self.scorer, Scorer):
            raise TypeError(f"scoring must be a scorer name or a Scorer instance, got {type(scoring).__name__}")
        for name, value in (("irf_timestep", irf_timestep), ("reconstruction_timestep", reconstruction_timestep)):
            if not isinstance(value, int) or not 0 <= value < num_train_timesteps:
                raise ValueError(f"{name} must be an int in [0, {num_train_timesteps - 1}], got {value!r}")
        self.irf_timestep = irf_timestep
        self.reconstruction_timestep = reconstruction_timestep
        self.reconstruction_steps = reconstruction_steps or min(self.grid.num_calls, max(reconstruction_timestep, 1))
        if self.reconstruction_steps > max(reconstruction_timestep, 1):
            raise ValueError(
                f"reconstruction_steps={self.reconstruction_steps} exceeds reconstruction_timestep="
                f"{reconstruction_timestep}"
            )
        self.reconstruction_seed = reconstruction_seed
        self.autocast_dtype = check_autocast_dtype(autocast_dtype)
        self._eps_fn = make_eps_fn(denoiser, self.alphas_cumprod, self.prediction_type)
        self.compile(compile_mode)
        if map_statistic is not None and not callable(map_statistic):
            raise TypeError(f"map_statistic must be callable on features, got {type(map_statistic).__name__}")
        self.map_statistic = map_statistic

    # ------------------------------------------------------------------ plumbing
    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def compile_mode(self) -> str | None:
        """The ``torch.compile`` mode of the latent computation, or ``None`` (eager); see :meth:`compile`."""
        return self._compile_mode

    def compile(self, mode: str | None, batch_size: int | None = None) -> InversionScorer:
        """Compile the latent computation with ``mode`` (``None``: back to eager); returns ``self``.

        Args:
            mode: one of :data:`~invert_ad.acceleration.COMPILE_MODES` or ``None``.
            batch_size: pad smaller batches to this size so they reuse the compiled graph
                (see :func:`~invert_ad.acceleration.compile_function`).
        """
        check_compile_mode(mode)
        self._latent_fn = (
            self.compute_latent if mode is None else compile_function(self.compute_latent, mode, batch_size)
        )
        self._compile_mode = mode
        return self

    @property
    def nfe(self) -> int:
        """Network calls per image for the configured scorer."""
        return {"inversion": self.grid.num_calls, "irf": 1, "reconstruction": self.reconstruction_steps}[
            self.scorer.latent
        ]

    def _placement(self, x: torch.Tensor) -> tuple[torch.device, torch.dtype]:
        param = first_tensor(self.denoiser)
        if param is None:
            return x.device, x.dtype if x.is_floating_point() else torch.float32
        return param.device, param.dtype if param.is_floating_point() else torch.float32

    def _check_features(self, features: Any) -> torch.Tensor:
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor of shape (B, C, h, w), got {type(features).__name__}")
        if features.dim() != 4:
            raise ValueError(f"features must have shape (B, C, h, w), got {tuple(features.shape)}")
        if features.shape[0] == 0:
            raise ValueError("features hold an empty batch")
        expected = denoiser_in_channels(self.denoiser)
        if expected is not None and features.shape[1] != expected:
            raise ValueError(f"features have {features.shape[1]} channels but the denoiser expects {expected}")
        if not torch.isfinite(features).all():
            raise ValueError("features contain NaN or infinite values")
        device, dtype = self._placement(features)
        return features.to(device=device, dtype=dtype)

    def _eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.autocast_dtype):
            return self._eps_fn(x, t).to(x.dtype)

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        with torch.inference_mode():
            yield

    @staticmethod
    def _batches(features: torch.Tensor, batch_size: int | None) -> list[torch.Tensor]:
        if batch_size is None:
            return [features]
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        return list(features.split(batch_size))

    # ------------------------------------------------------------------ latents
    def invert(self, features: torch.Tensor, return_trajectory: bool = False) -> Any:
        """DDIM-invert features along the grid to the final latent.

        Args:
            features: ``(B, C, h, w)``, the state at ``grid.points[0]``.
            return_trajectory: also return the list of ``NFE + 1`` states.

        Returns:
            The final latent ``(B, C, h, w)`` (and the trajectory if asked).
        """
        x = self._check_features(features)
        with self._inference():
            return ddim_integrate(self._eps, x, self.grid.call_points, self._grid_alpha_bars, return_trajectory)

    def irf(self, features: torch.Tensor) -> torch.Tensor:
        """OSD-IRF's one-step field ``eps(sqrt(ab_t) x0, t)`` at ``irf_timestep``, ``(B, C, h, w)``."""
        x = self._check_features(features)
        with self._inference():
            return one_step_irf(self._eps, x, self.irf_timestep, float(self.alphas_cumprod[self.irf_timestep]))

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        """The baseline: noise to ``reconstruction_timestep`` with fixed noise, DDIM-denoise to clean.

        Returns:
            The reconstruction ``x0hat``, ``(B, C, h, w)``.
        """
        x0 = self._check_features(features)
        with self._inference():
            return self._reconstruct(x0)

    def _reconstruct(self, x0: torch.Tensor) -> torch.Tensor:
        t_r, steps = self.reconstruction_timestep, self.reconstruction_steps
        points = spaced_grid(steps, "uniform", t_r + 1).points[::-1][:-1] if t_r > 0 else (0,)
        ab = self.alphas_cumprod
        alpha_bars = torch.cat([ab[list(points)], ab.new_ones(1)])
        generator = torch.Generator().manual_seed(self.reconstruction_seed)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        return ddim_integrate(self._eps, add_noise(x0, noise, float(ab[t_r])), points, alpha_bars)

    def compute_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The latent the scorer reads, without input checks or gradient mode changes (for tracing/export).

        Args:
            x: features ``(B, C, h, w)`` already on the denoiser's device and dtype.

        Returns:
            The contiguous latent ``(B, C, h, w)``: final inverted latent, IRF field, or ``x0 - x0hat``.
        """
        if self.scorer.latent == "inversion":
            latent = ddim_integrate(self._eps, x, self.grid.call_points, self._grid_alpha_bars)
        elif self.scorer.latent == "irf":
            latent = one_step_irf(self._eps, x, self.irf_timestep, float(self.alphas_cumprod[self.irf_timestep]))
        else:
            latent = x - self._reconstruct(x)
        return latent.contiguous()

    def latents(self, features: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """The latent the scorer reads (inversion, IRF or reconstruction residual), ``(B, C, h, w)``."""
        with self._inference():
            parts = [self._latent_fn(self._check_features(chunk)) for chunk in self._batches(features, batch_size)]
        return torch.cat(parts)

    # ------------------------------------------------------------------ scoring
    def fit(self, normal_features: torch.Tensor, batch_size: int | None = 64) -> InversionScorer:
        """Calibrate the scorer (e.g. the hybrid normalisation) on features of normal images only.

        Args:
            normal_features: ``(N, C, h, w)`` features of defect-free images, never the test set.
            batch_size: chunk size for the network calls.

        Returns:
            ``self``.
        """
        self.scorer.fit(self.latents(normal_features, batch_size))
        return self

    def score(self, features: torch.Tensor, batch_size: int | None = None) -> ScoreOutput:
        """Score feature maps.

        Args:
            features: ``(B, C, h, w)``.
            batch_size: chunk size for the network calls (``None``: one batch).

        Returns:
            A :class:`ScoreOutput`; higher scores are more anomalous.

        Raises:
            NotFittedError: the scorer needs :meth:`fit` first.
        """
        self.scorer.check_is_fitted()
        z = self.latents(features, batch_size)
        result = self.scorer.score(z)
        maps = self.final_maps(self._check_features(features), result.anomaly_maps)
        return ScoreOutput(result.image_scores.float(), maps.float(), z, result.components)

    def final_maps(self, features: torch.Tensor, latent_maps: torch.Tensor) -> torch.Tensor:
        """The anomaly maps ``(B, h, w)``: ``map_statistic(features)`` when one is set, else ``latent_maps``."""
        if self.map_statistic is None:
            return latent_maps
        return self.map_statistic(features).to(latent_maps.device)

    # ------------------------------------------------------------------ persistence
    def get_config(self) -> dict[str, Any]:
        """Everything but the weights and fitted state, JSON-serialisable."""
        return {
            "_class_name": type(self).__name__,
            "invert_ad_version": __version__,
            "grid": self.grid.to_dict(),
            "scorer": {"class": type(self.scorer).__name__, "config": self.scorer.get_config()},
            "irf_timestep": self.irf_timestep,
            "reconstruction_timestep": self.reconstruction_timestep,
            "reconstruction_steps": self.reconstruction_steps,
            "reconstruction_seed": self.reconstruction_seed,
            "map_statistic": None if self.map_statistic is None else self.map_statistic.get_config(),
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the denoiser, scheduler, scorer config and calibration into ``save_directory``.

        The folder may hold other files (an :class:`~invert_ad.pipeline.AnomalyDetector` adds its own).

        Raises:
            TypeError: the denoiser or scheduler cannot be saved (a plain callable has no weights format).
        """
        folder = Path(save_directory)
        for name, part in (("denoiser", self.denoiser), ("scheduler", self.scheduler)):
            if not callable(getattr(part, "save_pretrained", None)):
                raise TypeError(
                    f"the {name} ({type(part).__name__}) has no save_pretrained: only diffusers models and "
                    "schedulers (or invert_ad.models) can be saved"
                )
        folder.mkdir(parents=True, exist_ok=True)
        self.denoiser.save_pretrained(folder / "denoiser", safe_serialization=True)
        self.scheduler.save_pretrained(folder / "scheduler")
        atomic_save_tensors(self.scorer.state_dict(), folder / STATE_NAME)
        if self.map_statistic is not None:
            self.map_statistic.save_pretrained(folder / MAP_STATISTIC_DIR)
        atomic_write_json(folder / CONFIG_NAME, self.get_config())
        return folder

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        revision: str | None = None,
        token: str | None = None,
        **overrides: Any,
    ) -> InversionScorer:
        """Load a scorer saved with :meth:`save_pretrained`, from a folder or a Hub repo id.

        Args:
            pretrained: a local folder or ``user/repo`` on the Hugging Face Hub.
            device: where to put the denoiser.
            revision, token: Hub options.
            **overrides: constructor arguments to replace (e.g. ``timesteps="official"``,
                ``autocast_dtype=torch.bfloat16``). Replacing ``scoring`` drops the saved calibration.
        """
        folder = resolve_model_dir(pretrained, revision=revision, token=token)
        config = load_json(folder / CONFIG_NAME)
        denoiser_dir = folder / "denoiser"
        denoiser_config = load_json(denoiser_dir / "config.json")
        denoiser_cls = model_class(denoiser_config.get("_class_name", ""))
        shape_keys = ("in_channels", "out_channels", "sample_size")
        described = {k: denoiser_config[k] for k in shape_keys if k in denoiser_config}
        try:
            denoiser, info = denoiser_cls.from_pretrained(denoiser_dir, output_loading_info=True)
        except (ValueError, RuntimeError) as err:  # diffusers' shape-mismatch errors name neither file
            advice = r"\s*(If you want to instead overwrite|You may consider adding)"  # diffusers' tips, both paths
            why = " ".join(re.split(advice, str(err))[0].split()) or type(err).__name__
            raise ValueError(
                f"the weights in {denoiser_dir} do not match its config.json ({denoiser_cls.__name__} {described}): "
                f"{why}"
            ) from err
        wrong = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
        if wrong:  # diffusers only warns, and leaves missing tensors at their initial values
            raise ValueError(
                f"the weights in {denoiser_dir} do not match its config.json ({denoiser_cls.__name__} {described}): "
                f"{wrong}"
            )
        denoiser = denoiser.eval().requires_grad_(False)
        if device is not None:
            denoiser = denoiser.to(device)
        scheduler_config = load_json(folder / "scheduler" / "scheduler_config.json")
        scheduler = scheduler_class(scheduler_config.get("_class_name", "")).from_pretrained(folder / "scheduler")
        kwargs: dict[str, Any] = {
            "timesteps": InversionGrid.from_dict(config["grid"]),
            "irf_timestep": config["irf_timestep"],
            "reconstruction_timestep": config["reconstruction_timestep"],
            "reconstruction_steps": config["reconstruction_steps"],
            "reconstruction_seed": config["reconstruction_seed"],
        }
        if "scoring" not in overrides:
            spec = config["scorer"]
            scorer = scorer_class(spec["class"])(**spec["config"])
            scorer.load_state_dict(load_tensors(folder / STATE_NAME))
            kwargs["scoring"] = scorer
        if config.get("map_statistic") and "map_statistic" not in overrides:
            kwargs["map_statistic"] = load_map_statistic(config["map_statistic"], folder / MAP_STATISTIC_DIR, device)
        kwargs.update(overrides)
        return cls(denoiser, scheduler, **kwargs)

    def push_to_hub(self, repo_id: str, *, private: bool = True, token: str | None = None, **kwargs: Any) -> str:
        """Save to a temporary folder and upload it as a model repo; returns the commit URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return str(api.upload_folder(repo_id=repo_id, folder_path=tmp, **kwargs))

    def __repr__(self) -> str:
        return (
            f"InversionScorer(denoiser={type(self.denoiser).__name__}, grid={list(self.grid.points)}"
            f"{'' if self.grid.terminal_alpha_bar is None else f'+ab={self.grid.terminal_alpha_bar}'}, "
            f"scorer={self.scorer!r}, nfe={self.nfe})"
        )
