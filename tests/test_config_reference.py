"""README's configuration reference is generated from the config dataclasses and current."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import config_reference as ref  # noqa: E402


def test_every_field_of_every_config_is_documented() -> None:
    for module, name, _ in ref.CONFIGS:
        cls = getattr(__import__(module, fromlist=[name]), name)
        docs = ref.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{name}: fields without a comment: {missing}"


def test_field_comment_is_read_from_above_and_from_the_line_end() -> None:
    docs = ref.field_docs(sys.modules["ccstae_hpc.core.config"].MapConfig)
    assert docs["pool_sigma"].startswith("Gaussian pooling of the fitted deformation")
    assert docs["symmetry"].startswith("rotational symmetry of the pattern")


def test_readme_reference_is_current() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py"),
                        "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = (ROOT / "README.md").read_text()
    assert "| `refine_iters` | `5` |" in text
