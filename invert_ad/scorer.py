"""InversionScorer: a denoiser, its schedule, an inversion grid and a latent statistic, tied together.

It works on feature maps ``(B, C, h, w)`` in the denoiser's space. Turning images into features is the job
of :mod:`invert_ad.features`; :class:`invert_ad.detector.AnomalyDetector` composes both with calibration.
"""

from __future__ import annotations

import copy
import os
import re
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from ._version import __version__
from .acceleration import autocast, check_autocast_dtype, check_compile_mode, compile_function
from .denoiser import denoiser_in_channels, first_tensor, make_eps_fn
from .hub import load_json, model_class, push_folder_to_hub, resolve_model_dir, scheduler_class
from .inversion import add_noise, ddim_integrate, one_step_irf
from .io import atomic_save_tensors, atomic_write_json, load_tensors
from .schedule import InversionGrid, alphas_cumprod_of, prediction_type_of, resolve_grid, spaced_grid
from .scoring import NotFittedError, ScoreOutput, Scorer, create_scorer, load_map_statistic, scorer_class

CONFIG_NAME = "scorer_config.json"
STATE_NAME = "scorer_state.safetensors"
MAP_STATISTIC_DIR = "map_statistic"

__all__ = ["LATENT_SETTINGS", "InversionScorer"]

LATENT_SETTINGS = (
    "timesteps",
    "scoring",
    "irf_timestep",
    "reconstruction_timestep",
    "reconstruction_steps",
    "reconstruction_seed",
    "map_statistic",
)
"""Constructor arguments that change the latent, its statistic or the maps: overriding one at load time drops the
fit (and so a detector's thresholds)."""


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
        scoring: the latent statistic: a registered name (``nll``, ``maxmin``, ``hybrid``, ``max``, ``irf``,
            ``reconstruction``) or a :class:`~invert_ad.scoring.Scorer` (never modified: :meth:`fit` fits a copy,
            ``scoring_``).
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
            the anomaly maps instead of the latent's map (the image score still comes from the latent), e.g.
            :class:`~invert_ad.scoring.MahalanobisMap`. Saved with the model.

    Attributes:
        scoring_: the fitted copy of ``scoring`` (after :meth:`fit` or loading a fitted scorer).
        grid: the resolved :class:`~invert_ad.schedule.InversionGrid`.
        config: the constructor arguments, read-only (what :meth:`save_pretrained` writes).

    Example:
        >>> scorer = InversionScorer(unet, DDPMScheduler(), timesteps="paper", scoring="hybrid")
        >>> scorer.fit(normal_features)                  # hybrid normalisation on normal data only
        >>> out = scorer.score(features)                 # out.raw_score (B,), out.raw_map (B, h, w)
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
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.timesteps = timesteps
        self.scoring = scoring
        self.irf_timestep = irf_timestep
        self.reconstruction_timestep = reconstruction_timestep
        self.reconstruction_steps = reconstruction_steps
        self.reconstruction_seed = reconstruction_seed
        self.autocast_dtype = check_autocast_dtype(autocast_dtype)
        self.compile_mode = compile_mode
        self.map_statistic = map_statistic
        self._validate()

    def _validate(self) -> None:
        """Check the arguments (cheap: no network call, no compilation)."""
        if not callable(self.denoiser):
            raise TypeError(f"denoiser must be a model or a callable f(x, t), got {type(self.denoiser).__name__}")
        if not isinstance(self.scoring, str | Scorer):
            raise TypeError(f"scoring must be a scorer name or a Scorer instance, got {type(self.scoring).__name__}")
        check_compile_mode(self.compile_mode)
        if self.map_statistic is not None and not callable(self.map_statistic):
            raise TypeError(f"map_statistic must be callable on features, got {type(self.map_statistic).__name__}")
        last = self.num_train_timesteps - 1
        for name in ("irf_timestep", "reconstruction_timestep"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= last:
                raise ValueError(f"{name} must be an int in [0, {last}], got {value!r}")
        steps, t_r = self.reconstruction_steps, max(self.reconstruction_timestep, 1)
        if steps is not None and (not isinstance(steps, int) or not 1 <= steps <= t_r):
            raise ValueError(
                f"reconstruction_steps must be an int in [1, reconstruction_timestep={t_r}] or None, got {steps!r}"
            )
        _ = self._grid_alpha_bars, self._template  # resolve the grid and the statistic now: a bad name fails here

    # ------------------------------------------------------------------ derived from the arguments
    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """The schedule's float64 alpha-bars ``(T,)``."""
        return alphas_cumprod_of(self.scheduler)

    @property
    def prediction_type(self) -> str:
        return prediction_type_of(self.scheduler)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @cached_property
    def grid(self) -> InversionGrid:
        """The inversion grid resolved from ``timesteps``."""
        return resolve_grid(self.timesteps, self.num_train_timesteps)

    @cached_property
    def _grid_alpha_bars(self) -> torch.Tensor:  # constants, also for tracing
        return self.grid.alpha_bars(self.alphas_cumprod)

    @cached_property
    def _template(self) -> Scorer:
        return create_scorer(self.scoring) if isinstance(self.scoring, str) else self.scoring

    @cached_property
    def _eps_fn(self) -> Any:
        return make_eps_fn(self.denoiser, self.alphas_cumprod, self.prediction_type)

    @cached_property
    def _latent_fn(self) -> Any:
        if self.compile_mode is None:
            return self.compute_latent
        return compile_function(self.compute_latent, self.compile_mode, self._compile_batch_size)

    _compile_batch_size: int | None = None

    @property
    def config(self) -> MappingProxyType:
        """The constructor arguments as saved (read-only)."""
        return MappingProxyType(self.get_config())

    @property
    def latent_kind(self) -> str:
        """Which latent the statistic reads: ``inversion``, ``irf`` or ``reconstruction``."""
        return self._template.latent

    @property
    def requires_fit(self) -> bool:
        """Whether the statistic must be fitted on normal features before scoring (e.g. the hybrid)."""
        return self._template.requires_fit

    @property
    def num_reconstruction_steps(self) -> int:
        """Denoising calls of the reconstruction baseline (``reconstruction_steps`` or the grid's call count)."""
        if self.reconstruction_steps is not None:
            return self.reconstruction_steps
        return min(self.grid.num_calls, max(self.reconstruction_timestep, 1))

    def compile(self, mode: str | None, batch_size: int | None = None) -> InversionScorer:
        """Compile the latent computation with ``mode`` (``None``: back to eager); returns ``self``.

        Args:
            mode: one of :data:`~invert_ad.acceleration.COMPILE_MODES` or ``None``.
            batch_size: pad smaller batches to this size so they reuse the compiled graph
                (see :func:`~invert_ad.acceleration.compile_function`).
        """
        check_compile_mode(mode)
        self.compile_mode, self._compile_batch_size = mode, batch_size
        self.__dict__.pop("_latent_fn", None)
        return self

    @property
    def nfe(self) -> int:
        """Network calls per image for the configured statistic."""
        kind = self.latent_kind
        return {"inversion": self.grid.num_calls, "irf": 1}.get(kind) or self.num_reconstruction_steps

    @property
    def statistic(self) -> Scorer:
        """The statistic that scores latents: ``scoring_`` once fitted, else ``scoring`` if it needs no fit.

        Raises:
            NotFittedError: the statistic needs :meth:`fit` first.
        """
        fitted = self.__dict__.get("scoring_")
        if fitted is not None:
            return fitted
        if self._template.is_fitted:
            return self._template
        raise NotFittedError(
            f"the {self._template.name!r} statistic of this InversionScorer must be fitted on normal features "
            "first: call fit(normal_features)"
        )

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

    @staticmethod
    def _batches(features: torch.Tensor, batch_size: int | None) -> list[torch.Tensor]:
        if batch_size is None:
            return [features]
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
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
        with torch.inference_mode():
            if return_trajectory:
                return ddim_integrate(self._eps, x, self.grid.call_points, self._grid_alpha_bars, True)
            return self._invert(x)

    def _invert(self, x: torch.Tensor) -> torch.Tensor:
        """The final inverted latent: the denoiser's ``closed_form_inversion`` where it has one (the Gaussian
        denoisers: one matrix product per position for the whole grid), else the Euler steps."""
        closed_form = getattr(self.denoiser, "closed_form_inversion", None)
        if closed_form is not None and self.prediction_type == "epsilon":
            latent = closed_form(x, self.grid.call_points, self._grid_alpha_bars)
            if latent is not None:
                return latent
        return ddim_integrate(self._eps, x, self.grid.call_points, self._grid_alpha_bars)

    def irf(self, features: torch.Tensor) -> torch.Tensor:
        """OSD-IRF's one-step field ``eps(sqrt(ab_t) x0, t)`` at ``irf_timestep``, ``(B, C, h, w)``."""
        x = self._check_features(features)
        with torch.inference_mode():
            return self._irf(x)

    def _irf(self, x: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alphas_cumprod.tolist()[self.irf_timestep]  # a Python float, also while exporting
        return one_step_irf(self._eps, x, self.irf_timestep, alpha_bar)

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        """The baseline: noise to ``reconstruction_timestep`` with fixed noise, DDIM-denoise to clean.

        Returns:
            The reconstruction ``x0hat``, ``(B, C, h, w)``.
        """
        x0 = self._check_features(features)
        with torch.inference_mode():
            return self._reconstruct(x0)

    def _reconstruct(self, x0: torch.Tensor) -> torch.Tensor:
        t_r, steps = self.reconstruction_timestep, self.num_reconstruction_steps
        points = spaced_grid(steps, "uniform", t_r + 1).points[::-1][:-1] if t_r > 0 else (0,)
        ab = self.alphas_cumprod
        alpha_bars = torch.cat([ab[list(points)], ab.new_ones(1)])
        generator = torch.Generator().manual_seed(self.reconstruction_seed)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        return ddim_integrate(self._eps, add_noise(x0, noise, float(ab[t_r])), points, alpha_bars)

    def compute_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The latent the statistic reads, without input checks or gradient mode changes (for tracing/export).

        Args:
            x: features ``(B, C, h, w)`` already on the denoiser's device and dtype.

        Returns:
            The contiguous latent ``(B, C, h, w)``: final inverted latent, IRF field, or ``x0 - x0hat``.
        """
        kind = self.latent_kind
        if kind == "inversion":
            latent = self._invert(x)
        elif kind == "irf":
            latent = self._irf(x)
        else:
            latent = x - self._reconstruct(x)
        return latent.contiguous()

    def latents(self, features: torch.Tensor, batch_size: int | None = 64) -> torch.Tensor:
        """The latent the statistic reads (inversion, IRF or reconstruction residual), ``(B, C, h, w)``.

        Args:
            features: ``(B, C, h, w)``.
            batch_size: chunk size for the network calls (``None``: one batch).
        """
        chunks = self._batches(self._check_features(features), batch_size)
        with torch.inference_mode():
            return torch.cat([self._latent_fn(chunk) for chunk in chunks])

    # ------------------------------------------------------------------ fit / score
    def fit(self, normal_features: torch.Tensor, batch_size: int | None = 64) -> InversionScorer:
        """Fit a copy of the statistic (e.g. the hybrid normalisation) on features of normal images only.

        Args:
            normal_features: ``(N, C, h, w)`` features of defect-free images, never the test set.
            batch_size: chunk size for the network calls (``None``: one batch).

        Returns:
            ``self``, with ``scoring_`` set.
        """
        return self.fit_latents(self.latents(normal_features, batch_size))

    def fit_latents(self, normal_latents: torch.Tensor) -> InversionScorer:
        """Fit a copy of the statistic on latents ``(N, C, h, w)`` of normal images (see :meth:`latents`)."""
        self.scoring_ = copy.deepcopy(self._template).fit(normal_latents)
        return self

    def score(self, features: torch.Tensor, batch_size: int | None = 64) -> ScoreOutput:
        """Score feature maps.

        Args:
            features: ``(B, C, h, w)``.
            batch_size: chunk size for the network calls (``None``: one batch).

        Returns:
            A :class:`~invert_ad.scoring.ScoreOutput` with ``raw_score`` ``(B,)``, ``raw_map`` ``(B, h, w)`` on the
            feature grid and the ``latent``; higher is more anomalous.

        Raises:
            NotFittedError: the statistic needs :meth:`fit` first.
        """
        statistic = self.statistic
        z = self.latents(features, batch_size)
        out = statistic.score(z)
        raw_map = self.final_maps(self._check_features(features), out.raw_map)
        return ScoreOutput(out.raw_score.float(), raw_map.float(), out.components, z)

    def final_maps(self, features: torch.Tensor, latent_maps: torch.Tensor) -> torch.Tensor:
        """The anomaly maps ``(B, h, w)``: ``map_statistic(features)`` when one is set, else ``latent_maps``."""
        if self.map_statistic is None:
            return latent_maps
        return self.map_statistic(features).to(latent_maps.device)

    def with_denoiser(self, denoiser: Any) -> InversionScorer:
        """A new, unfitted scorer with the same settings around another denoiser (e.g. one refitted on a fold)."""
        return type(self)(
            denoiser,
            self.scheduler,
            timesteps=self.grid,
            scoring=self._template,
            irf_timestep=self.irf_timestep,
            reconstruction_timestep=self.reconstruction_timestep,
            reconstruction_steps=self.reconstruction_steps,
            reconstruction_seed=self.reconstruction_seed,
            autocast_dtype=self.autocast_dtype,
            map_statistic=self.map_statistic,
        )

    # ------------------------------------------------------------------ persistence
    def get_config(self) -> dict[str, Any]:
        """Everything but the weights and fitted state, JSON-serialisable."""
        statistic = self.__dict__.get("scoring_", self._template)
        return {
            "_class_name": type(self).__name__,
            "invert_ad_version": __version__,
            "grid": self.grid.to_dict(),
            "scorer": {"class": type(statistic).__name__, "config": statistic.get_config()},
            "irf_timestep": self.irf_timestep,
            "reconstruction_timestep": self.reconstruction_timestep,
            "reconstruction_steps": self.reconstruction_steps,
            "reconstruction_seed": self.reconstruction_seed,
            "map_statistic": None if self.map_statistic is None else self.map_statistic.get_config(),
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the denoiser, scheduler, scorer config and fitted statistic into ``save_directory``.

        The folder may hold other files (an :class:`~invert_ad.detector.AnomalyDetector` adds its own); each file
        is written atomically.

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
        fitted = self.__dict__.get("scoring_")
        atomic_save_tensors(fitted.state_dict() if fitted is not None else {}, folder / STATE_NAME)
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
            **overrides: constructor arguments to replace. ``autocast_dtype`` and ``compile_mode`` keep the saved
                fit; any of :data:`LATENT_SETTINGS` (``timesteps``, ``scoring``, ...) changes the latent or its
                statistic, so the loaded scorer is unfitted and a statistic that needs a fit raises
                :class:`~invert_ad.NotFittedError` until :meth:`fit` is called again.
        """
        allowed = (*LATENT_SETTINGS, "autocast_dtype", "compile_mode")
        unknown = set(overrides) - set(allowed)
        if unknown:
            raise TypeError(f"unknown override(s) {sorted(unknown)}; allowed: {list(allowed)}")
        folder = resolve_model_dir(pretrained, revision=revision, token=token)
        config = load_json(folder / CONFIG_NAME)
        denoiser = _load_denoiser(folder / "denoiser")
        if device is not None:
            denoiser = denoiser.to(device)
        scheduler_config = load_json(folder / "scheduler" / "scheduler_config.json")
        scheduler = scheduler_class(scheduler_config.get("_class_name", "")).from_pretrained(folder / "scheduler")
        spec = config["scorer"]
        saved = scorer_class(spec["class"])(**spec["config"])
        kwargs: dict[str, Any] = {
            "timesteps": InversionGrid.from_dict(config["grid"]),
            "scoring": saved,
            "irf_timestep": config["irf_timestep"],
            "reconstruction_timestep": config["reconstruction_timestep"],
            "reconstruction_steps": config["reconstruction_steps"],
            "reconstruction_seed": config["reconstruction_seed"],
        }
        if config.get("map_statistic") and "map_statistic" not in overrides:
            kwargs["map_statistic"] = load_map_statistic(config["map_statistic"], folder / MAP_STATISTIC_DIR, device)
        refit = bool(set(overrides) & set(LATENT_SETTINGS))
        kwargs.update(overrides)
        scorer = cls(denoiser, scheduler, **kwargs)
        if not refit:  # the saved statistic, fitted (or stateless) as saved
            fitted = copy.deepcopy(saved)
            fitted.load_state_dict(load_tensors(folder / STATE_NAME))
            scorer.scoring_ = fitted
        return scorer

    def push_to_hub(self, repo_id: str, *, private: bool = True, token: str | None = None, **kwargs: Any) -> str:
        """Save to a temporary folder and upload it as a model repo; returns the commit URL."""
        return push_folder_to_hub(self.save_pretrained, repo_id, private=private, token=token, **kwargs)

    def __repr__(self) -> str:
        terminal = self.grid.terminal_alpha_bar
        return (
            f"InversionScorer(denoiser={type(self.denoiser).__name__}, grid={list(self.grid.points)}"
            f"{'' if terminal is None else f'+ab={terminal}'}, "
            f"scoring={self.__dict__.get('scoring_', self._template)!r}, nfe={self.nfe})"
        )


def _load_denoiser(denoiser_dir: Path) -> Any:
    """A saved denoiser (diffusers or ``invert_ad.models``), frozen; weights must match its config exactly."""
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
            f"the weights in {denoiser_dir} do not match its config.json ({denoiser_cls.__name__} {described}): {why}"
        ) from err
    wrong = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if wrong:  # diffusers only warns, and leaves missing tensors at their initial values
        raise ValueError(
            f"the weights in {denoiser_dir} do not match its config.json ({denoiser_cls.__name__} {described}): {wrong}"
        )
    return denoiser.eval().requires_grad_(False)
