"""A1111's k-diffusion samplers, run inside diffusers pipelines as a scheduler.

Why our own loops: A1111 v1.8.0 samples with k-diffusion (crowsonkb, the commit A1111 pins) around a CompVis
denoiser - continuous sigmas, fractional timesteps from log-sigma interpolation, ``x0 = x - sigma * eps`` - and
diffusers' schedulers reproduce only part of that (no DPM++ 2S a, 3M SDE, DPM fast, Restart or exponential
schedules; integer timesteps in DPM++ 2M Karras; no ``s_churn``). Here every sampler is written from the
k-diffusion papers' update rules as a *generator*: it yields ``(x, sigma)`` where it wants the model, receives the
denoised prediction, and returns the final latents. :class:`KDiffusionScheduler` drives a generator from a
pipeline's loop (``scale_model_input`` hands the UNet the point the sampler asked for, ``step`` sends the
prediction back), so the same loops serve txt2img, img2img, hires fix, SDXL and every later pipeline, with the
pipelines' callbacks (progress, prompt editing, the refiner hand-over) seeing one call per model evaluation.

Noise is A1111's: ancestral and churn noise come from each image's own generator (``ImageRNG.next``), the SDE
samplers' from one Brownian tree per image seeded with the image's seed (``create_noise_sampler``), so an image
does not depend on the batch it ran in. Sampler arithmetic is float32, whatever the UNet's dtype.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from types import SimpleNamespace
from typing import Any

import torch

Loop = Generator[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Options:
    """The knobs A1111 passes to the samplers that take them (``sampler_extra_params`` and ``eta``)."""

    eta: float = 1.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    solver_type: str = "midpoint"


class ModelSigmas:
    """A checkpoint's discrete noise levels, as A1111's CompVis denoiser holds them: the betas in float64, their
    ``alphas_cumprod`` rounded once to float32, ``sigma = sqrt((1 - a) / a)``; timesteps between the 1000 levels
    are interpolated in log sigma."""

    def __init__(self, config: dict[str, Any]):
        steps = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
        kind = config.get("beta_schedule", "scaled_linear")
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        elif kind == "scaled_linear":  # CompVis' "linear": linear in sqrt(beta)
            betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
        elif kind == "linear":
            betas = torch.linspace(start, end, steps, dtype=torch.float64)
        else:
            raise ValueError(f"beta_schedule {kind} is not supported by the k-diffusion samplers")
        alphas_cumprod = torch.cumprod(1 - betas, dim=0).to(torch.float32)
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self.v_prediction = config.get("prediction_type", "epsilon") == "v_prediction"

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional timestep of a noise level (the UNet's ``t``)."""
        log_sigma = sigma.to(torch.float32).log()
        distances = log_sigma - self.log_sigmas[:, None]
        low = distances.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float32)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def schedule(self, kind: str, n: int, discard: bool = False) -> torch.Tensor:
        """The ``n``-step sigma schedule A1111 builds (``KDiffusionSampler.get_sigmas``), zero appended;
        ``discard`` computes one more and drops the penultimate (DPM2, 3M SDE)."""
        n += 1 if discard else 0
        low, high = self.sigma_min, self.sigma_max
        if kind in ("automatic", "uniform"):
            t = torch.linspace(len(self.sigmas) - 1, 0, n)
            sigmas = _append_zero(self.sigma(t))
        elif kind == "karras":
            sigmas = karras(n, low, high)
        elif kind == "exponential":
            sigmas = _append_zero(torch.linspace(math.log(high), math.log(low), n).exp())
        elif kind == "polyexponential":  # rho 1, A1111's default for it
            ramp = torch.linspace(1, 0, n)
            sigmas = _append_zero(torch.exp(ramp * (math.log(high) - math.log(low)) + math.log(low)))
        elif kind == "sgm_uniform":
            start, end = self.t(torch.tensor(high)), self.t(torch.tensor(low))
            sigmas = _append_zero(torch.stack([self.sigma(t) for t in torch.linspace(start, end, n + 1)[:-1]]))
        else:
            raise ValueError(f"schedule {kind} is not supported")
        if discard:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022)'s schedule: evenly spaced in ``sigma ** (1 / rho)``, zero appended."""
    ramp = torch.linspace(0, 1, n)
    high, low = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((high + ramp * (low - high)) ** rho)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


class Noise:
    """Where a sampler's fresh noise comes from: each image's generator (A1111's ``ImageRNG.next``) and, for the
    SDE samplers, one Brownian tree per image seeded with its seed over the schedule's sigma range."""

    def __init__(self, generators: Sequence[torch.Generator] | None, seeds: Sequence[int] | None = None):
        self.generators = list(generators or [])
        self.seeds = list(seeds or [])
        self.trees: list[Any] = []
        self.tree_range: tuple[torch.Tensor, torch.Tensor] | None = None

    def randn(self, x: torch.Tensor) -> torch.Tensor:
        if not self.generators:
            return torch.randn_like(x)
        draws = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in self.generators]
        return torch.stack(draws).to(x.device)

    def brownian(self, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """The Brownian increment between two noise levels, scaled to unit variance."""
        if not self.trees:
            import torchsde

            low, high = self.tree_range
            seeds = self.seeds or [int(torch.randint(0, 2**63 - 1, []).item()) for _ in range(x.shape[0])]
            w0 = torch.zeros_like(x[0])
            self.trees = [torchsde.BrownianTree(low, w0, high, entropy=seed) for seed in seeds]
        a, b, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        with warnings.catch_warnings():  # sigma(t(sigma_max)) may exceed sigma_max by an ulp, as in A1111
            warnings.simplefilter("ignore", UserWarning)
            w = torch.stack([tree(a, b) for tree in self.trees]) * sign
        return w / (b - a).abs().sqrt()


class _Silent(Noise):
    """The noise of a dry run (planning which sigmas a sampler will ask for): zeros, and no RNG consumed."""

    def __init__(self) -> None:
        super().__init__(None)

    def randn(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def brownian(self, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


# ---- the samplers (k-diffusion's update rules; ``x`` and the sigmas are float32) ----


def _d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dsigma."""
    return (x - denoised) / sigma


def _ancestral(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step into a deterministic part down to ``sigma_down`` and fresh noise of ``sigma_up``."""
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


def _churned(x: torch.Tensor, sigmas: torch.Tensor, i: int, noise: Noise, o: Options) -> tuple[Any, Any]:
    """Karras' stochastic churn: raise the noise level by ``gamma`` before the step (A1111 draws the noise each
    step whether or not it is used, so draws happen only when churn is on at all)."""
    if not o.s_churn:
        return x, sigmas[i]
    gamma = min(o.s_churn / (len(sigmas) - 1), 2**0.5 - 1) if o.s_tmin <= sigmas[i] <= o.s_tmax else 0.0
    eps = noise.randn(x) * o.s_noise
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


def euler(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options) -> Loop:
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churned(x, sigmas, i, noise, o)
        denoised = yield x, sigma_hat
        x = x + _d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
    return x


def euler_ancestral(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options) -> Loop:
    for i in range(len(sigmas) - 1):
        denoised = yield x, sigmas[i]
        down, up = _ancestral(sigmas[i], sigmas[i + 1], o.eta)
        x = x + _d(x, sigmas[i], denoised) * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise.randn(x) * o.s_noise * up
    return x


def heun(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options) -> Loop:
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churned(x, sigmas, i, noise, o)
        denoised = yield x, sigma_hat
        d = _d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            guess = x + d * dt
            denoised_2 = yield guess, sigmas[i + 1]
            x = x + (d + _d(guess, sigmas[i + 1], denoised_2)) / 2 * dt
    return x


def dpm_2(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options) -> Loop:
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churned(x, sigmas, i, noise, o)
        denoised = yield x, sigma_hat
        d = _d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            half = x + d * (mid - sigma_hat)
            denoised_2 = yield half, mid
            x = x + _d(half, mid, denoised_2) * (sigmas[i + 1] - sigma_hat)
    return x


def dpm_2_ancestral(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options) -> Loop:
    for i in range(len(sigmas) - 1):
        denoised = yield x, sigmas[i]
        down, up = _ancestral(sigmas[i], sigmas[i + 1], o.eta)
        d = _d(x, sigmas[i], denoised)
        if down == 0:
            x = x + d * (down - sigmas[i])
        else:
            mid = sigmas[i].log().lerp(down.log(), 0.5).exp()
            half = x + d * (mid - sigmas[i])
            denoised_2 = yield half, mid
            x = x + _d(half, mid, denoised_2) * (down - sigmas[i])
            x = x + noise.randn(x) * o.s_noise * up
    return x


def lms(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options, order: int = 4) -> Loop:
    """Linear multistep on the sigma axis; the coefficients integrate the Lagrange basis polynomials exactly."""
    import numpy as np

    grid = sigmas.cpu().numpy()  # float32, as k-diffusion's coefficients see it
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = yield x, sigmas[i]
        history = [*history, _d(x, sigmas[i], denoised)][-order:]
        current = min(i + 1, order)
        coefficients = []
        for j in range(current):
            basis = np.polynomial.Polynomial([1.0])
            for k in range(current):
                if k != j:
                    basis *= np.polynomial.Polynomial([-float(grid[i - k]), 1.0]) / float(grid[i - j] - grid[i - k])
            integral = basis.integ()
            coefficients.append(float(integral(float(grid[i + 1])) - integral(float(grid[i]))))
        x = x + sum(c * d for c, d in zip(coefficients, reversed(history), strict=True))
    return x


def _t(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def dpmpp_2s_ancestral(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options) -> Loop:
    for i in range(len(sigmas) - 1):
        denoised = yield x, sigmas[i]
        down, up = _ancestral(sigmas[i], sigmas[i + 1], o.eta)
        if down == 0:
            x = x + _d(x, sigmas[i], denoised) * (down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(down)
            h = t_next - t
            s = t + h / 2
            half = (_sigma(s) / _sigma(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = yield half, _sigma(s)
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise.randn(x) * o.s_noise * up
    return x


def dpmpp_sde(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options, r: float = 0.5) -> Loop:
    for i in range(len(sigmas) - 1):
        denoised = yield x, sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + _d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        down, up = _ancestral(_sigma(t), _sigma(s), o.eta)
        s_ = _t(down)
        mid = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
        mid = mid + noise.brownian(x, _sigma(t), _sigma(s)) * o.s_noise * up
        denoised_2 = yield mid, _sigma(s)
        down, up = _ancestral(_sigma(t), _sigma(t_next), o.eta)
        t_next_ = _t(down)
        blended = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_2
        x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * blended
        x = x + noise.brownian(x, _sigma(t), _sigma(t_next)) * o.s_noise * up
    return x


def dpmpp_2m(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options) -> Loop:
    previous = None
    for i in range(len(sigmas) - 1):
        denoised = yield x, sigmas[i]
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        if previous is None or sigmas[i + 1] == 0:
            estimate = denoised
        else:
            r = (t - _t(sigmas[i - 1])) / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
        x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * estimate
        previous = denoised
    return x


def dpmpp_2m_sde(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options) -> Loop:
    previous, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = yield x, sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            eta_h = o.eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if previous is not None:
                r = h_last / h
                if o.solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - previous)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - previous)
            if o.eta:
                w = noise.brownian(x, sigmas[i], sigmas[i + 1])
                x = x + w * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * o.s_noise
            h_last = h
        previous = denoised
    return x


def dpmpp_3m_sde(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options) -> Loop:
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = yield x, sigmas[i]
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            h_eta = h * (o.eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * ((denoised - d_1) / (h_1 / h))
            if o.eta:
                w = noise.brownian(x, sigmas[i], sigmas[i + 1])
                x = x + w * sigmas[i + 1] * (-2 * h * o.eta).expm1().neg().sqrt() * o.s_noise
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x


def dpm_fast(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options) -> Loop:
    """DPM-Solver (Lu et al. 2022) with fixed steps: ``n`` model calls split into third-, second- and first-order
    steps evenly spaced in log sigma between the schedule's ends (A1111 passes ``sigma_sched[-2]``,
    ``sigma_sched[0]`` and ``len - 1``)."""
    nfe = len(sigmas) - 1
    t_start, t_end = _t(sigmas[0]), _t(sigmas[-2])
    m = nfe // 3 + 1
    ts = torch.linspace(float(t_start), float(t_end), m + 1)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]

    def eps(point: torch.Tensor, t: torch.Tensor) -> Generator:
        denoised = yield point, _sigma(t)
        return (point - denoised) / _sigma(t)

    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        if o.eta:
            down, _ = _ancestral(_sigma(t), _sigma(t_next), o.eta)
            t_to = torch.minimum(t_end, _t(down))
            up = (_sigma(t_next) ** 2 - _sigma(t_to) ** 2) ** 0.5
        else:
            t_to, up = t_next, 0.0
        e = yield from eps(x, t)
        h = t_to - t
        if order == 1:
            x = x - _sigma(t_to) * h.expm1() * e
        elif order == 2:
            s1 = t + h / 2
            u1 = x - _sigma(s1) * (h / 2).expm1() * e
            e1 = yield from eps(u1, s1)
            x = x - _sigma(t_to) * h.expm1() * e - _sigma(t_to) * h.expm1() * (e1 - e)
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = t + r1 * h, t + r2 * h
            u1 = x - _sigma(s1) * (r1 * h).expm1() * e
            e1 = yield from eps(u1, s1)
            u2 = x - _sigma(s2) * (r2 * h).expm1() * e
            u2 = u2 - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (e1 - e)
            e2 = yield from eps(u2, s2)
            x = x - _sigma(t_to) * h.expm1() * e - _sigma(t_to) / r2 * (h.expm1() / h - 1) * (e2 - e)
        x = x + up * o.s_noise * noise.randn(x)
    return x


def restart(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options) -> Loop:
    """A1111's Restart sampler (Xu et al. 2023): Heun steps down a Karras schedule and, from 20 steps on, a
    segment that re-noises from sigma ~0.1 up to ~2 and descends again (twice from 36 steps), keeping the total
    number of steps."""
    steps = len(sigmas) - 1
    restarts: dict[int, tuple[int, int, float]] = {}
    if steps >= 20:
        restart_steps, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = karras(steps - restart_steps * times, float(sigmas[-2]), float(sigmas[0]))
        restarts = {int(torch.argmin((sigmas - 0.1).abs())): (restart_steps + 1, times, 2.0)}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restarts:
            count, times, top = restarts[i + 1]
            high = int(torch.argmin((sigmas - top).abs()))
            if high < i + 1:
                segment = karras(count, float(sigmas[i + 1]), float(sigmas[high]))[:-1]
                pairs.extend(list(pairwise(segment)) * times)
    last = None
    for old, new in pairs:
        if last is not None and last < old:
            x = x + noise.randn(x) * o.s_noise * (old**2 - last**2) ** 0.5
        denoised = yield x, old
        d = _d(x, old, denoised)
        if new == 0:
            x = x + d * (new - old)
        else:
            guess = x + d * (new - old)
            denoised_2 = yield guess, new
            x = x + (d + _d(guess, new, denoised_2)) / 2 * (new - old)
        last = new
    return x


LOOPS: dict[str, Callable[..., Loop]] = {
    f.__name__: f
    for f in (
        euler,
        euler_ancestral,
        heun,
        dpm_2,
        dpm_2_ancestral,
        lms,
        dpmpp_2s_ancestral,
        dpmpp_sde,
        dpmpp_2m,
        dpmpp_2m_sde,
        dpmpp_3m_sde,
        dpm_fast,
        restart,
    )
}


def plan(loop: str, sigmas: torch.Tensor, options: Options) -> list[torch.Tensor]:
    """The noise levels at which ``loop`` will call the model on ``sigmas``: a dry run with zero noise (every
    sampler here asks for the same levels whatever the latents)."""
    x = torch.zeros(1, 1)
    gen = LOOPS[loop](x, sigmas, _Silent(), options)
    asked = []
    try:
        _, sigma = next(gen)
        while True:
            asked.append(sigma)
            _, sigma = gen.send(torch.zeros(1, 1))
    except StopIteration:
        return asked


class KDiffusionScheduler:
    """A diffusers-compatible scheduler that runs one of :data:`LOOPS` (see the module docstring).

    ``denoise``: for img2img, the number of the schedule's last steps to run (A1111's ``t_enc + 1``): the pipeline
    is then called with strength 1 and :meth:`add_noise` starts at the cut schedule's first sigma, as A1111's
    ``sample_img2img`` does. ``on_denoised`` may rewrite each prediction (A1111 blends inpainting's x0 there).
    """

    order = 1
    init_noise_sigma = 1.0
    noise_multiplier = 1.0  # img2img's initial_noise_multiplier (A1111 scales the noise before adding it)

    def __init__(
        self,
        loop: str,
        model: ModelSigmas,
        schedule: str = "automatic",
        discard: bool = False,
        options: Options | None = None,
        generators: Sequence[torch.Generator] | None = None,
        seeds: Sequence[int] | None = None,
        denoise: int | None = None,
    ):
        self.loop, self.model, self.schedule_kind, self.discard = loop, model, schedule, discard
        self.options = options or Options()
        self.generators, self.seeds, self.denoise = generators, seeds, denoise
        self.on_denoised: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.config = SimpleNamespace(num_train_timesteps=len(model.sigmas), loop=loop, schedule=schedule)
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self.num_inference_steps = 0
        self._gen: Loop | None = None
        self._asked: tuple[torch.Tensor, torch.Tensor] | None = None
        self._calls = 0
        self._result: torch.Tensor | None = None

    def set_timesteps(self, num_inference_steps: int, device: Any = None, **_: Any) -> None:
        full = self.model.schedule(self.schedule_kind, num_inference_steps, self.discard)
        steps = len(full) - 1
        cut = full if self.denoise is None else full[steps - min(self.denoise, steps) :]
        self.num_inference_steps = num_inference_steps
        self.full_sigmas, self.sigmas = full, cut
        self.asked_sigmas = plan(self.loop, cut, self.options)
        self.timesteps = torch.stack([self.model.t(s) for s in self.asked_sigmas]).to(device)
        self.init_noise_sigma = float(cut[0])
        self._gen, self._asked, self._calls, self._result = None, None, 0, None

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index:
            raise ValueError("the k-diffusion scheduler cuts img2img schedules itself (pass strength 1)")

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """img2img's start: the init latents plus noise at the cut schedule's first sigma."""
        return (original.float() + noise.float() * self.noise_multiplier * self.sigmas[0]).to(original.dtype)

    def _start(self, x: torch.Tensor) -> None:
        noise = Noise(self.generators, self.seeds)
        positive = self.full_sigmas[self.full_sigmas > 0]
        noise.tree_range = (positive.min(), positive.max())
        self._gen = LOOPS[self.loop](x.float(), self.sigmas, noise, self.options)  # sigmas stay on the CPU
        self._asked = next(self._gen)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The UNet's input: the point the sampler asked for (repeated for the CFG halves), times ``c_in``."""
        if self._gen is None:
            if not self.generators:  # the batch is unknown until step(): the first call is at the start point
                if self.options.s_churn:
                    raise ValueError("s_churn needs the images' generators")
                return (sample * (1 / (self.sigmas[0] ** 2 + 1.0) ** 0.5)).to(sample.dtype)
            self._start(sample[: len(self.generators)])
        x, sigma = self._asked
        repeats = sample.shape[0] // x.shape[0]
        model_input = torch.cat([x] * repeats) if repeats > 1 else x
        c_in = 1 / (sigma**2 + 1.0) ** 0.5
        return (model_input * c_in).to(sample.dtype)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *_: Any, **kwargs: Any) -> Any:
        """Turn the guided prediction into x0 (epsilon or v), hand it to the sampler, return its next point."""
        if self._gen is None:
            self._start(sample)
        x, sigma = self._asked
        output = model_output.float()
        if self.model.v_prediction:  # k-diffusion's CompVisVDenoiser scalings
            c_skip, c_out = 1 / (sigma**2 + 1.0), -sigma / (sigma**2 + 1.0) ** 0.5
            denoised = output * c_out + x * c_skip
        else:
            denoised = x - output * sigma
        if self.on_denoised is not None:
            denoised = self.on_denoised(denoised)
        self._calls += 1
        try:
            self._asked = self._gen.send(denoised)
            following = self._asked[0]
        except StopIteration as done:
            self._result = done.value
            following = done.value
        result = following.to(sample.dtype)
        return SimpleNamespace(prev_sample=result) if kwargs.get("return_dict") else (result,)

    @property
    def finished(self) -> bool:
        return self._result is not None
