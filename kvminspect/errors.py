"""Errors: fatal ones end the command with one line; problems degrade."""

from __future__ import annotations

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
