"""The CLI speaks one language: every command's --help works, uses the shared flag names, and
every flag it lists is read by the command (a flag that does nothing must not exist)."""

from __future__ import annotations

import argparse
import inspect
import re
import sys

import pytest

from rlsim.cli import build_parser

# Flags every command shares, read in rlsim/cli.py (data_config) or by argparse itself.
SHARED = {"help", "config", "dataset", "split", "data_dir", "cache_dir", "overviews", "no_download", "seed",
          "text_model", "verbose"}
FORBIDDEN = {"--no-progress": "--quiet", "--progress": "--quiet", "--address": "--ray-address"}


def commands():
    """(name, parser) for every leaf subcommand."""
    out = []

    def walk(prefix, parser):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out.append((" ".join(prefix), parser))
            return
        for name, p in subs[0].choices.items():
            walk(prefix + [name], p)

    walk([], build_parser())
    return out


COMMANDS = commands()


def test_every_area_is_there():
    names = {n for n, _ in COMMANDS}
    assert {"data prepare", "baselines", "reward train", "reward tune", "candidates build", "policy train",
            "policy evaluate", "personas evaluate", "pipeline"} <= names
    assert not any(n.startswith("tune ") for n in names)  # one verb order: <area> <verb>


@pytest.mark.parametrize("name,parser", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_help_and_vocabulary(name, parser, capsys):
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for bad, good in FORBIDDEN.items():
        assert not re.search(rf"(?<![\w-]){re.escape(bad)}(?![\w-])", text), f"{name}: use {good}, not {bad}"


@pytest.mark.parametrize("name,parser", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_flag_is_read(name, parser):
    func = parser.get_default("func")
    assert func is not None, name
    source = inspect.getsource(sys.modules[func.__module__])
    for action in parser._actions:
        dest = action.dest
        if dest in SHARED or dest == argparse.SUPPRESS:
            continue
        used = re.search(rf"args\.{dest}\b|[\"']{dest}[\"']", source)
        if dest == "ray_address":  # read by rlsim.commands.ray_session.cli_ray, which the command must call
            used = used or "cli_ray(args" in source
        if not used:  # read by a shared reader the command calls (the persona and LLM persona flags)
            from rlsim.commands.personas import CALL_FLAGS, ENDPOINT_FLAGS, JOB_FLAGS, persona_config
            from rlsim.commands.policy import llm_options

            if "persona_config(args" in source:
                used = dest in {flag for flag, _ in ENDPOINT_FLAGS + CALL_FLAGS + JOB_FLAGS} or re.search(
                    rf"[\"']{dest}[\"']", inspect.getsource(persona_config))
            if not used and "llm_options(args" in source:
                used = re.search(rf"args\.{dest}\b", inspect.getsource(llm_options))
        if not used and "_" in dest:  # flags registered in a loop: dest = f"{prefix}_{name}" over a table of names
            prefix, rest = dest.split("_", 1)
            used = f'f"{prefix}_{{' in source and re.search(rf"[\"']{rest}[\"']", source)
        assert used, f"`rlsim {name}` lists {action.option_strings or dest} but {func.__module__} never reads it"


def test_long_commands_have_quiet_and_ray_commands_join_a_cluster():
    by = dict(COMMANDS)
    for name in ("reward train", "policy train", "pipeline"):
        assert any("--quiet" in a.option_strings for a in by[name]._actions), name
    for name in ("reward train", "reward tune", "policy train", "policy evaluate", "pipeline"):
        assert any("--ray-address" in a.option_strings for a in by[name]._actions), name
