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


def test_class_relations_flag_one_phase_split_over_two_entries():
    """Two dictionary entries of WS2 0.8% apart are flagged as one phase; WS2 vs WSe2
    (3.8% lattice mismatch, other disk intensities) and the vacuum entry are not."""
    import warnings

    import pytest

    from ccstae_hpc.pipeline import class_relations, warn_similar_classes

    cfg = SimConfig()
    org = np.array([[63.5, 63.5]] * 4)
    Fs = np.stack([np.eye(2), _F(0, 0, 0, 17.0), _F(0.008, 0.008, 0, 17.3),
                   _F(0, 0, 0, 17.0)])
    D = normalise(render_patterns(cfg, Fs, org, np.array([0, 1, 1, 2]))).astype(np.float32)
    ring = ring_mask(D.shape[1:], (63.5, 63.5), 11)
    rel = {tuple(r["classes"]): r for r in class_relations(D, ring, np.array([1, 0, 0, 0], bool))}
    assert set(rel) == {(1, 2), (1, 3), (2, 3)}
    assert rel[(1, 2)]["similar"] and abs(rel[(1, 2)]["max_strain"] - 0.008) < 0.002
    assert abs(rel[(1, 2)]["rotation_deg"] - 0.3) < 0.05
    assert not rel[(1, 3)]["similar"] and rel[(1, 3)]["max_strain"] > 0.03
    with pytest.warns(UserWarning, match="classes 1 and 2 .* smaller --num-base"):
        warn_similar_classes(list(rel.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_similar_classes([rel[(1, 3)], rel[(2, 3)]])
