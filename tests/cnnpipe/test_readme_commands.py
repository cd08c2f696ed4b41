"""Every command README.md shows runs after `make install`: its program comes with the install or
the shell, and each `cnnpipe` subcommand and option it names exists. The README once changed
drift thresholds with a `duckdb` command that no install provides."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cnnpipe.cli import cli

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
INSTALLED = Path(sys.executable).parent  # the venv's bin, what `make install` fills
SHELL = {"make", "bash", "export", "source", "kill", "$EDITOR"}
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_ASSIGNMENT = re.compile(r"^[A-Z_]+=")


def _words(command: str) -> list[str]:
    """The command's words, without a comment, brackets around optional ones, or leading VAR=value."""
    words = [word.strip("[]") for word in shlex.split(command, comments=True)]
    while words and _ASSIGNMENT.match(words[0]):
        words.pop(0)
    return words


def shell_lines() -> list[list[str]]:
    """Each command of the README's `sh` blocks, with continued lines joined."""
    commands = []
    for language, body in _FENCE.findall(README):
        if language == "sh":
            commands += [_words(line) for line in body.replace("\\\n", " ").splitlines()]
    return [words for words in commands if words]


def inline_commands(program: str) -> list[list[str]]:
    """The inline code spans of the prose that run `program`."""
    prose = _FENCE.sub("", README)
    spans = (_words(span) for span in re.findall(r"`([^`]+)`", prose))
    return [words for words in spans if words and words[0] == program]


def test_every_shell_block_command_comes_with_the_install_or_the_shell():
    missing = [" ".join(words) for words in shell_lines()
               if words[0] not in SHELL and not (INSTALLED / words[0]).exists()]
    assert not missing, f"README commands whose program `make install` does not provide: {missing}"
    assert not inline_commands("duckdb"), "no duckdb command comes with the install; use `cnnpipe`"


def test_every_make_target_and_script_the_readme_runs_exists():
    targets = set(re.findall(r"^([\w.-]+):", (REPO / "Makefile").read_text(), re.M))
    for words in shell_lines() + inline_commands("make"):
        if words[0] == "make":
            assert set(words[1:]) <= targets, words
        elif words[0] in ("bash", "python"):
            assert (REPO / words[1]).is_file(), words


def _option_names(command: click.Command) -> dict[str, bool]:
    """Each option's names (the training knobs included, made on demand), and whether it takes a value."""
    names = {}
    for param in command.get_params(click.Context(command)):
        if isinstance(param, click.Option):
            takes_value = not (param.is_flag or param.count)
            names.update({name: takes_value for name in (*param.opts, *param.secondary_opts)})
    return names


def command_path(words: list[str]) -> list[str]:
    """The subcommands `cnnpipe WORDS...` runs, failing on any subcommand or option that does not exist."""
    command, path, rest = cli, [], iter(words[1:])
    for word in rest:
        options = _option_names(command)
        if word.startswith("-"):
            name = word.split("=")[0]
            assert name in options, f"`{' '.join(words)}`: `cnnpipe {' '.join(path)}` has no option {name}"
            if options[name] and "=" not in word:
                next(rest, None)  # its value
        elif isinstance(command, click.Group):
            assert word in command.commands, f"`{' '.join(words)}`: `cnnpipe {' '.join(path)}` has no command {word}"
            command = command.commands[word]
            path.append(word)
    return path


def readme_cnnpipe_commands() -> list[tuple[str, ...]]:
    commands = [words for words in shell_lines() if words[0] == "cnnpipe"] + inline_commands("cnnpipe")
    return sorted({tuple(words) for words in commands if len(words) > 1})


@pytest.mark.parametrize("words", readme_cnnpipe_commands(), ids=" ".join)
def test_every_cnnpipe_command_in_the_readme_exists(words):
    path = command_path(list(words))
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0 and result.output.startswith(f"Usage: cli {' '.join(path)}"), result.output
