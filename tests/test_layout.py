"""The house rules, checked on the source: layers import only downward, no import cycle, no
private name used across modules, kernels free of I/O and orchestration, and README's
layout section naming every module that exists.

Imports are read with ``ast`` from every file, function-local imports included, so a cycle
hidden behind a deferred import is found too.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ccstae_hpc", "flows")

# lower layers never import higher ones; equal layers may not import each other either,
# except inside one subpackage
LAYERS = {
    "ccstae_hpc": 0,  # the package root: only __version__
    "ccstae_hpc.core": 1,  # numeric kernels
    "ccstae_hpc.runtime": 2,  # where work runs
    "ccstae_hpc.stages": 3,  # store stages
    "ccstae_hpc.sim": 3,  # truth and scoring
    "ccstae_hpc.plot": 4,  # figures
    "flows": 5,  # Prefect wiring
    "ccstae_hpc.cli": 6,  # the command line
    "ccstae_hpc.demo": 7,  # `make demo`
}
# kernels know no storage, no cluster and no workflow engine
CORE_FORBIDDEN = ("zarr", "dask", "distributed", "dask_jobqueue", "prefect", "tqdm")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = f
    return out


MODULES = _modules()


def _layer(module: str) -> tuple[str, int]:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return best, LAYERS[best]


def _imports(name: str, path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [a.name for a in node.names]
            # `from pkg import module` imports the module
            subs = [n for n in names if f"{mod}.{n}" in MODULES]
            for n in subs:
                yield f"{mod}.{n}", [], node.lineno
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                yield mod, rest, node.lineno


def _graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, p in MODULES.items():
        for target, _, _ in _imports(m, p):
            if target in MODULES and target != m:
                g[m].add(target)
    return g


def test_no_upward_import() -> None:
    bad = []
    for m, p in MODULES.items():
        (own, lm) = _layer(m)
        for target, names, line in _imports(m, p):
            if target not in MODULES:
                continue
            (other, lt) = _layer(target)
            if target == "ccstae_hpc" and names == ["__version__"]:
                continue
            if lt > lm or (lt == lm and own != other):
                bad.append(f"{p.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle() -> None:
    g = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(g[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cyc := visit(t)):
                return cyc
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (cyc := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cyc))


def _private_uses(path: Path, name: str) -> Iterator[str]:
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}
    for target, names, line in _imports(name, path):
        if target in MODULES and target != name:
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    yield f"{path.relative_to(ROOT)}:{line} imports {target}.{n}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    aliases[a.asname or a.name.split(".")[0]] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in MODULES:
                    aliases[a.asname or a.name] = full
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                and node.value.id in aliases):
            yield f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}"


def test_no_private_name_used_across_modules() -> None:
    files = dict(MODULES)
    for d in ("tests", "benchmarks"):
        for f in sorted((ROOT / d).glob("*.py")):
            files[f"{d}.{f.stem}"] = f
    bad = [u for m, p in files.items() for u in _private_uses(p, m)]
    assert not bad, "\n".join(bad)


def test_core_knows_no_io_or_orchestration() -> None:
    bad = []
    for m, p in MODULES.items():
        if _layer(m)[0] != "ccstae_hpc.core":
            continue
        for target, _, line in _imports(m, p):
            if target.split(".")[0] in CORE_FORBIDDEN:
                bad.append(f"{p.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_readme_layout_names_every_module() -> None:
    """README's layout block lists each file of the package and of flows/, and no other."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- layout -->\n```\n(.*?)```\n<!-- /layout -->", text, re.S)
    assert block, "README.md needs its layout block between <!-- layout --> markers"
    listed: set[str] = set()
    folders: list[str] = []  # the folder open at each indentation depth (2 spaces)
    for line in block.group(1).splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m or len(m.group(1)) % 2:
            continue  # a continuation line
        depth, entry = len(m.group(1)) // 2, m.group(2)
        if entry.endswith("/"):
            folders = folders[:depth] + [entry.rstrip("/")]
        elif entry.endswith(".py"):
            listed.add("/".join(folders[:depth] + [entry]))
    actual = {str(p.relative_to(ROOT)) for p in MODULES.values()
              if p.name != "__init__.py"}
    assert listed == actual, (f"missing from README: {sorted(actual - listed)}; "
                              f"listed but absent: {sorted(listed - actual)}")
