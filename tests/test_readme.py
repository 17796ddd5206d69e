"""Every README example that runs on the bundled sample or a fixture runs as written.

The examples are the `kvminspect ...` lines of README.md's ```sh blocks and its
inline code. Each one that targets --sample, the bundled sample (`kvminspect
vmcore` without PATH) or a fixture (tests/vmcores/...) is run exactly as
written, leading VAR=value assignments included, and must exit 0. The others
are skipped, each with its reason (pytest -rs lists them):

- live: `live`, `--live`, `--qemu` or `sudo` need a running KVM host, root or a
  QMP socket;
- placeholder: a template such as `-c CORE COMMAND [ARGS]`, `help CMD`, `diff A B`;
- elsewhere: a path on the reader's machine, not the sample or a fixture.

The sample output printed after "prints, at N columns (`COLUMNS=N kvminspect
...`):" must be exactly what that command prints at that width.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

LIVE = {"live", "--live", "--qemu", "sudo"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$|[\[\]|…<>]|^/path/")


def examples(text: str) -> list[str]:
    """The `kvminspect ...` commands of the ```sh blocks and the inline code, in
    order, once each (comments and prompts dropped)."""
    found: list[str] = []
    for block in re.findall(r"^```(?:sh|shell|bash|console)\n(.*?)^```", text, re.M | re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip().removeprefix("$ ")
            found.append(line)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    found += re.findall(r"`([^`\n]+)`", prose)
    cmds = [c.strip() for c in found if re.match(r"^(\w+=\S*\s+)*(sudo\s+)?kvminspect\s", c)]
    return list(dict.fromkeys(cmds))


def split(example: str) -> tuple[dict[str, str], list[str]]:
    """(the VAR=value assignments, the words after them)."""
    words = shlex.split(example)
    env = {}
    while words and re.match(r"^\w+=", words[0]):
        k, _, v = words.pop(0).partition("=")
        env[k] = v
    return env, words


def skip_reason(example: str) -> str | None:
    """Why *example* is not run (None: it is run)."""
    _, words = split(example)
    if LIVE & set(words):
        return "live: needs a running KVM host, root or a QMP socket"
    if any(PLACEHOLDER.search(w) for w in words):
        return "placeholder: a template, not a command"
    args = words[1:]
    if "--sample" in args or args == ["vmcore"]:
        return None
    if args in (["help"], ["--help"]) or args[:1] == ["--completion"] and ">" not in example:
        return None  # no target at all
    paths = [a for i, a in enumerate(args) if "/" in a or (i and args[i - 1] in ("-c", "--core"))]
    if paths and all(p.startswith("tests/vmcores/") for p in paths):
        return None
    return "elsewhere: not the bundled sample or a fixture"


EXAMPLES = examples(README)


def run(example: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """*example* as written: kvminspect is this Python's `-m kvminspect` of this tree,
    run from the repository (fixture paths are relative to it), writing nowhere else."""
    env, words = split(example)
    assert words[0] == "kvminspect"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **env,
                "KVMINSPECT_CACHE": os.environ.get("KVMINSPECT_CACHE", str(tmp_path))}
    return subprocess.run([sys.executable, "-m", "kvminspect", *words[1:]], cwd=ROOT,
                          env=full_env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300)


def test_the_examples_are_found() -> None:
    assert "kvminspect --sample roots" in EXAMPLES
    assert "kvminspect --sample unsync" in EXAMPLES
    assert "sudo kvminspect --live roots" in EXAMPLES
    assert not [e for e in EXAMPLES if e.startswith("kvminspect/")]  # paths are no commands
    assert sum(skip_reason(e) is None for e in EXAMPLES) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES)
def test_example_runs_as_written(example: str, tmp_path: Path) -> None:
    reason = skip_reason(example)
    if reason:
        pytest.skip(f"{example!r}: {reason}")
    p = run(example, tmp_path)
    assert p.returncode == 0, (example, p.stderr)
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr


def sample_outputs(text: str) -> list[tuple[str, str]]:
    """(command, output) of each "prints, at N columns (`CMD`):" and the ```text block after it."""
    return re.findall(r"prints, at \d+ columns \(`([^`]+)`\):\n\n```text\n(.*?)^```", text,
                      re.M | re.S)


def test_sample_output_is_what_the_command_prints(tmp_path: Path) -> None:
    outputs = sample_outputs(README)
    assert [cmd for cmd, _ in outputs] == ["COLUMNS=130 kvminspect --sample roots",
                                           "COLUMNS=100 kvminspect --sample walk 0x200000",
                                           "COLUMNS=100 kvminspect --sample check --audit",
                                           "COLUMNS=100 kvminspect --sample rmap 0x10",
                                           "COLUMNS=130 kvminspect diff "
                                           "tests/vmcores/6.1-shadow-pair/before "
                                           "tests/vmcores/6.1-shadow-pair/after"]
    for cmd, shown in outputs:
        env, _ = split(cmd)
        stated = re.search(rf"prints, at (\d+) columns \(`{re.escape(cmd)}`", README)
        assert stated and env.get("COLUMNS") == stated.group(1)
        p = run(cmd, tmp_path)
        assert p.returncode == 0, p.stderr
        assert p.stdout == shown, cmd
