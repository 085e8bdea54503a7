"""The CLI speaks one language: every command's --help works, uses the shared flag names, and
every flag it lists changes the resolved run config or is one of the command's own arguments
(a flag that does nothing must not exist)."""

from __future__ import annotations

import argparse
import re

import pytest

from rlsim.cli import build_parser

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


# Flags a command reads itself, not configuration: its inputs and outputs, how it runs, what it judges.
# `llm serve`'s flags fill LocalLLMConfig (rlsim.commands.llm.SERVE_FLAGS), a server, not a YAML section.
COMMAND_ARGS = {"help", "verbose", "out", "users", "pairs", "profiles", "lessons", "dry_run", "no_ray", "quiet",
                "ray_address", "num_cpus", "force", "resume", "candidates", "reward", "reward_actor",
                "reward_namespace", "ndcg_k", "hit_threshold", "run", "checkpoint", "source", "size", "ratings",
                "items", "synth_seed", "port", "model_path", "alias", "n_ctx", "parallel", "threads"}
# Values for flags whose text is parsed; other flags get values by type (see _values).
PARSED_VALUES = {"weights": ["0.3,0.7"], "sources": ["bias,mf"], "stages": ["data,baselines"]}


def _values(action) -> list[str]:
    if action.dest in PARSED_VALUES:
        return PARSED_VALUES[action.dest]
    if action.choices:
        return [str(c) for c in action.choices]
    return {int: ["7", "11"], float: ["0.37", "0.5"]}.get(action.type, ["x7", "y7"])


def _argv(name, parser, extra) -> list[str]:
    """The command's words, every required flag with a placeholder, then ``extra``."""
    required = [w for a in parser._actions if a.required and a.option_strings for w in (a.option_strings[0], "x")]
    return [*name.split(), *required, *extra]


def _resolved(name, parser, extra) -> dict:
    import dataclasses

    from rlsim.run_config import resolve

    args = build_parser().parse_args(_argv(name, parser, extra))
    run = resolve(None, {}, vars(args))  # no environment: only the flags
    return {k: v for k, v in dataclasses.asdict(run).items() if k != "origin"}


def _changes(a: dict, b: dict, prefix="") -> set[str]:
    out = set()
    for k in set(a) | set(b):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out |= _changes(x, y, f"{prefix}{k}.")
        elif x != y:
            out.add(f"{prefix}{k}")
    return out


CONFIG_FLAGS = [(name, parser, a) for name, parser in COMMANDS for a in parser._actions
                if a.option_strings and a.dest not in COMMAND_ARGS]


@pytest.mark.parametrize("name,parser,action", CONFIG_FLAGS,
                         ids=[f"{n}:{a.option_strings[-1]}" for n, _, a in CONFIG_FLAGS])
def test_every_config_flag_changes_the_resolved_config(name, parser, action):
    """Behavioural: parse the flag, resolve, and see a config field change (a flag that changes
    nothing must not exist; a command's own arguments are COMMAND_ARGS)."""
    from rlsim.run_config import FLAGS, config_flags

    assert action.dest in config_flags(), f"`rlsim {name}` {action.option_strings}: neither resolved nor a " \
                                          "command argument (add it to rlsim.run_config or COMMAND_ARGS)"
    if action.dest == "config":
        return  # read by resolve itself: test_config_resolve.py
    base = _resolved(name, parser, [])
    flag = action.option_strings[-1]
    if isinstance(action, argparse._StoreTrueAction):
        tries = [[flag]]
    else:
        tries = [[flag, v] for v in _values(action)]
    changed = set()
    for extra in tries:
        changed = _changes(base, _resolved(name, parser, extra))
        if changed:
            break
    assert changed, f"`rlsim {name} {flag}` changes no config field"
    expected = {k for k in FLAGS.get(action.dest, ())}
    assert expected <= changed, (flag, expected, changed)


def test_every_resolved_flag_exists_somewhere():
    """No dead entries: each flag rlsim.run_config resolves is a flag of some command."""
    from rlsim.run_config import config_flags

    dests = {a.dest for _, parser in [("rlsim", build_parser()), *COMMANDS] for a in parser._actions}
    assert config_flags() - dests == set()


def test_long_commands_have_quiet_and_ray_commands_join_a_cluster():
    by = dict(COMMANDS)
    for name in ("reward train", "policy train", "pipeline"):
        assert any("--quiet" in a.option_strings for a in by[name]._actions), name
    for name in ("reward train", "reward tune", "policy train", "policy evaluate", "pipeline"):
        assert any("--ray-address" in a.option_strings for a in by[name]._actions), name
