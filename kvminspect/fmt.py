"""The one formatter of kernel addresses and numbers in hex, for JSON, text and messages.

drgn-free (kvminspect.unsync uses it too): a NoValue formats as its name
through its own ``__format__``, so nothing here imports the layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, overload

if TYPE_CHECKING:
    from kvminspect.layout import NoValue


@overload
def hx(v: None) -> None: ...
@overload
def hx(v: int | NoValue) -> str: ...
@overload
def hx(v: object) -> str | None: ...


def hx(v: object) -> str | None:
    """An address-like value as "0x…": None stays None (JSON null; text shows
    ``hx(v) or "-"``), UNKNOWN / UNREADABLE give their name ("unknown",
    "unreadable"), and anything else (a corrupt snapshot's value, in an error
    message) its repr."""
    if type(v) is int:  # the hot path: 10^5 shadow pages
        return hex(v)
    if v is None:
        return None
    try:
        return f"{v:#x}"
    except (TypeError, ValueError):
        return repr(v)


def hpa_text(hpa: int | NoValue | None) -> str:
    """A root's hpa (kvminspect.results.root_hpa): "0x…", "INVALID_PAGE" (None:
    no root) or "unreadable" (its MMU could not be read)."""
    return "INVALID_PAGE" if hpa is None else hx(hpa)


def spte_text(value: int) -> str:
    """An SPTE's value in text: 0x and 16 hex digits ("0x0000000002ed6827"), the one
    width of every SPTE kvminspect prints (sp, walk, rmap, the findings' messages),
    so that the values of one table line up and compare by eye. JSON keeps hx()."""
    return f"{value:#018x}"
