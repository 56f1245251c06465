"""Shared check of the command line's refusals (imported by the CLI tests)."""

from __future__ import annotations

import pytest

from ccstae_hpc import cli


def fails(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """Run ``ccstae argv``: exit code 2 and exactly one ``error:`` line naming ``words``
    (case-insensitive); returns stderr."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w.lower() in err.lower(), (w, err)
    return err
