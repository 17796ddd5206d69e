"""The one place kvminspect uses a private part of drgn (tests/test_drgn_compat.py
fails when drgn changes it).

HelpFormatter: the argparse formatter drgn's commands format their help with
(_drgn_util.argparseformatter.MultilineHelpFormatter: paragraphs kept, not
one run of words). kvminspect.registry formats a command's help without
importing the command, and must format it as drgn does.
"""

from __future__ import annotations

from _drgn_util.argparseformatter import (  # type: ignore[import-untyped]
    MultilineHelpFormatter as HelpFormatter,
)

__all__ = ["HelpFormatter"]
