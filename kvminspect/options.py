"""The global options: one table for the command line, --help, the shell
completion scripts and the one-shot diff.

kvminspect.cli reads them anywhere on the command line (split_argv) and
builds --help from them (parser); kvminspect.completion completes them
(files after the file ones, the choices of --completion); split_first_core
(the one-shot 'kvminspect diff A B') skips their values when it looks for
A. Imports nothing heavy: ``kvminspect --help`` and ``--completion`` read
this and the command registry only.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvminspect.errors import UsageError


@dataclass(frozen=True)
class GlobalOption:
    """One global option: its spellings, the Globals field it fills, its value."""

    flags: tuple[str, ...]  # the one messages and usage lines show first: "-c", "--core"
    dest: str  # the field of kvminspect.cli.Globals it fills
    help: str
    metavar: str | None = None  # None: a flag, which takes no value
    target: bool = False  # names the target (at most one of these)
    file: bool = False  # its value is a file (completion offers file names)
    choices: tuple[str, ...] = ()
    first: bool = False  # only before the command (-h, --version): after it, the command's
    repeat: bool = False  # may be given several times, each value kept (-s, -e)
    in_usage: bool = True  # in the usage line's options (-e has its own place there)

    @property
    def takes_value(self) -> bool:
        return self.metavar is not None

    @property
    def spelling(self) -> str:
        """How usage lines and messages show it: '-c CORE', '--live'."""
        return f"{self.flags[0]} {self.metavar}" if self.metavar else self.flags[0]


SHELLS = ("bash", "zsh")

OPTIONS: tuple[GlobalOption, ...] = (
    GlobalOption(("-c", "--core"), "core", "vmcore (ELF or kdump; .xz/.zst/.gz), crash "
                 "directory (/var/crash/...: its vmcore or dump.*) or fixture directory",
                 metavar="CORE", target=True, file=True),
    GlobalOption(("--live", "-k"), "live", "the running kernel (/proc/kcore; -k as in drgn)",
                 target=True),
    GlobalOption(("--qemu",), "qemu", "a QEMU-emulated host, live, through its QMP unix socket",
                 metavar="SOCKET", target=True, file=True),
    GlobalOption(("--sample",), "sample", "the sample vmcore in the package", target=True),
    GlobalOption(("-s", "--symbols"), "symbols", "debug info file or directory (repeatable); "
                 "default: drgn's search", metavar="PATH", file=True, repeat=True),
    GlobalOption(("--vm",), "vm", "select a VM (index, pid:PID, kvm address, or name: kvm-PID "
                 "or QEMU's -name)", metavar="ID"),
    GlobalOption(("--json",), "json", "JSON output (with -e: one document per command)"),
    GlobalOption(("-e", "--exec"), "exec", "run commands ('CMD; CMD', repeatable) on one load, "
                 "then exit", metavar="CMDS", repeat=True, in_usage=False),
    GlobalOption(("--completion",), "completion", "print a completion script for bash or zsh",
                 metavar="SHELL", choices=SHELLS, in_usage=False),
    GlobalOption(("-h", "--help"), "help", "show this help message and exit", first=True,
                 in_usage=False),
    GlobalOption(("--version",), "version", "show the version and exit", first=True,
                 in_usage=False),
)


def spellings() -> list[str]:
    """Every spelling of every global option, in table order."""
    return [f for o in OPTIONS for f in o.flags]


def by_flag() -> dict[str, GlobalOption]:
    """Each spelling -> its option."""
    return {f: o for o in OPTIONS for f in o.flags}


def value_flags() -> list[str]:
    """The spellings of the options that take a value."""
    return [f for o in OPTIONS if o.takes_value for f in o.flags]


def file_flags() -> list[str]:
    """The spellings of the options whose value is a file."""
    return [f for o in OPTIONS if o.file for f in o.flags]


def targets() -> list[GlobalOption]:
    """The options that name a target (-c, --live, --qemu, --sample)."""
    return [o for o in OPTIONS if o.target]


def target_choices() -> str:
    """'-c CORE, --live, --qemu SOCKET or --sample', for messages."""
    names = [o.spelling for o in targets()]
    return ", ".join(names[:-1]) + " or " + names[-1]


# many vmcores at once, one JSON line each (kvminspect.batch)
BATCH_USAGE = ("kvminspect diagnose --jsonl CORE... [-j N] [-s PATH]... [--vm ID] "
               "[--fail-on warning]")


def usage() -> str:
    """The usage lines of kvminspect --help: one target and a command (none: the
    REPL on the target, as drgn -c CORE), then diagnose --jsonl over many vmcores."""
    parts = ["[" + " | ".join(o.spelling for o in targets()) + "]"]
    parts += [f"[{o.spelling}]" + ("..." if o.repeat else "") for o in OPTIONS
              if o.in_usage and not o.target]
    return (f"kvminspect {' '.join(parts)} [COMMAND [ARGS] | -e 'CMD; CMD']\n"
            f"       {BATCH_USAGE}")


def split_first_core(words: list[str]) -> tuple[str, list[str]]:
    """'kvminspect diff A B ...': A, and the words of 'diff B ...' (A removed).

    A and B are the first two words that are neither options nor an option's
    value (diff's own options and the global ones); UsageError unless both are there.
    """
    from kvminspect import registry

    diff = registry.entry("diff")
    takes = {**(diff.options() if diff else {}), **dict.fromkeys(value_flags(), True)}
    cores, skip = [], False
    for i, w in enumerate(words):
        if skip:
            skip = False
        elif w.startswith("-"):
            skip = takes.get(w, False)
        else:
            cores.append(i)
    if len(cores) < 2:
        raise UsageError("diff needs two vmcores: kvminspect diff A B (or -c A diff B)")
    return words[cores[0]], words[:cores[0]] + words[cores[0] + 1:]
