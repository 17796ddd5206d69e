"""The command registry: every kvminspect command, known without importing it.

A command module (kvminspect.commands.*) imports what its command reads with:
the model, the graph (networkx), drgn's helpers. Listing the commands,
``help CMD``, ``--help``, the completion scripts and argument errors need
none of that, only what each command is: its module, description, usage and
arguments. kvminspect.commands.kvm_command records that spec when a command
registers (LIVE); ``python3 -m kvminspect.registry`` writes every spec to
kvminspect/manifest.py (tests/test_registry.py fails when it is stale), and
this module reads that file. An Entry is a command as the manifest says it
is: it formats its own usage and help (the same text drgn's command gives,
from the same argparse arguments) and checks arguments without the types
it cannot import; as a drgn command (kvminspect.commands.NAMESPACE holds
one per command until its module is imported) it imports its module on
first use and hands over to the real command, which replaces it.
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import re
import sys
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kvminspect.errors import KvminspectError, UsageError

# argparse actions that take no value
FLAG_ACTIONS = ("store_true", "store_false", "store_const", "append_const", "count", "help",
                "version")
HELP_FLAGS = ("-h", "--help")
# argparse actions an option may be given several times for
REPEAT_ACTIONS = ("append", "append_const", "count", "extend")
MANIFEST = "kvminspect/manifest.py"
LITERALS = (str, int, float, bool, type(None))


# the command modules of kvminspect.commands, in the order help lists them
MODULES = ("vms", "vm", "vcpus", "roots", "tree", "sp", "walk", "rmap", "unsync", "stats", "check",
           "diagnose", "export", "guestcore", "guest", "watch", "diff", "rate", "pyshell", "help")
# name -> the real command, as each command module registers it (kvminspect.commands)
REAL: dict[str, Any] = {}


def import_all() -> None:
    """Import every command module (each registers its command and its spec)."""
    for m in MODULES:
        importlib.import_module(f"kvminspect.commands.{m}")


@dataclass(frozen=True)
class CommandSpec:
    """What a command is: what kvminspect.commands.kvm_command registered.

    *arguments* are plain data: {"args": [...], "kwargs": {...}} for an
    argument, {"group": TITLE, "description": ..., "arguments": [...]} for an
    argument group, {"exclusive": REQUIRED, "arguments": [...]} for a mutually
    exclusive group. A live spec's "type" is the callable; the manifest's is
    its name ("builtins.int"). *custom*: the command parses its own words
    (py): no argparse check.
    """

    name: str
    module: str
    description: str
    long_description: str | None = None
    usage: str | None = None
    epilog: str | None = None
    arguments: tuple[dict[str, Any], ...] = ()
    custom: bool = False

    def to_data(self) -> dict[str, Any]:
        """The manifest's entry: literals only."""
        return {"module": self.module, "description": self.description,
                "long_description": self.long_description, "usage": self.usage,
                "epilog": self.epilog, "custom": self.custom,
                "arguments": [_plain(a, self.name) for a in self.arguments]}

    @classmethod
    def from_data(cls, name: str, data: Mapping[str, Any]) -> CommandSpec:
        return cls(name, data["module"], data["description"], data["long_description"],
                   data["usage"], data["epilog"], tuple(data["arguments"]), data["custom"])


def spec_of(arg: Any) -> dict[str, Any]:
    """A drgn.commands argument, argument_group or mutually_exclusive_group as data
    (by their public attributes: drgn documents them as argparse's)."""
    if hasattr(arg, "kwargs"):
        return {"args": list(arg.args), "kwargs": dict(arg.kwargs)}
    if hasattr(arg, "title"):
        return {"group": arg.title, "description": arg.description,
                "arguments": [spec_of(a) for a in arg.arguments]}
    return {"exclusive": bool(arg.required), "arguments": [spec_of(a) for a in arg.arguments]}


def _plain(arg: dict[str, Any], command: str) -> dict[str, Any]:
    """*arg* with its type callable as a name; ValueError on another non-literal."""
    if "arguments" in arg:
        return {**arg, "arguments": [_plain(a, command) for a in arg["arguments"]]}
    kwargs = dict(arg["kwargs"])
    if callable(kwargs.get("type")):
        kwargs["type"] = f"{kwargs['type'].__module__}.{kwargs['type'].__qualname__}"
    for key, value in kwargs.items():
        items = value if isinstance(value, (list, tuple)) else (value,)
        if not all(isinstance(v, LITERALS) for v in items):
            raise ValueError(f"{command}: argument {arg['args']}: {key}={value!r} is not "
                             "a literal (the manifest keeps literals only)")
    return {"args": list(arg["args"]), "kwargs": kwargs}


# -- the argparse parser of a spec ------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one UsageError line: 'CMD: what; usage: ...'."""

    def error(self, message: str) -> Any:
        usage = " ".join(self.format_usage().removeprefix("usage: ").split())  # one line
        raise UsageError(f"{self.prog}: {message}; usage: {usage}")


def _sanitize_rst(text: str | None) -> str | None:
    """A reStructuredText usage as drgn shows it: '**py** *code*' -> 'py code'."""
    return re.sub(r"\\(.)|[*\\]", r"\1", text) if text else text


def _decimal_or_hexadecimal(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        return int(s, 16)


# -- numbers as typed: one rule for every command ------------------------------------
#
# Addresses, gfns and SPTE values are hex, with or without 0x (crash's habit: 'walk
# 200000' walks 0x200000); counts, depths and indexes are decimal, 0x accepted
# ('tree --depth 0x1' is 1). Commands name these argparse types by their names
# ("address", "gfn", "count"): registered in kvminspect.commands.NAMESPACE (drgn's
# parsers) and in build_parser, so a bad number is said before the target is opened.
NUMBERS_RULE = ("addresses, gfns and SPTE values are hex, 0x optional (walk 200000 is "
                "0x200000); counts, depths and indexes are decimal, 0x accepted")
_HEX = re.compile(r"(0[xX])?[0-9a-fA-F]+")
_DECIMAL = re.compile(r"[0-9]+")


def hex_number(text: str, what: str, hint: str = "hex, 0x optional") -> int:
    """An address, gfn or SPTE value as typed: hex, with or without 0x, below 2^64;
    argparse.ArgumentTypeError 'bad WHAT: TEXT (HINT)' otherwise."""
    t = text.strip()
    if _HEX.fullmatch(t) and (n := int(t, 16)) < 1 << 64:
        return n
    raise argparse.ArgumentTypeError(f"bad {what}: {text!r} ({hint})")


def address(text: str) -> int:
    """argparse type "address": a kernel or guest address (hex, 0x optional)."""
    return hex_number(text, "address")


def gfn(text: str) -> int:
    """argparse type "gfn": a guest frame number (hex, 0x optional)."""
    return hex_number(text, "gfn", "a guest frame number in hex, 0x optional")


def count(text: str) -> int:
    """argparse type "count": a count, depth or index, 0 or more (decimal, 0x accepted)."""
    t = text.strip()
    if _DECIMAL.fullmatch(t):
        return int(t, 10)
    if t[:2].lower() == "0x" and _HEX.fullmatch(t):
        return int(t, 16)
    if t.startswith("-") and (_DECIMAL.fullmatch(t[1:]) or _HEX.fullmatch(t[1:])):
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    raise argparse.ArgumentTypeError(f"not a number: {text!r} (decimal, 0x accepted)")


# (name, type) of the number types, for argparse's register("type", ...)
NUMBER_TYPES: tuple[tuple[str, Any], ...] = (("address", address), ("gfn", gfn),
                                             ("count", count))
HEX_TYPES = ("address", "gfn")


def numbers_note(arguments: Iterable[Any]) -> str | None:
    """What the usage line says of the numbers its arguments take ("ADDR, SP: hex, 0x
    optional; N: decimal, 0x accepted"); None when they take none. *arguments*: a
    spec's argument data (spec_of)."""
    hexes: dict[str, None] = {}
    counts: dict[str, None] = {}
    for a in _flat(arguments):
        kind = a["kwargs"].get("type")
        name = str(a["kwargs"].get("metavar") or a["args"][0].lstrip("-")).upper()
        if kind in HEX_TYPES:
            hexes[name] = None
        elif kind == "count":
            counts[name] = None
    parts = [f"{', '.join(hexes)}: hex, 0x optional"] if hexes else []
    parts += [f"{', '.join(counts)}: decimal, 0x accepted"] if counts else []
    return "; ".join(parts) or None


def usage_with_numbers(spec: CommandSpec) -> str | None:
    """*spec*'s usage line (as argparse makes it, on one line) followed by how its
    numbers are typed ("  (ADDR: hex, 0x optional)"); None if it takes no number."""
    note = numbers_note(spec.arguments)
    if note is None:
        return None
    line = " ".join(build_parser(spec).format_usage().removeprefix("usage: ").split())
    return f"{line}  ({note})"


def _type(value: Any, typed: bool) -> Any:
    """An argument's type: the callable (typed), a builtin by name, a registered
    type's name, else None (a type the manifest only names is checked when the
    command runs)."""
    if callable(value):
        return value if typed or getattr(value, "__module__", None) == "builtins" else None
    if isinstance(value, str) and value.startswith("builtins."):
        return getattr(builtins, value.removeprefix("builtins."))
    if value in ("hexadecimal", "decimal_or_hexadecimal", *(n for n, _ in NUMBER_TYPES)):
        return value
    return None


def _add(parser: Any, arg: dict[str, Any], typed: bool) -> None:
    if "exclusive" in arg:
        group = parser.add_mutually_exclusive_group(required=arg["exclusive"])
    elif "group" in arg:
        group = parser.add_argument_group(title=arg["group"], description=arg["description"])
    else:
        kwargs = dict(arg["kwargs"])
        if "%" in kwargs.get("help", ""):  # argparse formats help with %
            kwargs["help"] = kwargs["help"].replace("%", "%%")
        if "type" in kwargs:
            kwargs["type"] = _type(kwargs["type"], typed)
            if kwargs["type"] is None:
                del kwargs["type"]
        parser.add_argument(*arg["args"], **kwargs)
        return
    for a in arg["arguments"]:
        _add(group, a, typed)


def build_parser(spec: CommandSpec, typed: bool = False) -> argparse.ArgumentParser:
    """The argparse parser drgn makes for *spec* (drgn.commands.command), with
    drgn's help formatter; *typed*: with the spec's type callables."""
    from kvminspect.drgn_compat import HelpFormatter

    parser = _Parser(prog=spec.name, description=spec.long_description,
                     usage=_sanitize_rst(spec.usage), epilog=spec.epilog,
                     formatter_class=HelpFormatter, add_help=False, allow_abbrev=False)
    parser.register("type", "hexadecimal", lambda s: int(s, 16))
    parser.register("type", "decimal_or_hexadecimal", _decimal_or_hexadecimal)
    for name, func in NUMBER_TYPES:
        parser.register("type", name, func)
    for arg in spec.arguments:
        _add(parser, arg, typed)
    return parser


def _arguments(spec: CommandSpec) -> Iterable[dict[str, Any]]:
    """Every argument of *spec*, groups flattened, in order."""
    return _flat(spec.arguments)


def _flat(arguments: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """Every argument of *arguments* (spec data), groups flattened, in order."""
    stack = list(reversed(list(arguments)))
    while stack:
        arg = stack.pop()
        if "arguments" in arg:
            stack += reversed(arg["arguments"])
        else:
            yield arg


# -- a command as the registry knows it --------------------------------------------


class Entry:
    """One command: its spec, help, options and argument check, and (as a drgn
    command in kvminspect.commands.NAMESPACE) a stand-in that imports its module
    when it is run. Implements drgn.commands.Command."""

    def __init__(self, spec: CommandSpec) -> None:
        self.spec = spec
        self.name = spec.name

    def __repr__(self) -> str:
        return f"Entry({self.name!r}, {self.spec.module!r})"

    # drgn.commands.Command

    def description(self) -> str:
        return self.spec.description

    def format_usage(self) -> str:
        """As drgn's format_usage: the usage line without 'usage: '."""
        return build_parser(self.spec).format_usage().removeprefix("usage: ").rstrip()

    def format_help(self, *, indent: str = "") -> str:
        """As drgn's format_help: the help after the usage line, indented."""
        parser = build_parser(self.spec)
        usage, text = parser.format_usage(), parser.format_help()
        if text.startswith(usage):
            text = text[len(usage):].lstrip()
        return textwrap.indent(text, indent).rstrip()

    def enabled(self, prog: Any) -> bool:
        return True

    def parse(self, source: str, /) -> Any:
        return self.real().parse(source)

    def run(self, prog: Any, name: str, args: Any, /, **kwargs: Any) -> Any:
        return self.real().run(prog, name, args, **kwargs)

    def real(self) -> Any:
        """The command its module registers (the module imported on first use)."""
        importlib.import_module(self.spec.module)
        cmd = REAL.get(self.name)
        if cmd is None:
            raise KvminspectError(f"{self.spec.module} registers no command '{self.name}' "
                                  f"(kvminspect's {MANIFEST} is stale)")
        return cmd

    # what the CLI, the REPL and the completion scripts ask

    def options(self) -> dict[str, bool]:
        """Option string -> whether it takes a value."""
        return {o: a["kwargs"].get("action") not in FLAG_ACTIONS and a["kwargs"].get("nargs") != 0
                for a in _arguments(self.spec) for o in a["args"] if o.startswith("-")}

    def choices(self) -> dict[str, list[str]]:
        """Option string -> its choices, for the options that have them."""
        return {o: [str(c) for c in a["kwargs"]["choices"]]
                for a in _arguments(self.spec) if a["kwargs"].get("choices")
                for o in a["args"] if o.startswith("-")}

    def excludes(self) -> dict[str, list[str]]:
        """Option string -> the option strings not to offer once it is given: its own
        spellings and those of its mutually exclusive group (walk --vcpu: --root);
        none for an option that may be repeated (append, count)."""
        out: dict[str, list[str]] = {}
        groups = [a["arguments"] for a in self.spec.arguments if "exclusive" in a]
        for arg in _arguments(self.spec):
            flags = [o for o in arg["args"] if o.startswith("-")]
            if not flags or arg["kwargs"].get("action") in REPEAT_ACTIONS:
                continue
            mates = next((g for g in groups if arg in g), [arg])
            ruled = [o for m in mates for o in m["args"] if o.startswith("-")]
            out.update((o, ruled) for o in flags)
        return out

    def values(self) -> dict[str, str]:
        """Option string -> what its value is ("N: walk from vCPU N's current root ..."),
        for the options that take one (zsh shows it when nothing can be offered)."""
        takes = self.options()
        return {o: f"{a['kwargs'].get('metavar') or max(a['args'], key=len).lstrip('-').upper()}"
                   f": {a['kwargs'].get('help', '')}".rstrip(": ")
                for a in _arguments(self.spec) for o in a["args"] if takes.get(o)}

    def positionals(self) -> list[str]:
        """The metavars (else the names, upper case) of its positional arguments."""
        return [str(a["kwargs"].get("metavar") or a["args"][0]).upper()
                for a in _arguments(self.spec) if not a["args"][0].startswith("-")]

    def check(self, words: list[str], typed: bool = False) -> None:
        """Parse the command's words (no pipes or redirects: a command line's);
        UsageError 'CMD: what is wrong; usage: CMD ...' when they do not parse.
        Without *typed*, values are checked only by builtin types (int, float)."""
        if not self.spec.custom:
            build_parser(self.spec, typed).parse_args(words)


def _manifest() -> dict[str, dict[str, Any]]:
    from kvminspect.manifest import COMMANDS

    return COMMANDS


# specs of the commands registered so far in this process (kvm_command): the truth
# the manifest is made from, with the type callables
LIVE: dict[str, CommandSpec] = {}


def entries() -> dict[str, Entry]:
    """Every command, in registration order: registered ones as registered (LIVE),
    the others as the manifest has them."""
    out = {name: Entry(LIVE.get(name) or CommandSpec.from_data(name, data))
           for name, data in _manifest().items()}
    out.update((name, Entry(spec)) for name, spec in LIVE.items() if name not in out)
    return out


def entry(name: str) -> Entry | None:
    """Command *name* (None if there is none)."""
    return entries().get(name)


def asks_help(words: list[str]) -> str | None:
    """The command of 'CMD ... -h' / '--help' (shown as 'help CMD': drgn commands
    have no -h), else None. The CLI and the REPL both ask this."""
    if len(words) > 1 and any(w in HELP_FLAGS for w in words[1:]):
        return words[0]
    return None


# -- help ---------------------------------------------------------------------------


class Describable(Protocol):
    def description(self) -> str: ...

    def format_usage(self) -> str: ...

    def format_help(self, *, indent: str = "") -> str: ...


def show_help(name: str | None, commands: Mapping[str, Describable], repl: bool = False) -> None:
    """What 'help' prints: the list of *commands* (in their order, that of --help),
    or command *name*'s usage, description and options; *repl*: the REPL's own
    words too. UsageError for a command not in *commands*."""
    from kvminspect.render import console

    c = console()
    if name:
        cmd = commands.get(name)
        if cmd is None:
            raise UsageError(f"unknown command '{name}'")
        c.print(f"usage: {cmd.format_usage()}\n\n{cmd.description()}\n", markup=False)
        c.print(cmd.format_help(indent="  "), markup=False)
        return
    for cmd_name, cmd in commands.items():
        c.print(f"  {cmd_name:<8} {cmd.description()}", markup=False)
    if repl:
        c.print(f"  {'vm all':<8} clear the VM selection ('vm ID' selects one for later "
                "commands)\n"
                f"  {'pager':<8} 'pager off' or 'pager on': output longer than the screen "
                "goes through $PAGER (default less -FRX)\n"
                f"  {'exit':<8} leave the REPL (also 'quit' or Ctrl-D)", markup=False)
    c.print("\nCommands that print data take --json (one JSON document). "
            "In the REPL: 'cmd | shell', 'cmd > file'; Ctrl-C cancels, Ctrl-D exits.\n"
            f"Numbers: {NUMBERS_RULE}.", markup=False)


# -- the manifest -------------------------------------------------------------------


def generate() -> dict[str, dict[str, Any]]:
    """Every command's manifest entry, from the command modules themselves."""
    import_all()

    def order(spec: CommandSpec) -> int:
        short = spec.module.rpartition(".")[2]
        return MODULES.index(short) if short in MODULES else len(MODULES)

    return {s.name: s.to_data() for s in sorted(LIVE.values(), key=order)}


def manifest_text(commands: dict[str, dict[str, Any]]) -> str:
    """The text of kvminspect/manifest.py for *commands*."""
    import pprint

    body = pprint.pformat(commands, width=99, sort_dicts=False)
    return ('"""Every command\'s spec, made by kvminspect.registry: do not edit; after '
            'changing a\ncommand, run python3 -m kvminspect.registry to write it anew."""\n\n'
            "from typing import Any\n\n"
            f"COMMANDS: dict[str, dict[str, Any]] = {body}\n")


def main(argv: list[str] | None = None) -> int:
    """python3 -m kvminspect.registry [--check]: write (or check) the manifest."""
    from pathlib import Path

    path = Path(__file__).resolve().parent / "manifest.py"
    text = manifest_text(generate())
    if "--check" in (sys.argv[1:] if argv is None else argv):
        if path.read_text() != text:
            print(f"{MANIFEST} is stale: run python3 -m kvminspect.registry", file=sys.stderr)
            return 1
        return 0
    if path.read_text() != text:
        path.write_text(text)
        print(f"wrote {MANIFEST}")
    return 0


if __name__ == "__main__":  # run as kvminspect.registry, whose LIVE the commands fill
    from kvminspect.registry import main as registry_main

    sys.exit(registry_main())
