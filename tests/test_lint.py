"""ruff and mypy over the repository, from the suite: the README's one test
command (which CI runs) checks them. Both are configured in pyproject.toml."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the `# type: ignore` comments the code may carry at most (issue 15's note lists them)
MAX_TYPE_IGNORES = 3


def _tool(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed: python3 -m pip install -e '.[test]'")


def test_ruff_is_clean() -> None:
    _tool("ruff")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "kvminspect", "tests",
                           "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def drgn_stubs(where: Path) -> Path:
    """A directory holding drgn's type stubs for mypy: drgn ships them as
    _drgn.pyi at the top of site-packages, beside its extension module, where
    PEP 561 does not look (without them every drgn call is Any)."""
    spec = importlib.util.find_spec("_drgn")
    assert spec is not None and spec.origin is not None, "drgn is not installed"
    stub = Path(spec.origin).parent / "_drgn.pyi"
    assert stub.exists(), f"drgn's stubs are not where drgn installs them: {stub}"
    where.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(stub, where / "_drgn.pyi")
    return where


@pytest.mark.parametrize("stubs", [True, False], ids=["drgn-typed", "drgn-untyped"])
def test_mypy_is_clean(stubs: bool, tmp_path: Path) -> None:
    """mypy, as pyproject.toml configures it (strict for the model, the readers and
    the analyses), with drgn's types and without them (a plain `mypy` run)."""
    _tool("mypy")
    env = dict(os.environ)
    env.pop("MYPYPATH", None)
    if stubs:
        env["MYPYPATH"] = str(drgn_stubs(tmp_path / "stubs"))
    done = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_type_ignores_do_not_grow() -> None:
    found = [f"{p.relative_to(ROOT)}:{n}" for p in sorted((ROOT / "kvminspect").rglob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"#\s*type:\s*ignore", line)]
    assert len(found) <= MAX_TYPE_IGNORES, found
