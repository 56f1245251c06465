"""The cycle-consistent spatial-transforming autoencoder (CC-ST-AE): modules and losses.

Torch only, no I/O.  Shapes: patterns ``(N, Q, Q)`` float32, normalised to mean 1 over the
detector; the encoder sees them binned to ``input_size`` and square-rooted.

Affine convention (see :mod:`ccstae_hpc.core.strain`): in normalised detector coordinates
``u = (x, y)`` in ``[-1, 1]`` (``align_corners=False``), the *forward* transform samples the
input at ``A u + t`` so that ``I(A u + t) ~ D_c(u)`` with ``D_c`` the pattern's dictionary
entry.  The *cycle* (inverse) transform samples the dictionary at ``A^-1 (u - t)`` and must
reproduce the input.  Both directions are one ``grid_sample`` each: where the original code
chained three bicubic warps at 800x800, one composed affine per direction suffices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ccstae_hpc.core.config import ModelConfig
from ccstae_hpc.core.geometry import ring_inner_radius

__all__ = [
    "CCSTAE",
    "radial_features",
    "affine_matrix",
    "encoder_input",
    "cycle_loss",
    "warp",
    "affine_grid",
    "sample",
]


def encoder_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bin normalised patterns ``(N, Q, Q)`` to ``(N, 1, size, size)`` and take the sqrt.

    The square root stabilises Poisson variance and compresses the bright central disk, so
    that the encoder sees the Bragg disks at every dose.
    """
    x = x.unsqueeze(1)
    if x.shape[-1] != size:
        f = x.shape[-1] // size
        # whole binning factors (the usual case) pool in one pass
        x = F.avg_pool2d(x, f) if f * size == x.shape[-1] else F.adaptive_avg_pool2d(x, size)
    return torch.sqrt(torch.clamp(x, min=0.0))


def disk_centroids(
    x: torch.Tensor, center: torch.Tensor, radius: float, iters: int = 2
) -> torch.Tensor:
    """Per-pattern centre ``(N, 2)`` (row, col) of the central disk.

    Centre of mass inside a window of ``radius + 6`` px, re-centred once on the first
    estimate so that descan drift of several pixels is followed.
    """
    N, Q0, Q1 = x.shape
    # work on a crop around the mean centre only: 16x less than the full detector
    h = int(math.ceil(radius + 6.0)) + 8
    r0 = int(min(max(round(float(center[0])) - h, 0), max(Q0 - 2 * h - 1, 0)))
    c0 = int(min(max(round(float(center[1])) - h, 0), max(Q1 - 2 * h - 1, 0)))
    xc = x[:, r0:r0 + 2 * h + 1, c0:c0 + 2 * h + 1]
    yy, xx = torch.meshgrid(
        torch.arange(xc.shape[1], dtype=x.dtype) + r0,
        torch.arange(xc.shape[2], dtype=x.dtype) + c0, indexing="ij")
    c = center.to(x.dtype).expand(N, 2)
    for _ in range(iters):
        d = torch.hypot(yy[None] - c[:, :1, None], xx[None] - c[:, 1:, None])
        w = xc * (d <= radius + 6.0)
        tot = w.sum((1, 2)).clamp(min=1e-12)
        c = torch.stack([(w * yy).sum((1, 2)) / tot, (w * xx).sum((1, 2)) / tot], 1)
    return c


def radial_features(
    x: torch.Tensor, center: torch.Tensor, radius: float, r_in: int,
    centroids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotation-invariant descriptor: sqrt of the radial profile about each pattern's origin.

    The origin is the centre of mass of the central disk inside a window around the mean
    centre (so descan drift does not smear the rings); profiles start at ``r_in`` to skip
    the central disk.  Phases whose lattices differ by a few percent
    separate cleanly in this space, which the classifier uses next to the CNN features.

    Parameters
    ----------
    x : (N, Q, Q) normalised patterns.
    center : (2,) mean central-disk centre (row, col).
    radius : central disk radius in px.
    r_in : first radius bin kept.
    centroids : (N, 2) central-disk centres if already known (:func:`disk_centroids`).
    """
    N, Q, _ = x.shape
    idx = torch.arange(Q, dtype=x.dtype)
    if centroids is None:
        centroids = disk_centroids(x, center, radius)
    # squared distances from separable terms, then rounding and clamping in float: whole-
    # detector int64 arithmetic costs several times more
    dy2 = (idx[None, :] - centroids[:, :1]) ** 2
    dx2 = (idx[None, :] - centroids[:, 1:]) ** 2
    r = (dy2[:, :, None] + dx2[:, None, :]).sqrt_()
    nb = Q // 2
    rb = r.round_().clamp_(max=nb).view(N, -1).long()  # bin nb collects the corners
    prof = torch.zeros(N, nb + 1, dtype=x.dtype).scatter_add_(1, rb, x.reshape(N, -1))
    # mean intensity per ring (patterns are normalised to mean 1), square-rooted; no
    # per-pattern rescaling, so vacuum stays a tight cluster near zero instead of noise
    # blown up to unit norm
    area = 2 * torch.pi * torch.arange(r_in, nb, dtype=x.dtype).clamp(min=1)
    return torch.sqrt(prof[:, r_in:nb].clamp(min=0) / area)


def affine_matrix(params: torch.Tensor) -> torch.Tensor:
    """Build ``(N, 2, 3)`` affines ``[A | t]`` from ``(N, 6)`` physical parameters.

    ``params`` columns: ``scale_x, scale_y, shear, theta (rad), t_x, t_y``;
    ``A = R(theta) @ [[scale_x, shear], [shear, scale_y]]``.
    """
    sx, sy, sh, th, tx, ty = params.unbind(-1)
    c, s = torch.cos(th), torch.sin(th)
    a00 = c * sx - s * sh
    a01 = c * sh - s * sy
    a10 = s * sx + c * sh
    a11 = s * sh + c * sy
    return torch.stack(
        [torch.stack([a00, a01, tx], -1), torch.stack([a10, a11, ty], -1)], -2
    )


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """Inverse of ``(N, 2, 3)`` affines: ``u -> A^-1 (u - t)``."""
    A = theta[:, :, :2]
    t = theta[:, :, 2:]
    Ai = torch.linalg.inv(A)
    return torch.cat([Ai, -Ai @ t], dim=-1)


_AXES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _axes(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pixel centres along x ``(w,)`` and y ``(h,)`` (align_corners=False),
    cached per size and device."""
    key = (h, w, str(device))
    ax = _AXES.get(key)
    if ax is None:
        xs = (torch.arange(w, dtype=torch.float32) * 2 + 1) / w - 1
        ys = (torch.arange(h, dtype=torch.float32) * 2 + 1) / h - 1
        ax = _AXES[key] = (xs.to(device), ys.to(device))
    return ax


def affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Sampling positions ``(N, h, w, 2)`` float32 of ``theta @ [x, y, 1]`` at every pixel.

    The same as ``F.affine_grid(theta, (N, 1, h, w), align_corners=False)``, built from the
    separable terms ``a_0 x + (a_1 y + t)``: one batched matmul against the whole pixel grid
    (what ``F.affine_grid`` does) took 3.5x as long to build (5.0 against 1.4 ms at 64 x
    128 x 128 on the CPU) and, with its backward pass, a sixth of a training step.
    """
    xs, ys = _axes(h, w, theta.device)
    # float32 positions even under bf16 autocast: a bf16 grid would be off by up to a
    # quarter pixel
    with torch.autocast(theta.device.type, enabled=False):
        th = theta.float()[:, None, None]  # (N, 1, 1, 2, 3)
        row = torch.addcmul(th[..., 2], th[..., 1], ys[None, :, None, None])  # (N, h, 1, 2)
        return torch.add(th[..., 0] * xs[None, None, :, None], row)


def sample(img: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample ``img`` ``(N, C, Q, Q)`` at ``grid`` (:func:`affine_grid`; bilinear, zeros
    outside), in the wider of their dtypes: a bf16 image (a dictionary under GPU autocast)
    is sampled at the float32 positions, never at positions rounded to bf16 (off by up to
    a quarter pixel on a 128 px detector)."""
    dtype = torch.promote_types(img.dtype, grid.dtype)
    return F.grid_sample(img.to(dtype), grid.to(dtype), mode="bilinear",
                         padding_mode="zeros", align_corners=False)


def warp(img: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Sample ``img`` ``(N, C, Q, Q)`` at ``theta @ [u, 1]`` (bilinear, zeros outside)."""
    return sample(img, affine_grid(theta, *img.shape[-2:]))


class _Block(nn.Module):
    """Conv-norm-act residual unit with a strided downsampling entry."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.n1 = nn.GroupNorm(min(8, cout), cout)
        self.conv = nn.Conv2d(cout, cout, 3, padding=1)
        self.n2 = nn.GroupNorm(min(8, cout), cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.n1(self.down(x)))
        return F.silu(h + self.n2(self.conv(h)))


class CCSTAE(nn.Module):
    """Encoder, sparse top-1 dictionary, affine head and dictionary decoder.

    The decoder maps the one-hot code to a dictionary pattern.  For a one-hot input any
    decoder is a lookup table, so it is a single linear layer (``num_base -> Q*Q``) whose
    columns are the dictionary patterns, initialised from the data (cluster means) and kept
    non-negative by a softplus; deeper decoders only add an unwanted smoothing prior on the
    sharp disk edges that the affine fit needs.
    """

    def __init__(
        self, cfg: ModelConfig, detector: int, center: tuple[float, float] | None = None,
        radius: float = 4.0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.detector = detector
        c = center if center is not None else ((detector - 1) / 2, (detector - 1) / 2)
        # data-derived geometry travels with the weights (state_dict) for provenance
        self.register_buffer("center", torch.tensor(c, dtype=torch.float32))
        self.register_buffer("radius", torch.tensor(float(radius)))
        self.r_in = int(ring_inner_radius(radius))
        n_radial = detector // 2 - self.r_in
        chans = (1, *cfg.channels)
        pairs = zip(chans[:-1], chans[1:], strict=True)
        self.encoder = nn.Sequential(*[_Block(a, b) for a, b in pairs])
        side = cfg.input_size // 2 ** len(cfg.channels)
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(chans[-1] * side * side, cfg.latent), nn.SiLU()
        )
        self.radial = nn.Sequential(nn.Linear(n_radial, cfg.latent), nn.SiLU())
        self.classifier = nn.Linear(2 * cfg.latent, cfg.num_base)
        self.affine_head = nn.Sequential(
            nn.Linear(cfg.latent + cfg.num_base, 64), nn.SiLU(), nn.Linear(64, 7)
        )
        # start at the identity transform: cos-channel of the angle positive, rest zero
        nn.init.zeros_(self.affine_head[-1].weight)
        with torch.no_grad():
            self.affine_head[-1].bias.zero_()
            self.affine_head[-1].bias[4] = 1.0
        self.decoder = nn.Linear(cfg.num_base, detector * detector, bias=False)

    # -- dictionary --------------------------------------------------------------------
    def dictionary(self) -> torch.Tensor:
        """All dictionary patterns ``(num_base, Q, Q)``."""
        w = F.softplus(self.decoder.weight.t())  # (num_base, Q*Q)
        return w.view(self.cfg.num_base, self.detector, self.detector)

    @torch.no_grad()
    def init_dictionary(self, patterns: torch.Tensor) -> None:
        """Set the dictionary to given patterns ``(num_base, Q, Q)`` (inverse softplus)."""
        p = patterns.clamp(min=1e-4).reshape(self.cfg.num_base, -1)
        self.decoder.weight.copy_(torch.where(p > 20, p, torch.log(torch.expm1(p))).t())

    # -- encoder -----------------------------------------------------------------------
    def input_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The parts of the encoder that see only the input: central-disk centres ``(N, 2)``
        and radial profiles (:func:`radial_features`).  Constant per pattern, so training
        computes them once per pattern instead of at every step."""
        cen = disk_centroids(x, self.center, float(self.radius))
        return cen, radial_features(x, self.center, float(self.radius), self.r_in, cen)

    def encode(self, x: torch.Tensor,
               features: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(logits, onehot, params)`` for normalised patterns ``(N, Q, Q)``.

        ``onehot`` is the hard top-1 code with a straight-through gradient to the softmax;
        ``params`` are the physical affine parameters (see :func:`affine_matrix`).
        ``features``: :meth:`input_features` of ``x`` when already known.
        """
        z = self.fc(self.encoder(encoder_input(x, self.cfg.input_size)))
        cen, rad = self.input_features(x) if features is None else features
        zr = self.radial(rad)
        # plain logits: the original's LayerNorm over the num_base logits removes their
        # scale, so while the input-dependent part is small next to the bias every input
        # gets the same normalised logits and the classifier collapses onto one class (seen
        # on a noise-free 48x48 heterostructure: all 2304 patterns, vacuum included, in one
        # class while k-means had separated the three exactly)
        logits = self.classifier(torch.cat([z, zr], -1))
        p = torch.softmax(logits, -1)
        hard = F.one_hot(p.argmax(-1), self.cfg.num_base).to(p.dtype)
        onehot = hard + p - p.detach()
        r = self.affine_head(torch.cat([z, onehot], -1))
        c = self.cfg
        params = torch.stack(
            [
                1 + c.max_scale * torch.tanh(r[:, 0]),
                1 + c.max_scale * torch.tanh(r[:, 1]),
                c.max_shear * torch.tanh(r[:, 2]),
                torch.atan2(r[:, 3], r[:, 4]),  # full rotation range
                torch.zeros_like(r[:, 5]),
                torch.zeros_like(r[:, 5]),
            ],
            -1,
        )
        # translation: the measured central-disk origin carries the descan shift, so the
        # head only learns a small correction, t = o_input - A o_dict + dt
        A = affine_matrix(params)[:, :, :2]
        Q = self.detector
        o_in = (2 * cen.flip(-1) + 1) / Q - 1  # (x, y) normalised
        o_d = (2 * self.center.flip(-1) + 1) / Q - 1
        t = o_in - A @ o_d + c.max_shift * torch.tanh(r[:, 5:7])
        params = torch.cat([params[:, :4], t], -1)
        return logits, onehot, params

    def forward(self, x: torch.Tensor,
                features: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
        logits, onehot, params = self.encode(x, features)
        theta = affine_matrix(params)
        D = onehot @ self.dictionary().flatten(1)  # (N, Q*Q), differentiable in the code
        D = D.view(-1, 1, self.detector, self.detector)
        return {"logits": logits, "onehot": onehot, "params": params, "theta": theta, "dict": D}


def cycle_loss(
    x: torch.Tensor, out: dict[str, torch.Tensor], mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked MSE in both directions.

    Forward: the input warped onto the dictionary frame must match the dictionary pattern
    on the dictionary's Bragg-disk mask.  Cycle: the dictionary pattern warped back by the
    inverse affine must reproduce the input on the mask carried along with it.

    Parameters
    ----------
    x : (N, Q, Q) normalised patterns.
    out : output of :meth:`CCSTAE.forward`.
    mask : (N, 1, Q, Q) Bragg-disk weights in the dictionary frame of each pattern's class.
    """
    theta = out["theta"]
    D = out["dict"]
    xi = x.unsqueeze(1)
    fwd = warp(xi, theta)
    grid = affine_grid(invert_affine(theta), *x.shape[-2:])
    # the dictionary and its mask sampled apart: as two channels of one image the backward
    # pass also differentiated the mask (a fifth more time at 64 x 128 x 128 on the CPU)
    dback, mback = sample(D, grid), sample(mask, grid)
    norm_f = mask.sum((1, 2, 3)).clamp(min=1.0)
    norm_c = mback.sum((1, 2, 3)).clamp(min=1.0)
    lf = ((fwd - D) ** 2 * mask).sum((1, 2, 3)) / norm_f
    lc = ((dback - xi) ** 2 * mback).sum((1, 2, 3)) / norm_c
    per = 0.5 * (lf + lc)
    return per.mean(), {"forward": lf.detach(), "cycle": lc.detach(), "per_pattern": per.detach()}


def rotation_deg(params: torch.Tensor) -> torch.Tensor:
    """Rotation angle of the affine head in degrees."""
    return params[:, 3] * (180.0 / math.pi)
