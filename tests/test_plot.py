"""Publication figures of a result store (issue 13): ``ccstae_hpc.plot.plot_store`` and the
report that posts them.  The store is written directly (a ``strain`` group from the
simulator's truth plus noise, the ``analysis`` stage run on it): no training."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

from ccstae_hpc import plot
from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.core.strain import polar_decompose, rotation_matrix
from ccstae_hpc.sim.simulate import LATTICE_A, basis_vectors, truth_rows
from ccstae_hpc.stages.analyze import analyze_store
from ccstae_hpc.stages.store import commit, staging, with_pixel_coords, write_group
from tests.tree_digest import tree_digest

# 48 x 48 heterostructure with two cores in the WS2 triangle (away from the interface)
SCAN = (48, 48)
CORES = ((16.0, 17.0, 1, 0), (28.0, 20.0, 0, 1))
NOISE_STRAIN = 0.002
NOISE_THETA_DEG = 0.1
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PDF_MAGIC = b"%PDF-"


def _strain(cfg: SimConfig, rng: np.random.Generator, phases: tuple[int, ...] | None = None
            ) -> xr.Dataset:
    """A ``strain`` Dataset shaped as the map stage's: truth relative to the sample lattice,
    noise, NaN in vacuum, standard errors, sample and reference masks."""
    truth = truth_rows(cfg)
    T = truth["F"] @ rotation_matrix(-cfg.global_rotation_deg)
    theta, U = polar_decompose(T)
    st = {"exx": U[..., 0, 0] - 1, "eyy": U[..., 1, 1] - 1, "exy": U[..., 0, 1], "theta": theta}
    phase = truth["phase"].astype(np.int16)
    if phases is not None:  # keep only these phases, the rest becomes vacuum
        phase = np.where(np.isin(phase, phases), phase, 0).astype(np.int16)
    sample = phase > 0
    dims = ("scan_y", "scan_x")
    data: dict[str, Any] = {}
    for k, v in st.items():
        s = NOISE_THETA_DEG if k == "theta" else NOISE_STRAIN
        data[k] = (dims, np.where(sample, v + rng.normal(0, s, v.shape), np.nan).astype("f4"))
        data[f"{k}_std"] = (dims, np.where(sample, s * rng.uniform(0.8, 1.2, v.shape),
                                           np.nan).astype("f4"))
    A, _ = basis_vectors(LATTICE_A[1])
    basis = (rotation_matrix(cfg.global_rotation_deg) @ A).T
    return xr.Dataset(
        {**data, "phase": (dims, phase), "sample": (dims, sample),
         "reference": (dims, sample & (phase == 1))},
        attrs={"reference_lattice": json.dumps({"found": True,
                                                "real_basis_A": basis.tolist()})})


def _store(path: Path, ds: xr.Dataset, step_nm: float | None, analyze: bool,
           losses: list[float] | None = None) -> Path:
    """A store with ``raw`` (calibration only), optional ``model`` (loss), ``strain`` and
    optional ``analysis``, through the store's own stage contract."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    cal = {"scan_step_nm": step_nm} if step_nm else {}
    root.create_group("raw", attributes={"calibration": cal, "complete": True})
    if losses is not None:
        root.create_group("model", attributes={"loss": losses, "epochs_run": 2,
                                               "complete": True})
    write_group(with_pixel_coords(ds.assign_attrs(complete=True)), path, staging("strain"))
    commit(path, "strain")
    if analyze:
        analyze_store(path)
    return path


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimConfig]:
    cfg = SimConfig(scan=SCAN, dislocations=CORES, seed=3)
    store = tmp_path_factory.mktemp("plot") / "sample A.zarr"
    return _store(store, _strain(cfg, np.random.default_rng(3)), cfg.scan_step_A / 10,
                  analyze=True), cfg


def _axes(fig: Any) -> dict[str, Any]:
    return {ax.get_label(): ax for ax in fig.axes if ax.get_label()[:1] not in ("", "<")}


def _legend(fig: Any) -> list[str]:
    (leg,) = fig.legends
    return [t.get_text() for t in leg.get_texts()]


def _scale_bar(ax: Any) -> tuple[float, str]:
    (bar,) = [a for a in ax.artists if a.get_gid() == "scale_bar"]
    (rect,) = bar.size_bar.get_children()
    return rect.get_width(), bar.txt_label.get_text()


def test_files_are_written_atomically_beside_the_store(analysed) -> None:
    store, _ = analysed
    before = tree_digest(store)
    out = plot.default_figure_dir(store)
    assert out == store.with_name("sample A_figures")
    out.mkdir(exist_ok=True)
    dead = out / f".strain.png.plot-tmp-{2**22 + 12345}-deadbeef"  # a killed run's leftover
    dead.write_bytes(b"half")
    mine = out / ".strain.png.plot-tmp-x"  # not of the pattern with a pid: left alone
    mine.write_bytes(b"other")
    paths = plot.plot_store(store)
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{n}.{f}" for n in ("strain", "uncertainty", "analysis")
                           for f in ("png", "pdf"))
    for p in paths:
        assert p.parent == out
        head = p.read_bytes()[:8]
        assert head.startswith(PNG_MAGIC if p.suffix == ".png" else PDF_MAGIC), p
        assert p.stat().st_size > 1000
    assert not dead.exists() and mine.exists()
    assert sorted(q.name for q in out.iterdir()) == sorted(names + [mine.name])
    # PNG resolution: the pHYs chunk holds pixels per metre
    data = (out / "strain.png").read_bytes()
    i = data.index(b"pHYs")
    ppm = int.from_bytes(data[i + 4:i + 8], "big")
    assert round(ppm * 0.0254) >= 200
    assert tree_digest(store) == before  # nothing written into the store


def test_options_and_refusals(analysed, tmp_path: Path) -> None:
    store, _ = analysed
    before = tree_digest(store)
    paths = plot.plot_store(store, tmp_path / "figs", formats=("pdf",), dpi=200)
    assert sorted(p.name for p in paths) == ["analysis.pdf", "strain.pdf", "uncertainty.pdf"]
    with pytest.raises(ValueError, match="inside the store"):
        plot.plot_store(store, store / "figs")
    with pytest.raises(ValueError, match="choose from"):
        plot.plot_store(store, tmp_path / "x", formats=("bmpx",))
    with pytest.raises(FileNotFoundError, match="run"):
        plot.plot_store(tmp_path / "missing.zarr", tmp_path / "y")
    assert not (store / "figs").exists()
    assert tree_digest(store) == before


def test_a_failed_write_keeps_the_old_figure(analysed, tmp_path: Path, monkeypatch) -> None:
    """A write that dies half-way leaves the previous file and no temporary behind."""
    from matplotlib.figure import Figure

    store, _ = analysed
    out = tmp_path / "figs"
    out.mkdir()
    (out / "strain.png").write_bytes(b"the previous figure")

    def dies_half_way(self: Figure, fname: Any, **kw: Any) -> None:
        Path(fname).write_bytes(b"half a figure")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        plot.plot_store(store, out)
    assert [q.name for q in out.iterdir()] == ["strain.png"]
    assert (out / "strain.png").read_bytes() == b"the previous figure"


def test_strain_figure_limits_legend_cores_scale(analysed) -> None:
    store, cfg = analysed
    strain, analysis, step = plot.read_result(store)
    assert step == pytest.approx(cfg.scan_step_A / 10)
    assert analysis is not None and analysis.sizes["dislocation"] >= 1
    figs = plot.store_figures(store)
    assert set(figs) == {"strain", "uncertainty", "analysis"}
    axes = _axes(figs["strain"])
    sample = strain["sample"].values
    # one symmetric range for the three strain components: the 99th percentile of |value|
    vals = np.concatenate([strain[k].values[sample] for k in ("exx", "eyy", "exy")]) * 100
    lim = np.percentile(np.abs(vals), plot.ROBUST_PERCENTILE)
    clims = {k: axes[k].images[0].get_clim() for k in ("exx", "eyy", "exy", "theta")}
    for k in ("exx", "eyy", "exy"):
        assert clims[k] == pytest.approx((-lim, lim), rel=1e-6)
    tlim = np.percentile(np.abs(strain["theta"].values[sample]), plot.ROBUST_PERCENTILE)
    assert clims["theta"] == pytest.approx((-tlim, tlim), rel=1e-6)
    # vacuum masked, the data otherwise intact (in %)
    img = axes["exx"].images[0].get_array()
    assert np.array_equal(np.ma.getmaskarray(img), ~sample)
    np.testing.assert_allclose(img.compressed(), 100 * strain["exx"].values[sample], rtol=1e-6)
    assert _legend(figs["strain"]) == ["vacuum", "phase 1", "phase 2"]
    n = analysis.sizes["dislocation"]
    for k, ax in axes.items():
        cores = [ln for ln in ax.lines if ln.get_gid() == "dislocation"]
        assert len(cores) == n, k
        got = sorted((float(c.get_xdata()[0]), float(c.get_ydata()[0])) for c in cores)
        want = sorted(zip(analysis["x"].values * step, analysis["y"].values * step, strict=True))
        np.testing.assert_allclose(got, want)
        # calibrated axes: the field is nx scan steps wide in nm, and the bar says its length
        x0, x1 = ax.get_xlim()
        assert abs(x1 - x0) == pytest.approx(SCAN[1] * step)
        length, label = _scale_bar(ax)
        value, unit = label.split()
        assert unit == "nm" and float(value) == pytest.approx(length)
        assert length == plot.nice_length(SCAN[1] * step)
        assert ax.get_xlabel() == "x (nm)"
    # the ripple in the title, in nm: the analysis's wavelength (scan px) times the step
    lam = float(analysis["ripple_wavelength_px"].values)
    assert np.isfinite(lam)
    assert f"ripple: wavelength {lam * step:.3g} nm" in figs["strain"].get_suptitle()
    assert f"{n} dislocation" in figs["strain"].get_suptitle()
    # uncertainty: non-negative ranges, the strain components shared
    ua = _axes(figs["uncertainty"])
    u = {k: ua[f"{k}_std"].images[0].get_clim() for k in ("exx", "eyy", "exy")}
    assert u["exx"] == u["eyy"] == u["exy"] and u["exx"][0] == 0 < u["exx"][1]
    # analysis: diverging dilatation centred on zero, cores drawn there too
    aa = _axes(figs["analysis"])
    lo, hi = aa["dilatation"].images[0].get_clim()
    assert lo == -hi < 0
    assert aa["dtheta_dx"].images[0].get_clim() == aa["dtheta_dy"].images[0].get_clim()


def test_core_symbol_turns_with_the_burgers_vector() -> None:
    """The bar of the symbol lies along b on a y-down display, the stem perpendicular."""
    ds = _strain(SimConfig(scan=(16, 16), dislocations=()), np.random.default_rng(0))
    for b, want in (((1.0, 0.0), (1.0, 0.0)), ((0.0, 1.0), (0.0, -1.0)),
                    ((1.0, 1.0), (1.0, -1.0))):
        an = xr.Dataset({k: ("dislocation", np.array([v], float)) for k, v in
                         {"y": 8.0, "x": 8.0, "burgers_x": b[0], "burgers_y": b[1],
                          "burgers_h": 1.0, "burgers_k": 0.0, "confidence": 9.0}.items()}
                        | {"ripple_wavelength_px": ((), np.nan, {"reason": "none here"}),
                           "ripple_direction_deg": ((), np.nan),
                           "ripple_amplitude_deg": ((), np.nan)}
                        | {k: (("scan_y", "scan_x"), np.zeros((16, 16))) for k in
                           ("dilatation", "max_shear", "principal_direction", "dtheta_dx",
                            "dtheta_dy", "lattice_curvature")})
        fig = plot.result_figures(ds, an, None)["strain"]
        (core,) = [ln for ln in _axes(fig)["exx"].lines if ln.get_gid() == "dislocation"]
        verts = core.get_marker().vertices  # marker space: x right, y up on the display
        bar = verts[1] - verts[0]
        stem = verts[3] - verts[2]
        d = np.asarray(want) / np.hypot(*want)
        np.testing.assert_allclose(bar / np.hypot(*bar), d, atol=1e-12)
        np.testing.assert_allclose(stem / np.hypot(*stem), [-d[1], d[0]], atol=1e-12)
        assert fig.get_suptitle().endswith("\nno significant ripple (none here)")


def test_uncalibrated_single_phase_without_analysis(tmp_path: Path) -> None:
    """No scan step: axes and scale bar in scan pixels; only phase 1 present (and vacuum):
    the legend says so; no analysis group: two figures, no cores, no ripple box."""
    cfg = SimConfig(scan=(24, 32), dislocations=())
    store = _store(tmp_path / "plain.zarr", _strain(cfg, np.random.default_rng(1), phases=(1,)),
                   None, analyze=False)
    before = tree_digest(store)
    strain, analysis, step = plot.read_result(store)
    assert analysis is None and step is None
    figs = plot.store_figures(store)
    assert set(figs) == {"strain", "uncertainty"}
    assert _legend(figs["strain"]) == ["vacuum", "phase 1"]
    ax = _axes(figs["strain"])["exx"]
    assert ax.get_xlabel() == "x (scan px)"
    length, label = _scale_bar(ax)
    assert label == f"{length:g} px" and length == plot.nice_length(32)
    assert abs(np.subtract(*ax.get_xlim())) == 32
    assert not [ln for ln in ax.lines if ln.get_gid() == "dislocation"]
    assert "ripple" not in figs["strain"].get_suptitle()
    out = plot.default_figure_dir(store)
    out.mkdir()
    for stale in ("analysis.png", "analysis.pdf"):  # of an earlier run that had an analysis
        (out / stale).write_bytes(b"old")
    paths = plot.plot_store(store, formats=["png"])
    assert [p.name for p in paths] == ["strain.png", "uncertainty.png"]
    # the PNG of the gone analysis is removed; the PDF, a format not asked for, is left
    assert sorted(p.name for p in out.iterdir()) == ["analysis.pdf", "strain.png",
                                                     "uncertainty.png"]
    assert tree_digest(store) == before


def test_nice_length() -> None:
    assert plot.nice_length(19.2) == 2.0
    assert plot.nice_length(32) == 5.0
    assert plot.nice_length(100) == 20.0
    assert plot.nice_length(5) == 1.0
    assert plot.nice_length(0.3) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="positive"):
        plot.nice_length(0)


# ------------------------------------------------------------------------------ the report


def test_report_posts_the_publication_figures(tmp_path: Path, monkeypatch) -> None:
    """``flows.report.write_report``: the old figures and tables as before, plus the
    publication figures as image artifacts (Prefect's artifact calls recorded)."""
    import prefect.artifacts

    from flows import report

    cfg = SimConfig(scan=SCAN, dislocations=CORES, seed=3)
    store = _store(tmp_path / "Run 7.zarr", _strain(cfg, np.random.default_rng(3)),
                   cfg.scan_step_A / 10, analyze=True, losses=[1.0, 0.5, 0.25, 0.2])
    before = tree_digest(store)
    calls: list[tuple[str, dict[str, Any]]] = []
    for name in ("create_image_artifact", "create_link_artifact", "create_markdown_artifact",
                 "create_table_artifact"):
        monkeypatch.setattr(prefect.artifacts, name,
                            lambda _n=name, **kw: calls.append((_n, kw)))
    r = report.write_report(store)
    assert Path(r["strain_figure"]).stat().st_size > 0  # the comparison figure, as before
    assert Path(r["loss_figure"]).stat().st_size > 0
    assert [row["phase"] for row in r["phases"]] == [0, 1, 2]
    figs = [Path(p) for p in r["figures"]]
    assert {p.name for p in figs} == {f"{n}.{f}" for n in ("strain", "uncertainty", "analysis")
                                      for f in ("png", "pdf")}
    assert all(p.parent == plot.default_figure_dir(store) and p.is_file() for p in figs)
    images = {kw["key"]: kw for n, kw in calls if n == "create_image_artifact"}
    slug = report.artifact_slug(store)
    assert slug == "run-7"
    assert {f"{slug}-strain-maps", f"{slug}-loss-curve", f"{slug}-figure-strain",
            f"{slug}-figure-uncertainty", f"{slug}-figure-analysis"} == set(images)
    for key in ("strain", "uncertainty", "analysis"):
        url = images[f"{slug}-figure-{key}"]["image_url"]
        assert url.startswith("data:image/png;base64,") or url.startswith("file:")
        assert re.match(r"^[a-z0-9-]+$", f"{slug}-figure-{key}")
    (md,) = [kw["markdown"] for n, kw in calls if n == "create_markdown_artifact"]
    for p in figs:
        assert str(p) in md
    assert tree_digest(store) == before


def test_report_of_a_hidden_build_store_leaves_no_figures_directory(tmp_path: Path) -> None:
    """``ccstae run`` builds the store under a hidden sibling name and renames it: the report
    of that store writes its two figures (renamed with it) but no figures directory."""
    from flows import report

    cfg = SimConfig(scan=(16, 16), dislocations=())
    store = _store(tmp_path / ".res.zarr.tmp-1-abc", _strain(cfg, np.random.default_rng(2)),
                   None, analyze=False, losses=[1.0, 0.5])
    r = report.write_report(store, artifacts=False)
    assert r["figures"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [store.name] + [p.name for p in report.figure_paths(store)])
