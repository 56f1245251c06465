"""Strain and rotation from per-pattern affine transforms.

Conventions (stated once, used everywhere):

* arrays are ``(scan_y, scan_x, k_y, k_x)``; detector axes are parallel to the scan axes;
* 2x2 matrices act on column vectors ``(x, y)`` with ``x`` = scan columns / ``k_x`` and
  ``y`` = scan rows / ``k_y``;
* a pattern's affine ``A`` is the *sampling* matrix in detector space: the transformed input
  is ``I(A k + t)`` and should equal the dictionary pattern ``D(k)``.  Reciprocal lattice
  vectors then satisfy ``G_input = A G_dict``, so the real-space deformation of the pattern's
  lattice relative to the dictionary lattice is ``M = A^-T``;
* relative to a reference ``M_ref`` the deformation is ``T = M M_ref^-1 = R U`` (polar
  decomposition, ``R`` a rotation, ``U`` symmetric positive definite) and the strain is
  ``eps = U - I``: ``exx = U_xx - 1``, ``eyy = U_yy - 1``, ``exy = U_xy`` (tensor shear,
  fractions);  ``theta = atan2(R_yx, R_xx)`` in degrees, positive turning +x toward +y.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "affine_to_deformation",
    "polar_decompose",
    "rotation_matrix",
    "unwrap_symmetry",
    "unwrap_fits",
    "reference_deformation",
    "relative_strain",
    "robust_inliers",
    "pool_deformation",
    "pool_covariance",
    "pooling_bias",
    "choose_pool_sigma",
    "scatter_variance_factor",
    "deformation_covariance",
    "strain_std",
    "POOL_SIGMAS",
    "stretch_determinant",
]

# pooling widths (scan px) the automatic choice tries; 0 keeps single-pattern fits
POOL_SIGMAS = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
# Gaussian kernels reach this many sigmas
POOL_TRUNCATE = 3.0
# median of a chi-square with one degree of freedom (scipy.stats.chi2(1).median())
MEDIAN_CHI2_1 = 0.454936423119572
# fewest neighbour triplets from which scatter_variance_factor estimates anything
MIN_SCATTER_TRIPLETS = 50
# scatter_variance_factor stays within [1 / this, this]
SCATTER_FACTOR_LIMIT = 4.0
# finite-difference step of the strain Jacobian (deformations are ~1, strains >~ 1e-5)
_JAC_STEP = 1e-6


def rotation_matrix(theta_deg: np.ndarray | float) -> np.ndarray:
    """Rotation matrices turning +x toward +y by ``theta_deg``; shape ``(..., 2, 2)``."""
    t = np.deg2rad(np.asarray(theta_deg, dtype=np.float64))
    c, s = np.cos(t), np.sin(t)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def affine_to_deformation(A: np.ndarray) -> np.ndarray:
    """Real-space deformation ``M = A^-T`` from detector sampling matrices ``(..., 2, 2)``."""
    return np.swapaxes(np.linalg.inv(np.asarray(A, dtype=np.float64)), -1, -2)


def polar_decompose(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batched right polar decomposition ``T = R U`` of 2x2 matrices (closed form).

    Returns ``(theta_deg, U)`` where ``R = rotation_matrix(theta_deg)`` and ``U`` symmetric.
    """
    T = np.asarray(T, dtype=np.float64)
    # the rotation closest to T in Frobenius norm has angle atan2(T10 - T01, T00 + T11)
    ang = np.arctan2(T[..., 1, 0] - T[..., 0, 1], T[..., 0, 0] + T[..., 1, 1])
    R = rotation_matrix(np.rad2deg(ang))
    U = np.swapaxes(R, -1, -2) @ T
    U = 0.5 * (U + np.swapaxes(U, -1, -2))
    return np.rad2deg(ang), U


def unwrap_symmetry(M: np.ndarray, target: np.ndarray, symmetry: int) -> np.ndarray:
    """Pick, per pattern, the symmetry-equivalent ``M S_k`` closest in rotation to ``target``.

    A dictionary pattern with ``symmetry``-fold rotational symmetry fixes the affine only up
    to ``A -> A S_k``, i.e. ``M -> M S_k`` with ``S_k`` a rotation by ``k * 360 / symmetry``.
    Choosing the branch whose relative rotation to ``target`` is smallest keeps the strain
    tensor in the right frame.
    """
    if symmetry <= 1:
        return M
    return M @ _branch(M, target, symmetry)


def unwrap_fits(M: np.ndarray, C: np.ndarray, target: np.ndarray, symmetry: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`unwrap_symmetry` of deformations ``M`` ``(..., 2, 2)`` together with the
    covariances ``C`` ``(..., 4, 4)`` of their row-major ``vec``: ``vec(M S) = L vec(M)``
    with ``L[ab, cd] = delta_ac S_db``, so ``C -> L C L^T``.  Fits of one phase must sit
    on one branch before they are averaged: neighbours' ``M`` and ``M S_k`` pooled together
    describe no lattice."""
    if symmetry <= 1:
        return M, C
    S = _branch(M, target, symmetry)
    L = np.einsum("ac,...db->...abcd", np.eye(2), S).reshape(*S.shape[:-2], 4, 4)
    return M @ S, L @ C @ np.swapaxes(L, -1, -2)


def _branch(M: np.ndarray, target: np.ndarray, symmetry: int) -> np.ndarray:
    """The rotations ``S_k`` ``(..., 2, 2)`` of :func:`unwrap_symmetry`."""
    step = 360.0 / symmetry
    theta, _ = polar_decompose(M @ np.linalg.inv(target))
    return rotation_matrix(-np.round(theta / step) * step)


def reference_deformation(M: np.ndarray, mask: np.ndarray, symmetry: int = 6) -> np.ndarray:
    """Robust reference deformation of the region ``mask``.

    The element-wise median of ``T = M M0^-1`` (``M0`` the mean of the region after
    symmetry unwrapping), mapped back by ``M0``.  Unlike a plain element-wise median of
    ``M``, this is equivariant under ``M -> M C`` for any constant ``C``: the arbitrary
    lattice frame of the learned dictionary cancels exactly.

    Parameters
    ----------
    M : (..., 2, 2) deformations.
    mask : boolean array of ``M.shape[:-2]``, the reference region.
    """
    Ms = M[mask]
    if Ms.shape[0] == 0:
        raise ValueError("reference region holds no valid pattern: choose a box inside the sample")
    # provisional target: the rotation whose symmetry-folded angle is the circular mean
    theta, U = polar_decompose(Ms)
    n = max(symmetry, 1)
    phi = np.angle(np.mean(np.exp(1j * np.deg2rad(theta) * n))) / n
    target = rotation_matrix(np.rad2deg(phi)) @ np.median(U, axis=0)
    Ms = unwrap_symmetry(Ms, target, symmetry)
    M0 = Ms.mean(axis=0)
    return np.median(Ms @ np.linalg.inv(M0), axis=0) @ M0


def relative_strain(M: np.ndarray, M_ref: np.ndarray, symmetry: int = 6) -> dict[str, np.ndarray]:
    """Strain and rotation of deformations ``M`` relative to ``M_ref``.

    Returns a dict of ``exx, eyy, exy`` (fractions) and ``theta`` (degrees, in
    ``(-180/symmetry, 180/symmetry]`` after unwrapping).
    """
    M = unwrap_symmetry(np.asarray(M, dtype=np.float64), M_ref, symmetry)
    theta, U = polar_decompose(M @ np.linalg.inv(M_ref))
    return {
        "exx": U[..., 0, 0] - 1.0,
        "eyy": U[..., 1, 1] - 1.0,
        "exy": U[..., 0, 1],
        "theta": theta,
    }


def robust_inliers(M: np.ndarray, M_ref: np.ndarray, nsigma: float, symmetry: int = 6
                   ) -> np.ndarray:
    """Boolean mask of fits whose strain and rotation lie within ``nsigma`` robust standard
    deviations (1.4826 MAD) of the median of their group; flags diverged fits."""
    st = relative_strain(M, M_ref, symmetry)
    ok = np.all(np.isfinite(M), axis=(-2, -1))
    for v in st.values():
        med = np.nanmedian(v)
        mad = 1.4826 * np.nanmedian(np.abs(v - med)) + 1e-9
        ok &= np.abs(v - med) <= nsigma * mad
    return ok


def _kernel(sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian of :func:`pool_deformation` (``POOL_TRUNCATE`` sigmas)."""
    r = int(POOL_TRUNCATE * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _smooth(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable correlation of ``a`` ``(ny, nx, ...)`` with ``k`` along both scan axes, zero
    outside the scan."""
    from scipy import ndimage  # local: only pooling needs scipy here

    out = ndimage.correlate1d(a, k, axis=0, mode="constant")
    return ndimage.correlate1d(out, k, axis=1, mode="constant")


def pool_deformation(M: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-weighted average of deformations ``(ny, nx, 2, 2)`` over neighbours.

    Normalised convolution: pixels with ``weight == 0`` (other phases, vacuum, outliers)
    contribute nothing, so phases never mix.  Returns NaN where no weight is in reach.
    """
    if sigma <= 0:
        return np.where(weight[..., None, None] > 0, M, np.nan)
    k = _kernel(sigma)
    w = weight.astype(np.float64)
    den = _smooth(w, k)
    num = _smooth(np.where(w[..., None, None] > 0, M, 0.0) * w[..., None, None], k)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den[..., None, None]
    out[den <= 1e-12] = np.nan
    return out


def pooling_bias(M: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Plug-in estimate ``(ny, nx, 2, 2)`` of the bias of :func:`pool_deformation`.

    Pooling a field ``f`` with the smoother ``S`` returns ``S f`` on average, off by
    ``(S - I) f`` where the field curves or the kernel is cut by a phase boundary.  The
    unknown ``f`` is replaced by the pooled estimate ``S M``: ``b = S (S M) - S M``.  This
    underestimates the bias of features sharper than the kernel (their pooled image is
    already flattened) and is zero when ``sigma <= 0``.
    """
    if sigma <= 0:
        return np.where(weight[..., None, None] > 0, np.zeros(np.shape(M)), np.nan)
    pooled = pool_deformation(M, weight, sigma)
    return pool_deformation(np.where(np.isfinite(pooled), pooled, 0.0), weight, sigma) - pooled


def pool_covariance(C: np.ndarray, weight: np.ndarray, sigma: float,
                    M: np.ndarray | None = None) -> np.ndarray:
    """Covariance ``(ny, nx, 4, 4)`` of :func:`pool_deformation`'s result from the
    per-pattern covariances ``C`` of independent fits: ``sum_j S_ij^2 C_j``.

    The fits are independent (each pattern has its own counts), so pooling ``n`` equally
    weighted patterns divides the variance by ``n``.  With the deformations ``M``
    ``(ny, nx, 2, 2)`` the result is the mean squared error about the truth instead: the
    outer product of :func:`pooling_bias` is added, since the Stein-optimal width leaves a
    squared bias comparable to the noise it keeps.
    """
    if sigma <= 0:
        return np.where(weight[..., None, None] > 0, C, np.nan)
    k = _kernel(sigma)
    w = weight.astype(np.float64)
    den = _smooth(w, k)
    num = _smooth(np.where(w[..., None, None] > 0, C, 0.0) * (w * w)[..., None, None], k * k)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / (den * den)[..., None, None]
    out[den <= 1e-12] = np.nan
    if M is not None:
        b = pooling_bias(M, weight, sigma).reshape(*out.shape[:-1])
        out = out + b[..., :, None] * b[..., None, :]
    return out


def scatter_variance_factor(M: np.ndarray, C: np.ndarray, weight: np.ndarray) -> float:
    """How much the fits actually scatter against their covariances, from the data.

    Along each scan axis, the second difference ``y_i - (y_(i-1) + y_(i+1)) / 2`` of the
    deformation components ``y`` of three neighbouring fits with ``weight > 0`` has variance
    ``v_i + (v_(i-1) + v_(i+1)) / 4`` (independent fits, ``v`` the diagonal of ``C``) plus
    the field's curvature, which is small over two scan px.  The median of the squared
    differences over their predicted variance, divided by the median of a chi-square with
    one degree of freedom, is the factor by which ``C`` misstates the variance; its median
    is robust to the few triplets that straddle an interface or a defect.

    Returns 1.0 when fewer than :data:`MIN_SCATTER_TRIPLETS` triplets are available or the
    covariances are unknown; otherwise the factor clipped to
    ``[1 / SCATTER_FACTOR_LIMIT, SCATTER_FACTOR_LIMIT]`` (on noise-free data the curvature,
    not the noise, sets the differences: the clip keeps that from swamping the estimate).
    """
    y = np.asarray(M, np.float64).reshape(*M.shape[:2], 4)
    v = np.diagonal(np.asarray(C, np.float64), axis1=-2, axis2=-1)
    sel = (weight > 0) & np.isfinite(y).all(-1) & np.isfinite(v).all(-1) & (v > 0).all(-1)
    ratios = []
    for ax in (0, 1):
        n = sel.shape[ax]
        if n < 3:
            continue
        mid = [slice(None)] * 2
        lo, hi = list(mid), list(mid)
        mid[ax], lo[ax], hi[ax] = slice(1, n - 1), slice(0, n - 2), slice(2, n)
        mid, lo, hi = tuple(mid), tuple(lo), tuple(hi)
        ok = sel[mid] & sel[lo] & sel[hi]
        d = y[mid][ok] - 0.5 * (y[lo][ok] + y[hi][ok])
        var = v[mid][ok] + 0.25 * (v[lo][ok] + v[hi][ok])
        ratios.append((d * d / var).ravel())
    r = np.concatenate(ratios) if ratios else np.empty(0)
    if r.size < MIN_SCATTER_TRIPLETS * 4:
        return 1.0
    factor = float(np.median(r)) / MEDIAN_CHI2_1
    return float(np.clip(factor, 1.0 / SCATTER_FACTOR_LIMIT, SCATTER_FACTOR_LIMIT))


def choose_pool_sigma(M: np.ndarray, C: np.ndarray, weight: np.ndarray,
                      sigmas: tuple[float, ...] = POOL_SIGMAS) -> tuple[float, dict]:
    """The pooling width with the least estimated mean squared error, from the data.

    Stein's unbiased risk estimate of a linear smoother ``S`` with known per-pattern noise
    variances ``v``: ``SURE = sum (y - S y)^2 + 2 sum v_i S_ii - sum v_i``, summed over the
    four components of the deformations ``M`` ``(ny, nx, 2, 2)`` of the pixels with
    ``weight > 0``, ``v`` the diagonal of their covariances ``C`` ``(ny, nx, 4, 4)``.  Where
    the fits are precise against the field's own variation (noise-free data, fields that
    change from one probe position to the next) the residual term wins and nothing is
    pooled; where noise dominates a smooth field the width grows until its bias costs more
    than the noise it removes.

    Returns the width (0 when the variances are unknown) and the risk of every width tried.
    """
    sel = weight > 0
    y = M[sel].reshape(-1, 4)
    v = np.diagonal(C[sel], axis1=-2, axis2=-1)
    if not sel.any() or not np.isfinite(v).all() or not np.isfinite(y).all():
        return 0.0, {}
    w = sel.astype(np.float64)
    risk = {}
    for sigma in sigmas:
        if sigma <= 0:
            risk[float(sigma)] = float(v.sum())
            continue
        k = _kernel(sigma)
        fit = pool_deformation(M, w, sigma)[sel].reshape(-1, 4)
        s_ii = k[len(k) // 2] ** 2 / _smooth(w, k)[sel]
        risk[float(sigma)] = float(((y - fit) ** 2).sum() + 2 * (v * s_ii[:, None]).sum()
                                   - v.sum())
    return min(risk, key=risk.get), risk


def deformation_covariance(cov_B: np.ndarray, F: np.ndarray) -> np.ndarray:
    """Covariance ``(..., 4, 4)`` of ``vec(M F)`` with ``M = B^T`` (row-major ``vec``) from
    the covariance of ``vec(B)`` (``B00, B01, B10, B11``) and the frames ``F``
    ``(..., 2, 2)``: ``(M F)_ab = sum_c B_ca F_cb`` is linear in ``B``."""
    eye = np.eye(2)
    # L[a, b, c, d] = d(M F)_ab / dB_cd = delta_da F_cb
    L = np.einsum("da,...cb->...abcd", eye, np.asarray(F, np.float64))
    L = L.reshape(*L.shape[:-4], 4, 4)
    return L @ np.asarray(cov_B, np.float64) @ np.swapaxes(L, -1, -2)


def strain_std(M: np.ndarray, C: np.ndarray, M_ref: np.ndarray, symmetry: int = 6
               ) -> dict[str, np.ndarray]:
    """Standard errors of :func:`relative_strain` for deformations ``M`` ``(n, 2, 2)`` with
    covariances ``C`` ``(n, 4, 4)`` of ``vec(M)``, to first order (the reference is the
    median of many fits and taken as exact)."""
    M = np.asarray(M, np.float64)
    keys = ("exx", "eyy", "exy", "theta")
    J = np.empty((len(M), len(keys), 4))
    for q in range(4):
        d = np.zeros(4)
        d[q] = _JAC_STEP
        d = d.reshape(2, 2)
        up = relative_strain(M + d, M_ref, symmetry)
        down = relative_strain(M - d, M_ref, symmetry)
        for i, k in enumerate(keys):
            J[:, i, q] = (up[k] - down[k]) / (2 * _JAC_STEP)
    var = np.einsum("nip,npq,niq->ni", J, np.asarray(C, np.float64), J)
    return {k: np.sqrt(np.clip(var[:, i], 0, None)) for i, k in enumerate(keys)}


def stretch_determinant(st: dict[str, np.ndarray]) -> np.ndarray:
    """``det U`` of the stretch from a strain dict (``exx, eyy, exy``): the area of the lattice
    cell relative to the reference (dilatation ``det U - 1``, mean lattice parameter change
    ``sqrt(det U) - 1``)."""
    return (1 + st["exx"]) * (1 + st["eyy"]) - st["exy"] ** 2
