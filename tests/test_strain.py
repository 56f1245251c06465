"""Strain maths: polar decomposition, references, symmetry unwrapping, pooling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ccstae_hpc.core.strain import (
    POOL_SIGMAS,
    affine_to_deformation,
    choose_pool_sigma,
    deformation_covariance,
    polar_decompose,
    pool_covariance,
    pool_deformation,
    reference_deformation,
    relative_strain,
    robust_inliers,
    rotation_matrix,
    strain_std,
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


def _field(ny: int = 40, nx: int = 40) -> np.ndarray:
    """A smooth deformation field: 0.5 % strain and 0.3 deg rotation waves over ~20 px."""
    yy, xx = np.mgrid[0:ny, 0:nx]
    M = np.tile(np.eye(2), (ny, nx, 1, 1))
    M[..., 0, 0] += 0.005 * np.sin(2 * np.pi * xx / 20)
    M[..., 1, 1] += 0.005 * np.cos(2 * np.pi * yy / 25)
    rot = np.deg2rad(0.3) * np.sin(2 * np.pi * (xx + yy) / 30)
    M[..., 0, 1] -= rot
    M[..., 1, 0] += rot
    return M


def test_pool_width_is_chosen_from_the_noise():
    """No pooling for precise fits, some for noisy ones, and the chosen width beats both
    no pooling and the widest kernel on the truth."""
    rng = np.random.default_rng(0)
    M = _field()
    w = np.ones(M.shape[:2], bool)
    C = np.tile(np.eye(4), (*M.shape[:2], 1, 1))
    sigma, _ = choose_pool_sigma(M + 1e-6 * rng.standard_normal(M.shape), 1e-12 * C, w)
    assert sigma == 0.0
    sd = 0.002
    noisy = M + sd * rng.standard_normal(M.shape)
    sigma, risk = choose_pool_sigma(noisy, sd**2 * C, w)
    assert sigma > 0 and set(risk) == set(POOL_SIGMAS)
    mse = {s: np.mean((pool_deformation(noisy, w, s) - M) ** 2) for s in POOL_SIGMAS}
    assert mse[sigma] < mse[0.0] and mse[sigma] < mse[max(POOL_SIGMAS)], (sigma, mse)
    # unknown variances: nothing pooled
    assert choose_pool_sigma(noisy, np.full_like(C, np.nan), w)[0] == 0.0


def test_pooled_covariance_matches_monte_carlo():
    rng = np.random.default_rng(1)
    M = _field(12, 12)
    w = np.ones((12, 12), bool)
    w[:, 6:] = False  # an edge of the phase: fewer neighbours, larger variance
    C = np.tile(np.diag([1.0, 2.0, 3.0, 4.0]) * 1e-6, (12, 12, 1, 1))
    pred = pool_covariance(C, w, 1.0)
    draws = np.stack([pool_deformation(M + np.sqrt(np.diagonal(C, axis1=-2, axis2=-1))
                                       .reshape(12, 12, 2, 2) * rng.standard_normal(M.shape),
                                       w, 1.0) for _ in range(3000)])
    var = draws.reshape(3000, 12, 12, 4).var(0)
    got = np.diagonal(pred, axis1=-2, axis2=-1)
    assert np.allclose(var[w], got[w], rtol=0.1), (var[w][:3], got[w][:3])
    assert np.isnan(pred[:, 9:]).all()  # out of the kernel's reach (3 sigma) of the phase


def test_strain_std_propagates_the_fit_covariance():
    """Standard errors of the strain from the covariance of B (the refinement's parameters)
    through M = B^T F and the polar decomposition, against a Monte Carlo."""
    rng = np.random.default_rng(2)
    F = rotation_matrix(20.0) @ np.diag([1.02, 0.99])
    B = np.array([[1.01, 0.004], [-0.003, 0.995]])
    L = rng.standard_normal((4, 4)) * 1e-3
    cov_B = L @ L.T
    C = deformation_covariance(cov_B[None], F[None])[0]
    draws = B.ravel() + rng.multivariate_normal(np.zeros(4), cov_B, size=20000)
    Ms = np.swapaxes(draws.reshape(-1, 2, 2), -1, -2) @ F
    assert np.allclose(np.cov(Ms.reshape(-1, 4).T), C, rtol=0.05, atol=1e-9)
    M_ref = F
    mc = relative_strain(Ms, M_ref)
    se = strain_std((B.T @ F)[None], C[None], M_ref)
    for k in ("exx", "eyy", "exy", "theta"):
        assert se[k][0] == pytest.approx(np.std(mc[k]), rel=0.05), k


def test_pooled_map_is_the_same_whatever_symmetry_branch_each_fit_took():
    """Fits of one phase may end on affines a symmetry turn apart (their starts lay a turn
    apart; measured at 500 e-/pattern: 250 of a phase's 539): the same lattice, so the map,
    its automatic pooling width and its standard errors must be those of fits all on one
    branch (pooled together, ``M`` and ``M S`` describe no lattice)."""
    from ccstae_hpc.core.config import MapConfig
    from ccstae_hpc.core.mapping import assemble_strain
    from ccstae_hpc.core.phases import single_phase_map

    ny = nx = 16
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:ny, 0:nx] / 16.0
    A = np.empty((ny, nx, 2, 2))
    for i in range(ny):
        for j in range(nx):
            # a smooth field (sampling matrices of a lattice strained by up to ~1 %), noisy
            A[i, j] = np.linalg.inv(_F(0.01 * np.sin(3 * xx[i, j]), 0.008 * yy[i, j],
                                       0.003 * xx[i, j] * yy[i, j], 0.5 * xx[i, j])).T
    A += 1e-3 * rng.standard_normal(A.shape)
    cov = np.broadcast_to(1e-6 * np.eye(4), (ny, nx, 4, 4)).astype(np.float32)

    def affine(lin: np.ndarray) -> dict:
        theta = np.zeros((ny, nx, 2, 3), np.float32)
        theta[..., :2] = lin
        return {"theta": theta, "entry": np.zeros((ny, nx), np.int16),
                "phase": np.ones((ny, nx), np.int16),
                "residual": np.zeros((ny, nx), np.float32), "cov": cov}

    # M = A^-T -> M S_k for A -> A S_k (S_k a rotation: S^-T = S)
    k = rng.choice([-2, -1, 0, 1, 3], (ny, nx))
    turned = A @ rotation_matrix(60.0 * k)
    cfg = MapConfig()
    one = assemble_strain(affine(A), single_phase_map(), cfg)
    mixed = assemble_strain(affine(turned), single_phase_map(), cfg)
    pool = [json.loads(ds.attrs["pooling"])["phases"]["1"] for ds in (one, mixed)]
    assert pool[0]["sigma_px"] == pool[1]["sigma_px"] > 0, pool
    # (float32 affines: the turned ones are rounded differently)
    assert pool[1]["scatter_factor"] == pytest.approx(pool[0]["scatter_factor"], rel=1e-4)
    for name in ("exx", "eyy", "exy", "theta", "exx_std", "theta_std"):
        np.testing.assert_allclose(mixed[name].values, one[name].values, atol=1e-6,
                                   err_msg=name)
