"""The benchmark report: ``benchmarks/REPORT.md`` and its PNG plots from
``benchmarks/results/*.json``.

Reads what the benchmarks wrote (each section names the command that measures it and the
time its results were written; a benchmark that has not run is listed as such), draws the
plots with matplotlib into the results directory and writes the report beside this file.
``make bench`` runs the benchmarks and then this script; it can also be run alone on the
results at hand.

Run: ``python benchmarks/report.py [--results DIR] [--out REPORT.md]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from results_io import STAMP_FORMAT, written  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
COMPONENTS = ("exx", "eyy", "exy", "theta")
TARGET_MAP_VS_PY4DSTEM = 2.5
TARGET_RUN_VS_PY4DSTEM = 0.5
TARGET_RUN_S = 60.0
TARGET_TRAIN_S = 30.0
DPI = 120


def _load(results: Path, name: str) -> tuple[Any, str] | tuple[None, None]:
    """A result file and when it was written, or ``(None, None)``."""
    p = results / name
    if not p.exists():
        return None, None
    # the time the benchmark recorded; a file without one (written before results_io, or by
    # hand) shows its modification time, marked as such: a checkout resets it
    stamp = written(results, name) or time.strftime(
        f"{STAMP_FORMAT}, file time", time.gmtime(p.stat().st_mtime))
    return json.loads(p.read_text()), stamp


def _pct(v: float | None, k: str) -> str:
    """A strain in % or an angle in deg, as the tables print them."""
    if v is None or not np.isfinite(v):
        return "-"
    return f"{v:.3f} deg" if k == "theta" else f"{100 * v:.3f} %"


def _figure(fig: plt.Figure, results: Path, name: str) -> str:
    """Save ``fig`` as ``results/name.png`` and return the report's link to it."""
    fig.tight_layout()
    fig.savefig(results / f"{name}.png", dpi=DPI)
    plt.close(fig)
    return f"\n![{name}](results/{name}.png)"


def _missing(cmd: str) -> str:
    return f"_Not measured yet: run `{cmd}`._\n"


def section_peers(results: Path) -> str:
    """Throughput and accuracy against py4DSTEM and the centre of mass (bench_peers)."""
    d, stamp = _load(results, "peers.json")
    out = ["## Speed against the peers, same patterns, same run\n",
           "`python benchmarks/bench_peers.py`"]
    if d is None:
        return "\n".join(out) + "\n\n" + _missing("python benchmarks/bench_peers.py")
    out[-1] += (f" ({d['scan'][0]}x{d['scan'][1]} scan, {d['dose']:g} e-/pattern, "
                f"{d['workers']} workers on {d['cpus']} cores; written {stamp}).\n")
    rows = [("`ccstae run` (end to end)", d.get("ccstae_run")),
            ("`ccstae map --workers 2` (trained store)", d.get("ccstae_map")),
            ("`ccstae map` (default: threads)", d.get("ccstae_map_threads")),
            ("`ccstae map --method com`", d.get("com_map")),
            ("py4DSTEM 0.14.18 (whole script)", d.get("py4dstem"))]
    out.append("| tool | wall s | patterns/s | " + " | ".join(COMPONENTS) + " |")
    out.append("|---|---|---|" + "---|" * len(COMPONENTS))
    names, rates = [], []
    for name, r in rows:
        if not r or "wall_s" not in r:
            continue
        e = r.get("errors", {})
        out.append(f"| {name} | {r['wall_s']:.1f} | {r['patterns_per_s']:.0f} | "
                   + " | ".join(_pct(e.get(f"mae_{k}"), k) for k in COMPONENTS) + " |")
        names.append(name.replace("`", ""))
        rates.append(r.get("stage_patterns_per_s", r["patterns_per_s"]))
    rt = d.get("ratios", {})
    out.append("")
    if rt:
        m, e2e = rt.get("map_vs_py4dstem"), rt.get("run_vs_py4dstem_end_to_end")
        run_s = d.get("ccstae_run", {}).get("wall_s", float("nan"))
        out.append(f"- mapping / py4DSTEM: **{m:.2f}x** with 2 Dask workers (target >= "
                   f"{TARGET_MAP_VS_PY4DSTEM}x)")
        if rt.get("map_threads_vs_py4dstem") is not None:
            out.append(f"- mapping / py4DSTEM, default `ccstae map` (threads in one process): "
                       f"**{rt['map_threads_vs_py4dstem']:.2f}x**")
        out.append(f"- `ccstae run` / py4DSTEM end to end: **{e2e:.2f}x** (target >= "
                   f"{TARGET_RUN_VS_PY4DSTEM}x) in {run_s:.0f} s (target <= {TARGET_RUN_S:.0f} s)")
    if names:
        fig, ax = plt.subplots(figsize=(6, 2.8))
        ax.barh(names[::-1], rates[::-1], color="tab:blue")
        ax.set_xlabel("patterns/s (mapping stage where measured)")
        out.append(_figure(fig, results, "throughput"))
    return "\n".join(out) + "\n"


def section_training(results: Path) -> str:
    """Training to convergence against a fixed epoch count (bench_training)."""
    d, stamp = _load(results, "training.json")
    head = "## Training to convergence\n\n`python benchmarks/bench_training.py`"
    if d is None:
        return head + "\n\n" + _missing("python benchmarks/bench_training.py")
    lines = [head + f" (written {stamp}).\n", "```", json.dumps(d, indent=1)[:3000], "```",
             f"\nTarget: <= {TARGET_TRAIN_S:.0f} s for the default settings."]
    return "\n".join(lines) + "\n"


def section_dose(results: Path) -> str:
    """Accuracy against dose and background, with the Cramer-Rao floor (bench_dose)."""
    d, stamp = _load(results, "dose.json")
    head = ("## Accuracy against dose, next to the peers and the Cramer-Rao floor\n\n"
            "`python benchmarks/bench_dose.py`")
    if d is None:
        return head + "\n\n" + _missing("python benchmarks/bench_dose.py")
    out = [head + f" (written {stamp}). MAE against the truth; in brackets the ratio to "
                  "the one-pattern Cramer-Rao floor of the same data (each phase's mean over "
                  "its own patterns, weighted by the pixels scored). Rows marked * are the "
                  "mean over several draws of the shot noise of the same scan (each a "
                  "`ccstae run`), the range of their ratios after it.\n",
           "| data | dose | background | method | " + " | ".join(COMPONENTS) + " |",
           "|---|---|---|---|" + "---|" * len(COMPONENTS)]
    for r in d:
        dose = "noise-free" if r.get("dose") is None else f"{r['dose']:g}"
        head_cells = (f"| {r.get('data')} | {dose} | {r.get('background_weight', 0):g} | "
                      f"{r.get('method')} | ")
        if r.get("error"):
            out.append(head_cells + f"failed: {str(r['error'])[:80]} |||")
            continue
        cells = []
        for k in COMPONENTS:
            ratio = r.get(f"ratio_{k}")
            each = r.get(f"ratio_{k}_each")
            cells.append(_pct(r.get(f"mae_{k}"), k)
                         + (f" ({ratio:.2f})" if isinstance(ratio, (int, float)) else "")
                         + (f" {min(each):.2f}-{max(each):.2f}" if each else ""))
        if r.get("realisations"):
            head_cells = head_cells.replace(f"{r.get('method')} | ",
                                            f"{r.get('method')} * {r['realisations']} | ")
        out.append(head_cells + " | ".join(cells) + " |")
    out.append("")
    for png in ("dose.png", "background.png"):
        if (results / png).exists():
            out.append(f"![{png[:-4]}](results/{png})\n")
    for p in sorted(results.glob("dose_*.png")):
        out.append(f"![{p.stem}](results/{p.name})\n")
    return "\n".join(out) + "\n"


def section_multislice(results: Path) -> str:
    """Accuracy on abTEM multislice data: bench_dose's abTEM rows (``ccstae run``, its
    single-pattern map, ``ccstae map --method com`` and py4DSTEM on the same patterns), with
    a bar chart of exx."""
    d, stamp = _load(results, "dose.json")
    cmd = "python benchmarks/bench_dose.py"
    head = ("## On physics the model did not come from (abTEM multislice)\n\n"
            f"`{cmd}`, its abTEM rows")
    rows = [r for r in d or [] if str(r.get("data", "")).startswith("abtem_")]
    if not rows:
        return head + "\n\n" + _missing(cmd)
    methods = ("ccstae", "ccstae_unpooled", "com", "py4dstem")
    out = [head + f" (written {stamp}): MAE against the atom-position truth, every method "
                  "referenced on the same pixels.\n",
           "| set | dose | method | " + " | ".join(COMPONENTS) + " |",
           "|---|---|---|" + "---|" * len(COMPONENTS)]
    cases: list[str] = []
    vals: dict[str, list[float]] = {m: [] for m in methods}
    for r in rows:
        dose = "noise-free" if r.get("dose") is None else f"{r['dose']:.0e}"
        case = f"{r['data'].removeprefix('abtem_')}\n{dose}"
        if case not in cases:
            cases.append(case)
            for m in methods:
                vals[m].append(np.nan)
        m = r.get("method")
        if m not in vals:
            continue
        cells = f"| {r['data'].removeprefix('abtem_')} | {dose} | {m} | "
        if r.get("error"):
            out.append(cells + f"failed: {str(r['error'])[:80]} |||")
            continue
        vals[m][cases.index(case)] = 100 * r["mae_exx"]
        out.append(cells + " | ".join(_pct(r.get(f"mae_{k}"), k) for k in COMPONENTS) + " |")
    fig, ax = plt.subplots(figsize=(8, 3))
    x = np.arange(len(cases))
    for i, m in enumerate(methods):
        ax.bar(x + (i - 1.5) * 0.2, vals[m], 0.2, label=m)
    ax.set_xticks(x, cases, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("MAE exx (%)")
    ax.legend(fontsize=8)
    out.append(_figure(fig, results, "multislice"))
    return "\n".join(out) + "\n"


def section_memory(results: Path) -> str:
    """Peak RSS per stage at two sizes (bench_memory), with a bar chart."""
    d, stamp = _load(results, "memory.json")
    head = "## Memory per stage\n\n`python benchmarks/bench_memory.py`"
    if d is None:
        return head + "\n\n" + _missing("python benchmarks/bench_memory.py")
    rows = [r for r in d if "stage" in r and "peak_rss_mib" in r]
    out = [head + f" (written {stamp}).\n", "| stage | scan | raw MiB | peak RSS MiB | wall s |",
           "|---|---|---|---|---|"]
    for r in rows:
        scan = r.get("scan")
        scan = f"{scan[0]}x{scan[1]}" if isinstance(scan, list) else str(scan)
        out.append(f"| {r['stage']} | {scan} | {r.get('raw_mib', float('nan')):.0f} | "
                   f"{r['peak_rss_mib']:.0f} | {r.get('wall_s', float('nan')):.1f} |")
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    scans = list(dict.fromkeys(str(r.get("scan")) for r in rows))
    if stages:
        fig, ax = plt.subplots(figsize=(6, 2.8))
        x = np.arange(len(stages))
        for i, s in enumerate(scans):
            v = [next((r["peak_rss_mib"] for r in rows
                       if r["stage"] == st and str(r.get("scan")) == s), np.nan)
                 for st in stages]
            ax.bar(x + (i - (len(scans) - 1) / 2) * 0.35, v, 0.35, label=f"scan {s}")
        ax.set_xticks(x, stages)
        ax.set_ylabel("peak RSS (MiB)")
        ax.legend(fontsize=8)
        out.append(_figure(fig, results, "memory"))
    return "\n".join(out) + "\n"


def section_gpu(results: Path) -> str:
    """The GPU projection's own markdown (bench_gpu_projection)."""
    p = results / "gpu_projection.md"
    if not p.exists():
        return "## GPU projection\n\n" + _missing("python benchmarks/bench_gpu_projection.py")
    return p.read_text().replace("## GPU projection", "## GPU projection", 1) + "\n"


def section_ablation(results: Path) -> str:
    """Which part does the work (bench_ablation)."""
    d, stamp = _load(results, "ablation.json")
    head = "## Which part does the work\n\n`python benchmarks/bench_ablation.py`"
    if d is None:
        return head + "\n\n" + _missing("python benchmarks/bench_ablation.py")
    out = [head + f" (written {stamp}).\n", "| dose | variant | " + " | ".join(COMPONENTS)
           + " |", "|---|---|" + "---|" * len(COMPONENTS)]
    for r in d:
        dose = "noise-free" if r["dose"] is None else f"{r['dose']:g}"
        out.append(f"| {dose} | {r['variant']} | "
                   + " | ".join(_pct(r.get(f"mae_{k}"), k) for k in COMPONENTS) + " |")
    return "\n".join(out) + "\n"


def section_efficiency(results: Path) -> str:
    """What an ideal single-pattern fit reaches against the floor (bench_efficiency)."""
    d, stamp = _load(results, "efficiency.json")
    cmd = "python benchmarks/bench_efficiency.py"
    head = "## How close a single-pattern fit can come to the floor\n\n`" + cmd + "`"
    if d is None:
        return head + "\n\n" + _missing(cmd) + "\n" + _efficiency_scan(results)
    off = d[0].get("offsets", [])
    intro = (head + f" (written {stamp}). Poisson maximum-likelihood fits whose forward model "
             "is the simulator itself (no model error), of one unstrained pattern, "
             f"{d[0].get('patterns')} realisations each: the standard deviation of the fits "
             "over the Cramer-Rao floor's. Started at the truth, and from starts off by "
             + (f"{100 * off[0]:g} %, {off[3]:g} deg and {off[4]:g} px" if len(off) == 6
                else "the given offsets")
             + " through a blur continuation, and that fit's likelihood mean (what `ccstae "
             "map`'s disk fits report). `bench_dose`'s single-pattern ratios above compare "
             "with these.\n")
    return _ratio_table(intro, d, ("start",)) + "\n" + _efficiency_scan(results)


def _ratio_table(intro: str, rows: list[dict], columns: tuple[str, ...]) -> str:
    """``intro``, then a table of bench_efficiency's rows: dose, ``columns``, and every
    ``ratio_<parameter>`` to two decimals."""
    params = [k.removeprefix("ratio_") for k in rows[0] if k.startswith("ratio_")]
    out = [intro, "| dose | " + " | ".join((*columns, *params)) + " |",
           "|---|" + "---|" * (len(columns) + len(params))]
    for r in rows:
        out.append(f"| {r['dose']:g} | " + " | ".join(str(r[c]) for c in columns) + " | "
                   + " | ".join(f"{r[f'ratio_{k}']:.2f}" for k in params) + " |")
    return "\n".join(out) + "\n"


def _efficiency_scan(results: Path) -> str:
    """The same estimators on the patterns bench_fit_spread maps (``--scan-pixels``)."""
    cmd = "python benchmarks/bench_efficiency.py --doses 500 --scan-pixels 24 --patterns 24"
    d, stamp = _load(results, "efficiency_scan.json")
    if d is None:
        return "On the heterostructure's own patterns: " + _missing(cmd)
    intro = (f"On the patterns whose `ccstae map` fits `bench_fit_spread` measures (`{cmd}`, "
             f"written {stamp}): {d[0].get('pixels')} interior patterns per phase of the 32x32 "
             f"heterostructure, strained and rotated, {d[0].get('patterns')} realisations "
             "each; the root mean square over a phase's patterns of the fits' standard "
             "deviation over each pattern's own floor.\n")
    return _ratio_table(intro, d, ("phase", "start"))


SECTIONS = (section_peers, section_training, section_dose, section_efficiency,
            section_multislice, section_memory, section_gpu, section_ablation)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="benchmark results")
    ap.add_argument("--out", type=Path, default=HERE / "REPORT.md", help="the report")
    args = ap.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    parts = ["# ccstae-hpc benchmark report\n",
             "Generated by `python benchmarks/report.py` from `benchmarks/results/` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); every figure was "
             "measured on the 2-core development machine by the command named in its "
             "section. `make bench` re-measures everything and writes this file.\n"]
    parts += [s(args.results) for s in SECTIONS]
    args.out.write_text("\n".join(parts))
    print(f"report written: {args.out} ({len(SECTIONS)} sections)")


if __name__ == "__main__":
    main()
