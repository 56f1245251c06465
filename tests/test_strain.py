"""Strain maths: polar decomposition, references, symmetry unwrapping, pooling."""

from __future__ import annotations

import numpy as np
import pytest

from ccstae_hpc.core.strain import (
    affine_to_deformation,
    polar_decompose,
    pool_deformation,
    reference_deformation,
    relative_strain,
    robust_inliers,
    rotation_matrix,
)


def _F(exx, eyy, exy, theta):
    eps = np.array([[exx, exy], [exy, eyy]])
    return rotation_matrix(theta) @ (np.eye(2) + eps)


def test_rotation_sign_turns_x_toward_y():
    R = rotation_matrix(90.0)
    assert np.allclose(R @ [1.0, 0.0], [0.0, 1.0])


def test_polar_decomposition_recovers_known_strain():
    F = _F(0.012, -0.007, 0.004, 23.0)
    theta, U = polar_decompose(F)
    assert theta == pytest.approx(23.0, abs=1e-9)
    assert np.allclose(U, [[1.012, 0.004], [0.004, 0.993]], atol=1e-12)


def test_relative_strain_against_reference():
    F_ref = _F(0.01, 0.01, 0.0, 5.0)
    F = _F(0.01, 0.01, 0.0, 5.0) @ np.linalg.inv(F_ref) @ _F(0.003, -0.002, 0.001, 2.0) @ F_ref
    st = relative_strain(F[None], F_ref)
    # T = F F_ref^-1 = R(2) (I + eps) exactly
    assert st["exx"][0] == pytest.approx(0.003, abs=1e-12)
    assert st["eyy"][0] == pytest.approx(-0.002, abs=1e-12)
    assert st["exy"][0] == pytest.approx(0.001, abs=1e-12)
    assert st["theta"][0] == pytest.approx(2.0, abs=1e-9)


def test_affine_to_deformation_is_inverse_transpose():
    A = np.array([[1.02, 0.01], [-0.03, 0.98]])
    assert np.allclose(affine_to_deformation(A), np.linalg.inv(A).T)


def test_reference_is_equivariant_to_the_dictionary_frame():
    rng = np.random.default_rng(0)
    Fs = np.stack([_F(*rng.normal(0, 0.01, 3), rng.normal(17, 1)) for _ in range(200)])
    mask = np.ones(200, bool)
    C = _F(0.04, -0.02, 0.01, 31.0)  # an arbitrary dictionary frame
    a = relative_strain(Fs, reference_deformation(Fs, mask))
    b = relative_strain(Fs @ C, reference_deformation(Fs @ C, mask))
    for k in a:
        assert np.allclose(a[k], b[k], atol=1e-10), k


def test_symmetry_branches_are_unwrapped():
    F = _F(0.01, -0.005, 0.002, 3.0)
    ref = _F(0.0, 0.0, 0.0, 0.0)
    # the same lattice seen through a 60-degree-rotated branch of a 6-fold dictionary
    st = relative_strain(np.stack([F, F @ rotation_matrix(60.0), F @ rotation_matrix(-120.0)]),
                         ref, symmetry=6)
    for k in st:
        assert np.allclose(st[k], st[k][0], atol=1e-10), k
    assert st["theta"][0] == pytest.approx(3.0, abs=1e-9)


def test_pooling_never_mixes_excluded_pixels():
    M = np.broadcast_to(np.eye(2), (6, 7, 2, 2)).copy()
    M[:, 4:] *= 1.04  # another phase
    w = np.ones((6, 7))
    w[:, 4:] = 0
    P = pool_deformation(M, w, sigma=1.5)
    assert np.allclose(P[:, :4], np.eye(2))
    # excluded pixels get their neighbours' value, not their own
    assert np.allclose(P[:, 4], np.eye(2))


def test_pooling_reduces_noise_of_a_constant_field():
    rng = np.random.default_rng(1)
    M = np.eye(2) + rng.normal(0, 0.01, (40, 40, 2, 2))
    P = pool_deformation(M, np.ones((40, 40)), sigma=1.0)
    assert np.std(P[5:-5, 5:-5, 0, 0]) < 0.4 * np.std(M[..., 0, 0])


def test_inliers_flag_diverged_fits():
    rng = np.random.default_rng(2)
    Fs = np.stack([_F(*rng.normal(0, 0.002, 3), rng.normal(0, 0.1)) for _ in range(100)])
    Fs[7] = _F(0.3, 0.0, 0.0, 0.0)
    ok = robust_inliers(Fs, np.eye(2), 8.0)
    assert not ok[7] and ok.sum() >= 97
