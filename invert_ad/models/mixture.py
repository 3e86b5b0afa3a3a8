"""Training-free denoiser for several products at once: the exact eps of a mixture of per-position Gaussians.

The prior is ``p(x) = sum_k w_k prod_p N(x_p; mu_kp, Sigma_kp)``: an image comes from one of K components (a
product, or a cluster of similar images), and within a component every grid position is Gaussian, as in
:class:`~invert_ad.models.GaussianDenoiser`. The noisy marginal at alpha-bar ``a`` is the mixture of the
components' marginals ``N(sqrt(a) mu_k, a Sigma_k + (1 - a) I)``, so by Tweedie's formula

    eps*(x_t, t) = sum_k r_k(x_t) eps*_k(x_t, t),   r_k = softmax_k(log w_k + log N_k(x_t)),

with ``eps*_k`` the component's closed form. The log-density needs no extra projection:
``(x - sqrt(a) mu_k)^T (a Sigma_k + (1 - a) I)^{-1} (x - sqrt(a) mu_k) = (x - sqrt(a) mu_k) . eps*_k / sqrt(1 - a)``
and the log-determinant is ``sum log(a l + 1 - a)`` over the eigenvalues ``l``. Near t = 0 the responsibilities
are one-hot: each image is inverted by the Gaussian of the component it belongs to, without being told which.

Components come from k-means on the images' mean features (class-agnostic: a whole product line without
labels) or from given labels (one component per category).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ._layers import DenoiserOutput, alpha_bars_at, as_timesteps, check_sample, grid_hw
from .gaussian import GaussianDenoiser

__all__ = ["GaussianMixtureDenoiser", "kmeans_components"]


def kmeans_components(features: torch.Tensor, num_components: int, seed: int = 0) -> torch.Tensor:
    """Cluster images by their mean feature (k-means, scikit-learn): ``(N, C, h, w) -> (N,)`` labels in ``[0, K)``.

    Raises:
        ValueError: fewer than two images per component on average.
    """
    from sklearn.cluster import KMeans

    if features.shape[0] < 2 * num_components:
        raise ValueError(f"{features.shape[0]} images are too few for {num_components} components (need >= 2 each)")
    descriptors = features.detach().double().mean(dim=(2, 3)).cpu().numpy()
    labels = KMeans(num_components, n_init=4, random_state=seed).fit_predict(descriptors)
    return torch.as_tensor(labels, dtype=torch.long)


class GaussianMixtureDenoiser(ModelMixin, ConfigMixin):
    """Closed-form eps of an image-level mixture of per-position Gaussians; nothing to train.

    Build it with :meth:`fit`. Each component is a :class:`GaussianDenoiser` (buffers saved by
    ``save_pretrained``); ``log_weights`` ``(K,)`` holds the mixture weights.

    Args:
        num_components: K.
        in_channels: feature channels C.
        sample_size: feature grid, an int (square) or ``(h, w)``.
        covariance: ``full`` or ``diagonal``, for every component.
        num_train_timesteps, beta_start, beta_end, beta_schedule: the diffusion schedule (as ``GaussianDenoiser``).

    Example:
        >>> model = GaussianMixtureDenoiser.fit(torch.randn(64, 8, 4, 4), num_components=2)
        >>> model(torch.randn(2, 8, 4, 4), torch.tensor([0, 999])).sample.shape
        torch.Size([2, 8, 4, 4])
    """

    @register_to_config
    def __init__(
        self,
        num_components: int = 2,
        in_channels: int = 192,
        sample_size: int | tuple[int, int] = 16,
        covariance: Literal["full", "diagonal"] = "full",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
    ) -> None:
        super().__init__()
        if num_components < 1:
            raise ValueError(f"num_components must be positive, got {num_components}")
        schedule = {
            "num_train_timesteps": num_train_timesteps,
            "beta_start": beta_start,
            "beta_end": beta_end,
            "beta_schedule": beta_schedule,
        }
        self.grid = grid_hw(sample_size)
        self.components = nn.ModuleList(
            GaussianDenoiser(in_channels, sample_size, covariance, **schedule) for _ in range(num_components)
        )
        self.register_buffer("log_weights", torch.full((num_components,), -math.log(num_components)))

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.components[0].alphas_cumprod

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        *,
        num_components: int = 2,
        labels: torch.Tensor | None = None,
        shrinkage: Literal["ledoit_wolf", "diagonal"] = "ledoit_wolf",
        seed: int = 0,
        **schedule: int | float | str,
    ) -> GaussianMixtureDenoiser:
        """Fit one Gaussian per component on training features ``(N, C, h, w)``.

        Args:
            features: features of normal images.
            num_components: K (ignored with ``labels``: one component per distinct label).
            labels: ``(N,)`` category of each image; ``None``: k-means (:func:`kmeans_components`).
            shrinkage: as :meth:`GaussianDenoiser.fit`.
            seed: the k-means seed.
            **schedule: the diffusion schedule (as :meth:`GaussianDenoiser.fit`).

        Raises:
            ValueError: a component with fewer than two images, or labels that do not match the features.
        """
        if labels is None:
            labels = kmeans_components(features, num_components, seed)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (features.shape[0],):
            raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
        names = labels.unique()
        _, channels, h, w = features.shape
        model = cls(
            num_components=len(names),
            in_channels=channels,
            sample_size=h if h == w else (h, w),
            covariance="full" if shrinkage == "ledoit_wolf" else "diagonal",
            **schedule,
        )
        counts = torch.stack([(labels == k).sum() for k in names])
        if int(counts.min()) < 2:
            raise ValueError(f"every component needs at least two images, got counts {counts.tolist()}")
        for component, k in zip(model.components, names, strict=True):
            fitted = GaussianDenoiser.fit(features[labels == k], shrinkage=shrinkage, **schedule)
            component.load_state_dict(fitted.state_dict())
        model.log_weights.copy_((counts.double() / counts.sum()).log())
        return model

    def refit(self, features: torch.Tensor) -> GaussianMixtureDenoiser:
        """A new mixture of this one's kind (K, covariance, schedule) fitted on other features, by k-means."""
        config = self.config
        schedule = {k: config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
        shrinkage = "ledoit_wolf" if config["covariance"] == "full" else "diagonal"
        model = type(self).fit(features, num_components=config["num_components"], shrinkage=shrinkage, **schedule)
        return model.to(self.log_weights.device)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, return_dict: bool = True
    ) -> DenoiserOutput | tuple[torch.Tensor]:
        """Closed-form eps of the mixture.

        Args:
            sample: noisy features ``(B, C, h, w)``.
            timestep: ``(B,)`` or a scalar, integer steps in ``[0, T - 1]``.

        Returns:
            ``DenoiserOutput(sample=eps)`` of the input's shape and dtype (a tuple with ``return_dict=False``).
        """
        check_sample(sample, self.config.in_channels, self.grid)
        b, c, h, w = sample.shape
        t = as_timesteps(timestep, b, sample.device).round().long()
        ab = alpha_bars_at(self.alphas_cumprod, t, b, sample.device)  # float64 (B,), range-checked
        x = sample.double()
        eps_all, log_density = [], []
        for component, log_weight in zip(self.components, self.log_weights, strict=True):
            eps = component(sample, t).sample.double()
            mean = component.mean.double().transpose(0, 1).reshape(1, c, h, w)
            deviation = x - ab.sqrt().reshape(-1, 1, 1, 1) * mean
            quadratic = (deviation * eps).sum(dim=(1, 2, 3)) / (1 - ab).sqrt()
            variances = ab[:, None, None] * component.eigenvalues.double()[None] + (1 - ab)[:, None, None]
            log_det = variances.log().sum(dim=(1, 2))
            log_density.append(log_weight.double() - 0.5 * (quadratic + log_det))
            eps_all.append(eps)
        responsibilities = torch.softmax(torch.stack(log_density, dim=1), dim=1)  # (B, K)
        out = torch.einsum("bk,kbchw->bchw", responsibilities, torch.stack(eps_all)).to(sample.dtype)
        return DenoiserOutput(sample=out) if return_dict else (out,)
