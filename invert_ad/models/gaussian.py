"""Training-free denoiser: the exact eps of a per-position Gaussian fitted on training features.

If the features at grid position p are distributed as ``N(mu_p, Sigma_p)`` and ``Sigma_p = U diag(l) U^T``,
the noisy marginal at alpha-bar ``a`` is ``N(sqrt(a) mu_p, a Sigma_p + (1 - a) I)`` and the optimal noise
prediction is

    eps*(x_t, t) = sqrt(1 - a) U diag(1 / (a l + 1 - a)) U^T (x_t - sqrt(a) mu_p).

Deterministic DDIM inversion with this eps maps features to their whitened deviation
``Sigma_p^{-1/2} (x_0 - mu_p)`` at the end of the schedule, which makes the InvAD scores PaDiM-like
Mahalanobis statistics. Covariances are estimated with Ledoit-Wolf shrinkage (or kept diagonal).

Every ``M_t = sqrt(1 - a) U diag(1 / (a l + 1 - a)) U^T`` shares ``U``, so the Euler steps of that inversion are
diagonal in the eigenbasis and compose into one affine map per position for any grid
(:meth:`GaussianDenoiser.closed_form_inversion`, which :class:`~invert_ad.InversionScorer` uses).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..inversion import ddim_coefficients
from ..schedule import schedule_alphas_cumprod
from ._layers import DenoiserOutput, alpha_bars_at, as_timesteps, check_sample, grid_hw

__all__ = ["GaussianDenoiser", "ledoit_wolf"]

COVARIANCES = ("full", "diagonal", "identity")
SHRINKAGES = ("ledoit_wolf", "diagonal")


def ledoit_wolf(x: torch.Tensor, assume_centered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Ledoit-Wolf shrunk covariance, batched over leading dimensions.

    ``Sigma = (1 - s) S + s mu I`` with ``S`` the (biased) empirical covariance, ``mu = trace(S) / C`` and the
    shrinkage ``s`` of Ledoit & Wolf (2004), "A well-conditioned estimator for large-dimensional covariance
    matrices", with the same estimate as ``sklearn.covariance.LedoitWolf``.

    Args:
        x: samples ``(..., N, C)``.
        assume_centered: treat ``x`` as already centred (no mean subtracted).

    Returns:
        The covariance ``(..., C, C)`` and the shrinkage ``(...)``, both float64.
    """
    x = x.to(torch.float64)
    if not assume_centered:
        x = x - x.mean(dim=-2, keepdim=True)
    n, c = x.shape[-2:]
    emp = x.mT @ x / n
    mu = emp.diagonal(dim1=-2, dim2=-1).sum(-1) / c
    emp_sq = emp.square().sum(dim=(-2, -1))
    # beta: variance of the entries of x x^T around S; delta: squared distance of S from mu I (both / C)
    beta = (x.square().sum(-1).square().sum(-1) / n - emp_sq) / (c * n)
    delta = (emp_sq - c * mu.square()) / c
    beta = torch.minimum(beta, delta)
    shrinkage = torch.where(delta > 0, beta / delta.clamp_min(torch.finfo(delta.dtype).tiny), 0.0)
    identity = torch.eye(c, dtype=x.dtype, device=x.device)
    s = shrinkage[..., None, None]
    return (1 - s) * emp + s * mu[..., None, None] * identity, shrinkage


def _floats(values: Sequence[float] | torch.Tensor) -> list[float]:
    """Python floats of a sequence or tensor (``tolist`` reads a constant tensor while tracing, too)."""
    return values.tolist() if isinstance(values, torch.Tensor) else [float(v) for v in values]


class GaussianDenoiser(ModelMixin, ConfigMixin):
    """Closed-form eps of a per-position Gaussian prior on the features; nothing to train.

    Build it with :meth:`fit`. The statistics are buffers saved by ``save_pretrained``: ``mean`` ``(P, C)``,
    ``eigenvalues`` ``(P, C)`` and, for a full covariance, ``eigenvectors`` ``(P, C, C)`` (columns), with
    ``P = h * w`` positions in row-major order. Before fitting they describe ``N(0, I)``. The model has no
    parameters; the closed form runs in the buffers' dtype with autocast disabled.

    ``covariance="identity"`` is the standard-normal prior itself, with no buffers and nothing to fit: its eps
    is the trivial predictor ``sqrt(1 - ab_t) x_t``, exact for features standardised to ``N(0, I)``, computed in
    float32.

    Args:
        in_channels: feature channels C.
        sample_size: feature grid, an int (square) or ``(h, w)``; inputs must have this grid.
        covariance: ``full`` (eigendecomposition per position), ``diagonal`` (per-channel variances) or
            ``identity`` (the fixed ``N(0, I)`` prior: the trivial predictor).
        num_train_timesteps: T of the diffusion schedule the eps belongs to.
        beta_start: first beta of that schedule.
        beta_end: last beta.
        beta_schedule: ``linear`` or ``scaled_linear`` (computed in float64, like ``DDPMScheduler``'s values).

    Raises:
        ValueError: an unknown ``covariance`` or ``beta_schedule``.

    Example:
        >>> model = GaussianDenoiser.fit(torch.randn(64, 8, 4, 4))
        >>> model(torch.randn(2, 8, 4, 4), torch.tensor([0, 999])).sample.shape
        torch.Size([2, 8, 4, 4])
    """

    max_cached_operators: int = 4
    """Timesteps whose per-position eps matrices are kept after first use (``P C^2`` numbers each: 38 MB in float32
    for 192 channels on 16 x 16); the paper grid calls three."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 192,
        sample_size: int | tuple[int, int] = 16,
        covariance: Literal["full", "diagonal"] = "full",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
    ) -> None:
        super().__init__()
        if covariance not in COVARIANCES:
            raise ValueError(f"unknown covariance {covariance!r}; choose one of {COVARIANCES}")
        self.grid = grid_hw(sample_size)
        positions = self.grid[0] * self.grid[1]
        self.alphas_cumprod = schedule_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)
        self._operators: dict[int, torch.Tensor] = {}  # timestep -> M_t, see _cached_operator
        self._inversion_maps: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # see closed_form_inversion
        self._operator_state: tuple | None = None
        if covariance == "identity":
            return
        self.register_buffer("mean", torch.zeros(positions, in_channels))
        self.register_buffer("eigenvalues", torch.ones(positions, in_channels))
        if covariance == "full":
            self.register_buffer("eigenvectors", torch.eye(in_channels).expand(positions, -1, -1).clone())

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        *,
        shrinkage: Literal["ledoit_wolf", "diagonal"] = "ledoit_wolf",
        min_variance: float = 1e-6,
        chunk_size: int = 32,
        **schedule: int | float | str,
    ) -> GaussianDenoiser:
        """Fit the mean and covariance of every grid position on training features.

        Args:
            features: features of normal images ``(N, C, h, w)``, ``N >= 2``.
            shrinkage: ``ledoit_wolf`` (full covariance, Ledoit-Wolf shrinkage, as PaDiM-style detectors) or
                ``diagonal`` (per-channel variances only).
            min_variance: floor for the eigenvalues (variances), keeping the closed form finite at ``t = 0``.
            chunk_size: positions processed at once (bounds the float64 working memory).
            **schedule: ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` of the
                diffusion schedule (defaults: diffusers' ``DDPMScheduler``).

        Returns:
            A fitted :class:`GaussianDenoiser` on the CPU with float32 buffers.

        Raises:
            ValueError: features not ``(N, C, h, w)`` with ``N >= 2``, non-finite values, or an unknown
                ``shrinkage``.
        """
        if shrinkage not in SHRINKAGES:
            raise ValueError(f"unknown shrinkage {shrinkage!r}; choose one of {SHRINKAGES}")
        if features.dim() != 4 or features.shape[0] < 2:
            raise ValueError(f"features must have shape (N, C, h, w) with N >= 2, got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError("features contain NaN or infinite values")
        _, channels, h, w = features.shape
        model = cls(
            in_channels=channels,
            sample_size=h if h == w else (h, w),
            covariance="full" if shrinkage == "ledoit_wolf" else "diagonal",
            **schedule,
        )
        samples = features.detach().flatten(2).permute(2, 0, 1)  # (P, N, C)
        means, values, vectors = [], [], []
        for chunk in samples.split(chunk_size):
            chunk = chunk.to(torch.float64)
            means.append(chunk.mean(dim=1))
            if shrinkage == "diagonal":
                values.append(chunk.var(dim=1, correction=0))
            else:
                chunk_values, chunk_vectors = torch.linalg.eigh(ledoit_wolf(chunk)[0])
                values.append(chunk_values)
                vectors.append(chunk_vectors)
        model.mean.copy_(torch.cat(means))
        model.eigenvalues.copy_(torch.cat(values).clamp_min(min_variance))
        if vectors:
            model.eigenvectors.copy_(torch.cat(vectors))
        return model

    def refit(self, features: torch.Tensor) -> GaussianDenoiser:
        """A new denoiser of this one's kind (covariance, schedule) fitted on other features ``(N, C, h, w)``.

        :meth:`AnomalyDetector.fit <invert_ad.AnomalyDetector.fit>` uses it for out-of-fold scores.
        """
        config = self.config
        if config["covariance"] == "identity":  # the fixed N(0, I) prior: nothing to fit
            return self
        schedule = {k: config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
        shrinkage = "ledoit_wolf" if config["covariance"] == "full" else "diagonal"
        return type(self).fit(features, shrinkage=shrinkage, **schedule).to(self.mean.device)

    def alphas_cumprod_at(self, timestep: torch.Tensor | int, batch_size: int, device: torch.device) -> torch.Tensor:
        """Alpha-bar at integer timesteps (floats are rounded): ``(B,)`` float64 on ``device``.

        Raises:
            ValueError: a timestep outside ``[0, T - 1]``, or neither a scalar nor ``(B,)``.
        """
        return alpha_bars_at(self.alphas_cumprod, timestep, batch_size, device)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, return_dict: bool = True
    ) -> DenoiserOutput | tuple[torch.Tensor]:
        """The exact eps of the fitted Gaussian at noise level ``t``.

        Args:
            sample: noisy features ``(B, C, h, w)``.
            timestep: integer training timesteps in ``[0, T - 1]``, a scalar or ``(B,)``.
            return_dict: return a :class:`DenoiserOutput` (else a 1-tuple).

        Returns:
            eps ``(B, C, h, w)`` in the dtype of ``sample``.

        Raises:
            ValueError: a wrong input shape or a timestep outside ``[0, T - 1]``.
        """
        check_sample(sample, self.config.in_channels, self.grid)
        b, c, h, w = sample.shape
        t = as_timesteps(timestep, b, sample.device).round().long()
        ab = self.alphas_cumprod_at(t, b, sample.device)  # float64 (B,), range-checked
        if self.config.covariance == "identity":
            with torch.autocast(device_type=sample.device.type, enabled=False):
                out = ((1 - ab).sqrt().float()[:, None, None, None] * sample.float()).to(sample.dtype)
            return DenoiserOutput(sample=out) if return_dict else (out,)
        ab = ab[None, :, None]  # (1, B, 1)
        dtype = self.mean.dtype
        with torch.autocast(device_type=sample.device.type, enabled=False):
            x = sample.to(dtype).flatten(2).permute(2, 0, 1)  # (P, B, C): one small matrix product per position
            deviation = x - ab.sqrt().to(dtype) * self.mean[:, None, :]
            operator = None if self.config.covariance == "diagonal" else self._cached_operator(t)
            if operator is not None:
                eps = torch.bmm(deviation, operator)
            else:
                gain = (1 - ab).sqrt().to(dtype) / (ab.to(dtype) * self.eigenvalues[:, None, :] + (1 - ab).to(dtype))
                if self.config.covariance == "diagonal":
                    eps = gain * deviation
                else:
                    rotated = torch.bmm(deviation, self.eigenvectors)  # rows (U^T d)^T
                    eps = torch.bmm(gain * rotated, self.eigenvectors.mT)  # rows (U g U^T d)^T
        out = eps.permute(1, 2, 0).reshape(b, c, h, w).to(sample.dtype)
        return DenoiserOutput(sample=out) if return_dict else (out,)

    def _valid_caches(self) -> bool:
        """Empty the caches of derived matrices if the statistics changed (``fit``, ``load_state_dict``, ``to``);
        ``False`` where no change could be detected (inference-mode buffers have no version counter)."""
        buffers = list(self.buffers(recurse=False))
        if any(v.is_inference() for v in buffers):
            return False
        state = tuple((v.data_ptr(), v._version, v.dtype, v.device) for v in buffers)
        if self._operator_state != state:
            self._operators, self._inversion_maps, self._operator_state = {}, {}, state
        return True

    def _cached_operator(self, t: torch.Tensor) -> torch.Tensor | None:
        """``M_t`` of :meth:`operator` ``(P, C, C)`` if all samples of the batch share one timestep, else ``None``.

        Built on first use (in float64, stored in the buffers' dtype) and kept for up to
        :attr:`max_cached_operators` timesteps, which makes each later call one batched matrix product (reading
        ``P C^2`` numbers once) instead of two rotations by the eigenvectors; a batch of mixed timesteps, a
        further timestep, or tracing (``torch.compile``, ``torch.export``: the check reads tensor values) use
        the two rotations.
        """
        if torch.compiler.is_compiling() or torch.compiler.is_exporting() or not self._valid_caches():
            return None
        first = int(t[0])
        if not bool((t == first).all()):
            return None
        if first not in self._operators and len(self._operators) < self.max_cached_operators:
            with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor, usable in any mode
                self._operators[first] = self.operator(first).to(self.eigenvectors.dtype)
        return self._operators.get(first)

    def inversion_map(
        self, call_points: Sequence[int], alpha_bars: Sequence[float] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact affine map of DDIM inversion with this eps: ``x_K = A_p x_0 + b_p`` at every position ``p``.

        Every ``M_t`` shares the eigenvectors ``U_p``, so each Euler step of
        :func:`~invert_ad.inversion.ddim_integrate` (``x <- c_x x + c_eps M_t (x - sqrt(a_t) mu_p)``) is diagonal
        in the eigenbasis and the whole inversion composes into ``A_p = U_p diag(d_p) U_p^T`` with
        ``d_p = prod_k (c_x,k + c_eps,k g_k(l_p))`` and an offset ``b_p`` along the mean: one matrix per position
        for any number of calls.

        Args:
            call_points: the ``K`` integer timesteps eps is evaluated at (the model's own alpha-bars there).
            alpha_bars: the ``K + 1`` alpha-bars of the steps (those ``ddim_integrate`` receives).

        Returns:
            ``A`` ``(P, C, C)`` (symmetric) for a full covariance, its diagonal ``(P, C)`` otherwise, and ``b``
            ``(P, C)``, float64 on the buffers' device.

        Raises:
            ValueError: ``len(alpha_bars) != len(call_points) + 1``, or a timestep outside ``[0, T - 1]``.
        """
        steps = _floats(alpha_bars)
        if len(steps) != len(call_points) + 1:
            raise ValueError(f"need {len(call_points) + 1} alpha-bars for {len(call_points)} calls, got {len(steps)}")
        covariance = self.config.covariance
        if covariance == "identity":
            positions, channels = self.grid[0] * self.grid[1], self.config.in_channels
            values = torch.ones(positions, channels, dtype=torch.float64)
            mean = torch.zeros_like(values)
        else:
            values, mean = self.eigenvalues.to(torch.float64), self.mean.to(torch.float64)
        vectors = self.eigenvectors.to(torch.float64) if covariance == "full" else None
        rotated_mean = mean if vectors is None else (vectors.mT @ mean[..., None])[..., 0]  # U^T mu per position
        model_bars = self.alphas_cumprod_at(torch.as_tensor(list(call_points)), len(call_points), values.device)
        diagonal, offset = torch.ones_like(values), torch.zeros_like(values)
        for k, a in enumerate(model_bars.tolist()):
            scale, c_eps = ddim_coefficients(steps[k], steps[k + 1])
            gain = c_eps * (1 - a) ** 0.5 / (a * values + (1 - a))
            diagonal, offset = (scale + gain) * diagonal, (scale + gain) * offset - gain * a**0.5 * rotated_mean
        if vectors is None:
            return diagonal, offset
        return (vectors * diagonal[:, None, :]) @ vectors.mT, (vectors @ offset[..., None])[..., 0]

    @torch.compiler.disable  # eager under torch.compile too: the cache is checked against the real buffers
    def _cached_inversion_map(
        self, call_points: Sequence[int], alpha_bars: Sequence[float] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = (tuple(int(t) for t in call_points), tuple(_floats(alpha_bars)))
        if torch.compiler.is_exporting():  # the buffers are fake while exporting: use what an eager call built
            return self._inversion_maps.get(key)
        if not self._valid_caches():
            return None
        if key not in self._inversion_maps:
            dtype = self.mean.dtype if self.config.covariance != "identity" else torch.float32
            with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable in any mode
                self._inversion_maps[key] = tuple(m.to(dtype) for m in self.inversion_map(*key))
        return self._inversion_maps[key]

    def closed_form_inversion(
        self, sample: torch.Tensor, call_points: Sequence[int], alpha_bars: Sequence[float] | torch.Tensor
    ) -> torch.Tensor | None:
        """``ddim_integrate(eps, sample, call_points, alpha_bars)`` in one matrix product per position.

        Applies :meth:`inversion_map`, built in float64 on first use for these points (stored in the buffers'
        dtype) and kept until the statistics change: the whole inversion then reads ``P C^2`` numbers once,
        instead of twice per call (the rotations of :meth:`forward`). :class:`~invert_ad.InversionScorer` calls it
        for its latents. Equal to the Euler steps up to floating-point rounding.

        Args:
            sample: features at ``call_points[0]``, ``(B, C, h, w)``.
            call_points: the ``K`` timesteps of the calls.
            alpha_bars: the ``K + 1`` step alpha-bars.

        Returns:
            The final state ``(B, C, h, w)`` in the dtype of ``sample``, or ``None`` where the map cannot be had
            without tracing its construction (exporting before any eager call, inference-mode buffers): then use
            :func:`~invert_ad.inversion.ddim_integrate`.

        Raises:
            ValueError: a wrong input shape, or alpha-bars that do not fit the points.
        """
        check_sample(sample, self.config.in_channels, self.grid)
        maps = self._cached_inversion_map(call_points, alpha_bars)
        if maps is None:
            return None
        matrix, offset = maps
        b, c, h, w = sample.shape
        with torch.autocast(device_type=sample.device.type, enabled=False):
            x = sample.to(offset.dtype).flatten(2).permute(2, 0, 1)  # (P, B, C)
            x = torch.bmm(x, matrix) if matrix.dim() == 3 else x * matrix[:, None, :]  # A symmetric: rows (A x)^T
            x = x + offset[:, None, :]
        return x.permute(1, 2, 0).reshape(b, c, h, w).to(sample.dtype)

    def operator(self, timestep: int) -> torch.Tensor:
        """The symmetric matrices ``M_t = sqrt(1 - a) U diag(1 / (a l + 1 - a)) U^T`` per position, float64.

        ``eps*(x_t, t) = M_t (x_t - sqrt(a) mu_p)`` at every position ``p`` (full covariance only).

        Args:
            timestep: an integer training timestep in ``[0, T - 1]``.

        Returns:
            ``(P, C, C)`` float64 on the buffers' device.
        """
        ab = self.alphas_cumprod[int(timestep)].item()
        vectors = self.eigenvectors.to(torch.float64)
        gain = (1 - ab) ** 0.5 / (ab * self.eigenvalues.to(torch.float64) + (1 - ab))
        return (vectors * gain[:, None, :]) @ vectors.mT
