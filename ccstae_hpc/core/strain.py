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
    "reference_deformation",
    "relative_strain",
    "robust_inliers",
    "pool_deformation",
    "stretch_determinant",
]


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
    step = 360.0 / symmetry
    theta, _ = polar_decompose(M @ np.linalg.inv(target))
    k = -np.round(theta / step)
    return M @ rotation_matrix(k * step)


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


def pool_deformation(M: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-weighted average of deformations ``(ny, nx, 2, 2)`` over neighbours.

    Normalised convolution: pixels with ``weight == 0`` (other phases, vacuum, outliers)
    contribute nothing, so phases never mix.  Returns NaN where no weight is in reach.
    """
    from scipy import ndimage  # local: only pooling needs scipy here

    w = weight.astype(np.float64)
    Mw = np.where(w[..., None, None] > 0, M, 0.0) * w[..., None, None]
    kw = dict(sigma=sigma, mode="constant", truncate=3.0)
    den = ndimage.gaussian_filter(w, **kw)
    num = np.empty_like(Mw)
    for i in range(2):
        for j in range(2):
            num[..., i, j] = ndimage.gaussian_filter(Mw[..., i, j], **kw)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den[..., None, None]
    out[den <= 1e-12] = np.nan
    return out


def stretch_determinant(st: dict[str, np.ndarray]) -> np.ndarray:
    """``det U`` of the stretch from a strain dict (``exx, eyy, exy``): the area of the lattice
    cell relative to the reference (dilatation ``det U - 1``, mean lattice parameter change
    ``sqrt(det U) - 1``)."""
    return (1 + st["exx"]) * (1 + st["eyy"]) - st["exy"] ** 2
