"""Benchmark results on disk: every JSON result file with the time it was measured.

A file's modification time is not that: a clone, a checkout or a copy sets it anew.  Each
benchmark therefore writes its results through :func:`save_json`, which also records the
time in ``written.json`` next to them, and ``report.py`` reads it back with :func:`written`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

STAMPS = "written.json"  # {result file name: "YYYY-MM-DD HH:MM UTC"}
STAMP_FORMAT = "%Y-%m-%d %H:%M UTC"


def _stamps(results: Path) -> dict[str, str]:
    p = results / STAMPS
    return json.loads(p.read_text()) if p.exists() else {}


def save_json(results: Path, name: str, obj: Any) -> Path:
    """Write ``obj`` as ``results/name`` and record the time in ``results/written.json``."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / name
    path.write_text(json.dumps(obj, indent=1))
    stamps = _stamps(results)
    stamps[name] = time.strftime(STAMP_FORMAT, time.gmtime())
    (results / STAMPS).write_text(json.dumps(stamps, indent=1, sort_keys=True) + "\n")
    return path


def written(results: Path, name: str) -> str | None:
    """When ``results/name`` was written, or None if no benchmark recorded it."""
    return _stamps(results).get(name)
