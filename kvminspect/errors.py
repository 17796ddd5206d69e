"""Errors: fatal ones end the command with one line; problems degrade."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


class KvminspectError(Exception):
    """A fatal error: printed as one line on stderr, exit status *status*."""

    status = 1


class TargetError(KvminspectError):
    """The core or live kernel cannot be opened."""


class DebugInfoError(KvminspectError):
    """Debug info is missing or does not match the kernel."""


class KvmNotFound(KvminspectError):
    """The kernel has no kvm module (or no debug info for it)."""


class UsageError(KvminspectError):
    """Bad command line or command arguments."""

    status = 2


class LookupFailed(KvminspectError):
    """A named object (VM, vCPU, shadow page) does not exist."""


@dataclass(frozen=True)
class Problem:
    """An object that could not be read or is inconsistent; it was skipped.

    *kind* names the kernel structure, *addr* its address, *what* the failure.
    """

    kind: str
    addr: int | None
    what: str

    def __str__(self) -> str:
        where = f" {self.addr:#x}" if self.addr is not None else ""
        return f"{self.kind}{where}: {self.what}"

    def to_json(self) -> dict:
        return {
            "object": self.kind,
            "addr": None if self.addr is None else hex(self.addr),
            "error": self.what,
        }


class Problems:
    """Every Problem met on a target, in the order met, each once, with its owner.

    The owner is the struct kvm address of the VM whose objects were being
    read when the problem was met (None: the kernel's VM list itself), so a
    document shows the problems of the VMs it shows, wherever in the session
    they were first met. Adding is O(1).
    """

    def __init__(self) -> None:
        self._owner: dict[Problem, int | None] = {}

    def add(self, p: Problem, owner: int | None) -> None:
        self._owner.setdefault(p, owner)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, p: object) -> bool:
        return p in self._owner

    def of(self, owners: Iterable[int]) -> list[Problem]:
        """The problems of VMs *owners* and of the VM list, in the order met."""
        want = set(owners)
        return [p for p, o in self._owner.items() if o is None or o in want]

    def disown(self, owner: int) -> None:
        """Give one VM's problems to the VM list (the VM itself could not be read)."""
        self._owner = {p: (None if o == owner else o) for p, o in self._owner.items()}

    def discard(self, owner: int) -> None:
        """Forget the problems of one VM (a test that made them up)."""
        self._owner = {p: o for p, o in self._owner.items() if o != owner}


def _argument_error_text(e: BaseException) -> str:
    """argparse's "PROG: error: MSG" as "PROG: MSG" (the usage line is already out)."""
    text = str(e).strip()
    return re.sub(r"^(\S+): error: ", r"\1: ", text) or "bad arguments"


def is_output_error(e: BaseException) -> bool:
    """Whether *e* is the output failing to be written (stdout or a '> file' on a full
    disk, a lost terminal): an OSError of a write, which names no file."""
    import errno

    return (isinstance(e, OSError) and e.filename is None
            and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO))


def describe(e: BaseException, help_hint: str = "try help") -> tuple[str, str, int]:
    """(kind, one-line message, exit status) for an exception a command raised.

    kind is "error" (the user's or the target's) or "internal" (a bug). The
    one mapping the CLI and the REPL share; *help_hint* says where the list
    of commands is.
    """
    import drgn
    from drgn.commands import CommandArgumentError, CommandError, CommandNotFoundError

    if isinstance(e, CommandNotFoundError):
        return "error", f"unknown command '{e.name}' ({help_hint})", UsageError.status
    if isinstance(e, CommandArgumentError):
        return "error", _argument_error_text(e), UsageError.status
    if isinstance(e, KvminspectError):
        return "error", str(e), e.status
    if isinstance(e, CommandError):
        return "error", str(e), 1
    if isinstance(e, drgn.FaultError):
        return "error", f"cannot read the target: {e}", 1
    if isinstance(e, SyntaxError):
        return "error", f"syntax error: {e.msg}", UsageError.status
    if isinstance(e, NotImplementedError):  # e.g. a '3> file' redirect
        return "error", str(e), UsageError.status
    if is_output_error(e):
        return "error", f"writing output: {getattr(e, 'strerror', None) or e}", 1
    if isinstance(e, OSError) and e.filename is not None:
        return "error", f"{e.filename}: {e.strerror or e}", 1
    return "internal", f"{type(e).__name__}: {e}", 1
