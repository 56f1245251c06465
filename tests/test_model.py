"""The model's warps: the separable sampling grid is torch's affine grid, and the cycle loss
(dictionary and mask sampled apart) has the value and gradients of sampling them together."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ccstae_hpc.core.model import affine_grid, cycle_loss, invert_affine, sample


def _thetas(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.eye(2, 3).expand(n, 2, 3) + 0.05 * torch.randn(n, 2, 3, generator=g)


def test_affine_grid_is_torchs_with_its_gradient() -> None:
    th1 = _thetas(5).requires_grad_()
    th2 = th1.detach().clone().requires_grad_()
    for h, w in ((16, 16), (12, 20)):
        ours = affine_grid(th1, h, w)
        ref = F.affine_grid(th2, [5, 1, h, w], align_corners=False)
        assert ours.shape == ref.shape == (5, h, w, 2)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
        weights = torch.rand(ref.shape, generator=torch.Generator().manual_seed(h + w))
        (ours * weights).sum().backward()
        (ref * weights).sum().backward()
        torch.testing.assert_close(th1.grad, th2.grad, atol=1e-4, rtol=1e-5)
        th1.grad = th2.grad = None


def test_cycle_loss_equals_sampling_dictionary_and_mask_together() -> None:
    g = torch.Generator().manual_seed(1)
    n, q = 4, 24
    x = torch.rand(n, q, q, generator=g)
    mask = (torch.rand(n, 1, q, q, generator=g) > 0.3).float()
    theta = _thetas(n, seed=2)
    D = torch.rand(n, 1, q, q, generator=g)
    th1, D1 = theta.clone().requires_grad_(), D.clone().requires_grad_()
    th2, D2 = theta.clone().requires_grad_(), D.clone().requires_grad_()
    loss, _ = cycle_loss(x, {"theta": th1, "dict": D1}, mask)
    loss.backward()

    # the formulation before: one grid_sample of the two channels
    xi = x.unsqueeze(1)
    fwd = F.grid_sample(xi, F.affine_grid(th2, [n, 1, q, q], align_corners=False),
                        align_corners=False)
    back = F.grid_sample(torch.cat([D2, mask], 1),
                         F.affine_grid(invert_affine(th2), [n, 2, q, q], align_corners=False),
                         align_corners=False)
    dback, mback = back[:, :1], back[:, 1:]
    lf = ((fwd - D2) ** 2 * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp(min=1.0)
    lc = ((dback - xi) ** 2 * mback).sum((1, 2, 3)) / mback.sum((1, 2, 3)).clamp(min=1.0)
    ref = (0.5 * (lf + lc)).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(th1.grad, th2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(D1.grad, D2.grad, atol=1e-6, rtol=1e-5)


def test_a_bf16_image_is_sampled_at_float32_positions() -> None:
    """Under GPU autocast the dictionary is bf16 while the grid stays float32: sampling must
    not round the positions to bf16 (8 mantissa bits: up to a quarter pixel at 128 px)."""
    g = torch.Generator().manual_seed(3)
    img = torch.rand(2, 1, 128, 128, generator=g).to(torch.bfloat16)
    grid = affine_grid(_thetas(2, seed=4), 128, 128)
    out = sample(img, grid)
    ref = F.grid_sample(img.float(), grid, align_corners=False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
