"""Per-pattern affine refinement against an exact dictionary pattern."""

from __future__ import annotations

import numpy as np
import torch

from ccstae_hpc.config import SimConfig
from ccstae_hpc.infer import refine
from ccstae_hpc.preprocess import disk_mask, normalise, ring_mask
from ccstae_hpc.simulate import render_patterns
from ccstae_hpc.strain import affine_to_deformation, relative_strain, rotation_matrix


def _F(exx, eyy, exy, theta):
    return rotation_matrix(theta) @ (np.eye(2) + np.array([[exx, exy], [exy, eyy]]))


def test_refine_recovers_known_strain_rotation_and_shift():
    cfg = SimConfig()
    org0 = np.array([[63.4, 64.2]])
    D = normalise(render_patterns(cfg, rotation_matrix(17.0)[None], org0, np.array([1])))[0]
    ring = ring_mask(D.shape, tuple(org0[0]), 11)
    mask = disk_mask(D, ring)
    truths = [(0.01, -0.005, 0.002, 17.8), (-0.008, 0.006, -0.003, 16.1), (0, 0, 0, 17.0)]
    Fs = np.stack([_F(*t) for t in truths])
    origins = np.array([[65.1, 62.7], [61.9, 66.0], [63.4, 64.2]])
    x = torch.from_numpy(normalise(render_patterns(cfg, Fs, origins, np.ones(3, int))))
    start = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).repeat(3, 1, 1)  # identity: no hint
    theta, resid = refine(x, torch.zeros(3, dtype=torch.long), start, D[None], mask[None], ring)
    M = affine_to_deformation(theta[:, :, :2].numpy().astype(np.float64))
    est = relative_strain(M, M[2])
    tru = relative_strain(Fs, Fs[2])
    for k in ("exx", "eyy", "exy"):
        # a single sharp-edged template leaves a sub-pixel interpolation bias of a few 1e-4
        assert np.abs(est[k] - tru[k]).max() < 6e-4, (k, est[k], tru[k])
    assert np.abs(est["theta"] - tru["theta"]).max() < 0.02
    # translation: the fitted shift moves the dictionary origin onto each pattern's origin
    Q = x.shape[-1]
    t_px = theta[:, :, 2].numpy() * Q / 2  # (x, y) in px
    shift = origins[:, ::-1] - org0[0, ::-1]
    assert np.abs(t_px - shift).max() < 0.1
    assert (resid < 0.02).all()
