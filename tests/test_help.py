"""Every option of every ``ccstae`` command says what it does, and every ``--help`` works."""

from __future__ import annotations

import argparse

import pytest

from ccstae_hpc import cli
from ccstae_hpc.stages.ingest import OneLineParser


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    # argparse has no public way to list a parser's actions: its `_actions` is the list
    return {name: sp for a in p._actions if isinstance(a, argparse._SubParsersAction)
            for name, sp in a.choices.items()}


def _missing_help(p: argparse.ArgumentParser) -> list[str]:
    return [a.dest if not a.option_strings else "/".join(a.option_strings)
            for a in p._actions if not isinstance(a, argparse._HelpAction)
            and not (a.help or "").strip()]


def _ingest_parser(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                   ) -> argparse.ArgumentParser:
    """The parser ``ccstae ingest`` builds, caught as it parses ``--help``."""
    seen: list[argparse.ArgumentParser] = []
    parse = OneLineParser.parse_args

    def record(self: argparse.ArgumentParser, *a: object, **kw: object) -> object:
        seen.append(self)
        return parse(self, *a, **kw)

    monkeypatch.setattr(OneLineParser, "parse_args", record)
    assert cli.main(["ingest", "--help"]) == 0
    capsys.readouterr()
    assert len(seen) == 1 and seen[0].prog == "ccstae ingest"
    return seen[0]


def test_every_option_has_help(monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    top = cli.build_parser()
    subs = _subparsers(top)
    assert {"simulate", "run", "ingest", "preprocess", "train", "map", "analyze",
            "serve"} <= set(subs)
    parsers = {"ccstae": top, **{f"ccstae {k}": v for k, v in subs.items()},
               "ccstae ingest (its own parser)": _ingest_parser(monkeypatch, capsys)}
    missing = {name: m for name, p in parsers.items() if (m := _missing_help(p))}
    assert missing == {}, f"options without help: {missing}"
    # the check itself finds an option without help
    bare = argparse.ArgumentParser()
    bare.add_argument("--bare")
    assert _missing_help(bare) == ["--bare"]


@pytest.mark.parametrize("command", sorted(_subparsers(cli.build_parser())))
def test_every_subcommand_help_exits_0(command: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.lower().startswith("usage: ccstae " + command), out[:200]


def test_analyze_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["analyze", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--loop-px", "--false-alarms", "--scan-step-A", "--overwrite", "--quiet"):
        assert opt in out, opt
