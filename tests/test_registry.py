"""The command registry and the global options (issue 15, points 6 and 8).

kvminspect/manifest.py says what every command is (kvminspect.registry), so
that --help, help, the completion scripts and argument errors import no
command: it must say what the commands themselves say. The global options
are one table (kvminspect.options) that the command line, --help, the
completion scripts and the one-shot diff all read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvminspect import cli, completion, options, registry
from kvminspect.commands import NAMESPACE, check_arguments, load_all
from kvminspect.errors import UsageError
from kvminspect.manifest import COMMANDS

ROOT = Path(__file__).resolve().parent.parent


# -- the manifest says what the commands say ---------------------------------------------


def test_manifest_is_current() -> None:
    """Stale after a command's docstring or arguments changed: run
    python3 -m kvminspect.registry (it writes kvminspect/manifest.py)."""
    made = registry.generate()
    stale = [n for n in {**made, **COMMANDS} if made.get(n) != COMMANDS.get(n)]
    assert not stale, f"commands {stale} changed: run python3 -m kvminspect.registry"
    assert registry.manifest_text(COMMANDS) == (ROOT / "kvminspect/manifest.py").read_text()


@pytest.mark.parametrize("name", list(COMMANDS))
def test_entry_formats_as_drgn_does(name: str) -> None:
    """The manifest's entry gives the same description, usage and help as the
    drgn command its module registers (the same parser, drgn's formatter)."""
    real = load_all().commands[name]
    entry = registry.Entry(registry.CommandSpec.from_data(name, COMMANDS[name]))
    assert not isinstance(real, registry.Entry)
    assert entry.description() == real.description()
    assert entry.format_usage() == real.format_usage()
    for indent in ("", "  "):
        assert entry.format_help(indent=indent) == real.format_help(indent=indent)


def test_options_and_positionals() -> None:
    tree, export, sp = (registry.entry(n) for n in ("tree", "export", "sp"))
    assert tree and export and sp
    assert tree.options() == {"--depth": True, "--unsync-only": False, "--drgn": False,
                              "--vm": True, "--json": False}
    assert export.choices()["--format"] == export.choices()["-f"] == ["dot", "graphml", "json",
                                                                      "svg", "png"]
    assert sp.positionals() == ["ADDR"] and tree.positionals() == ["SP"]
    assert registry.entry("no-such-command") is None


def test_a_command_is_imported_when_it_runs() -> None:
    """NAMESPACE holds an Entry until the command's module registers the real command."""
    code = ("import sys; from kvminspect.commands import NAMESPACE; "
            "from kvminspect.registry import Entry; "
            "assert isinstance(NAMESPACE.commands['stats'], Entry); "
            "assert 'kvminspect.commands.stats' not in sys.modules; "
            "print(NAMESPACE.commands['stats'].description())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == COMMANDS["stats"]["description"], r.stderr


# -- argument checks --------------------------------------------------------------------


def test_check_without_types_then_with() -> None:
    """The CLI checks a command's words before it opens the target (types it cannot
    import are checked when the command is imported: check_arguments)."""
    tree = registry.entry("tree")
    assert tree is not None
    with pytest.raises(UsageError, match=r"^tree: unrecognized arguments: --bogus; "
                                         r"usage: tree \[--depth N\] .* \[SP\] \(SP: hex, "
                                         r"0x optional; N: decimal, 0x accepted\)$"):
        tree.check(["--bogus"])
    # the number types (registry.NUMBER_TYPES) are registered by name: checked already
    with pytest.raises(UsageError, match="tree: argument --depth: must be 0 or more, not -1"):
        tree.check(["--depth", "-1"])
    with pytest.raises(UsageError, match="tree: argument --depth: must be 0 or more, not -1"):
        check_arguments(None, ["tree", "--depth", "-1"])  # type: ignore[arg-type]
    rate = registry.entry("rate")
    assert rate is not None
    with pytest.raises(UsageError, match=r"not a number: 'x' \(decimal, 0x accepted\)"):
        rate.check(["--seconds", "x"])
    watch = registry.entry("watch")
    assert watch is not None
    with pytest.raises(UsageError, match="invalid float value: 'x'"):
        watch.check(["--interval", "x"])  # a builtin type is checked already


def test_py_is_not_parsed_as_argparse_words(capsys) -> None:
    """'kvminspect --sample py "1"' was an internal error: check_arguments gave the
    code object py's parse returns to argparse (TypeError: 'code' object is not
    iterable). py parses its own words."""
    check_arguments(None, ["py", "1"])  # type: ignore[arg-type]
    status = cli.main(["--sample", "py", "1"])
    out, err = capsys.readouterr()
    assert (status, out, err) == (0, "1\n", "")
    status = cli.main(["--sample", "py", "[n for n in range(3)]"])
    out, err = capsys.readouterr()
    assert (status, out, err) == (0, "[0, 1, 2]\n", "")


def test_help_lists_every_command_in_the_registry(capsys) -> None:
    assert cli.main(["help"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()
              if line.startswith("  ")]
    assert listed == list(COMMANDS)  # the order of --help (issue 18, item 10)
    with pytest.raises(UsageError, match="unknown command 'bogus'"):
        registry.show_help("bogus", registry.entries())


# -- the global options: one table --------------------------------------------------------


def test_the_command_line_reads_the_table() -> None:
    p = cli.parser()
    for o in options.OPTIONS:
        for f in o.flags:
            if not o.first:  # --help and --version exit
                words = [f, o.choices[0] if o.choices else "X"] if o.takes_value else [f]
                assert vars(p.parse_args(words))[o.dest] in (words[-1], True), f
            assert (cli.VALUE_OPTIONS.get(f) or cli.FLAG_OPTIONS.get(f)
                    or cli.FIRST_OPTIONS.get(f)) == o.dest, f
            if o.first:
                continue
            g = cli.split_argv([f, "X"] if o.takes_value else [f])
            assert getattr(g, o.dest) == (["X"] if o.takes_value else True), f
    usage = p.format_usage()
    for o in options.OPTIONS:
        if o.in_usage:
            assert o.spelling in usage, o


def test_completion_reads_the_table() -> None:
    assert list(completion.GLOBALS) == options.spellings()
    assert set(completion.FILE_OPTIONS) == {"-c", "--core", "-s", "--symbols", "--qemu"}
    bash = completion.script("bash")
    for o in options.OPTIONS:
        if o.choices:
            assert f'{o.flags[0]}) COMPREPLY=($(compgen -W "{" ".join(o.choices)}"' in bash
    assert "--vm|-e|--exec) return ;;" in bash


def test_diff_finds_a_by_the_options() -> None:
    """diff's A is the first word that is neither an option nor an option's value:
    diff's own (--vm ID) and the global ones."""
    assert options.split_first_core(["--vm", "0", "A", "B"]) == ("A", ["--vm", "0", "B"])
    assert options.split_first_core(["-s", "D", "A", "--json", "B"]) == (
        "A", ["-s", "D", "--json", "B"])
    with pytest.raises(UsageError, match="diff needs two vmcores"):
        options.split_first_core(["--vm", "A", "B"])


def test_target_messages_name_the_targets() -> None:
    assert options.target_choices() == "-c CORE, --live, --qemu SOCKET or --sample"


# -- import only what a command needs ---------------------------------------------------------


HEAVY = ("networkx", "drgn.helpers", "kvminspect.graph", "kvminspect.session", "kvminspect.model")
PROBE = """
import contextlib, io, json, os, runpy, sys
sys.argv = ["kvminspect", *sys.argv[1:]]
def _exit(code):  # cli.run() ends the process at once: here, as sys.exit would
    raise SystemExit(code)
os._exit = _exit
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        runpy.run_module("kvminspect", run_name="__main__")
    except SystemExit as e:
        status = e.code
print(json.dumps([status, sorted(m for m in sys.modules if m.startswith(HEAVY))]))
"""


@pytest.mark.parametrize("argv, status", [
    (["--help"], 0),
    (["help"], 0),
    (["help", "roots"], 0),
    (["roots", "--help"], 0),
    (["--completion", "bash"], 0),
    (["--completion", "zsh"], 0),
    (["--bogus"], 2),  # argument errors
    (["bogus"], 2),
    (["roots", "--bogus"], 2),
    (["--sample", "roots", "--bogus"], 2),
    (["-c", "A", "--sample", "vms"], 2),
    (["diff", "A"], 2),
    (["vms"], 2),
    (["--completion", "fish"], 2),
])
def test_help_completion_and_argument_errors_import_nothing_heavy(argv: list[str],
                                                                  status: int) -> None:
    r = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{PROBE}", *argv],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [status, []], argv


def test_namespace_commands_is_public() -> None:
    """Tests and the REPL see NAMESPACE's commands without drgn's private dict."""
    assert set(COMMANDS) <= set(NAMESPACE.commands)
    enabled = dict(NAMESPACE.enabled(None))  # type: ignore[arg-type]
    assert enabled.keys() == NAMESPACE.commands.keys()
