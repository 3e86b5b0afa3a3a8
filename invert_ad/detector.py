"""AnomalyDetector: images in, decisions out.

The data path, one step per object: images ``(B, 3, S, S)`` in ``[0, 1]`` -> a frozen feature extractor ->
per-channel standardisation -> :class:`~invert_ad.scorer.InversionScorer` (inversion and the latent statistic:
raw scores and maps) -> :class:`~invert_ad.calibration.Calibration` (thresholds, normalisation, domain check) ->
:class:`DetectorOutput` (decisions). Maps are upsampled bilinearly (``align_corners=False``, no smoothing) from
the feature grid to ``S x S``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from tqdm.auto import tqdm

from ._version import __version__
from .acceleration import autocast, check_autocast_dtype, check_batch_size, check_compile_mode, compile_function
from .calibration import Calibration, domain_scores, fit_calibration
from .defaults import CPU_BACKBONE_BATCH
from .denoiser import denoiser_in_channels
from .hub import detector_model_card, load_json, push_folder_to_hub, resolve_model_dir
from .io import atomic_save_tensors, atomic_write_json, load_tensors, replace_directory
from .scorer import InversionScorer
from .scoring import NotFittedError, ScoreOutput, upsample_maps

__all__ = ["AnomalyDetector", "DetectorOutput", "channel_statistics", "warn_out_of_domain"]

CONFIG_NAME = "detector_config.json"
STATE_NAME = "detector_state.safetensors"
FOLDER_CLASSES: dict[str, type[AnomalyDetector]] = {}
"""Detector classes with their own folder layout, by the ``_class_name`` of ``detector_config.json``:
:meth:`AnomalyDetector.from_pretrained` hands such a folder to its class (filled by the modules that define them)."""


def channel_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation over images and positions: ``(N, C, h, w) -> (C,), (C,)``."""
    flat = features.transpose(0, 1).flatten(1).to(torch.float64)
    std = flat.std(dim=1)
    return flat.mean(dim=1).float(), torch.where(std > 0, std, torch.ones_like(std)).float()


def warn_out_of_domain(decisions: DetectorOutput, limit: float | None) -> None:
    """Warn (``UserWarning``) when some images look unlike the training images (``decisions.in_domain``)."""
    in_domain = decisions.in_domain
    if bool(in_domain.all()):
        return
    domain = decisions.domain_score
    where = "" if limit is None else f", limit {limit:.2f}"
    warnings.warn(
        f"{int((~in_domain).sum())} of {len(domain)} images look unlike the training images (domain score "
        f"up to {float(domain.max()):.2f}{where}): is this the model for these parts?",
        UserWarning,
        stacklevel=3,
    )


@dataclass(frozen=True)
class DetectorOutput:
    """Decisions for a batch of images, with anomalib's field names. Higher is more anomalous everywhere.

    Attributes:
        raw_score: ``(B,)`` float32 image scores in the statistic's units (what :meth:`AnomalyDetector.score` gives).
        pred_score: ``(B,)`` float64 normalised scores in ``(0, 1)``: strictly increasing in ``raw_score`` (same
            ranking), 0.5 at the calibrated threshold (see :mod:`invert_ad.calibration`).
        pred_label: ``(B,)`` bool, ``pred_score > threshold``.
        raw_map: ``(B, S, S)`` float32 raw anomaly maps at the model's image size.
        anomaly_map: ``(B, S, S)`` float32 normalised maps in ``(0, 1)``, 0.5 at the pixel threshold.
        pred_mask: ``(B, S, S)`` bool, ``anomaly_map > threshold`` where ``pred_label`` (empty for images labelled
            normal, so a mask never contradicts its label).
        domain_score: ``(B,)`` float64 mean squared standardised feature (about 1 for the training domain).
        in_domain: ``(B,)`` bool, ``domain_score`` within the calibrated limit (``False``: the image looks unlike the
            training images, e.g. another product; its scores mean little).
    """

    raw_score: torch.Tensor
    pred_score: torch.Tensor
    pred_label: torch.Tensor
    raw_map: torch.Tensor
    anomaly_map: torch.Tensor
    pred_mask: torch.Tensor
    domain_score: torch.Tensor
    in_domain: torch.Tensor

    def __len__(self) -> int:
        return len(self.raw_score)


class AnomalyDetector:
    """Feature extractor + standardisation + :class:`InversionScorer` + calibration.

    Args:
        feature_extractor: a module mapping images ``(B, 3, S, S)`` in ``[0, 1]`` to ``(B, C, h, w)``, with
            ``get_config()``, ``image_size`` and, optionally, ``check_images`` (see :mod:`invert_ad.features`).
        scorer: the inversion scorer working on standardised features.
        feature_mean, feature_std: ``(C,)`` per-channel statistics the denoiser's input was standardised with;
            ``None`` for none.

    Attributes:
        calibration_: thresholds, normalisation and domain limit, set by :meth:`fit` (or loaded).

    Example:
        >>> detector = AnomalyDetector(extractor, InversionScorer(my_denoiser, DDPMScheduler()))  # doctest: +SKIP
        >>> detector.fit(normal_images).save_pretrained("my_model")                              # doctest: +SKIP
        >>> out = detector.predict(images)  # out.pred_score (B,), out.anomaly_map (B, S, S)    # doctest: +SKIP
    """

    def __init__(
        self,
        feature_extractor: torch.nn.Module,
        scorer: InversionScorer,
        *,
        feature_mean: torch.Tensor | None = None,
        feature_std: torch.Tensor | None = None,
    ) -> None:
        if (feature_mean is None) != (feature_std is None):
            raise ValueError("give both feature_mean and feature_std, or neither")
        if not isinstance(scorer, InversionScorer):
            raise TypeError(f"scorer must be an InversionScorer, got {type(scorer).__name__}")
        self.feature_extractor = feature_extractor
        self.scorer = scorer
        self.feature_mean = feature_mean
        self.feature_std = feature_std
        self.compile_mode: str | None = None
        self.channels_last = False
        self.backbone_autocast_dtype: torch.dtype | None = None
        self._compile_batch_size: int | None = None
        self.backbone_batch_size: int | str | None = "auto"

    # ------------------------------------------------------------------ settings
    @property
    def config(self) -> MappingProxyType:
        """What :meth:`save_pretrained` writes as ``detector_config.json`` (read-only)."""
        return MappingProxyType(self.get_config())

    @property
    def calibration(self) -> Calibration:
        """The fitted calibration.

        Raises:
            NotFittedError: :meth:`fit` was not called (or the model was loaded with settings that drop it).
        """
        calibration = self.__dict__.get("calibration_")
        if calibration is None:
            raise NotFittedError(
                "this detector has no thresholds: call fit(normal_images) (or load a trained model without "
                "overriding its scoring or timesteps)"
            )
        return calibration

    @property
    def is_fitted(self) -> bool:
        return self.__dict__.get("calibration_") is not None

    def optimize(
        self,
        *,
        compile_mode: str | None = None,
        channels_last: bool = False,
        autocast_dtype: torch.dtype | str | None = None,
        autocast_backbone: bool = False,
        compile_batch_size: int | None = None,
        backbone_batch_size: int | str | None = "auto",
    ) -> AnomalyDetector:
        """Set how inference runs (speed only; nothing is saved). Calling it again replaces every setting.

        Args:
            compile_mode: ``torch.compile`` the backbone and the scorer's latent computation with this mode
                (one of :data:`~invert_ad.acceleration.COMPILE_MODES`; ``"reduce-overhead"`` adds CUDA graphs on
                a GPU); ``None``: eager. The first call at each batch size compiles (minutes on a small CPU).
            channels_last: run the backbone in the channels-last memory format (faster convolutions on GPUs
                and recent CPUs).
            autocast_dtype: run the denoiser under autocast (``torch.bfloat16`` or ``"bfloat16"``,
                ``float16``); the ODE updates and scores stay in float32.
            autocast_backbone: run the backbone under ``autocast_dtype`` too. Off by default: the error
                compounds through a deep backbone (lite0 in bf16: features ~10 % off after standardisation,
                tire image AUROC 0.891 -> 0.864 on a quarter of its test set), while the denoiser's is small.
            compile_batch_size: with ``compile_mode``, pad smaller batches to this size (the batch size you score
                with), so a last, smaller batch reuses the compiled graphs instead of compiling again.
            backbone_batch_size: images per backbone call (a batch is split into calls of at most this many);
                ``None``: the whole batch; ``"auto"``: :data:`CPU_BACKBONE_BATCH` on a CPU in eager mode, else the
                whole batch.

        Returns:
            ``self``.

        Example:
            >>> detector.optimize(compile_mode="max-autotune", channels_last=True)  # doctest: +SKIP
            >>> detector.optimize()  # back to eager fp32                          # doctest: +SKIP
        """
        check_compile_mode(compile_mode)
        check_batch_size(compile_batch_size)
        if backbone_batch_size != "auto":
            check_batch_size(backbone_batch_size, "backbone_batch_size")
        dtype = check_autocast_dtype(autocast_dtype)
        self.backbone_batch_size = backbone_batch_size
        self.compile_mode, self.channels_last = compile_mode, bool(channels_last)
        self.backbone_autocast_dtype = dtype if autocast_backbone else None
        self._compile_batch_size = compile_batch_size
        self.__dict__.pop("_backbone", None)
        self.scorer.autocast_dtype = dtype
        self.scorer.compile(compile_mode, compile_batch_size)
        return self

    def inference_settings(self) -> dict[str, Any]:
        """The settings :meth:`optimize` applied, JSON-ready (dtypes by name, ``None`` when off)."""

        def name(dtype: torch.dtype | None) -> str | None:
            return None if dtype is None else str(dtype).removeprefix("torch.")

        return {
            "compile_mode": self.compile_mode,
            "channels_last": self.channels_last,
            "autocast_dtype": name(self.scorer.autocast_dtype),
            "backbone_autocast_dtype": name(self.backbone_autocast_dtype),
            "backbone_batch_size": self.backbone_batch_size,
        }

    @cached_property
    def _backbone(self) -> Any:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        forward = self.feature_extractor.eval().requires_grad_(False).to(memory_format=memory_format)
        if self.compile_mode is None:
            return forward
        return compile_function(forward, self.compile_mode, self._compile_batch_size)

    @property
    def image_size(self) -> int:
        return int(self.feature_extractor.image_size)

    @property
    def device(self) -> torch.device:
        param = next(iter(self.feature_extractor.parameters()), None)
        return param.device if param is not None else torch.device("cpu")

    def to(self, device: str | torch.device) -> AnomalyDetector:
        """Move the backbone, the denoiser and the feature statistics to ``device``; returns ``self``."""
        self.feature_extractor.to(device)
        if callable(getattr(self.scorer.denoiser, "to", None)):
            self.scorer.denoiser.to(device)
        if self.feature_mean is not None:
            self.feature_mean, self.feature_std = self.feature_mean.to(device), self.feature_std.to(device)
        self.__dict__.pop("_backbone", None)
        return self

    # ------------------------------------------------------------------ features
    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the per-channel standardisation to backbone features ``(B, C, h, w)``."""
        if self.feature_mean is None:
            return features
        mean = self.feature_mean.to(features.device).reshape(1, -1, 1, 1)
        std = self.feature_std.to(features.device).reshape(1, -1, 1, 1)
        return (features - mean) / std

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised float32 features ``(B, C, h, w)`` of images ``(B, 3, S, S)`` in ``[0, 1]``.

        Raises:
            TypeError: not a tensor.
            ValueError: not ``(B, 3, S, S)`` at the model's image size, or values outside ``[0, 1]``.
        """
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
        x = images.to(self.device, torch.float32)
        check = getattr(self.feature_extractor, "check_images", None)
        if check is not None:  # before the backbone: a compiled graph would skip its data-dependent checks
            check(x)
        elif x.dim() != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images must have shape (B, 3, {self.image_size}, {self.image_size}), got {tuple(x.shape)}"
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        size = self.backbone_batch_size
        if size == "auto":
            size = CPU_BACKBONE_BATCH if x.device.type == "cpu" and self.compile_mode is None else None
        with torch.inference_mode(), autocast(x.device, self.backbone_autocast_dtype):
            features = torch.cat([self._backbone(chunk) for chunk in x.split(size or len(x) or 1)])
        return self.standardize(features.float().contiguous())

    def _features(self, images: torch.Tensor | None, features: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if (images is None) == (features is None):
            raise ValueError("give images or their standardised features (exactly one)")
        if features is not None:
            return features
        return torch.cat([self.extract(chunk) for chunk in images.split(batch_size)])

    # ------------------------------------------------------------------ raw scores
    def score_features(self, features: torch.Tensor, batch_size: int | None = 32) -> ScoreOutput:
        """Raw scores of standardised features ``(B, C, h, w)``; ``raw_map`` is upsampled to ``S x S``."""
        out = self.scorer.score(features, batch_size=batch_size)
        raw_map = upsample_maps(out.raw_map, (self.image_size, self.image_size))
        return ScoreOutput(out.raw_score.cpu(), raw_map.cpu(), out.components, out.latent)

    def score(self, images: torch.Tensor, batch_size: int = 32) -> ScoreOutput:
        """Raw image scores ``(B,)`` and maps ``(B, S, S)`` of images; higher is more anomalous (no thresholds)."""
        return self.score_features(self._features(images, None, batch_size), batch_size)

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        normal_images: torch.Tensor | None = None,
        *,
        normal_features: torch.Tensor | None = None,
        fpr: float = 0.01,
        folds: int | None = 5,
        batch_size: int = 32,
        seed: int = 0,
        progress: bool = False,
    ) -> AnomalyDetector:
        """Fit the scorer's statistic and the calibration on normal images only; returns ``self``.

        With a denoiser that can be refitted from features (one with a ``refit(features)`` method, such as
        :class:`~invert_ad.models.GaussianDenoiser`) and ``folds``, every image is scored out of fold: the
        denoiser is refitted on ``k - 1`` folds and inverts the held-out one, so the thresholds come from all
        images, none of them seen by the denoiser that scored it; a map statistic made by
        :meth:`MahalanobisMap.fit <invert_ad.scoring.MahalanobisMap.fit>` is refitted on the same folds for the
        pixel thresholds. The denoiser and the map statistic themselves are left as given (fitted on all of them).
        Any other denoiser is frozen: give normal images it was not trained on.

        Args:
            normal_images: ``(N, 3, S, S)`` in ``[0, 1]``, or
            normal_features: their standardised features ``(N, C, h, w)``.
            fpr: accepted false-positive rate on normal images, in ``(0, 1)``.
            folds: ``k`` for out-of-fold scores (``None`` or 1: score the images as they are).
            batch_size: images per network call.
            seed: the fold assignment.
            progress: a progress bar over the folds.

        Raises:
            ValueError: no or too few images, an ``fpr`` outside ``(0, 1)``.
        """
        if folds is not None and (not isinstance(folds, int) or folds < 1):
            raise ValueError(f"folds must be a positive int or None, got {folds!r}")
        features = self._features(normal_images, normal_features, batch_size)
        n = features.shape[0]
        refit = getattr(self.scorer.denoiser, "refit", None)
        k = min(folds, n) if folds is not None and folds > 1 and callable(refit) else None
        map_statistic = self.scorer.map_statistic
        grid_map = None
        if k is not None and n >= 4:
            fold_of = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % k
            latents = torch.empty_like(features)
            if getattr(map_statistic, "can_refit", False):  # any callable may form the maps; refit: MahalanobisMap
                grid_map = features.new_empty(n, *features.shape[2:])
            for fold in tqdm(range(k), desc="out-of-fold scores", unit="fold", disable=not progress):
                held = fold_of == fold
                scorer = self.scorer.with_denoiser(refit(features[~held]))
                latents[held] = scorer.latents(features[held], batch_size).to(latents.dtype)
                if grid_map is not None:  # the maps out of fold too
                    grid_map[held] = map_statistic.refit(features[~held])(features[held]).to(grid_map.dtype)
        else:
            k = None
            latents = self.scorer.latents(features, batch_size)
        self.scorer.fit_latents(latents)
        out = self.scorer.statistic.score(latents)
        if grid_map is None:  # a map statistic's maps when the scorer has one
            grid_map = self.scorer.final_maps(features, out.raw_map)
        raw_map = upsample_maps(grid_map.float(), (self.image_size, self.image_size)).cpu()
        self.calibration_ = fit_calibration(
            out.raw_score.cpu(), raw_map, fpr, folds=k, domain_score=domain_scores(features).cpu()
        )
        return self

    def _score_with_domain(self, images: torch.Tensor, batch_size: int) -> tuple[ScoreOutput, torch.Tensor]:
        """Raw scores (maps at ``S x S``) and the :func:`~invert_ad.calibration.domain_scores` ``(B,)`` of images."""
        features = self._features(images, None, batch_size)
        return self.score_features(features, batch_size), domain_scores(features).cpu()

    # ------------------------------------------------------------------ decisions
    def predict(
        self, images: torch.Tensor, *, threshold: float = 0.5, batch_size: int = 32, warn: bool = True
    ) -> DetectorOutput:
        """Decisions for a batch of images.

        Args:
            images: ``(B, 3, S, S)`` in ``[0, 1]`` at the model's image size.
            threshold: on the normalised scale (0.5: the calibrated thresholds).
            batch_size: images per network call.
            warn: warn when images look unlike the training images (see :attr:`DetectorOutput.in_domain`).

        Raises:
            NotFittedError: the detector has no calibration (call :meth:`fit`).
        """
        out, domain = self._score_with_domain(images, batch_size)
        decisions = self._decide(out, domain, threshold)
        if warn:
            warn_out_of_domain(decisions, self.calibration.domain_threshold)
        return decisions

    def _decide(self, out: ScoreOutput, domain: torch.Tensor, threshold: float) -> DetectorOutput:
        """Decisions from raw scores (maps at ``S x S``) and domain scores, by this detector's calibration."""
        calibration = self.calibration
        pred_score = calibration.normalize_scores(out.raw_score)
        pred_label = pred_score > threshold
        anomaly_map = calibration.normalize_maps(out.raw_map)
        return DetectorOutput(
            raw_score=out.raw_score,
            pred_score=pred_score,
            pred_label=pred_label,
            raw_map=out.raw_map,
            anomaly_map=anomaly_map,
            pred_mask=(anomaly_map > threshold) & pred_label.reshape(-1, 1, 1),
            domain_score=domain,
            in_domain=calibration.in_domain(domain),
        )

    # ------------------------------------------------------------------ persistence
    def get_config(self) -> dict[str, Any]:
        calibration = self.__dict__.get("calibration_")
        return {
            "_class_name": type(self).__name__,
            "invert_ad_version": __version__,
            "feature_extractor": self.feature_extractor.get_config(),
            "standardize_features": self.feature_mean is not None,
            "calibration": calibration.to_dict() if calibration is not None else None,
        }

    def save_pretrained(self, save_directory: str | os.PathLike, model_card: dict[str, Any] | None = None) -> Path:
        """Write the whole detector into ``save_directory`` atomically (an old folder is replaced only on success).

        Args:
            save_directory: the model folder.
            model_card: optional facts for README.md: ``dataset``, ``metrics`` (dict), ``training`` (dict).
        """
        target = Path(save_directory)
        with replace_directory(target, marker=CONFIG_NAME) as tmp:
            self.scorer.save_pretrained(tmp)
            state = {}
            if self.feature_mean is not None:
                state = {"feature_mean": self.feature_mean.cpu(), "feature_std": self.feature_std.cpu()}
            atomic_save_tensors(state, tmp / STATE_NAME)
            atomic_write_json(tmp / CONFIG_NAME, self.get_config())
            detector_model_card(self, tmp, model_card or {})
        return target

    def push_to_hub(self, repo_id: str, *, private: bool = True, token: str | None = None, **kwargs: Any) -> str:
        """Save to a temporary folder and upload it as a Hub model repo; returns the commit URL."""
        return push_folder_to_hub(self.save_pretrained, repo_id, private=private, token=token, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        revision: str | None = None,
        token: str | None = None,
        **scorer_overrides: Any,
    ) -> AnomalyDetector:
        """Load a detector saved with :meth:`save_pretrained` from a folder or a Hub repo id.

        Args:
            pretrained: a local folder or ``user/repo``.
            device: where to run.
            revision, token: Hub options.
            **scorer_overrides: see :meth:`InversionScorer.from_pretrained`. Overriding a setting that changes the
                latent (``timesteps``, ``scoring``, ...) drops the saved fit and thresholds: call :meth:`fit` with
                normal images before :meth:`predict` (which raises :class:`~invert_ad.NotFittedError` until then).

        Raises:
            ValueError: the saved feature extractor's channel count differs from the denoiser's.
        """
        from .features import create_feature_extractor

        folder = resolve_model_dir(pretrained, revision=revision, token=token)
        config = load_json(folder / CONFIG_NAME)
        own_class = FOLDER_CLASSES.get(config.get("_class_name", ""))
        if own_class is not None and own_class is not cls:
            return own_class.from_pretrained(folder, device=device, **scorer_overrides)
        scorer = InversionScorer.from_pretrained(folder, device=device, **scorer_overrides)
        extractor_config = dict(config["feature_extractor"])
        name = extractor_config.pop("name", None)
        expected = denoiser_in_channels(scorer.denoiser)
        try:
            extractor = create_feature_extractor(name, **extractor_config)
        except (ValueError, RuntimeError, ImportError, OSError) as err:  # say which file asked for it
            raise type(err)(
                f"{folder / CONFIG_NAME}: cannot build its feature extractor {name!r} (the denoiser expects "
                f"{expected} channels): {err}"
            ) from err
        if device is not None:
            extractor = extractor.to(device)
        if expected is not None and extractor.channels != expected:
            raise ValueError(
                f"{folder}: feature extractor {name} gives {extractor.channels} channels but the denoiser expects "
                f"{expected}"
            )
        state = load_tensors(folder / STATE_NAME)
        for key in ("feature_mean", "feature_std") if config.get("standardize_features") else ():
            shape = tuple(state[key].shape) if key in state else None
            if shape != (extractor.channels,):
                raise ValueError(
                    f"{folder / STATE_NAME}: {key} has shape {shape} but {CONFIG_NAME} asks for standardised "
                    f"features of the {extractor.channels}-channel extractor {name!r}"
                )
        detector = cls(extractor, scorer, feature_mean=state.get("feature_mean"), feature_std=state.get("feature_std"))
        if config.get("calibration") and "scoring_" in scorer.__dict__:
            detector.calibration_ = Calibration.from_dict(config["calibration"])
        return detector

    def __repr__(self) -> str:
        name = self.feature_extractor.get_config().get("name")
        return f"AnomalyDetector(features={name}, scorer={self.scorer!r}, fitted={self.is_fitted})"
