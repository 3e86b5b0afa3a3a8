"""RoutedDetector: one detector for a product line, made of one expert per product and a router.

The unified setting of the papers asks for one model over several products, told nothing about an image's
product at test time. A single denoiser over the union standardises every product with the union's channel
statistics and models each grid position as a blend of products; measured on the development categories it
loses image AUROC to one detector per product (``benchmarks/results/unified.md``). A :class:`RoutedDetector`
keeps one :class:`~invert_ad.detector.AnomalyDetector` per product (its own standardisation, denoiser,
statistic and thresholds) behind one shared backbone:

    images (B, 3, S, S) -> backbone features (B, C, h, w), once
      -> router: the expert whose training images the features resemble most (below)
      -> that expert: standardise, invert, score, calibrate, decide

The router is a linear discriminant on each image's channel means of the backbone features (scikit-learn's
``LinearDiscriminantAnalysis`` with Ledoit-Wolf shrinkage, fitted on every expert's normal training images with
the product as label; ``C`` weights and a bias per expert). On the four development categories it sends 1,255 of
1,262 test images, anomalous ones included, to their own product's expert (``benchmarks/results/unified.md``).
Thresholds are therefore per product, chosen by the router, not pooled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .calibration import domain_scores
from .detector import CONFIG_NAME, FOLDER_CLASSES, AnomalyDetector, DetectorOutput, warn_out_of_domain
from .hub import load_json, resolve_model_dir
from .io import atomic_save_tensors, atomic_write_json, atomic_write_text, load_tensors, replace_directory
from .scoring import NotFittedError, ScoreOutput

__all__ = ["RoutedDetector"]

EXPERTS_DIR = "experts"
ROUTER_NAME = "router.safetensors"


def image_descriptors(features: torch.Tensor) -> torch.Tensor:
    """What the router reads: the channel means of backbone features, ``(B, C, h, w) -> (B, C)`` float64."""
    return features.to(torch.float64).mean(dim=(2, 3))


def _scatter(parts: list[tuple[torch.Tensor, Any]], n: int) -> Any:
    """Reassemble per-expert results ``[(indices, result)]`` into batch order.

    Results are tensors (batch first), dicts of them (the keys all parts share) or dataclasses of them;
    ``None`` anywhere gives ``None``.
    """
    if not parts:
        raise ValueError("no images to score")
    values = [value for _, value in parts]
    first = values[0]
    if any(value is None for value in values):
        return None
    if isinstance(first, torch.Tensor):
        out = first.new_empty((n, *first.shape[1:]))
        for index, value in parts:
            out[index.to(out.device)] = value
        return out
    if isinstance(first, dict):
        shared = [key for key in first if all(key in value for value in values)]
        return {key: _scatter([(i, v[key]) for i, v in parts], n) for key in shared}
    names = first.__dataclass_fields__
    return type(first)(**{name: _scatter([(i, getattr(v, name)) for i, v in parts], n) for name in names})


class RoutedDetector(AnomalyDetector):
    """One detector for several products: an expert :class:`AnomalyDetector` per product and a router.

    ``score``, ``score_features``, ``predict``, ``save_pretrained`` / ``from_pretrained`` and the command line
    work as for a single detector; :meth:`route` says which expert each image went to. The features a
    routed detector passes around (``standardize``, ``score_features``) are the backbone's, unstandardised:
    each expert standardises its own images.

    Args:
        experts: product name -> a detector; all on the same feature extractor (same backbone, image size and
            grid).

    Attributes:
        router_weight_, router_bias_: ``(K, C)`` and ``(K,)`` float64, the router's linear discriminant (set by
            :meth:`fit` / :meth:`fit_router`, or loaded).

    Raises:
        ValueError: no experts, or experts on different feature extractors.
        TypeError: an expert that is not a plain :class:`AnomalyDetector`.
    """

    def __init__(self, experts: Mapping[str, AnomalyDetector]) -> None:
        if not experts:
            raise ValueError("a RoutedDetector needs at least one expert")
        for name, expert in experts.items():
            if not isinstance(expert, AnomalyDetector) or isinstance(expert, RoutedDetector):
                raise TypeError(f"expert {name!r} must be an AnomalyDetector, got {type(expert).__name__}")
        first = next(iter(experts.values()))
        spec = first.feature_extractor.get_config()
        for name, expert in experts.items():
            if expert.feature_extractor.get_config() != spec:
                raise ValueError(
                    f"expert {name!r} uses the feature extractor {expert.feature_extractor.get_config()}, the "
                    f"first one {spec}: a routed detector runs one backbone for all"
                )
        super().__init__(first.feature_extractor, first.scorer)
        self.experts = dict(experts)
        for expert in self.experts.values():  # one backbone in memory
            expert.feature_extractor = first.feature_extractor

    # ------------------------------------------------------------------ state
    @property
    def is_fitted(self) -> bool:
        routed = self.__dict__.get("router_weight_") is not None
        return routed and all(expert.is_fitted for expert in self.experts.values())

    @property
    def calibration(self) -> Any:
        """Not one: every expert has its own (``experts[name].calibration``)."""
        raise AttributeError("a RoutedDetector has one calibration per expert: see .experts[name].calibration")

    def to(self, device: str | torch.device) -> RoutedDetector:
        for expert in self.experts.values():
            expert.to(device)
        self.__dict__.pop("_backbone", None)
        return self

    def optimize(self, *args: Any, **kwargs: Any) -> RoutedDetector:
        raise NotImplementedError("speed settings apply to one detector: optimise the experts before routing")

    # ------------------------------------------------------------------ routing
    def fit_router(self, features: torch.Tensor, labels: torch.Tensor) -> RoutedDetector:
        """Fit the router on backbone features ``(N, C, h, w)`` of normal images and their expert index ``(N,)``.

        Raises:
            ValueError: labels of the wrong shape, or an expert without images.
        """
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

        labels = self._check_labels(features, labels)
        channels = features.shape[1]
        if len(self.experts) == 1:  # nothing to choose
            self.router_weight_ = torch.zeros(1, channels, dtype=torch.float64)
            self.router_bias_ = torch.zeros(1, dtype=torch.float64)
            return self
        lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(
            image_descriptors(features).cpu().numpy(), labels.numpy()
        )
        weight, bias = torch.as_tensor(lda.coef_), torch.as_tensor(lda.intercept_)
        if len(self.experts) == 2:  # scikit-learn's binary form: one decision function for class 1
            weight, bias = torch.cat([torch.zeros_like(weight), weight]), torch.cat([torch.zeros_like(bias), bias])
        self.router_weight_, self.router_bias_ = weight, bias
        return self

    def route(self, features: torch.Tensor) -> torch.Tensor:
        """The expert index ``(B,)`` (order of :attr:`experts`) of backbone features ``(B, C, h, w)``.

        Raises:
            NotFittedError: the router is not fitted (:meth:`fit` or :meth:`fit_router`).
        """
        weight = self.__dict__.get("router_weight_")
        if weight is None:
            raise NotFittedError("the router is not fitted: call fit(normal_images, labels=...) or fit_router")
        logits = image_descriptors(features).cpu() @ weight.T + self.router_bias_
        return logits.argmax(dim=1)

    def _check_labels(self, features: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None or tuple(torch.as_tensor(labels).shape) != (features.shape[0],):
            raise ValueError(f"give labels: the expert index of each of the {features.shape[0]} images")
        labels = torch.as_tensor(labels).long().cpu()
        if bool(((labels < 0) | (labels >= len(self.experts))).any()):
            found = labels.unique().tolist()
            raise ValueError(f"labels must be expert indices in [0, {len(self.experts)}), got {found}")
        for k, name in enumerate(self.experts):
            if not bool((labels == k).any()):
                raise ValueError(f"no normal images for expert {name!r} (label {k})")
        return labels

    def _by_expert(self, features: torch.Tensor) -> list[tuple[torch.Tensor, AnomalyDetector, torch.Tensor]]:
        """``[(indices, expert, its standardised features)]`` for every expert that got images."""
        index = self.route(features)
        parts = []
        for k, expert in enumerate(self.experts.values()):
            chosen = torch.nonzero(index == k).flatten()
            if len(chosen):
                parts.append((chosen, expert, expert.standardize(features[chosen.to(features.device)])))
        return parts

    def score_features(self, features: torch.Tensor, batch_size: int | None = 32) -> ScoreOutput:
        """Raw scores ``(B,)`` and maps ``(B, S, S)`` of backbone features (each in its expert's units)."""
        parts = [(i, expert.score_features(x, batch_size)) for i, expert, x in self._by_expert(features)]
        return _scatter(parts, features.shape[0])

    def _score_with_domain(self, images: torch.Tensor, batch_size: int) -> tuple[ScoreOutput, torch.Tensor]:
        features = self._features(images, None, batch_size)
        parts = [
            (i, (expert.score_features(x, batch_size), domain_scores(x).cpu()))
            for i, expert, x in self._by_expert(features)
        ]
        n = features.shape[0]
        return _scatter([(i, out) for i, (out, _) in parts], n), _scatter([(i, d) for i, (_, d) in parts], n)

    def predict(
        self, images: torch.Tensor, *, threshold: float = 0.5, batch_size: int = 32, warn: bool = True
    ) -> DetectorOutput:
        """Decisions for a batch of images, each by the calibration of the expert it was routed to."""
        features = self._features(images, None, batch_size)
        parts = [
            (i, expert._decide(expert.score_features(x, batch_size), domain_scores(x).cpu(), threshold))
            for i, expert, x in self._by_expert(features)
        ]
        decisions = _scatter(parts, features.shape[0])
        if warn:
            warn_out_of_domain(decisions, None)
        return decisions

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        normal_images: torch.Tensor | None = None,
        *,
        normal_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        fpr: float = 0.01,
        folds: int | None = 5,
        batch_size: int = 32,
        seed: int = 0,
        progress: bool = False,
    ) -> RoutedDetector:
        """Fit every expert's statistic and calibration on its own normal images, then the router; returns ``self``.

        Args:
            normal_images: ``(N, 3, S, S)`` in ``[0, 1]``, or
            normal_features: their backbone features ``(N, C, h, w)`` (unstandardised).
            labels: ``(N,)`` expert index of each image (order of :attr:`experts`).
            fpr, folds, batch_size, seed, progress: as :meth:`AnomalyDetector.fit`, per expert.

        Raises:
            ValueError: labels missing, of the wrong shape, or an expert without images.
        """
        features = self._features(normal_images, normal_features, batch_size)
        labels = self._check_labels(features, labels)  # before fitting anything
        chosen = [torch.nonzero(labels == k).flatten() for k in range(len(self.experts))]
        for expert, mine in zip(self.experts.values(), chosen, strict=True):
            expert.fit(
                normal_features=expert.standardize(features[mine.to(features.device)]),
                fpr=fpr,
                folds=folds,
                batch_size=batch_size,
                seed=seed,
                progress=progress,
            )
        return self.fit_router(features, labels)

    # ------------------------------------------------------------------ persistence
    def get_config(self) -> dict[str, Any]:
        return {
            "_class_name": type(self).__name__,
            "invert_ad_version": __version__,
            "feature_extractor": self.feature_extractor.get_config(),
            "experts": list(self.experts),
            "router": "linear discriminant of the image channel means (Ledoit-Wolf shrinkage)",
        }

    def save_pretrained(self, save_directory: str | os.PathLike, model_card: dict[str, Any] | None = None) -> Path:
        """Write every expert (``experts/<name>/``) and the routing config into ``save_directory`` atomically."""
        target = Path(save_directory)
        card = model_card or {}
        with replace_directory(target, marker=CONFIG_NAME) as tmp:
            for name, expert in self.experts.items():
                expert.save_pretrained(tmp / EXPERTS_DIR / name, model_card={"dataset": name, **card})
            if self.__dict__.get("router_weight_") is not None:
                atomic_save_tensors({"weight": self.router_weight_, "bias": self.router_bias_}, tmp / ROUTER_NAME)
            atomic_write_json(tmp / CONFIG_NAME, self.get_config())
            listing = "\n".join(f"- `{name}`: `{expert.scorer!r}`" for name, expert in self.experts.items())
            atomic_write_text(
                tmp / "README.md",
                f"---\nlibrary_name: invert_ad\ntags:\n- anomaly-detection\n---\n\n"
                f"An `invert_ad` routed detector: one expert per product, chosen per image (no product given at "
                f"test time).\n\n{listing}\n\nLoad with `invert_ad.AnomalyDetector.from_pretrained(path)`.\n",
            )
        return target

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        revision: str | None = None,
        token: str | None = None,
        **scorer_overrides: Any,
    ) -> RoutedDetector:
        """Load a routed detector saved with :meth:`save_pretrained` (folder or Hub repo id).

        Raises:
            TypeError: scorer overrides (load an expert on its own to change its settings).
            ValueError: the folder is not a routed detector's, or an expert folder is missing.
        """
        if scorer_overrides:
            raise TypeError(
                f"a routed detector takes no scorer overrides ({sorted(scorer_overrides)}): load an expert "
                f"(<model>/{EXPERTS_DIR}/<name>) on its own to change its settings"
            )
        folder = resolve_model_dir(pretrained, revision=revision, token=token)
        config = load_json(folder / CONFIG_NAME)
        if config.get("_class_name") != cls.__name__:
            raise ValueError(f"{folder / CONFIG_NAME} describes a {config.get('_class_name')}, not a {cls.__name__}")
        experts = {}
        for name in config["experts"]:
            path = folder / EXPERTS_DIR / name
            if not (path / CONFIG_NAME).is_file():
                raise ValueError(f"{folder}: expert {name!r} is missing ({path} has no {CONFIG_NAME})")
            experts[name] = AnomalyDetector.from_pretrained(path, device=device)
        detector = cls(experts)
        if (folder / ROUTER_NAME).is_file():
            state = load_tensors(folder / ROUTER_NAME)
            if tuple(state["weight"].shape) != (len(experts), detector.feature_extractor.channels):
                raise ValueError(
                    f"{folder / ROUTER_NAME}: weight has shape {tuple(state['weight'].shape)}, expected "
                    f"({len(experts)}, {detector.feature_extractor.channels})"
                )
            detector.router_weight_, detector.router_bias_ = state["weight"], state["bias"]
        return detector

    def __repr__(self) -> str:
        return f"RoutedDetector(experts={list(self.experts)}, fitted={self.is_fitted})"


FOLDER_CLASSES[RoutedDetector.__name__] = RoutedDetector
