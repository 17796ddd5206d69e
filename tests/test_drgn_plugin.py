"""kvminspect inside drgn (%kvm, the plugin), drgn inside kvminspect (py, drgn) and --drgn code."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from importlib import metadata
from pathlib import Path
from typing import Any

import drgn
import pytest
from drgn.commands import DEFAULT_COMMAND_NAMESPACE, run_command

from kvminspect import drgn_plugin
from kvminspect.cli import run_one
from kvminspect.commands import load_all
from kvminspect.errors import KvminspectError, UsageError
from kvminspect.session import Session
from kvminspect.target import DEBUG_NAMES, decompressed
from tests.conftest import open_fixture

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "kvminspect" / "sample"
FIXTURE = "6.1-shadow"  # the bundled sample
FIXTURE_DIR = ROOT / "tests" / "vmcores" / FIXTURE


def text_of(argv: list[str], session: Session | None = None) -> str:
    """What 'kvminspect -c FIXTURE ARGV' prints on stdout (run_one, as the CLI runs it)."""
    s = session or Session(open_fixture(FIXTURE))
    buf = io.StringIO()
    with redirect_stdout(buf):
        run_one(s, argv)
    return buf.getvalue()


def drgn_program(fixture: Path = FIXTURE_DIR) -> drgn.Program:
    """A drgn Program opened as drgn's CLI opens it: the core and the debug files."""
    core = decompressed(next(p for p in sorted(fixture.iterdir()) if p.name.startswith("vmcore")))
    prog = drgn.Program()
    prog.set_core_dump(str(core))
    debug = [str(decompressed(p)) for p in sorted(fixture.iterdir())
             if DEBUG_NAMES.match(p.name.removesuffix(".xz"))]
    prog.load_debug_info(debug, main=True)
    return prog


def drgn_cli(*extra: str, env: dict[str, str] | None = None) -> list[str]:
    """The drgn command line on the fixture (its files decompressed)."""
    fx = sorted(FIXTURE_DIR.iterdir())
    core = decompressed(next(p for p in fx if p.name.startswith("vmcore")))
    argv = [sys.executable, "-m", "drgn", "-q", "-c", str(core)]
    for p in fx:
        if DEBUG_NAMES.match(p.name.removesuffix(".xz")):
            argv += ["-s", str(decompressed(p))]
    return argv + list(extra)


# -- %kvm: the plugin --------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["roots", "unsync", "tree --unsync-only", "vms --json"])
def test_kvm_command_prints_what_kvminspect_prints(cmd: str) -> None:
    """The plugin module registers 'kvm' in drgn's namespace; on a Program drgn opened
    '%kvm CMD' prints what kvminspect prints."""
    assert "kvm" in dict(DEFAULT_COMMAND_NAMESPACE.enabled(drgn_program()))
    prog = drgn_program()
    buf = io.StringIO()
    with redirect_stdout(buf):
        run_command(prog, f"kvm {cmd}", globals={})
    assert buf.getvalue() == text_of(cmd.split())
    assert buf.getvalue().strip()


def test_kvm_keeps_its_session_and_raises_errors() -> None:
    prog = drgn_program()
    with redirect_stdout(io.StringIO()) as out:
        run_command(prog, "kvm vm 0", globals={})
        run_command(prog, "kvm", globals={})  # no command: the list
    assert prog.config[drgn_plugin.SESSION_KEY].selected.index == 0
    assert "roots" in out.getvalue() and "help" in out.getvalue()
    with pytest.raises(KvminspectError, match="not a shadow page"):
        run_command(prog, "kvm sp 0x1234", globals={})


def test_kvm_without_kvm_debug_info_is_one_line() -> None:
    core = decompressed(FIXTURE_DIR / "vmcore.xz")
    prog = drgn.Program()
    prog.set_core_dump(str(core))
    prog.load_debug_info([str(decompressed(FIXTURE_DIR / "vmlinux.xz"))], main=True)
    with pytest.raises(KvminspectError, match="no debug info for kvm.ko"):
        drgn_plugin.run_kvm(prog, "roots")


def test_pyproject_names_the_plugin() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    value = project["entry-points"]["drgn.plugins"]["kvminspect"]
    assert value == drgn_plugin.__name__ == "kvminspect.drgn_plugin"
    # drgn loads the plugin by importing that module; its import registers %kvm
    assert drgn_plugin.run_kvm.__module__ == value  # (registered: test_kvm_command_prints...)


def _run_drgn_cli(env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    code = "from drgn.commands import run_command; run_command(prog, 'kvm roots')"
    return subprocess.run(drgn_cli("-e", code), capture_output=True, text=True, env=env,
                          check=False, timeout=300)


def test_drgn_cli_runs_kvm_roots() -> None:
    """drgn's own CLI, in a subprocess, loads the plugin (named as an entry point is,
    through DRGN_PLUGINS, so this runs before the package is reinstalled)."""
    done = _run_drgn_cli({"DRGN_PLUGINS": "kvminspect_test=kvminspect.drgn_plugin",
                          "DRGN_DISABLE_PLUGINS": "kvminspect"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == text_of(["roots"])


def test_installed_entry_point_runs_kvm_roots() -> None:
    """The entry point of the installed package (pip install -e . registers it)."""
    names = {e.name: e.value for e in metadata.entry_points(group="drgn.plugins")}
    if names.get("kvminspect") != "kvminspect.drgn_plugin":
        pytest.skip("kvminspect's drgn.plugins entry point is not installed yet "
                    "(pip install -e . registers it)")
    done = _run_drgn_cli({})
    assert done.returncode == 0, done.stderr
    assert done.stdout == text_of(["roots"])


# -- py and drgn in kvminspect's REPL ----------------------------------------------------


def repl(*lines: str) -> subprocess.CompletedProcess[str]:
    """Lines piped into 'kvminspect vmcore' (the sample)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "kvminspect", "vmcore"],
                          input="".join(line + "\n" for line in lines), capture_output=True,
                          text=True, env=env, check=False, timeout=300)


def test_py_evaluates_with_prog_kvm_and_session() -> None:
    done = repl("py kvm is None", "vm 0", "py kvm.online_vcpus.counter",
                "py n = len(session.kernel.vms())", "py n * 10",
                "py hex(kvm.value_()) | tr a-f A-F", "py 'text'",
                "py kvm.arch.n_used_mmu_pages", "py 1 / 0", "py (", "py")
    out = done.stdout.splitlines()
    vm = Session(open_fixture(FIXTURE)).kernel.vms()[0]
    assert out[0] == "True"  # no VM selected yet
    i = out.index("(unsigned long)37")  # a drgn Object is printed as drgn prints it
    assert out[i - 4:i] == ["(int)4", "10", hex(vm.addr).upper().replace("0X", "0x"), "text"]
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors == [
        "kvminspect: error: py: ZeroDivisionError: division by zero",
        "kvminspect: error: syntax error: '(' was never closed",
        "kvminspect: error: py needs Python code, e.g. 'py kvm.online_vcpus'",
    ]
    assert "Traceback" not in done.stderr


def test_drgn_runs_drgns_shell_on_the_same_program(monkeypatch: pytest.MonkeyPatch) -> None:
    import drgn.cli

    calls: list[tuple[drgn.Program, dict[str, Any], str]] = []

    def fake(prog: drgn.Program, banner_func: Any = None, globals_func: Any = None,
             quiet: bool = False) -> None:
        calls.append((prog, globals_func({"prog": prog}), banner_func("drgn")))

    monkeypatch.setattr(drgn.cli, "run_interactive", fake)
    s = Session(open_fixture(FIXTURE))
    load_all()
    run_one(s, ["vm", "0"])
    run_one(s, ["drgn"])
    (prog, names, banner), = calls
    assert prog is s.target.prog
    assert names["session"] is s and names["prog"] is prog
    assert names["kvm"].value_() == s.selected.addr
    assert str(names["kvm"].type_) == "struct kvm *"
    assert "kvm, session" in banner
    prog.config["outer_repl"] = "drgn"
    try:
        with pytest.raises(UsageError, match="already inside drgn"):
            run_one(s, ["drgn"])
    finally:
        prog.config.pop("outer_repl")


# -- --drgn: the code that reads the same objects ------------------------------------------


def run_code(code: str, prog: drgn.Program) -> list[str]:
    """exec the printed code with prog bound, as drgn runs a script; its output lines."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        exec(compile(code, "<--drgn>", "exec"), {"prog": prog, "__name__": "__main__"})
    return buf.getvalue().splitlines()


CODE_FIXTURES = ["6.1-shadow", "5.10-shadow", "6.12-tdp", "7.3-shadow"]


@pytest.mark.parametrize("name", CODE_FIXTURES)
def test_roots_drgn_code_finds_the_same_roots(name: str) -> None:
    s = Session(open_fixture(name))
    code = text_of(["roots", "--drgn"], s)
    compile(code, "<--drgn>", "exec")
    doc = json.loads(text_of(["roots", "--json"], s))
    want = []
    for v in doc["vms"][0]["vcpus"]:
        for label, r in [("root", v["root"]),
                         *((f"prev_roots[{j}]", p) for j, p in enumerate(v["prev_roots"]))]:
            if r["state"] == "invalid_page":
                want.append((v["vcpu_idx"], label, r["pgd"], None, None))
            elif r["state"] == "page":
                want.append((v["vcpu_idx"], label, r["pgd"], r["hpa"], r["page"]["sp"]))
    got = []
    for line in run_code(code, s.target.prog):
        m = re.match(r"vcpu\[(\d+)\] cr3 \S+ (\S+): pgd (\S+) (?:hpa (\S+) sp (\S+))?", line)
        assert m, line
        if "special root" not in line:
            got.append((int(m[1]), m[2], m[3], m[4], m[5]))
    assert got == want and want


@pytest.mark.parametrize("name", CODE_FIXTURES)
def test_tree_drgn_code_walks_the_same_pages(name: str) -> None:
    s = Session(open_fixture(name))
    vm = s.kernel.vms()[0]
    g = s.graph(vm)
    lines = run_code(text_of(["tree", "--drgn"], s), s.target.prog)
    pages = {int(m, 16) for m in re.findall(r"sp (0x[0-9a-f]+)", "\n".join(lines))}
    assert pages == {a for a in g.nodes if not g.is_orphan(a)}
    tops = [int(line.split()[1], 16) for line in lines if line.startswith("sp ")]
    assert set(tops) == set(g.roots)
    depth1 = run_code(text_of(["tree", "--drgn", "--depth", "1"], s), s.target.prog)
    assert max(len(x) - len(x.lstrip()) for x in depth1) == 4  # roots and one level


@pytest.mark.parametrize("name", ["6.1-shadow", "6.12-tdp"])
def test_sp_drgn_code_reads_the_same_fields(name: str) -> None:
    s = Session(open_fixture(name))
    g = s.graph(s.kernel.vms()[0])
    addr = g.root_order()[0]
    d = json.loads(text_of(["sp", hex(addr), "--json"], s))["vms"][0]["pages"][0]
    lines = run_code(text_of(["sp", hex(addr), "--drgn"], s), s.target.prog)
    head = " ".join(lines[:3])
    assert lines[0] == f"sp {d['sp']} gfn {d['gfn']} level {d['level']}"
    assert f"unsync_children {d['unsync_children']}" in head
    assert f"root_count {d['root_count']}" in head
    tables = {int(m[1]): m[2] for line in lines
              if (m := re.match(r"\[(\d+)\] spte \S+ pfn \S+ table child sp (\S+)", line))}
    want = {e["index"]: e["child"] for e in d["sptes"] if not e["leaf"]}
    assert tables == want
    entries = [line for line in lines if re.match(r"\[\d+\] spte", line)]
    assert len(entries) == len(d["sptes"])


def test_drgn_option_errors() -> None:
    s = Session(open_fixture(FIXTURE))
    with pytest.raises(UsageError, match="--json"):
        run_one(s, ["roots", "--drgn", "--json"])
    with pytest.raises(UsageError, match="--unsync-only"):
        run_one(s, ["tree", "--drgn", "--unsync-only"])
    with pytest.raises(UsageError, match="not --gfn"):
        run_one(s, ["sp", "--gfn", "0x101", "--drgn"])
