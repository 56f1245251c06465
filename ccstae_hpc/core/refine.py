"""Inference: encode patterns, then refine each affine against the cycle loss.

The refinement keeps the dictionary fixed and minimises the cycle term of the loss (the
dictionary pattern, warped back by the inverse affine, must reproduce the input) for each
pattern with a batched Gauss-Newton / Levenberg-Marquardt solver.  Only the smooth,
noise-free dictionary is ever interpolated, never the noisy input, and pixels are weighted
by the inverse of their expected counts, so the fit is a Poisson maximum-likelihood
estimate of the affine.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ccstae_hpc.core.disks import blur_profile
from ccstae_hpc.core.model import CCSTAE, affine_matrix
from ccstae_hpc.core.strain import rotation_matrix

__all__ = ["encode", "refine", "refine_checked", "ring_rotation", "Registration", "DiskEntries",
           "relate_entries", "compose_affine", "disk_templates", "pixel_grid", "LINEAR_PARAMS"]

# Rotations tried when one dictionary entry is fitted onto another: the learned entries may
# sit in any orientation, and Gauss-Newton captures only a few degrees; a step of
# ROTATION_SEARCH_STEP_DEG over one symmetry period leaves every start within half a step.
ROTATION_SEARCH_STEP_DEG = 3.0
# fits of one entry onto another repeated from the previous result (fresh mask weights)
RELATION_REFITS = 2
# trust region of one Gauss-Newton step: the largest change of each linear and translation
# parameter, in normalised detector units (on a 128 px detector a translation of 0.05 is
# 3.2 px, and a linear change of 0.05 moves a disk 20 px from the centre by 1 px)
TRUST_REGION = 0.05
# Poisson weights of a disk-sum model are floored at this fraction of its mean (empty disks)
COMPOSITION_WEIGHT_FLOOR = 1e-3
# px around the fitted pixels that hold an entry's whole labelled disks (the labels grow the
# disk mask by phases.LABEL_DILATION = 2 px; 2 px more for the pattern's own strain)
COMPOSITION_REACH_PX = 4
# Gauss-Newton iterations of a registration, the first COARSE_ITERS of them on the blurred
# dictionary and every other pixel: on the 96x96 benchmark scan (2e3 e-/pattern) 5 with 2
# coarse gave the MAE of 6 with 3 within 0.2 % for 8 % less work; 4 with 2 was 1.5 % worse
REFINE_ITERS = 5
COARSE_ITERS = 2
# patterns encoded together: on one thread (128 px detector, 64 px encoder input) 128 at a
# time took 0.25 s per 768 patterns, 256 took 0.35 s and 512 more (the work arrays of larger
# batches leave the CPU's cache); the classes and affines do not depend on it
ENCODE_BATCH = 128
# patterns registered together: small enough that the work arrays stay in the CPU's cache
REFINE_CHUNK = 32
# The encoder's affine head can start a pattern further from its entry in rotation than the
# Gauss-Newton steps capture: on a 32x32 heterostructure at 500 e-/pattern one class started
# 14-16 deg off and its fits settled 10-20 deg from the truth.  The pattern's angular
# harmonics of the orders symmetry x 1..ROTATION_HARMONICS, shell by shell
# (ROTATION_SHELL_PX wide) on the ring, against its entry's, give its rotation modulo
# 360/symmetry from all the ring's counts (to ROTATION_GRID_DEG); where that differs from the
# start by more than ROTATION_CAPTURE_DEG the pattern is also registered from the turned
# start.  6 deg: Gauss-Newton with its coarse stage captured every start up to 10 deg off
# at 1e4, 1e3 and 300 e-/pattern (the setup of tests/test_infer.py, 8 patterns per angle),
# and the ring's estimate scatters by 3-5 deg at 1e3 e- on abTEM data, where a 3 deg
# threshold re-fitted 10 % of the patterns for nothing, and the changed calibration fits
# made the single-pattern map 10-30 % worse (6 deg: as without the check)
ROTATION_HARMONICS = 3
ROTATION_SHELL_PX = 2.0
ROTATION_GRID_DEG = 0.25
ROTATION_CAPTURE_DEG = 6.0
# the linear part of the sampling matrix B in the Gauss-Newton parameter vector
# (B00, B01, s_x, B10, B11, s_y, g, b): the rows and columns of the covariance returned
LINEAR_PARAMS = (0, 1, 3, 4)
# fitted parameters per pattern (6 affine, scale, offset): degrees of freedom of the residual
N_PARAMS = 8
# The curvature estimate phi H^-1 takes the fitted pixels as independent, but the fit sees the
# data smoothed by ``refine(smooth=0.5)``: the residual's dispersion understates the counts'
# noise (the kernel's squared weights sum to 0.41) and neighbouring pixels are correlated.
# The scatter of unpooled `ccstae run` fits about the truth (sim.evaluate.truth_relative),
# divided by the raw estimate, was 1.55-1.87 (standard deviations) on the project's
# simulator at 1e4 and 1e3 e-/pattern and on abTEM multislice data at 1e5 e-/pattern:
# variances are scaled by 1.7^2 (README, "Uncertainty and pooling")
COVARIANCE_CALIBRATION = 1.7 ** 2
# Fine steps of a sharp-disk model fit (refine(disks=...)): at 1e3 e-/pattern its likelihood
# has local optima a fraction of a pixel apart, and the fit kept a memory of the coarse
# steps' start (exact-pattern fits in memory, 400 patterns: 1.29-1.38x the Cramer-Rao floor
# of the whole detector after 3 fine steps, 1.18-1.29x after 2 steps with the disks blurred
# by these px and 5 sharp ones; 1.23-1.32x after 2 blurred and 3 sharp)
DISK_FINE_BLURS_PX = (1.0, 0.5)
DISK_EXTRA_FINE_ITERS = 2
# What a sharp-disk fit reports (refine(posterior=True)): the mean of the pattern's
# likelihood over its geometry, not its maximum.  At 1e3 and 500 e-/pattern the likelihood
# has local optima closer together than the floor (above), and which one a local fit
# settles in is noise of its own; the likelihood's mean averages over them.  Measured with
# the simulator itself as the forward model (no model error; benchmarks/bench_efficiency.py,
# fits from starts 1 %, 2 deg, 2 px off through the blur continuation, 200 Poisson draws of
# one pattern): the maximum's std over the Cramer-Rao floor 1.12-1.28x at 1e3 e- and
# 1.18-1.34x at 500 e- for the four strain and rotation components, the mean's 1.08-1.23x
# and 1.14-1.23x (a fit started at the truth: 1.04-1.21x, 1.08-1.14x).  On `ccstae map`'s
# own fits of the 32x32 heterostructure (benchmarks/bench_fit_spread.py): 1.21-1.34x ->
# 1.14-1.31x at 1e3 e- and 1.28-1.46x -> 1.23-1.42x at 500 e-; 32 draws gave a spread 2-4 %
# wider than 64, 128 (or a width of 2) the same as 64.  The mean is importance-sampled
# from the Laplace approximation at the maximum (the Gauss-Newton curvature of the six
# geometric parameters, scale and offset held at their fit), widened by POSTERIOR_WIDTH so
# that the proposal covers the rough likelihood's spread, with POSTERIOR_SAMPLES
# antithetic standard-normal draws fixed by POSTERIOR_SEED (the same for every pattern: a
# map is reproducible)
POSTERIOR_SAMPLES = 64
POSTERIOR_WIDTH = 1.5
POSTERIOR_SEED = 0
# The draws are evaluated only on the pixels they can move (_moving_pixels): measured on
# the 32x32 heterostructure at 500 e-/pattern, 30-55 % of a chunk's pixels per pattern, the
# likelihood's mean 2.8 -> 1.5 s and a map block 5.2 -> 3.9 s (one thread), the fits equal
# to 3e-7.  MOVING_SLACK_PX is the bound's slack (px) for float32 rounding
MOVING_SLACK_PX = 0.01
GEOMETRY_PARAMS = 6  # (B00, B01, s_x, B10, B11, s_y): the first of the 8 fitted parameters
# The same for fits of the sharp-disk model (refine(disks=...)) to the unsmoothed counts,
# whose pixels are independent: see README, "Uncertainty and pooling"
DISK_COVARIANCE_CALIBRATION = 1.0


class Registration(NamedTuple):
    """What :func:`refine` returns, one row per pattern.

    theta : (N, 2, 3) refined affines ``[A | t]``.
    residual : (N,) weighted relative residual ``sum w r^2 / sum w x^2``.
    cov : (N, 4, 4) covariance of the linear part of ``B = A^-1`` (``B00, B01, B10, B11``):
        the inverse Gauss-Newton curvature of the Poisson-weighted loss at the fit, times the
        pattern's own residual dispersion, so it is small for noise-free data and follows the
        dose otherwise (the fit's statistical uncertainty; uncalibrated).
    composition : (N, K) composition chi-squares (NaN for entries not related), or None
        when no composition scoring was asked for.
    """

    theta: torch.Tensor
    residual: torch.Tensor
    cov: torch.Tensor
    composition: torch.Tensor | None


@torch.no_grad()
def encode(model: CCSTAE, x: torch.Tensor, batch: int = ENCODE_BATCH
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes ``(N,)`` and affines ``(N, 2, 3)`` from the encoder, ``batch`` patterns at a
    time."""
    cls, th = [], []
    for i in range(0, len(x), batch):
        _, onehot, params = model.encode(x[i:i + batch])
        cls.append(onehot.argmax(-1))
        th.append(affine_matrix(params))
    return torch.cat(cls), torch.cat(th)


def ring_rotation(x: torch.Tensor, classes: torch.Tensor, dictionary: np.ndarray,
                  ring: np.ndarray, symmetry: int) -> torch.Tensor:
    """Rotation (deg, in ``[-180/symmetry, 180/symmetry)``) of each pattern ``(N, Q, Q)``
    relative to its entry, modulo ``360/symmetry``: the angle ``d`` that best overlays the
    entry's angular harmonics (orders ``symmetry * 1..ROTATION_HARMONICS``, over ``ring``)
    turned by ``d`` on the pattern's.  Positive turns +x toward +y, as ``A`` of an affine
    ``[A | t]`` whose input is its entry turned by ``A``'s rotation.

    The harmonics are compared shell by shell (ROTATION_SHELL_PX wide): summed over the
    whole ring they mix shells whose reflections sit at different angles (a hexagonal
    lattice's second shell is turned 30 deg from its first), and their balance, which
    differs between a noisy pattern and its averaged entry, could flip the estimate by half
    a period."""
    N, Q, _ = x.shape
    w = np.ascontiguousarray(ring, np.float32)
    pidx, ker, n_shells, m = _ring_kernel(Q, symmetry, w.tobytes())
    hp = x.reshape(N, -1)[:, pidx] @ ker  # (N, 2SH): Re and -Im of the harmonics
    dic = torch.from_numpy(np.asarray(dictionary, np.float32).reshape(len(dictionary), -1))
    hd = dic[:, pidx] @ ker
    SH = ker.shape[1] // 2
    P = torch.complex(hp[:, :SH], -hp[:, SH:]).reshape(N, n_shells, -1)
    D = torch.complex(hd[:, :SH], -hd[:, SH:]).reshape(len(dictionary), n_shells, -1)
    # the pattern is the entry turned by d: P_m = D_m exp(-i m d) on every shell
    C = (P * D[classes].conj()).sum(1)  # (N, H)
    period = 360.0 / symmetry
    grid = torch.arange(-period / 2, period / 2, ROTATION_GRID_DEG)
    turn = torch.exp(1j * torch.deg2rad(grid)[None, :] * m[:, None])  # (H, G)
    score = (C @ turn.to(C.dtype)).real  # (N, G)
    return grid[score.argmax(1)]


@functools.lru_cache(maxsize=4)
def _ring_kernel(Q: int, symmetry: int, ring: bytes
                 ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """The ring pixels, the cos and sin of every harmonic order on every shell over them
    ``(P, 2*S*H)``, the number of shells and the orders, for :func:`ring_rotation`: the same
    for every batch of a map run, so built once (``ring`` as the bytes of its float32
    ``(Q, Q)`` weights)."""
    w = np.frombuffer(ring, np.float32)
    px = np.flatnonzero(w > 0)
    u = pixel_grid(Q)[px]
    phi = torch.atan2(u[:, 1], u[:, 0])
    shell = torch.from_numpy(np.floor(u.norm(dim=1).numpy() * (Q / 2) / ROTATION_SHELL_PX))
    shells = torch.unique(shell)
    one_hot = (shell[:, None] == shells[None, :]).float() * torch.from_numpy(w[px])[:, None]
    m = symmetry * torch.arange(1, ROTATION_HARMONICS + 1, dtype=torch.float32)
    arg = phi[:, None] * m[None, :]
    # (P, S*H) each, cos and sin of every order on every shell
    cos = (one_hot[:, :, None] * torch.cos(arg)[:, None, :]).reshape(len(px), -1)
    sin = (one_hot[:, :, None] * torch.sin(arg)[:, None, :]).reshape(len(px), -1)
    return torch.from_numpy(px), torch.cat([cos, sin], 1), len(shells), m


def turned(theta: torch.Tensor, deg: torch.Tensor) -> torch.Tensor:
    """Affines ``[A | t]`` whose input is turned by ``deg`` more about the detector centre:
    ``[R A | R t]``."""
    R = torch.from_numpy(rotation_matrix(deg.numpy())).to(theta.dtype)
    return R @ theta


def on_branch(theta: torch.Tensor, symmetry: int) -> torch.Tensor:
    """Starts ``[A | t]`` moved onto the symmetry branch nearest their entry's own
    orientation: the entry turned by whole periods (``A R(-k 360/symmetry)``, ``t`` kept:
    the entry's centre is the detector's), ``k`` chosen so that the rotation lies within
    half a period of zero.

    The branches of one fit are equivalent only for an exactly symmetric entry.  A learned
    entry's lattice is the mean of its patterns', a little strained, so fits that start on
    different branches end a branch-dependent strain apart, and no rotation by a period
    brings them together again (measured: noise-free patterns of one phase fitted on two
    branches, exy -0.123 % and +0.111 %, each within 0.004 %).  Every fit of an entry
    started on one branch lands on one branch.
    """
    if symmetry <= 1:
        return theta
    period = 360.0 / symmetry
    k = torch.round(affine_rotation(theta) / period)
    if not bool((k != 0).any()):
        return theta
    R = torch.from_numpy(rotation_matrix((-k * period).numpy())).to(theta.dtype)
    return torch.cat([theta[:, :, :2] @ R, theta[:, :, 2:]], -1)


def affine_rotation(theta: torch.Tensor) -> torch.Tensor:
    """Rotation (deg) of the linear part of affines ``(N, 2, 3)``."""
    A = theta[:, :, :2]
    return torch.rad2deg(torch.atan2(A[:, 1, 0] - A[:, 0, 1], A[:, 0, 0] + A[:, 1, 1]))


def pixel_grid(Q: int) -> torch.Tensor:
    """Normalised ``(x, y)`` coordinates of pixel centres, ``(Q*Q, 2)`` (align_corners=False)."""
    c = (torch.arange(Q, dtype=torch.float32) + 0.5) * (2.0 / Q) - 1.0
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.ravel(), yy.ravel()], -1)


def _channels(dictionary: np.ndarray, masks: np.ndarray, sigma: float) -> torch.Tensor:
    """Stack ``[D, dD/dx, dD/dy]`` per class ``(K, 3, Q, Q)``; gradients per unit of
    normalised coordinate."""
    K, Q, _ = dictionary.shape
    out = np.empty((K, 3, Q, Q), dtype=np.float32)
    for k in range(K):
        d = ndimage.gaussian_filter(dictionary[k].astype(np.float64), sigma) if sigma > 0 \
            else dictionary[k].astype(np.float64)
        gy, gx = np.gradient(d)
        out[k, 0] = d
        out[k, 1] = gx * (Q / 2.0)
        out[k, 2] = gy * (Q / 2.0)
    return torch.from_numpy(out)


def _sample(img: torch.Tensor, pts: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample one class image ``img`` ``(1, C, Q, Q)`` at ``pts`` ``(n, P, 2)`` -> ``(C, n, P)``.

    All patterns' points go into one sampling grid of the single image: expanding the image
    to the batch would make grid_sample copy it once per pattern.
    """
    return F.grid_sample(img, pts.unsqueeze(0), mode=mode, padding_mode="zeros",
                         align_corners=False)[0]


def _points(u: torch.Tensor, B: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Where each pattern samples its entry: ``B u + s`` for pixels ``u`` ``(P, 2)`` ->
    ``(n, P, 2)``."""
    return torch.einsum("pj,nij->npi", u, B) + s[:, None, :]


def _normal_equations(xi, W, u, B, s, g, b, sample, floor_frac):
    """Gauss-Newton normal equations ``(H, grad)`` ``(N, 8, 8), (N, 8, 1)`` of patterns of
    one class on pixels ``u`` (``sample(pts)``: the entry and its gradients at ``pts``).

    The Jacobian is ``[g Gx phi, g Gy phi, D, 1]`` with ``phi = (u_x, u_y, 1)`` per pixel, so
    the normal equations reduce to ``(N, P) x (P, 9)`` and ``(N, P) x (P, 3)`` products and
    the ``(N, P, 8)`` Jacobian is never materialised (its memory traffic dominated); the
    intensity scale ``g`` multiplies the products afterwards, per pattern.
    """
    N, P = xi.shape
    Ds, Gx, Gy = sample(_points(u, B, s), B)
    w, r = _weights(xi, W, Ds, g, b, floor_frac)
    wr = w * r
    phi = torch.cat([u, torch.ones(P, 1)], 1)
    phi2 = (phi[:, :, None] * phi[:, None, :]).reshape(P, 9)
    wGx, wGy, wD = w * Gx, w * Gy, w * Ds
    g1, g2 = g[:, None], (g * g)[:, None, None]
    H = torch.zeros(N, 8, 8)
    H[:, 0:3, 0:3] = ((wGx * Gx) @ phi2).view(N, 3, 3) * g2
    H[:, 0:3, 3:6] = ((wGx * Gy) @ phi2).view(N, 3, 3) * g2
    H[:, 3:6, 3:6] = ((wGy * Gy) @ phi2).view(N, 3, 3) * g2
    H[:, 0:3, 6] = ((wD * Gx) @ phi) * g1
    H[:, 3:6, 6] = ((wD * Gy) @ phi) * g1
    H[:, 0:3, 7] = (wGx @ phi) * g1
    H[:, 3:6, 7] = (wGy @ phi) * g1
    H[:, 6, 6] = (wD * Ds).sum(1)
    H[:, 6, 7] = wD.sum(1)
    H[:, 7, 7] = w.sum(1)
    H = torch.triu(H) + torch.triu(H, 1).transpose(1, 2)
    grad = torch.cat([((wr * Gx) @ phi) * g1, ((wr * Gy) @ phi) * g1,
                      (wr * Ds).sum(1, keepdim=True), wr.sum(1, keepdim=True)], 1)
    return H, grad


def _gn_step(xi, W, u, B, s, g, b, sample, damping, floor_frac):
    """One damped Gauss-Newton step (see :func:`_normal_equations`); returns the updated
    ``B, s, g, b`` and the undamped curvature ``H`` at the step's start."""
    H0, grad = _normal_equations(xi, W, u, B, s, g, b, sample, floor_frac)
    eye = torch.eye(8)
    H = H0 + damping * torch.diagonal(H0, dim1=1, dim2=2).unsqueeze(-1) * eye + 1e-9 * eye
    d = torch.linalg.solve(H, grad)
    # a trust region: no single step may move the pattern by more than a few pixels; at very
    # low dose an ill-conditioned first step would otherwise throw the fit out of the basin
    d = torch.nan_to_num(d)
    d[:, :6] = d[:, :6].clamp(-TRUST_REGION, TRUST_REGION)
    # parameter order: (B00, B01, s_x), (B10, B11, s_y), g, b
    B = B + torch.stack([d[:, 0:2], d[:, 3:5]], 1)
    s = s + torch.stack([d[:, 2], d[:, 5]], 1)
    return B, s, g + d[:, 6], b + d[:, 7], H0


def _covariance(H: torch.Tensor, chi2: torch.Tensor, n_pix: torch.Tensor,
                calibration: float) -> torch.Tensor:
    """Covariance ``(N, 4, 4)`` of the linear parameters: ``phi H^-1`` with the dispersion
    ``phi = calibration * chi2 / (n_pix - N_PARAMS)`` of the pattern's own weighted
    residual."""
    phi = calibration * chi2 / (n_pix - N_PARAMS).clamp(min=1.0)
    C = _ridged_inverse(H)[:, LINEAR_PARAMS][:, :, LINEAR_PARAMS]
    return (C * phi.double()[:, None, None]).float()


def _ridged_inverse(H: torch.Tensor) -> torch.Tensor:
    """Inverses ``(N, k, k)`` (float64) of curvatures ``H``: a relative ridge keeps singular
    ones (empty or flat patterns) finite and huge."""
    Hd = H.double()
    ridge = 1e-9 * torch.diagonal(Hd, dim1=1, dim2=2).sum(-1) + 1e-30
    return torch.linalg.inv(Hd + ridge[:, None, None] * torch.eye(H.shape[-1],
                                                                   dtype=torch.float64))


def _weights(xi, W, Ds, g, b, floor_frac):
    """Poisson weights and residuals of the model ``g D + b`` (the variance of normalised
    counts is proportional to their mean; floored where the model is near zero)."""
    mu = torch.addcmul(b[:, None], g[:, None], Ds)
    floor = floor_frac * mu.mean(1, keepdim=True).clamp(min=1e-6)
    return W / torch.maximum(mu, floor), xi - mu


@functools.lru_cache(maxsize=2)
def _posterior_draws(n: int, dim: int) -> torch.Tensor:
    """``n`` antithetic standard-normal draws ``(n, dim)``, the same on every call."""
    gen = torch.Generator().manual_seed(POSTERIOR_SEED)
    z = torch.randn(n // 2, dim, generator=gen)
    return torch.cat([z, -z])


def _posterior_mean(xi, W, u, B, s, g, b, disks, H, sigma, floor_frac):
    """The mean of each pattern's likelihood over ``B, s`` (see POSTERIOR_SAMPLES), from
    its maximum ``B, s`` and the Gauss-Newton curvature ``H`` there, for the sharp-disk
    model ``disks`` (a :class:`_DiskSampler`); ``sigma`` ``(N,)`` is the normalised value of
    one count (the likelihood's temperature).  Patterns whose curvature or count scale is
    unusable keep their maximum.

    The likelihood is the one whose score the Gauss-Newton steps solve (:func:`_weights`):
    Poisson where the model is above its floor ``f``, continued below it by its second-order
    expansion at ``f`` (the quadratic of the floor's variance).  Each draw's model is
    computed from precomputed per-pixel terms, a dozen array operations.
    """
    n = len(xi)
    z = _posterior_draws(POSTERIOR_SAMPLES, GEOMETRY_PARAMS)
    sig = sigma.double()
    # the fit's covariance: the Poisson Fisher information of normalised counts is H / sigma
    C = sig[:, None, None] * _ridged_inverse(H[:, :GEOMETRY_PARAMS, :GEOMETRY_PARAMS])
    L, info = torch.linalg.cholesky_ex(C)
    ok = (info == 0) & torch.isfinite(sig) & (sig > 0) & torch.isfinite(L).all(-1).all(-1)
    L = torch.where(ok[:, None, None], L, torch.zeros_like(L)).float() * POSTERIOR_WIDTH
    steps = torch.einsum("nij,mj->mni", L, z)  # (M, n, 6)
    # the model at pixel k is b + g (bg_k + a_k f(|A (p_k - c_k)|)) with p = half (B u + s)
    # + half - 1/2 in the entry's px: |.| = |half u + A (half s + half - 1/2 - c)|
    h = disks.half
    e0x, e0y = (h - 0.5) - disks.cx, (h - 0.5) - disks.cy
    hux, huy = h * u[:, 0], h * u[:, 1]
    ga = g[:, None] * disks.a
    gbg = torch.addcmul(b[:, None], g[:, None], disks.bg)
    r0 = torch.sqrt(_distance2(hux, huy, e0x, e0y, B, s, h))
    mu0 = torch.addcmul(gbg, ga, disks.profile(r0)[1])
    f = floor_frac * mu0.mean(1, keepdim=True).clamp(min=1e-6)
    # a pixel whose model no draw changes adds the same to every draw's log-likelihood,
    # which the importance weights' normalisation cancels: the draws are evaluated on the
    # pixels that some pattern weighs and whose distance from its disk some draw brings
    # within the profile's reach (beyond it the profile is exactly zero)
    # each pattern's draws run over its own such pixels, padded to the chunk's largest set
    # with pixels of its own that no draw changes (constants again)
    moving = _moving_pixels(W, ga, e0x, e0y, B, s, Bs=B[None] + torch.stack(
        [steps[..., 0:2], steps[..., 3:5]], 2), ss=s[None] + steps[..., 2::3], half=h,
        r0=r0, reach=disks.last * disks.step)
    idx = torch.argsort((~moving).to(torch.uint8), dim=1, stable=True)
    idx = idx[:, :max(int(moving.sum(1).max()), 1)]
    hux, huy = hux[idx], huy[idx]
    xi, W, e0x, e0y, ga, gbg = (torch.gather(v, 1, idx) for v in (xi, W, e0x, e0y, ga, gbg))
    Wx, wq = W * xi, W * (xi - f) / f  # terms of the Poisson part and of the expansion
    w2 = W / (2.0 * f)
    ll = torch.empty(len(z), n, dtype=torch.float64)
    for m in range(len(z)):
        d = steps[m]
        Bm = B + torch.stack([d[:, 0:2], d[:, 3:5]], 1)
        sm = s + torch.stack([d[:, 2], d[:, 5]], 1)
        mu = torch.addcmul(gbg, ga, disks.profile(torch.sqrt(
            _distance2(hux, huy, e0x, e0y, Bm, sm, h)))[1])
        mm = torch.maximum(mu, f)
        below = mu.sub_(f).clamp_(max=0.0)
        # sum W (x log m - m) + W ((x - f) dl / f - dl^2 / (2 f)), dl = min(mu - f, 0), in
        # place: one reduction per draw
        t = torch.log(mm).mul_(Wx).sub_(mm.mul_(W)).addcmul_(below, wq)
        ll[m] = t.sub_(below.mul_(below).mul_(w2)).sum(1).double()
    # importance weights: likelihood (at temperature sigma) over the Gaussian proposal
    lw = ll / torch.where(ok, sig, torch.ones_like(sig)) + 0.5 * (z.double() ** 2).sum(1)[:, None]
    w = torch.softmax(torch.nan_to_num(lw, nan=-torch.inf), 0)
    ok &= torch.isfinite(w).all(0)
    d = torch.einsum("mn,mni->ni", torch.nan_to_num(w).float(), steps)
    d = torch.where(ok[:, None], d, torch.zeros_like(d)).clamp(-TRUST_REGION, TRUST_REGION)
    return B + torch.stack([d[:, 0:2], d[:, 3:5]], 1), s + torch.stack([d[:, 2], d[:, 5]], 1)


def _moving_pixels(W, ga, e0x, e0y, B, s, Bs, ss, half, r0, reach):
    """Pixels ``(n, P)`` of :func:`_posterior_mean` whose model some draw ``Bs, ss``
    ``(M, n, 2, 2), (M, n, 2)`` may change: weighed (``W > 0``), on a disk (``ga != 0``),
    and not provably beyond the profile's ``reach`` under every draw.

    A pixel's offset from its disk's centre is ``half u + A (half s + e0)``; a draw moves it
    by ``(A_m - A) (half s + e0) + A_m half (s_m - s)``, at most
    ``|A_m - A| |half s + e0| + |A_m| half |s_m - s|`` (spectral norms), so a pixel at
    ``r0 - that >= reach`` stays beyond the reach under every draw.
    """
    A = torch.linalg.inv(B)
    Am = torch.linalg.inv(Bs)
    dA = torch.linalg.matrix_norm(Am - A, ord=2).amax(0)
    dS = (torch.linalg.matrix_norm(Am, ord=2) * half
          * torch.linalg.vector_norm(ss - s, dim=-1)).amax(0)
    v0 = torch.hypot(e0x + half * s[:, 0:1], e0y + half * s[:, 1:2])
    # slack on top of the bound for float32 rounding of the distances (1e-5 px)
    near = r0 - dA[:, None] * v0 - dS[:, None] < reach + MOVING_SLACK_PX
    return (W > 0) & (ga != 0) & near


def _distance2(hux, huy, e0x, e0y, B, s, half):
    """Squared distance ``(n, P)`` (px of the pattern) of each pixel from its disk's centre
    under ``B, s``: ``|half u + A (half s + e0)|^2`` with ``A = B^-1``."""
    A = torch.linalg.inv(B)
    vx = e0x + half * s[:, 0:1]
    vy = e0y + half * s[:, 1:2]
    dx = (vx * A[:, 0, 0, None]).addcmul_(vy, A[:, 0, 1, None]).add_(hux)
    dy = (vx * A[:, 1, 0, None]).addcmul_(vy, A[:, 1, 1, None]).add_(huy)
    return (dx * dx).addcmul_(dy, dy)


def _residual(xi, W, u, B, s, g, b, sample, floor_frac):
    """Weighted residual ``sum w r^2`` and relative residual ``sum w r^2 / sum w x^2`` of
    the fit, per pattern."""
    w, r = _weights(xi, W, sample(_points(u, B, s), B, values_only=True)[0], g, b, floor_frac)
    chi2 = (w * r * r).sum(1)
    return chi2, chi2 / (w * xi * xi).sum(1).clamp(min=1e-12)


def disk_templates(dictionary: np.ndarray, labels: np.ndarray, relations: np.ndarray
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Disk intensities of every entry on every related entry's disks, computed once.

    ``E[c, j, d]`` is entry ``j`` integrated over disk ``d`` of entry ``c`` (``labels``), with
    ``j`` placed onto ``c`` by ``T_cj`` (NaN where not related); ``area[c, d]`` the disk's
    pixel count.  A pattern registered onto ``c`` is integrated over the same disks, so its
    disk sums compare with ``E[c, j]`` directly: whole dilated disks make the sums blind to
    the pattern's sub-pixel placement and to its few-percent strain (absorbed by the fitted
    scale).
    """
    K, Q, _ = dictionary.shape
    n_lab = int(labels.max())
    E = torch.full((K, K, n_lab), float("nan"))
    area = torch.zeros(K, n_lab)
    u = pixel_grid(Q)
    D = torch.from_numpy(np.ascontiguousarray(dictionary, np.float32)).unsqueeze(1)
    rel = torch.from_numpy(np.asarray(relations, np.float32))
    for c in range(K):
        # whole disks, not cut by the ring: a cut would fall differently on a strained
        # pattern than on the entry, a misfit that is not composition
        lab = torch.from_numpy(labels[c].ravel().astype(np.int64))
        onehot = F.one_hot(lab, n_lab + 1)[:, 1:].float()  # (Q*Q, n_lab)
        area[c] = onehot.sum(0)
        for j in range(K):
            if torch.isnan(rel[c, j, 0, 0]):
                continue
            A, t = rel[c, j, :, :2].double(), rel[c, j, :, 2:].double()
            Bm = torch.linalg.inv(A)
            pts = (u.double() @ Bm.T - (Bm @ t).squeeze(-1)).float()
            Dj = F.grid_sample(D[j:j + 1], pts.view(1, 1, -1, 2), mode="bilinear",
                               padding_mode="zeros", align_corners=False).view(-1)
            E[c, j] = Dj @ onehot
    return E, area


def _entry_residuals(xi, u, B, s, c, labels, templates, scale):
    """Composition misfit ``(N, K)`` of patterns of entry ``c`` against every related entry.

    The pattern is integrated over each Bragg disk of its own entry (``labels``, generously
    dilated, placed by its registration) and compared with every related entry's disk
    intensities on the same disks (:func:`disk_templates`) after a fitted scale and offset,
    as a Poisson chi-square summed over the disks.  Integrating whole disks makes the score
    blind to disk-edge sharpness (how much an averaged dictionary entry is blurred) and
    sensitive to what differs between phases of one lattice type: the intensity ratios of
    the reflections, the composition.
    """
    E_all, area_all = templates
    N, P = xi.shape
    K = E_all.shape[0]
    n_lab = E_all.shape[-1]
    pts = _points(u, B, s)
    lab = _sample(labels[c:c + 1, None].float(), pts, "nearest")[0].long()
    I = torch.zeros(N, n_lab + 1).scatter_add_(1, lab, xi)[:, 1:]
    area = area_all[c].expand(N, -1)
    sc = scale[:, None]
    out = torch.full((N, K), float("nan"))
    for j in range(K):
        E = E_all[c, j].expand(N, -1)
        if torch.isnan(E[0, 0]):
            continue
        E = torch.nan_to_num(E)
        w = (area > 0).float()
        for _ in range(2):  # weighted least squares, Poisson weights from the first fit
            s_ee, s_aa, s_ea = (w * E * E).sum(1), (w * area * area).sum(1), (w * E * area).sum(1)
            s_ie, s_ia = (w * I * E).sum(1), (w * I * area).sum(1)
            det = (s_ee * s_aa - s_ea * s_ea).clamp(min=1e-12)
            g = (s_ie * s_aa - s_ia * s_ea) / det
            b = (s_ee * s_ia - s_ea * s_ie) / det
            model = g[:, None] * E + b[:, None] * area
            # variance of a disk sum of normalised counts x = counts * scale: scale * model
            floor = COMPOSITION_WEIGHT_FLOOR * model.mean(1, keepdim=True).clamp(min=1e-12)
            w = (area > 0) / (sc * torch.maximum(model, floor))
        r = I - model
        out[:, j] = (w * r * r).sum(1)
    return out


def _groups(cls: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(class, start, stop)`` runs of a class-sorted label vector."""
    ks, counts = torch.unique_consecutive(cls, return_counts=True)
    ends = torch.cumsum(counts, 0).tolist()
    return [(int(k), e - int(c), e) for k, c, e in zip(ks.tolist(), counts.tolist(), ends,
                                                         strict=True)]


def compose_affine(theta: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """``[A A_r | A t_r + t]``: the fit onto entry ``c`` followed by ``T_cj`` (onto ``j``)."""
    A, t = theta[..., :2], theta[..., 2:]
    return torch.cat([A @ rel[..., :2], A @ rel[..., 2:] + t], -1)


@torch.no_grad()
def relate_entries(dictionary: np.ndarray, masks: np.ndarray, ring: np.ndarray,
                   entries: np.ndarray, symmetry: int = 6, iters: int = 6
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Fit every listed dictionary entry onto every other one.

    Entry ``c`` (as the input) is registered onto entry ``j`` by :func:`refine` from
    rotations spaced :data:`ROTATION_SEARCH_STEP_DEG` over one symmetry period, keeping the
    best residual: the learned entries may sit in any relative orientation.

    Returns
    -------
    relations : (K, K, 2, 3) ``T_cj = [A_cj | t_cj]`` with ``D_c(A_cj k + t_cj) ~ D_j(k)``;
        identity on the diagonal, NaN for entries not listed.
    residual : (K, K) relative weighted residual of each fit (0 on the diagonal).
    """
    K = dictionary.shape[0]
    rel = torch.full((K, K, 2, 3), float("nan"))
    res = torch.full((K, K), float("nan"))
    period = 360.0 / max(symmetry, 1)
    angles = np.deg2rad(np.arange(-period / 2, period / 2, ROTATION_SEARCH_STEP_DEG))
    starts = torch.zeros(len(angles), 2, 3)
    starts[:, 0, 0] = starts[:, 1, 1] = torch.from_numpy(np.cos(angles)).float()
    starts[:, 0, 1] = torch.from_numpy(-np.sin(angles)).float()
    starts[:, 1, 0] = torch.from_numpy(np.sin(angles)).float()
    entries = [int(e) for e in entries]
    for c in entries:
        rel[c, c] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        res[c, c] = 0.0
        x = torch.from_numpy(np.ascontiguousarray(dictionary[c], dtype=np.float32))
        for j in entries:
            if j == c:
                continue
            xs = x.expand(len(angles), -1, -1).contiguous()
            # half of them coarse: the search starts lie up to half a step away
            th, r = refine(xs, torch.full((len(angles),), j), starts, dictionary, masks, ring,
                           iters, coarse_iters=iters // 2)[:2]
            best = int(torch.nan_to_num(r, nan=np.inf).argmin())
            th, r = th[best:best + 1], r[best:best + 1]
            # refine samples the disk-mask weights once, at its start: from a search start
            # they sit a few px off the outer disks, so fit again from the converged affine
            for _ in range(RELATION_REFITS):
                th, r = refine(x[None], torch.tensor([j]), th, dictionary, masks, ring, iters,
                               coarse_iters=0)[:2]
            rel[c, j], res[c, j] = th[0], r[0]
    return rel.numpy(), res.numpy()


class _ImageSampler:
    """An entry image and its gradients (``(1, 3, Q, Q)`` from :func:`_channels`),
    interpolated at the sampling points."""

    def __init__(self, ch: torch.Tensor, mode: str) -> None:
        self.ch, self.mode = ch, mode

    def __call__(self, pts: torch.Tensor, B: torch.Tensor, values_only: bool = False
                 ) -> tuple[torch.Tensor, ...]:
        if values_only:
            return (_sample(self.ch[:, :1], pts, self.mode)[0],)
        return tuple(_sample(self.ch, pts, self.mode).unbind(0))


class DiskEntries(NamedTuple):
    """The sharp-disk model of the dictionary (:class:`ccstae_hpc.core.disks.DiskModel`) as
    tensors, for :func:`refine`."""

    centers: torch.Tensor  # (K, n + 1, 2) disk centres (x, y), px of the entry
    amps: torch.Tensor  # (K, n + 1)
    background: torch.Tensor  # (K, 3, Q, Q) smooth background and its gradients
    labels: torch.Tensor  # (K, 1, Q, Q) float: the disk each entry pixel belongs to
    profile: torch.Tensor  # (m,) radial profile at r = i * step px
    step: float
    # a model that reaches beyond the Bragg annulus: the pattern pixels its fits use
    # (indices into Q*Q) and its weights (K, 1, Q, Q), 1 on its labelled disks; None: the
    # annulus and the dictionary's disk masks
    region: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @classmethod
    def from_model(cls, model, labels: np.ndarray) -> DiskEntries:
        """From a :class:`~ccstae_hpc.core.disks.DiskModel` and the entries' disk labels
        (the model's own labels when it has them)."""
        K, Q, _ = model.background.shape
        bg = _channels(np.asarray(model.background), np.zeros((K, Q, Q)), 0.0)
        if model.labels is not None:
            labels = model.labels
        lab = torch.from_numpy(np.asarray(labels, np.float32)).unsqueeze(1)
        region = mask = None
        if model.region is not None:
            region = torch.from_numpy(np.flatnonzero(np.asarray(model.region).ravel()))
            mask = (lab > 0).float()
        return cls(torch.from_numpy(np.asarray(model.centers, np.float32)),
                   torch.from_numpy(np.asarray(model.amps, np.float32)), bg, lab,
                   torch.from_numpy(np.append(np.asarray(model.profile.values, np.float32),
                                              np.float32(0.0))),
                   float(model.profile.step), region, mask)


class _DiskSampler:
    """Entry ``k`` of a :class:`DiskEntries` model at the sampling points: each point's disk
    is the entry's label at the point's start position (fixed during the fit, as the mask
    weights are); the disk term and its gradient are exact at any sub-pixel position.

    The lattice moves the disks, not their size (the probe's aperture sets it): the profile
    is evaluated at the distance in the pattern's pixels, ``|A (p - c)|`` with ``A = B^-1``.
    Were the disks warped with the lattice, a fit onto another phase's entry (3-4 % apart)
    would meet disks of the wrong size, which the Bragg annulus's edge turns into a false
    lattice scale (0.06 % measured).  The gradient takes ``A`` as fixed: exact for the
    translation, and for the linear part it differs only in the disk's own breathing, which
    averages out over a disk.  The smooth background is taken at the start positions: a fit
    moves a pattern by a pixel or two, over which it does not change.
    """

    def __init__(self, disks: DiskEntries, k: int, pts0: torch.Tensor) -> None:
        lab = _sample(disks.labels[k:k + 1], pts0, "nearest")[0].long()
        self.cx, self.cy = disks.centers[k, :, 0][lab], disks.centers[k, :, 1][lab]
        self.a = disks.amps[k][lab]
        self.bg = _sample(disks.background[k:k + 1, :1], pts0, "bilinear")[0]
        self.step, self.last = disks.step, len(disks.profile) - 1
        self.inv_step = 1.0 / self.step
        self._set_profile(disks.profile)
        self.half = disks.background.shape[-1] / 2.0

    def _set_profile(self, prof: torch.Tensor) -> None:
        # f(r) = intercept[i] + slope[i] r on [i step, (i + 1) step): one gather each
        self.slope = torch.diff(prof, append=prof[-1:]) / self.step
        self.intercept = prof - self.slope * (torch.arange(len(prof)) * self.step)

    def blurred(self, sigma: float) -> _DiskSampler:
        """The same disks with their edge blurred by a Gaussian of ``sigma`` px (along r)."""
        out = copy.copy(self)
        if sigma <= 0:
            return out
        v = (self.intercept + self.slope * (torch.arange(self.last + 1) * self.step)).numpy()
        out._set_profile(torch.from_numpy(blur_profile(v, self.step, sigma).astype(np.float32)))
        return out

    def profile(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The profile's slope and value at distances ``r`` ``(n, P)`` (px of the
        pattern)."""
        i = (r * self.inv_step).long().clamp_(max=self.last)
        # gather from a row view per pattern: 3-4x faster than indexing the 1-D table
        n = r.shape[0]
        slope = torch.gather(self.slope.expand(n, -1), 1, i)
        return slope, torch.gather(self.intercept.expand(n, -1), 1, i).addcmul_(slope, r)

    def __call__(self, pts: torch.Tensor, B: torch.Tensor, values_only: bool = False
                 ) -> tuple[torch.Tensor, ...]:
        # normalised coordinates (align_corners=False) -> px of the entry -> of the pattern
        px = pts * self.half + (self.half - 0.5)
        ex, ey = px[..., 0] - self.cx, px[..., 1] - self.cy
        A = torch.linalg.inv(B)
        a00, a01, a10, a11 = (A[:, i, j, None] for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
        dx, dy = a00 * ex + a01 * ey, a10 * ex + a11 * ey
        r = torch.sqrt(dx * dx + dy * dy).clamp_(min=1e-6)
        slope, f = self.profile(r)
        D = torch.addcmul(self.bg, self.a, f)
        if values_only:
            return (D,)
        # d/d(normalised coordinate) = A^T d/d(pattern px) * Q/2
        g = self.a * slope * self.half / r
        gx, gy = g * dx, g * dy
        return D, a00 * gx + a10 * gy, a01 * gx + a11 * gy


class _ClassFit:
    """The registration of chunks of patterns of one class (the body of :func:`refine`)."""

    def __init__(self, x, x_raw, ring_px, coarse_grid, mask_stack, stacks, coarse_sigma, iters,
                 coarse_iters, mode, damping, floor, disks, posterior=False, recorded=None
                 ) -> None:
        self.x, self.x_raw, self.ring_px, self.coarse_grid = x, x_raw, ring_px, coarse_grid
        self.recorded = recorded
        self.mask_stack, self.stacks, self.coarse_sigma = mask_stack, stacks, coarse_sigma
        self.iters, self.coarse_iters = iters, coarse_iters
        self.mode, self.damping, self.floor, self.disks = mode, damping, floor, disks
        self.posterior = posterior
        self.Q = mask_stack.shape[-1]
        self.u_all = pixel_grid(self.Q)
        self.u_ring = self.u_all[ring_px]

    def _whole_detector(self, k, sl, B, s):
        """The fine pixel set of a whole-detector disk model (``DiskEntries.region``) for
        patterns ``sl`` at ``B, s``, and its sampler."""
        placed = self._placed(self.disks.region, self.disks.mask, k, sl, B, s)
        if placed is None:
            # an entry without disks of its own (vacuum, or one the model was not grown
            # for): the annulus and the dictionary's masks, placed here
            placed = self._placed(self.ring_px, self.mask_stack, k, sl, B, s,
                                  allow_empty=True)
        pixels, pts = placed
        return pixels, _DiskSampler(self.disks, k, pts)

    def _recorded(self, W, sl, px):
        """Weights ``W`` ``(n, P)`` of patterns ``sl`` on pixels ``px``, zero where a pattern
        holds no recorded count (see :func:`refine`'s ``recorded``)."""
        return W if self.recorded is None else W * self.recorded[sl][:, px]

    def _placed(self, px, masks, k, sl, B, s, allow_empty=False):
        """Detector pixels ``px`` where ``masks[k]``, placed at ``B, s``, weighs any pattern
        of ``sl`` (None if none does and not ``allow_empty``): the set ``(u, counts, W)`` and
        its sampling points."""
        u = self.u_all[px]
        pts = _points(u, B, s)
        W = self._recorded(_sample(masks[k:k + 1], pts, "bilinear")[0], sl, px)
        keep = (W > 0).any(0)
        if not (keep.any() or allow_empty):
            return None
        return ((u[keep], self.x_raw[sl][:, px[keep]].contiguous(), W[:, keep].contiguous()),
                pts[:, keep])

    def __call__(self, k, sl, B, s, g, b, sigma=None):
        """Refine patterns ``sl`` of class ``k``: ``B, s``, the residual, the covariance of
        ``B`` and the pixels that hold their whole disks (for composition scoring).  With
        ``posterior`` (and ``sigma``, the normalised value of one count per pattern) a
        sharp-disk fit reports its likelihood's mean (:func:`_posterior_mean`)."""
        # the disk-mask weights are sampled once at the start: the fit moves a pattern by a
        # pixel or two at most, which the mask's 2-px dilation absorbs, and fixed weights give
        # the fit one well-defined objective.  Pixels where no pattern of the chunk has weight
        # add nothing to the fit and are left out (about half of the ring)
        pts0 = _points(self.u_ring, B, s)
        W = self._recorded(_sample(self.mask_stack[k:k + 1], pts0, "bilinear")[0], sl,
                           self.ring_px)
        keep = (W > 0).any(0)
        # the sharp-disk model is fitted to the counts as recorded; the image model to the
        # data smoothed as its dictionary is (see refine's ``smooth``)
        fine_x = self.x if self.disks is None else self.x_raw
        sets = {"fine": (self.u_ring[keep], fine_x[sl][:, self.ring_px[keep]].contiguous(),
                         W[:, keep].contiguous())}
        kk = keep & self.coarse_grid
        sets["coarse"] = (self.u_ring[kk], self.x[sl][:, self.ring_px[kk]].contiguous(),
                          W[:, kk].contiguous())
        coarse_sample = _ImageSampler(self.stacks[self.coarse_sigma][k:k + 1], self.mode)
        if self.disks is None:
            fine = _ImageSampler(self.stacks[0.0][k:k + 1], self.mode)
            calibration = COVARIANCE_CALIBRATION
        elif self.disks.region is None:
            fine = _DiskSampler(self.disks, k, pts0[:, keep])
            calibration = DISK_COVARIANCE_CALIBRATION
        else:
            # a model of the whole detector: its pixels and weights are placed where the
            # coarse steps leave the pattern (its outermost disks are 3-4 times further out
            # than the annulus' first ones, and the start's strain error moves them most)
            fine, calibration = None, DISK_COVARIANCE_CALIBRATION
        H = None
        # a disk model's likelihood is rough at low dose (few counts on its sharp edges):
        # its first fine steps fit the disks blurred, then sharp, with more steps in all
        blurs = DISK_FINE_BLURS_PX if self.disks is not None else ()
        iters = self.iters
        if self.disks is not None and self.iters > self.coarse_iters:
            iters += len(blurs) + DISK_EXTRA_FINE_ITERS
        for it in range(iters + 1):
            coarse = it < self.coarse_iters
            if fine is None and (not coarse or it == iters):
                sets["fine"], fine = self._whole_detector(k, sl, B, s)
            if it == iters:
                break
            uu, xi, Wk = sets["coarse" if coarse else "fine"]
            j = it - self.coarse_iters
            sampler = (coarse_sample if coarse else
                       fine.blurred(blurs[j]) if j < len(blurs) else fine)
            B, s, g, b, H = _gn_step(xi, Wk, uu, B, s, g, b, sampler, self.damping, self.floor)
            H = None if coarse else H
        uu, xi, Wk = sets["fine"]
        if H is None:  # no fine step was taken: the curvature at the start
            H, _ = _normal_equations(xi, Wk, uu, B, s, g, b, fine, self.floor)
        if self.posterior and self.disks is not None and sigma is not None:
            B, s = _posterior_mean(xi, Wk, uu, B, s, g, b, fine, H, sigma, self.floor)
        # the curvature of the last step is that of its start, one converged step away from
        # the end: the same to well within its own uncertainty, at no extra sampling cost
        chi2, resid = _residual(xi, Wk, uu, B, s, g, b, fine, self.floor)
        cov = _covariance(H, chi2, (Wk > 0).sum(1), calibration)
        # whole disks (see disk_templates), ring or not: every pixel within
        # COMPOSITION_REACH_PX of a fitted one holds all of the class's labelled disks
        Q = self.Q
        near = np.zeros(Q * Q, bool)
        near[self.ring_px[keep].numpy()] = True
        near = torch.from_numpy(ndimage.binary_dilation(
            near.reshape(Q, Q), iterations=COMPOSITION_REACH_PX).ravel())
        return B, s, resid, cov, near


@torch.no_grad()
def refine_checked(x: torch.Tensor, classes: torch.Tensor, theta: torch.Tensor,
                   dictionary: np.ndarray, masks: np.ndarray, ring: np.ndarray, iters: int,
                   symmetry: int, sample: np.ndarray, **kw: Any) -> Registration:
    """:func:`refine`, with each start's rotation checked against the pattern's ring
    (:func:`ring_rotation`) on the ``sample`` entries (``(K,)`` bool: not vacuum): a
    pattern whose start is more than ROTATION_CAPTURE_DEG off is registered from the turned
    start too, and that fit is kept where its residual is smaller and its rotation lands
    within ROTATION_CAPTURE_DEG of the ring's.  Every start is first put on the symmetry
    branch nearest its entry's orientation (:func:`on_branch`)."""
    theta = on_branch(theta, symmetry)
    fit = refine(x, classes, theta, dictionary, masks, ring, iters, **kw)
    period = 360.0 / symmetry
    want = ring_rotation(x, classes, dictionary, ring, symmetry)
    start = affine_rotation(theta)
    off = torch.remainder(want - start + period / 2, period) - period / 2
    want_abs = start + off
    checked = torch.from_numpy(np.asarray(sample, bool))[classes]
    redo = torch.nonzero(checked & (off.abs() > ROTATION_CAPTURE_DEG)).squeeze(1)
    if len(redo) == 0:
        return fit
    # per-pattern arguments follow their patterns
    sub = {k: (v[redo] if k in ("scale", "recorded") and v is not None else v)
           for k, v in kw.items()}
    alt = refine(x[redo], classes[redo], on_branch(turned(theta[redo], off[redo]), symmetry),
                 dictionary, masks, ring, iters, **sub)
    # the turned fit is taken only where it both explains the pattern better and settles
    # where the ring put it: one that Gauss-Newton carries back near the first fit's
    # rotation is no other optimum, only a second convergence with its own small noise
    landed = torch.remainder(affine_rotation(alt.theta) - want_abs[redo] + period / 2,
                             period) - period / 2
    better = (alt.residual < fit.residual[redo]) & (landed.abs() <= ROTATION_CAPTURE_DEG)
    take = redo[better]
    out = [f.clone() if f is not None else None for f in fit]
    for f, a in zip(out, alt, strict=True):
        if f is not None:
            f[take] = a[better]
    return Registration(*out)


@torch.no_grad()
def refine(
    x: torch.Tensor,
    classes: torch.Tensor,
    theta: torch.Tensor,
    dictionary: np.ndarray,
    masks: np.ndarray,
    ring: np.ndarray,
    iters: int = REFINE_ITERS,
    coarse_sigma: float = 1.5,
    coarse_iters: int = COARSE_ITERS,
    damping: float = 1e-3,
    smooth: float = 0.5,
    mode: str = "bilinear",
    floor: float = 0.05,
    labels: torch.Tensor | None = None,
    templates: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: torch.Tensor | None = None,
    disks: DiskEntries | None = None,
    posterior: bool = False,
    recorded: torch.Tensor | None = None,
) -> Registration:
    """Refine affines so that ``g D_c(A^-1 (u - t)) + b`` reproduces each input.

    Parameters
    ----------
    x : (N, Q, Q) normalised patterns.
    classes : (N,) dictionary class per pattern.
    theta : (N, 2, 3) starting affines ``[A | t]`` (forward sampling convention).
    dictionary, masks : (K, Q, Q) dictionary patterns and their Bragg-disk weights.
    ring : (Q, Q) detector region used (excludes the central disk and the border).
    iters : Gauss-Newton iterations in all; the first ``coarse_iters`` fit a dictionary
        blurred by ``coarse_sigma`` px on every other pixel, for a wider capture range.
    smooth : Gaussian blur (px) applied to both the data and the dictionary: it makes the
        bilinear interpolant of the sharp-edged dictionary consistent with its gradient,
        which removes a sub-pixel bias of the fit.

    labels, templates : composition scoring, both or none, with ``scale``: ``labels``
        ``(K, Q, Q)`` (each entry's Bragg disks numbered 1..n, 0 elsewhere), ``templates``
        from :func:`disk_templates`.  Each pattern is then scored against every entry
        related to its own after its own registration (see :func:`_entry_residuals`).
    scale : ``(N,)`` normalised value of one count per pattern (the Poisson scale of
        composition scoring and of ``posterior``).

    disks : the sharp-disk model of the dictionary (:class:`DiskEntries`): the fine
        iterations then fit it to the unsmoothed counts (``smooth`` applies to the coarse
        ones only), which keeps the information of the disk edges (see
        :mod:`ccstae_hpc.core.disks`).
    posterior : with ``disks`` and ``scale``, each pattern's affine is the mean of its
        likelihood rather than its maximum (see :data:`POSTERIOR_SAMPLES`).
    recorded : ``(N, Q, Q)`` bool, the pixels of each pattern that hold recorded counts
        (:func:`ccstae_hpc.core.patterns.recorded_pixels`: not the strip a re-centring shift
        uncovers, not a repaired hot pixel); the others weigh nothing in its fit.  None: all.

    Returns
    -------
    :class:`Registration` (``composition`` only with ``templates``).
    """
    N, Q, _ = x.shape
    order = torch.argsort(classes, stable=True)
    cls = classes[order]
    groups = _groups(cls)
    x = x[order]
    A = theta[order, :, :2]
    B = torch.linalg.inv(A)  # the dictionary is sampled at B u + s
    s = -(B @ theta[order, :, 2:]).squeeze(-1)
    g = torch.ones(N)
    b = torch.zeros(N)
    stacks = {sig: _channels(dictionary, masks, max(sig, smooth)) for sig in {coarse_sigma, 0.0}}
    x_raw = x.reshape(N, -1)
    if smooth > 0:
        x = torch.from_numpy(ndimage.gaussian_filter(x.numpy(), (0, smooth, smooth)))
    x = x.reshape(N, -1)
    u = pixel_grid(Q)
    ring_px = torch.from_numpy(np.flatnonzero(np.asarray(ring).ravel() > 0))
    idx = torch.arange(Q)
    coarse_grid = ((idx[:, None] % 2 == 0) & (idx[None, :] % 2 == 0)).ravel()[ring_px]
    mask_stack = torch.from_numpy(np.asarray(masks, dtype=np.float32)).unsqueeze(1)
    resid = torch.zeros(N)
    cov = torch.zeros(N, 4, 4)
    entry = torch.full((N, len(masks)), float("nan")) if templates is not None else None
    rec = None if recorded is None else recorded.reshape(N, -1)[order].float()
    fit = _ClassFit(x, x_raw, ring_px, coarse_grid, mask_stack, stacks, coarse_sigma, iters,
                    coarse_iters, mode, damping, floor, disks, posterior, rec)
    scale = scale[order] if scale is not None else None
    for k, a, z in groups:
        # chunks of a few dozen patterns: the work arrays stay in cache, and each chunk fits
        # only the pixels its own patterns reach
        for c0 in range(a, z, REFINE_CHUNK):
            sl = slice(c0, min(c0 + REFINE_CHUNK, z))
            B[sl], s[sl], resid[sl], cov[sl], near = fit(
                k, sl, B[sl], s[sl], g[sl], b[sl], None if scale is None else scale[sl])
            if entry is not None:
                entry[sl] = _entry_residuals(x_raw[sl][:, near], u[near], B[sl], s[sl], k,
                                             labels, templates, scale[sl])
    A = torch.linalg.inv(B)
    t = -(A @ s.unsqueeze(-1))
    inv = torch.argsort(order)
    theta_out = torch.cat([A, t], -1)
    return Registration(theta_out[inv], resid[inv], cov[inv],
                        None if entry is None else entry[inv])
