"""Export the store's ``strain`` maps to files other tools read (NetCDF, CSV, HyperSpy, EMD).

:func:`export_store` reads the ``strain`` group (and the scan step from ``raw`` attrs) and
writes one file; the store is only read.  The output is written to a hidden temporary file in
the output's directory and given its name only once complete (a hard link, or ``os.replace``
where the file system has none), and an existing output is never replaced.

Formats (from the extension when ``fmt`` is None):

* ``.nc`` (``netcdf``): the whole ``strain`` Dataset with ``Dataset.to_netcdf`` (every
  variable, coordinate and attribute; NETCDF3 through scipy unless netCDF4/h5netcdf is
  installed);
* ``.csv`` (``csv``): one row per probe position, the ``(scan_y, scan_x)`` variables as
  columns (``Dataset.to_dataframe``), plus ``y_nm``, ``x_nm`` when the scan step is known;
* ``.hspy`` (``hspy``): a HyperSpy signal file (rosettasciio's hspy writer): data
  ``(component, scan_y, scan_x)`` = ``exx, eyy, exy, theta``, the component axis navigates and
  the scan axes are the signal (scale = scan step in nm when known, else 1 px); phase and
  sample maps and the strain attrs in ``original_metadata``;
* ``.emd`` / ``.h5`` (``emd``): EMD 1.0 as py4DSTEM's ``emdfile`` writes a ``RealSlice``: one
  array ``strain_root/strain/data`` ``(component, scan_y, scan_x)`` with dim vectors
  ``dim0`` (scan_y), ``dim1`` (scan_x) and the component labels in ``dim2``, the scan step
  in the root's py4DSTEM calibration (``R_pixel_size`` in A), and phase, sample and the
  strain attrs as ``Metadata`` ``ccstae`` of the array (``py4DSTEM.read(path)`` returns the
  RealSlice).

Axes and signs are those of the store (``ccstae_hpc.core.mapping.CONVENTIONS``): rows are
``scan_y``, columns ``scan_x``; strain in fractions, ``theta`` in degrees.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ccstae_hpc import __version__
from ccstae_hpc.stages.store import open_root, open_strain, sibling

__all__ = ["COMPONENTS", "EXTENSIONS", "FORMATS", "ExportError", "export_format",
           "export_store", "scan_step_nm"]

# the stacked maps of the hspy and EMD files, in this order along their first axis
COMPONENTS = ("exx", "eyy", "exy", "theta")
COMPONENT_UNITS = ("1", "1", "1", "deg")
FORMATS = ("netcdf", "csv", "hspy", "emd")
EXTENSIONS = {".nc": "netcdf", ".csv": "csv", ".hspy": "hspy", ".emd": "emd", ".h5": "emd"}
SCAN_DIMS = ("scan_y", "scan_x")
NM_PER_A = 0.1
# EMD 1.0 as emdfile 0.0.16 (py4DSTEM 0.14) writes it
EMD_VERSION = (1, 0)
EMD_ROOT = "strain_root"
EMD_ARRAY = "strain"
EMD_METADATA = "ccstae"
HSPY_TITLE = "ccstae strain"


class ExportError(ValueError):
    """The export cannot be made (unknown format, incomplete maps); the message says why."""


def export_format(out: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The format name (one of :data:`FORMATS`) for ``out``: ``fmt`` or from the extension.

    Raises
    ------
    ExportError
        ``fmt`` is not a known format, or it is None and the extension is not known.
    """
    if fmt is not None:
        name = fmt.lower().lstrip(".")
        name = EXTENSIONS.get("." + name, name)
        if name not in FORMATS:
            raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
        return name
    ext = Path(out).suffix.lower()
    if ext not in EXTENSIONS:
        raise ExportError(
            f"cannot tell the format of {out} from its extension {ext or '(none)'}; name it "
            f"{', '.join(EXTENSIONS)} or pass --format {'|'.join(FORMATS)}")
    return EXTENSIONS[ext]


def export_store(store: str | os.PathLike[str], out: str | os.PathLike[str],
                 fmt: str | None = None) -> Path:
    """Write the ``strain`` maps of ``store`` to the new file ``out``; return its path.

    Parameters
    ----------
    store : a result store (``ccstae run`` / ``ccstae map``); only read.
    out : the file to create; its directory must exist.
    fmt : ``"netcdf"``, ``"csv"``, ``"hspy"`` or ``"emd"`` (an extension such as ``"nc"``
        works too); None takes it from ``out``'s extension (:data:`EXTENSIONS`).

    Raises
    ------
    ExportError
        Unknown format, or the strain group lacks one of :data:`COMPONENTS`.
    FileExistsError
        ``out`` exists (it is never replaced).
    FileNotFoundError
        No store or no ``strain`` group at ``store`` (run the map stage first), or ``out``'s
        directory does not exist.
    """
    out = Path(out)
    name = export_format(out, fmt)
    if os.path.lexists(out):
        raise FileExistsError(f"{out} exists; choose another output name or remove it first")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the directory {out.parent} does not exist; create it first")
    ds = open_strain(store)
    missing = [k for k in COMPONENTS if k not in ds]
    if missing:
        raise ExportError(f"the strain group of {store} has no {', '.join(missing)}; re-run "
                          f"`ccstae map {store} --overwrite`")
    ds = ds.load()
    step_nm = scan_step_nm(store)
    writers: dict[str, Callable[[xr.Dataset, Path, float | None, str], None]] = {
        "netcdf": _write_netcdf, "csv": _write_csv, "hspy": _write_hspy, "emd": _write_emd}
    tmp = sibling(out, "export")
    try:
        writers[name](ds, tmp, step_nm, str(Path(store)))
        _move_new(tmp, out)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return out


def _move_new(tmp: Path, out: Path) -> None:
    """Give the complete file ``tmp`` the name ``out``, which must not exist."""
    try:
        # a hard link is atomic and never replaces an existing name: an output that appeared
        # while we wrote is kept
        os.link(tmp, out)
    except FileExistsError:
        raise FileExistsError(f"{out} appeared while exporting; it was left as it was; "
                              "choose another output name") from None
    except OSError:
        # no hard links on this file system: check again, then rename (atomic as well)
        if os.path.lexists(out):
            raise FileExistsError(f"{out} appeared while exporting; it was left as it was; "
                                  "choose another output name") from None
        os.replace(tmp, out)


def scan_step_nm(store: str | os.PathLike[str]) -> float | None:
    """The scan step in nm from the store's ``raw`` calibration, None when unknown."""
    root = open_root(store)
    if "raw" not in root:
        return None
    calib = root["raw"].attrs.get("calibration") or {}
    step = calib.get("scan_step_nm") if isinstance(calib, dict) else None
    try:
        value = float(step)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _map_vars(ds: xr.Dataset) -> list[str]:
    """The variables on exactly (scan_y, scan_x), in the Dataset's order."""
    return [str(k) for k, v in ds.data_vars.items() if v.dims == SCAN_DIMS]


def _text_attrs(ds: xr.Dataset) -> dict[str, Any]:
    """The Dataset attrs as str / int / float (bools as int) for file formats' metadata."""
    out: dict[str, Any] = {}
    for k, v in ds.attrs.items():
        if isinstance(v, (bool, np.bool_)):
            out[str(k)] = int(v)
        elif isinstance(v, (int, float, str, np.integer, np.floating)):
            out[str(k)] = v.item() if isinstance(v, np.generic) else v
        else:
            out[str(k)] = str(v)
    return out


def _stack(ds: xr.Dataset) -> np.ndarray:
    return np.stack([np.asarray(ds[k].values, np.float32) for k in COMPONENTS])


def _write_netcdf(ds: xr.Dataset, path: Path, step_nm: float | None, source: str) -> None:
    ds = ds.copy()
    for v in ds.variables.values():
        v.encoding = {}  # zarr chunking and codecs mean nothing to NetCDF
    ds.attrs = {**_text_attrs(ds), "exported_from": source,
                "scan_step_nm": step_nm if step_nm else "unknown"}
    ds.to_netcdf(path)


def _write_csv(ds: xr.Dataset, path: Path, step_nm: float | None, source: str) -> None:
    names = _map_vars(ds)
    # the strain components first, as users look for them
    df = ds[[k for k in COMPONENTS if k in names]
            + [k for k in names if k not in COMPONENTS]].to_dataframe()
    if step_nm:
        y, x = (df.index.get_level_values(d).to_numpy() for d in SCAN_DIMS)
        df.insert(0, "x_nm", x * step_nm)
        df.insert(0, "y_nm", y * step_nm)
    df.to_csv(path)


def _write_hspy(ds: xr.Dataset, path: Path, step_nm: float | None, source: str) -> None:
    from rsciio.hspy import file_writer

    data = _stack(ds)
    scale, units = (step_nm, "nm") if step_nm else (1.0, "px")

    def axis(name: str, size: int, navigate: bool, scale: float, units: str) -> dict:
        return {"_type": "UniformDataAxis", "name": name, "size": int(size),
                "scale": float(scale), "offset": 0.0, "units": units, "navigate": navigate,
                "is_binned": False}

    signal = {
        "data": data,
        "axes": [axis("component", len(COMPONENTS), True, 1.0, ""),
                 axis("y", data.shape[1], False, scale, units),
                 axis("x", data.shape[2], False, scale, units)],
        "metadata": {
            "General": {"title": HSPY_TITLE, "original_filename": Path(source).name},
            "Signal": {"signal_type": "",
                       "quantity": "strain (exx, eyy, exy: fraction) and rotation (theta: deg)"},
        },
        "original_metadata": {
            "ccstae_hpc": {"components": list(COMPONENTS),
                           "component_units": list(COMPONENT_UNITS),
                           "exported_from": source, "export_version": __version__,
                           "strain_attrs": _text_attrs(ds)},
            **{k: np.asarray(ds[k].values) for k in ("phase", "sample") if k in ds},
        },
        "tmp_parameters": {},
        "attributes": {"_lazy": False},
        "learning_results": {},
        "models": {},
        # no HyperSpy extension defines this signal: the base classes load it
        "package_info": {"package": "", "package_version": ""},
    }
    file_writer(str(path), signal, show_progressbar=False)


def _emd_metadata(parent: Any, name: str, python_class: str, items: dict[str, Any]) -> None:
    """A ``metadata`` group as emdfile's ``Metadata.to_h5`` writes it (one dataset per key,
    its kind in the ``type`` attr)."""
    bundle = parent.require_group("metadatabundle")
    bundle.attrs["emd_group_type"] = "metadatabundle"
    grp = bundle.create_group(name)
    grp.attrs["emd_group_type"] = "metadata"
    grp.attrs["python_class"] = python_class
    for k, v in items.items():
        if isinstance(v, str):
            dset, kind = grp.create_dataset(k, data=v.encode("utf-8")), "string"
        elif isinstance(v, (bool, np.bool_)):
            dset, kind = grp.create_dataset(k, data=bool(v), dtype=bool), "bool"
        elif isinstance(v, (int, float, np.integer, np.floating)):
            dset, kind = grp.create_dataset(k, data=v, dtype=type(v)), "number"
        elif isinstance(v, np.ndarray) and v.size == 0:  # emdfile: an empty list
            dset, kind = grp.create_dataset(k, data=v), "list"
        elif isinstance(v, np.ndarray):
            dset, kind = grp.create_dataset(k, data=v, dtype=v.dtype), "array"
        else:
            raise TypeError(f"no EMD metadata kind for {k}={type(v).__name__}")
        dset.attrs["type"] = kind.encode("utf-8")


def _write_emd(ds: xr.Dataset, path: Path, step_nm: float | None, source: str) -> None:
    import h5py

    data = _stack(ds)
    step_A, units = (step_nm / NM_PER_A, "A") if step_nm else (1.0, "pixels")
    with h5py.File(path, "w") as f:
        f.attrs["emd_group_type"] = "file"
        f.attrs["version_major"], f.attrs["version_minor"] = EMD_VERSION
        f.attrs["UUID"] = str(uuid.uuid4())
        f.attrs["authoring_program"] = f"ccstae-hpc {__version__}"
        f.attrs["authoring_user"] = ""
        root = f.create_group(EMD_ROOT)
        root.attrs["emd_group_type"] = "root"
        root.attrs["python_class"] = "Root"
        # py4DSTEM's calibration of the tree: real-space pixel = scan step; the maps carry no
        # diffraction axis, so Q stays py4DSTEM's default (1 pixel)
        _emd_metadata(root, "calibration", "Calibration", {
            "QR_flip": False, "Q_pixel_size": 1, "Q_pixel_units": "pixels",
            "R_pixel_size": float(step_A) if step_nm else 1, "R_pixel_units": units,
            "_root_treepath": "", "_target_paths": np.zeros(0)})
        arr = root.create_group(EMD_ARRAY)
        arr.attrs["emd_group_type"] = "array"
        arr.attrs["python_class"] = "RealSlice"
        d = arr.create_dataset("data", data=data)
        d.attrs["units"] = "; ".join(f"{k}: {u}" for k, u in zip(COMPONENTS, COMPONENT_UNITS,
                                                                 strict=True))
        for i, dim in enumerate(SCAN_DIMS):
            # emdfile stores a linear dim vector as its first two values
            v = arr.create_dataset(f"dim{i}", data=np.array([0.0, step_A]))
            v.attrs["name"] = dim
            v.attrs["units"] = units
        labels = arr.create_dataset(f"dim{len(SCAN_DIMS)}",
                                    data=[k.encode("utf-8") for k in COMPONENTS])
        labels.attrs["name"] = "_labels_"
        _emd_metadata(arr, EMD_METADATA, "Metadata", {
            **_text_attrs(ds),
            "component_units": ", ".join(COMPONENT_UNITS),
            "exported_from": source,
            "scan_step_nm": float(step_nm) if step_nm else "unknown",
            **{k: np.asarray(ds[k].values) for k in ("phase", "sample") if k in ds},
        })
