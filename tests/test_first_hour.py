"""Issue 18, "The first hour, second pass": items 2, 3, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16
and 17, each with the test that fails without its fix (the items' numbers head the sections)."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvminspect import cli, registry
from kvminspect.cli import run_one
from kvminspect.commands import export, load_all
from kvminspect.errors import KvminspectError, LookupFailed, UsageError
from kvminspect.manifest import COMMANDS
from kvminspect.session import Session
from kvminspect.unsync import replay_sync
from tests.conftest import VMCORES, open_fixture, run_main, truth

ROOT = Path(__file__).resolve().parent.parent
SHADOW = "6.1-shadow"  # the bundled sample's fixture
TWO = "6.1-shadow-2vm"  # one VMM process (pid 98) with two VMs


def session(name: str) -> Session:
    return Session(open_fixture(name))


def out_of(s: Session, argv: list[str], capsys) -> str:
    """What command *argv* prints in session *s*."""
    capsys.readouterr()
    run_one(s, argv)
    return capsys.readouterr().out


def doc_of(s: Session, argv: list[str], capsys) -> dict:
    return json.loads(out_of(s, [*argv, "--json"], capsys))


# -- 2: a pid two VMs share is ambiguous, everywhere -------------------------------------


@pytest.mark.parametrize("argv", [["vms"], ["roots"], ["check"], ["tree", "--depth", "0"],
                                  ["-e", "vm pid:98"], ["vm", "pid:98"]])
def test_a_shared_pid_is_an_ambiguous_error(argv: list[str], capsys) -> None:
    """--vm pid:98 silently took VM 0 of the two VMs pid 98 owns."""
    pid = truth(TWO)["vmm_pid"]
    vm = [] if "pid:98" in " ".join(argv) else ["--vm", f"pid:{pid}"]
    status, out, err = run_main(["-c", str(VMCORES / TWO), *vm, *argv], capsys)
    assert status == 1 and out == "", err
    assert err == (f"kvminspect: error: VM 'pid:{pid}' is ambiguous: pid {pid} owns VMs 0, 1 "
                   "(use the index)\n")


def test_a_shared_pid_in_a_session() -> None:
    s = session(TWO)
    with pytest.raises(LookupFailed, match="is ambiguous: pid 98 owns VMs 0, 1"):
        s.vms("pid:98")
    with pytest.raises(LookupFailed, match="is ambiguous"):
        s.select("pid:98")
    assert s.selected is None
    vm1 = s.kernel.vms()[1]
    assert s.vms("1") == [vm1] and s.vms(hex(vm1.addr)) == [vm1]
    assert s.vms(f"{vm1.addr:x}") == [vm1]  # an address is hex, 0x optional
    with pytest.raises(LookupFailed, match="no VM 'pid:7'"):
        s.vms("pid:7")


# -- 3: one rule for numbers ------------------------------------------------------------


def test_walk_address_is_hex_without_0x(capsys) -> None:
    """'walk 200000' walked decimal 200000 (0x30d40)."""
    s = session(SHADOW)
    text = out_of(s, ["walk", "200000"], capsys)
    assert "walk 0x200000:" in text and text == out_of(s, ["walk", "0x200000"], capsys)
    assert doc_of(s, ["walk", "30d40"], capsys)["vms"][0]["walks"][0]["addr"] == "0x30d40"


def test_walk_vcpu_is_decimal_and_root_hex(capsys) -> None:
    s = session(SHADOW)
    assert out_of(s, ["walk", "200000", "--vcpu", "0x1"], capsys) == out_of(
        s, ["walk", "200000", "--vcpu", "1"], capsys)
    root = s.kernel.vcpus(s.kernel.vms()[0])[0].root.sp.addr
    assert out_of(s, ["walk", "200000", "--root", f"{root:x}"], capsys) == out_of(
        s, ["walk", "200000", "--root", hex(root)], capsys)


def test_rmap_and_sp_gfn_are_hex(capsys) -> None:
    s = session(SHADOW)
    assert doc_of(s, ["rmap", "10"], capsys)["vms"][0]["gfn"] == "0x10"
    assert out_of(s, ["rmap", "10"], capsys) == out_of(s, ["rmap", "0x10"], capsys)
    assert out_of(s, ["sp", "--gfn", "101"], capsys) == out_of(s, ["sp", "--gfn", "0x101"],
                                                                capsys)


@pytest.mark.parametrize("cmd", ["sp", "tree", "unsync"])
def test_a_shadow_page_address_is_hex_without_0x(cmd: str, capsys) -> None:
    s = session(SHADOW)
    root = s.kernel.vcpus(s.kernel.vms()[0])[0].root.sp.addr
    text = out_of(s, [cmd, f"{root:x}"], capsys)
    assert hex(root) in text and text == out_of(s, [cmd, hex(root)], capsys)


def test_depth_accepts_0x(capsys) -> None:
    """'tree --depth 0x1' was "not a number"."""
    s = session(SHADOW)
    assert out_of(s, ["tree", "--depth", "0x1"], capsys) == out_of(s, ["tree", "--depth", "1"],
                                                                    capsys)


@pytest.mark.parametrize("cmd, words, dest, value", [
    ("watch", ["--count", "0x10"], "count", 16),
    ("watch", ["--count", "010"], "count", 10),
    ("rate", ["--seconds", "0xa"], "seconds", 10),
    ("diagnose", ["--jsonl", "-j", "0x2", "A"], "jobs", 2),
    ("diagnose", ["-j", "2", "--jsonl", "A"], "jobs", 2),
    ("tree", ["--depth", "12"], "depth", 12),
    ("walk", ["--vcpu", "10", "10"], "vcpu", 10),
    ("walk", ["10"], "addr", 0x10),
    ("walk", ["ffff888000001000"], "addr", 0xffff888000001000),
    ("sp", ["--gfn", "259"], "gfn", 0x259),
    ("rmap", ["16"], "gfn", 0x16),
    ("unsync", ["0XABC"], "sp", 0xabc),
])
def test_every_parser_follows_the_rule(cmd: str, words: list[str], dest: str,
                                       value: int) -> None:
    """Counts decimal with 0x accepted, addresses and gfns hex with or without 0x, from
    the manifest alone (before the target is opened) and from the live command."""
    load_all()
    for spec in (registry.CommandSpec.from_data(cmd, COMMANDS[cmd]), registry.LIVE[cmd]):
        ns = registry.build_parser(spec, typed=True).parse_args(words)
        assert getattr(ns, dest) == value, (cmd, words)


@pytest.mark.parametrize("argv, message", [
    (["walk", "zz"], "walk: argument ADDR: bad address: 'zz' (hex, 0x optional)"),
    (["walk", "1" * 17], "bad address"),  # above 2^64
    (["walk", "-5"], "bad address: '-5'"),
    (["sp", "--gfn", "0x"], "bad gfn: '0x'"),
    (["tree", "--depth", "ff"], "not a number: 'ff' (decimal, 0x accepted)"),
    (["tree", "--depth", "-1"], "must be 0 or more, not -1"),
    (["walk", "0", "--vcpu", "x"], "argument --vcpu: not a number: 'x'"),
    (["watch", "--count", "2.5"], "not a number: '2.5'"),
])
def test_bad_numbers_are_one_line_before_the_target(argv: list[str], message: str,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys) -> None:
    opened: list[object] = []
    monkeypatch.setattr(cli, "open_source", lambda *a: opened.append(a))
    status, out, err = run_main(["--sample", *argv], capsys)
    assert (status, out, opened) == (2, "", [])
    assert err.count("\n") == 1 and message in err, err


def test_each_usage_line_states_the_rule() -> None:
    load_all()
    numbered = {"walk", "sp", "rmap", "tree", "unsync", "watch", "rate", "diagnose"}
    for name, data in COMMANDS.items():
        usage = registry.Entry(registry.CommandSpec.from_data(name, data)).format_usage()
        if name not in numbered:
            continue
        assert usage.count("\n") == 0, usage
        assert re.search(r"\((\w+(, \w+)*: hex, 0x optional)?(; )?"
                         r"(\w+(, \w+)*: decimal, 0x accepted)?\)$", usage), usage
    walk = registry.entry("walk")
    assert walk is not None and walk.format_usage() == (
        "walk [--vcpu N | --root SP] [--vm ID] [--json] ADDR  "
        "(ADDR, SP: hex, 0x optional; N: decimal, 0x accepted)")


def test_help_and_readme_state_the_rule(capsys) -> None:
    assert cli.main(["help"]) == 0
    assert f"Numbers: {registry.NUMBERS_RULE}." in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    assert "Numbers: addresses, gfns and SPTE values are hex" in capsys.readouterr().out
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "So `walk 200000` walks 0x200000 (before, it read decimal 200000, 0x30d40)" in readme


def test_bad_numbers_in_the_repl_are_one_line(capsys) -> None:
    from kvminspect import repl

    session = Session(open_fixture("6.1-shadow"))
    for line in ("walk zz", "tree --depth x | cat", "sp --gfn 0xzz > /dev/null"):
        repl.run_line(session, line)
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 3 and all(x.startswith("kvminspect: error: ") for x in lines), err
    assert "bad address: 'zz'" in lines[0] and "; usage: walk " in lines[0]
    assert "not a number: 'x'" in lines[1] and "; usage: tree " in lines[1]
    assert session.failed == 2


# -- 4: the REPL pages long output through $PAGER, as crash does -------------------------


def _repl_in_a_pty(lines: list[str], env: dict[str, str], timeout: float = 120) -> str:
    """Run `kvminspect -c 6.1-shadow` on a pseudo-terminal (stdin and stdout a
    terminal, as a user's), type *lines* one at a time, each after the prompt;
    what the terminal showed."""
    import contextlib
    import os
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: the REPL on the terminal
        os.execvpe(sys.executable, [sys.executable, "-m", "kvminspect", "-c",
                                    str(VMCORES / "6.1-shadow")],
                   {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", **env})
    seen = b""
    deadline = time.monotonic() + timeout
    todo = [*lines, "exit"]  # each sent when a prompt shows; the REPL then ends
    prompts = 0
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # the REPL ended: the terminal is gone
                    break
                if not chunk:
                    break
                seen += chunk
            if todo and seen.count(b"kvminspect(6.1-shadow)>") > prompts:
                prompts = seen.count(b"kvminspect(6.1-shadow)>")
                os.write(fd, todo.pop(0).encode() + b"\r")
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
        os.waitpid(pid, 0)
    return seen.decode(errors="replace")


@pytest.mark.slow
def test_the_repl_pages_long_output_and_pager_off_stops_it(tmp_path: Path) -> None:
    paged = tmp_path / "paged"
    env = {"PAGER": f"tee -a {paged}", "LINES": "12", "COLUMNS": "100",
           "KVMINSPECT_HISTORY": str(tmp_path / "history")}
    shown = _repl_in_a_pty(["roots", "vms", "roots | cat", "pager", "pager off", "tree"], env)
    text = paged.read_text()
    # roots (longer than 12 lines) went through the pager, once; vms (short), the
    # piped roots and tree after 'pager off' did not
    assert text.count("prev_roots[0]") >= 1 and text.count("VM 0  kvm") == 1, text
    assert "shadow pages" not in text and "MMU PAGES" not in text
    assert f"pager on (tee -a {paged})" in shown
    assert "shadow pages" in shown  # tree printed straight to the terminal


def test_the_pager_is_off_when_piped_or_streaming(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvminspect import repl

    session = Session(open_fixture("6.1-shadow"))
    session.interactive = True
    monkeypatch.setattr(repl, "is_tty", lambda f: True)
    assert repl.paged(session, "roots")
    assert not repl.paged(session, "roots | less")
    assert not repl.paged(session, "roots > out.txt")
    assert not repl.paged(session, "watch --interval 1")
    session.paging = False
    assert not repl.paged(session, "roots")
    monkeypatch.setattr(repl, "is_tty", lambda f: False)
    session.paging = True
    assert not repl.paged(session, "roots")  # stdout piped: never paged


def test_pager_words(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvminspect import repl

    session = Session(open_fixture("6.1-shadow"))
    monkeypatch.delenv("PAGER", raising=False)
    repl.run_line(session, "pager off")
    repl.run_line(session, "pager")
    repl.run_line(session, "pager on")
    repl.run_line(session, "pager sideways")
    out, err = capsys.readouterr()
    assert out.splitlines() == ["pager off", "pager off", "pager on (less -FRX)"]
    assert err.strip() == "kvminspect: error: usage: pager [on|off]"
    assert session.paging


def test_a_pager_that_cannot_start_is_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                 capsys) -> None:
    from kvminspect import repl

    monkeypatch.setenv("PAGER", "/nonexistent/pager")
    monkeypatch.setenv("LINES", "5")
    repl.page("".join(f"line {n}\n" for n in range(20)))
    out, err = capsys.readouterr()
    assert out.count("line") == 20
    assert "pager '/nonexistent/pager' did not start" in err and err.count("\n") == 1


# -- 5: a target without a command is a REPL; -k is --live ------------------------------


def test_a_target_alone_opens_the_repl(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """'kvminspect -c CORE' was "error: no command"."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("vms\nroots\n"))
    status, out, err = run_main(["-c", str(VMCORES / SHADOW)], capsys)
    assert status == 0, err
    assert "vmm" in out and "prev_roots[0]" in out and "kvminspect on" in err


@pytest.mark.parametrize("argv, source", [
    (["--sample"], ("sample", None)),
    (["--live"], ("live", None)),
    (["-k"], ("live", None)),
    (["--qemu", "/run/q.sock"], ("qemu", "/run/q.sock")),
    (["-c", "CORE", "--vm", "1"], ("core", "CORE")),
])
def test_every_target_alone_is_a_repl(argv: list[str], source: tuple,
                                      monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    seen = []

    def fake(src, symbols):
        seen.append(src)
        raise KvminspectError("opened")

    monkeypatch.setattr(cli, "open_source", fake)
    status, _, err = run_main(argv, capsys)
    assert (status, seen, err) == (1, [source], "kvminspect: error: opened\n")


def test_k_is_live_and_json_alone_is_refused(capsys) -> None:
    g = cli.split_argv(["-k", "roots"])
    assert g.live and cli.target_source(g) == ("live", None)
    with pytest.raises(UsageError, match="conflicting targets: --live and --sample"):
        cli.target_source(cli.split_argv(["-k", "--sample"]))
    status, out, err = run_main(["--sample", "--json"], capsys)
    assert (status, out) == (2, "") and "--json is for commands" in err
    status, _, err = run_main([], capsys)  # no target, no command: still the usage
    assert status == 2 and "no command" in err


# -- 8: one width for SPTEs, one spelling for prev_roots, plurals -------------------------


SPTE = re.compile(r"^0x[0-9a-f]{16}$")


def test_sptes_print_at_one_width(capsys) -> None:
    """sp printed 0x2cc5827 where walk and rmap print 0x0000000002ed6827."""
    s = session(SHADOW)
    root = s.kernel.vcpus(s.kernel.vms()[0])[0].root.sp.addr
    page = doc_of(s, ["sp", hex(root)], capsys)["vms"][0]["pages"][0]
    text = out_of(s, ["sp", hex(root)], capsys)
    rows = [line.split() for line in text.splitlines() if re.match(r"^ +\d+ +0x", line)]
    assert [r[1] for r in rows] == [f"{int(e['value'], 16):#018x}" for e in page["sptes"]]
    assert all(SPTE.match(r[1]) for r in rows)
    walk = out_of(s, ["walk", "0x200000"], capsys)
    rmap = out_of(s, ["rmap", "0x10"], capsys)
    for text in (walk, rmap):
        assert [w for w in text.split() if w.startswith("0x00")]
        assert all(SPTE.match(w) for w in text.split() if w.startswith("0x00"))


def test_no_message_prints_an_spte_short() -> None:
    """The findings' messages name SPTEs as text does (fmt.spte_text)."""
    short = re.compile(r"(spt\[[^\]]*\] = |SPTE |writable \()\{[^}]*:#x\}|"
                       r"\{[^}]*(spte|\.value):#x\}")
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in (ROOT / "kvminspect").rglob("*.py")
             for m in short.finditer(p.read_text())]
    assert not found


def test_prev_roots_has_one_spelling(capsys) -> None:
    """roots said prev[2] where tree and unsync say prev_roots[2]."""
    s = session(SHADOW)
    roots, tree = out_of(s, ["roots"], capsys), out_of(s, ["tree"], capsys)
    assert "prev_roots[2]" in roots and "prev_roots[2]" in tree
    assert "prev[" not in roots + tree + out_of(s, ["unsync"], capsys)
    assert "prev[" not in out_of(s, ["roots", "--drgn"], capsys)


ONE = re.compile(r"\b1 (roots|orphans|shadow pages|present SPTEs|entries|errors|warnings|"
                 r"batches|vCPUs|edges|pages|bits|leaves|unsync leaves)\b")


@pytest.mark.parametrize("name, argv", [
    ("6.1-tdp", ["tree"]), ("6.1-tdp", ["vms"]), ("6.1-tdp", ["check"]),
    (SHADOW, ["unsync"]), (SHADOW, ["check"]), (SHADOW, ["diagnose"]),
    (SHADOW, ["sp", "--gfn", "0x104"]),
])
def test_a_count_of_one_is_singular(name: str, argv: list[str], capsys) -> None:
    """'1 roots', '1 present SPTEs'."""
    text = out_of(session(name), argv, capsys)
    assert not ONE.findall(text), text
    if argv == ["tree"]:
        assert ", 1 root, " in text
    if argv[0] == "sp":
        assert "1 present SPTE, " in text


def test_a_finding_counts_one_page_in_the_singular() -> None:
    from kvminspect.accounting import CounterCheck, Verdict, finding
    from kvminspect.check import FindingKind

    one = CounterCheck(FindingKind.USED_MMU_PAGES, "kvm->arch.n_used_mmu_pages", 2, 1,
                       "shadow pages on active_mmu_pages", Verdict.MISMATCH)
    f = finding(one, 0x1000)
    assert f is not None and f.message.startswith(
        "kvm->arch.n_used_mmu_pages is 2 but 1 shadow page on active_mmu_pages: ")
    same = CounterCheck(FindingKind.TDP_MMU_PAGES, "the kvm->arch.tdp_mmu_pages list", 1, 1,
                        "non-root TDP MMU pages reachable", Verdict.MISMATCH, objects=(0x2000,))
    f = finding(same, 0x1000)
    assert f is not None and "holds 1 page, as many as" in f.message
    assert "1 page is on one side only" in f.message


# -- 9: a TDP MMU VM's pages ----------------------------------------------------------


@pytest.mark.parametrize("name, counted", [("6.1-tdp", True), ("5.10-tdp", True),
                                           ("6.12-tdp", True), ("7.3-tdp", False)])
def test_vms_shows_the_tdp_mmu_pages(name: str, counted: bool, capsys) -> None:
    """vms showed MMU PAGES 0/64 where tree counts 5 pages."""
    s = session(name)
    (vm,) = doc_of(s, ["vms"], capsys)["vms"]
    tree = doc_of(s, ["tree"], capsys)["vms"][0]
    assert vm["tdp_mmu_roots"] == tree["roots"] >= 1
    if counted:
        assert (vm["tdp_mmu_pages"] + vm["tdp_mmu_roots"] + vm["n_used_mmu_pages"]
                == tree["pages"])
    else:
        assert vm["tdp_mmu_pages"] is None  # 7.3 keeps no count
    text = out_of(s, ["vms"], capsys)
    head, row = text.splitlines()
    assert " SHADOW PAGES " in head and " TDP PAGES " in head
    n = "?" if not counted else vm["tdp_mmu_pages"]
    assert f"  {vm['n_used_mmu_pages']}/{vm['n_max_mmu_pages']}  " in row
    assert f"  {n} + {vm['tdp_mmu_roots']} root{'s' if vm['tdp_mmu_roots'] > 1 else ''}  " in row
    assert "TDP MMU pages" in out_of(s, ["vm", "--vm", "0"], capsys)
    assert doc_of(s, ["vm", "--vm", "0"], capsys)["vms"][0]["tdp_mmu_roots"] == tree["roots"]


def test_a_shadow_vm_has_no_tdp_pages(capsys) -> None:
    s = session(SHADOW)
    (vm,) = doc_of(s, ["vms"], capsys)["vms"]
    assert vm["tdp_mmu_pages"] is None and vm["tdp_mmu_roots"] is None
    assert "TDP PAGES" not in out_of(s, ["vms"], capsys)


# -- 10: help ------------------------------------------------------------------------------


def _listed(text: str) -> list[str]:
    """The command names of a 'help' list (lines '  NAME  description')."""
    return [line.split()[0] for line in text.splitlines()
            if line.startswith("  ") and len(line) > 2 and line[2] != " "]


def test_repl_help_lists_exit_and_vm_all(capsys) -> None:
    """The REPL's 'help' said neither how to leave nor how to clear a selection."""
    s = session(SHADOW)
    s.interactive = True
    text = out_of(s, ["help"], capsys)
    assert re.search(r"^  vm all\s", text, re.M) and re.search(r"^  exit\s.*quit", text, re.M)


def test_vm_help_says_names_work() -> None:
    vm = COMMANDS["vm"]
    assert "name" in vm["description"]
    (arg,) = [a for a in vm["arguments"] if a["args"] == ["id"]]
    assert "name" in arg["kwargs"]["help"] and "'all'" in arg["kwargs"]["help"]


def test_help_and_dash_dash_help_list_commands_in_one_order(capsys) -> None:
    """'help' listed the commands sorted, '--help' in the manifest's order."""
    _, listed, _ = run_main(["help"], capsys)
    _, full, _ = run_main(["--help"], capsys)
    commands = full.split("\ncommands:\n", 1)[1].split("\n\n", 1)[0]
    assert _listed(listed) == _listed(commands) == list(COMMANDS)
    s = session(SHADOW)
    assert _listed(out_of(s, ["help"], capsys)) == list(COMMANDS)  # the REPL's (-e) too


def test_c_help_mentions_crash_directories(capsys) -> None:
    _, full, _ = run_main(["--help"], capsys)
    assert "crash directory" in " ".join(full.split())


def test_help_into_a_closed_pipe_exits_0() -> None:
    """'kvminspect help | true' exited 1 (rich's SystemExit on the broken pipe)."""
    p = subprocess.Popen([sys.executable, "-m", "kvminspect", "help"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # before it writes: it starts slower than this
    err = p.stderr.read()
    assert p.wait() == 0 and err == b""


@pytest.mark.parametrize("argv", [["-c", "/nonexistent", "sp"], ["--sample", "-e", "sp"]])
def test_sp_alone_prints_its_usage(argv: list[str], capsys) -> None:
    """'sp' alone said 'sp needs ADDR or --gfn GFN', after opening the target; walk and
    rmap print their usage, before it."""
    status, out, err = run_main(argv, capsys)
    assert status == 2 and "/nonexistent" not in err
    assert "kvminspect: error: sp: one of the arguments ADDR --gfn is required" in err
    assert "usage: sp [--gfn GFN]" in err + out


# -- 11: error paths ------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["roots"], ["-e", "roots; vms"]])
def test_a_full_disk_is_one_line_once(argv: list[str]) -> None:
    """'> /dev/full' was 'internal error: OSError ...', once per command."""
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "kvminspect", "--sample", *argv], cwd=ROOT,
                           stdout=full, stderr=subprocess.PIPE, text=True, check=False)
    assert (p.returncode, p.stderr) == (
        1, "kvminspect: error: writing output: No space left on device\n")


def test_a_full_disk_in_a_piped_repl_is_said_once(capsys) -> None:
    from kvminspect.repl import run_line

    s = session(SHADOW)
    for line in ("roots > /dev/full", "vms > /dev/full"):
        run_line(s, line)
        if s.output_failed:
            break
    err = capsys.readouterr().err
    assert err == "kvminspect: error: writing output: No space left on device\n"
    assert s.exit_status() == 1


@pytest.fixture
def own_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from kvminspect import cache

    monkeypatch.delenv("KVMINSPECT_CACHE_MAX", raising=False)
    cache.forget_process_state()
    yield
    if (d := cache.fallback_dir()) is not None:
        shutil.rmtree(d, ignore_errors=True)
    cache.forget_process_state()


def test_a_cache_that_cannot_be_made_falls_back(own_cache: None, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys) -> None:
    """KVMINSPECT_CACHE=/proc/nope was fatal (ENOENT): the README promises a warning."""
    import lzma

    from kvminspect import cache

    monkeypatch.setenv("KVMINSPECT_CACHE", "/proc/nope")
    src = tmp_path / "vmcore.xz"
    src.write_bytes(lzma.compress(b"x" * 5000))
    out = cache.decompressed(src)
    assert out.read_bytes() == b"x" * 5000
    fallback = cache.fallback_dir()
    assert fallback is not None and fallback in out.parents
    err = capsys.readouterr().err
    assert err.startswith("kvminspect: warning: cannot write the cache /proc/nope")
    assert err.count("\n") == 1


def test_a_truncated_xz_leaves_no_cache_entry(own_cache: None, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import lzma

    from kvminspect import cache

    monkeypatch.setenv("KVMINSPECT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "vmcore.xz"
    src.write_bytes(lzma.compress(bytes(range(256)) * 400)[:-20])
    with pytest.raises(KvminspectError, match="truncated xz file"):
        cache.decompressed(src)
    assert list((tmp_path / "cache").iterdir()) == []


def test_qemu_at_a_regular_file_is_not_a_socket(tmp_path: Path, capsys) -> None:
    f = tmp_path / "sock"
    f.write_text("")
    status, out, err = run_main(["--qemu", str(f), "vms"], capsys)
    assert status == 1 and out == ""
    assert err.startswith(f"kvminspect: error: {f}: not a socket") and err.count("\n") == 1
    assert "refused" not in err


def test_sp_of_another_vm_names_its_vm(capsys) -> None:
    s = session(TWO)
    vm1 = s.kernel.vms()[1]
    addr = s.graph(vm1).root_order()[0]
    status, out, err = run_main(["-c", str(VMCORES / TWO), "sp", hex(addr), "--vm", "0"], capsys)
    assert status == 1 and out == ""
    assert err == (f"kvminspect: error: {addr:#x} is not a shadow page of this VM: it is "
                   f"VM 1's (pid {vm1.pid}; use --vm 1)\n")


def test_unsync_on_an_unsync_leaf_says_why_nothing(capsys) -> None:
    """'unsync LEAF' said '0 batches, 0 unsync leaves' and nothing else."""
    s = session(SHADOW)
    g = s.graph(s.kernel.vms()[0])
    leaf = next(sp for sp in g.pages() if sp.unsync)
    text = out_of(s, ["unsync", hex(leaf.addr)], capsys)
    assert "0 batches" in text and "this page is itself unsync" in text
    parent = g.parents(leaf.addr)[0][0]
    assert f"its parents: {parent:#x}" in text
    plain = next(sp for sp in g.pages() if not sp.unsync and not sp.unsync_children)
    assert "no unsync_children" in out_of(s, ["unsync", hex(plain.addr)], capsys)


@pytest.mark.parametrize("argv", [["--sample", "-s", "/nonexistent/vmlinux", "vms"],
                                  ["--sample", "vms", "-s", "/nonexistent/vmlinux"]])
def test_a_missing_debug_path_with_the_sample_is_an_error(argv: list[str], capsys) -> None:
    """-s with --sample was silently ignored (the sample brings its own debug set):
    a path that is not there is one line, exit 1, as with -c."""
    from kvminspect.cli import main

    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "kvminspect: error: debug info path not found: /nonexistent/vmlinux"]


# -- 12: an owner the dump lacks is named unreadable -------------------------------------------


def test_an_unreadable_owner_is_named(tmp_path, capsys) -> None:
    """The owner's task not in the dump (its struct pid pointing into unmapped memory,
    as a -d 31 filter leaves it): vcpus' header says so instead of "(None)", a warning
    names the task, and the JSON says "unreadable" with the error listed."""
    import json

    from kvminspect.cli import main
    from tests.corrupt import make

    make("6.12-shadow", "owner-task-unmapped", tmp_path / "core")
    capsys.readouterr()
    assert main(["-c", str(tmp_path / "core"), "vcpus"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].endswith("(owner unreadable)") and "(None)" not in out
    assert "kvminspect: warning: struct task_struct: owner of the VM (pid" in err
    assert main(["-c", str(tmp_path / "core"), "vms", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (vm,) = doc["vms"]
    assert (vm["comm"], vm["task_state"]) == ("unreadable", "unreadable")
    assert [e["object"] for e in doc["errors"]] == ["struct task_struct"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("makedumpfile") is None, reason="no makedumpfile")
def test_a_real_filtered_dump_places_kvm_from_its_kallsyms(tmp_path: Path, capsys) -> None:
    """Debian 12's makedumpfile does not know 6.12 ("The kernel version is not
    supported"): its -d 31 copy of 6.12-shadow drops the slab pages that hold the
    modules' sect_attrs names, so drgn skips kvm.ko ("no kvm module loaded" before).
    kvminspect places kvm and kvm_amd from their own kallsyms, says so, and reads
    what the unfiltered dump says."""
    import json
    import lzma

    from kvminspect.cli import main

    src = VMCORES / "6.12-shadow"
    elf = tmp_path / "vmcore.elf"
    elf.write_bytes(lzma.decompress((src / "vmcore.xz").read_bytes()))
    filtered = tmp_path / "vmcore.kdump"
    subprocess.run(["makedumpfile", "-c", "-d", "31", str(elf), str(filtered)],
                   check=True, capture_output=True, timeout=300)
    debug = []
    for name in ("vmlinux", "kvm.ko", "kvm-amd.ko"):
        (tmp_path / name).write_bytes(lzma.decompress((src / f"{name}.xz").read_bytes()))
        debug += ["-s", str(tmp_path / name)]
    docs = {}
    for core in (elf, filtered):
        for cmd in ("vms", "roots", "tree", "diagnose"):
            capsys.readouterr()
            assert main(["-c", str(core), *debug, cmd, "--json"]) == 0
            out, err = capsys.readouterr()
            docs[core.name, cmd] = json.loads(out)
            if core == filtered and cmd == "vms":
                assert ("kvminspect: warning: kvm's section attributes (struct "
                        "module.sect_attrs) are not in the dump (filtered?)") in err
                assert "kvm_amd's section attributes" in err
    for cmd in ("vms", "roots", "tree", "diagnose"):
        a, b = docs["vmcore.elf", cmd], docs["vmcore.kdump", cmd]
        a.pop("target", None), b.pop("target", None)
        assert a == b, cmd
    (vm,) = docs["vmcore.kdump", "vms"]["vms"]
    assert (vm["vendor"], vm["comm"], vm["n_used_mmu_pages"]) == ("kvm_amd", "vmm", 37)
    # another kernel's kvm.ko: its symbols disagree with memory, nothing is placed
    wrong = tmp_path / "wrong" / "kvm.ko"
    wrong.parent.mkdir()
    wrong.write_bytes(lzma.decompress((VMCORES / "6.1-shadow" / "kvm.ko.xz").read_bytes()))
    capsys.readouterr()
    assert main(["-c", str(filtered), "-s", str(tmp_path / "vmlinux"), "-s", str(wrong),
                 "vms"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "kvminspect: error: kernel 6.12.117+deb12-amd64 has kvm loaded, but its section "
        "attributes are not in the dump (filtered?) and no kvm.ko given with -s matches "
        "its symbols"]


def test_a_damaged_ko_is_not_a_module_file(tmp_path: Path) -> None:
    """modsyms.read_ko on a .ko cut short (or not an ELF .ko at all): None, no
    traceback; the whole file: its name and symbols."""
    import lzma

    from kvminspect.modsyms import read_ko

    data = lzma.decompress((VMCORES / "6.12-shadow" / "kvm.ko.xz").read_bytes())
    ko = tmp_path / "kvm.ko"
    ko.write_bytes(data)
    whole = read_ko(ko)
    assert whole is not None and whole.name == "kvm" and len(whole.symbols) > 5000
    for cut in (0, 18, 64, 4096, len(data) // 2):
        ko.write_bytes(data[:cut])
        assert read_ko(ko) is None, cut


# -- 13: what each debug file is for ----------------------------------------------------------


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{title}\n")
    return text[start:text.index("\n#", start + len(title) + 2)]


def test_the_readme_says_what_each_debug_file_is_for() -> None:
    """The README said kvm-amd.ko's debug info was needed; every command works without it."""
    text = _section("### Debug info")
    assert not re.search(r"needs[^.]*kvm-amd", " ".join(text.split()))
    rows = {row.split("|")[1].strip(): row for row in text.splitlines()
            if row.startswith("| `vmlinux`") or row.startswith("| `kvm")}
    assert list(rows) == ["`vmlinux`", "`kvm.ko`",
                          "`kvm-amd.ko` / `kvm-intel.ko` (the vendor module loaded: `vms` says "
                          "which)"]
    vendor = rows[list(rows)[2]]
    assert "every command works" in vendor
    for lost in ("last exit", "`diagnose`", "RFLAGS", "segment", "`guest-core`"):
        assert lost in vendor, lost


def test_without_the_vendor_file_guest_core_loses_what_the_readme_says(tmp_path: Path,
                                                                        capsys) -> None:
    d = tmp_path / SHADOW
    d.mkdir()
    for f in (VMCORES / SHADOW).iterdir():
        if not f.name.startswith("kvm-amd.ko"):
            (d / f.name).symlink_to(f.resolve())
    status, out, err = run_main(["-c", str(d), "guest-core", str(tmp_path / "g.core")], capsys)
    assert status == 0, err
    assert "kvm-amd.ko" in err and "rflags ?" in out
    assert "rflags es cs ss ds fs gs" in out  # not in the dump: RFLAGS and the segments


# -- 14: export: one layout, and no DOT in an .svg ------------------------------------------


def test_the_dot_file_is_laid_out_as_the_picture(monkeypatch: pytest.MonkeyPatch) -> None:
    """The .dot said rankdir="TB" while 'export g.svg' draws left to right."""
    s = session(SHADOW)
    vm = s.kernel.vms()[0]
    g = export.plain_graph(s.graph(vm))
    g.graph.update(export.graph_info(vm))
    drawn: list[str] = []
    monkeypatch.setattr(export, "render_picture",
                        lambda dot, fmt: drawn.append(dot) or b"<svg/>")
    dot, _ = export.encode(g, vm, "dot")
    assert export.encode(g, vm, "svg") == (b"<svg/>", "")
    assert drawn == [dot.decode()] and 'rankdir="LR"' in drawn[0]


@pytest.mark.parametrize("fmt, file", [("dot", "g.svg"), ("svg", "g.dot"), ("json", "g.png"),
                                       ("graphml", "G.DOT")])
def test_format_and_extension_must_agree(fmt: str, file: str, tmp_path: Path,
                                         capsys) -> None:
    """'export --format dot g.svg' wrote DOT text into g.svg."""
    path = tmp_path / file
    status, out, err = run_main(["-c", str(VMCORES / SHADOW), "export", "--format", fmt,
                                 str(path)], capsys)
    assert (status, out) == (2, "") and err.count("\n") == 1
    assert f"export: --format {fmt} but {path}'s extension says" in err
    assert not path.exists()


@pytest.mark.parametrize("fmt, file", [("dot", "g.gv"), ("dot", "g.txt"), ("json", "-")])
def test_format_with_an_agreeing_or_unknown_extension(fmt: str, file: str,
                                                      tmp_path: Path) -> None:
    assert export.format_of(fmt, file if file == "-" else str(tmp_path / file)) == fmt


# -- 15: install and run ----------------------------------------------------------------------


def test_the_readme_installs_into_a_venv() -> None:
    """'python3 -m pip install .' is refused by Debian's Python (PEP 668)."""
    text = _section("## Install and test")
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block is not None
    installs = [line for line in block[1].splitlines() if "install" in line.split("#")[0]]
    assert installs and not any(line.startswith(("python3 -m pip", "pip ")) for line in installs)
    assert "python3 -m venv" in block[1] and "pipx install ." in block[1]
    assert "PEP 668" in text
    assert "sudo ~/.venvs/kvminspect/bin/kvminspect live" in text


def test_the_readme_says_where_the_history_is(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    from kvminspect.repl import history_path

    text = " ".join(_section("## Install and test").split())
    monkeypatch.delenv("KVMINSPECT_HISTORY", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert history_path() == tmp_path / ".local/state/kvminspect/history"
    assert "`~/.local/state/kvminspect/history`" in text
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert history_path() == tmp_path / "state/kvminspect/history"
    assert "`$XDG_STATE_HOME/kvminspect/history`" in text
    monkeypatch.setenv("KVMINSPECT_HISTORY", str(tmp_path / "h"))
    assert history_path() == tmp_path / "h" and "`$KVMINSPECT_HISTORY`" in text


def test_the_kvm_plugin_example_loads_plain_files() -> None:
    """The %kvm example gave drgn vmlinux, kvm.ko, kvm-amd.ko: the sample ships .xz."""
    text = _section("### drgn")
    (line,) = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("drgn -c")]
    words = line.split()[1:]
    files = [w for w in words if not w.startswith("-")]
    helpers = _section("## drgn helpers")
    assert 'xz -dc "$f" > "/tmp/sample/$(basename "$f" .xz)"' in helpers
    shipped = {p.name.removesuffix(".xz") for p in (VMCORES / SHADOW).glob("*.xz")}
    assert {Path(f).parent for f in files} == {Path("/tmp/sample")}
    assert {Path(f).name for f in files} <= shipped and not any(f.endswith(".xz") for f in files)


# -- 16: shell completion ------------------------------------------------------------------


def bash_complete(script: Path, cwd: Path, *words: str) -> list[str]:
    code = (f'source {script}; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _kvminspect; '
            'printf "%s\\n" "${COMPREPLY[@]}"')
    r = subprocess.run(["bash", "-c", code, "_", "kvminspect", *words], capture_output=True,
                       text=True, timeout=30, check=True, cwd=cwd)
    return [w for w in r.stdout.splitlines() if w]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_does_not_offer_what_was_given(tmp_path: Path, capsys) -> None:
    """--sample was offered again after --sample."""
    script = tmp_path / "kvminspect.bash"
    assert cli.main(["--completion", "bash"]) == 0
    script.write_text(capsys.readouterr().out)
    assert bash_complete(script, tmp_path, "--sa") == ["--sample"]
    assert bash_complete(script, tmp_path, "--sample", "--sa") == []
    assert bash_complete(script, tmp_path, "-c", "X", "--") == [
        o for o in bash_complete(script, tmp_path, "--") if o not in ("--core", "--live",
                                                                       "--qemu", "--sample")]
    opts = bash_complete(script, tmp_path, "--sample", "walk", "--vcpu", "1", "--")
    assert "--vm" in opts and "--json" in opts
    assert not {"--vcpu", "--root", "--sample", "--core", "--version"} & set(opts)
    opts = bash_complete(script, tmp_path, "--sample", "roots", "--json", "--")
    assert "--json" not in opts and "--drgn" in opts
    assert "--symbols" in bash_complete(script, tmp_path, "-s", "A", "--sym")  # repeatable


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_walk_vcpu_offers_nothing_but_does_not_break(tmp_path: Path, capsys) -> None:
    """After --vcpu a vCPU index goes, which only the target knows: bash offers nothing
    (not the file names of the directory), zsh says what goes there; the line goes on."""
    script = tmp_path / "kvminspect.bash"
    assert cli.main(["--completion", "bash"]) == 0
    script.write_text(capsys.readouterr().out)
    (tmp_path / "vmcore").write_text("")
    assert bash_complete(script, tmp_path, "--sample", "walk", "--vcpu", "") == []
    assert bash_complete(script, tmp_path, "--sample", "walk", "--vcpu", "1", "") == []
    assert bash_complete(script, tmp_path, "--sample", "tree", "--depth", "") == []
    assert bash_complete(script, tmp_path, "--sample", "walk", "--vcpu", "1", "--j") == [
        "--json"]
    assert cli.main(["--completion", "zsh"]) == 0
    zsh = capsys.readouterr().out
    assert ("    walk:--vcpu) _message 'N: walk from vCPU N'\\''s current root (its index, "
            "decimal; default 0)'; return ;;") in zsh
    assert "    --vm) _message 'ID: " in zsh
    assert 'for o in $opts; do [[ "$drop" == *" $o "* ]] || keep+=($o); done' in zsh


def test_repl_completion_offers_no_ambiguous_pid_and_files_to_write(tmp_path: Path) -> None:
    """pid:98 owns two VMs on 6.1-shadow-2vm: offering it would offer an error;
    guest-core OUT and export FILE are paths."""
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from kvminspect.repl import ReplCompleter

    def complete(session: Session, text: str) -> list[str]:
        return [c.text for c in ReplCompleter(session).get_completions(
            Document(text), CompleteEvent(completion_requested=True))]

    two = Session(open_fixture("6.1-shadow-2vm"))
    pids = {vm.pid for vm in two.kernel.vms()}
    assert len(pids) == 1 and len(two.kernel.vms()) == 2
    assert complete(two, "roots --vm ") == ["0", "1"]
    (tmp_path / "guest.core").write_text("")
    one = Session(open_fixture("6.1-shadow"))
    assert complete(one, f"guest-core {tmp_path}/gu") == ["est.core"]
    assert complete(one, f"export {tmp_path}/gu") == ["est.core"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_offers_files_after_guest_core(tmp_path: Path, capsys) -> None:
    script = tmp_path / "kvminspect.bash"
    assert cli.main(["--completion", "bash"]) == 0
    script.write_text(capsys.readouterr().out)
    (tmp_path / "guest.core").write_text("")
    assert bash_complete(script, tmp_path, "--sample", "guest-core", "gu") == ["guest.core"]


# -- 17: unsync in the systemtap script's words ------------------------------------------


def test_unsync_shows_the_vector_position_and_the_slot(capsys) -> None:
    """SP Index was the slot in the parent; the systemtap script's SP Index is the position
    in the kvm_mmu_pages vector, and it prints each leaf as 'Current sp : [3]ffff...'."""
    s = session(SHADOW)
    text = out_of(s, ["unsync"], capsys)
    root = doc_of(s, ["unsync"], capsys)["vms"][0]["roots"][0]
    batch = root["batches"][0]
    lines = text.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("batch 1: ")))
    assert lines[at + 1].split() == "SP Index SP Level Slot in Parent SP".split()
    rows = [line.split() for line in lines[at + 2:at + 2 + len(batch["pages"])]]
    assert rows == [[str(i), str(e["level"]), str(e["idx"]), e["sp"]]
                    for i, e in enumerate(batch["pages"])]
    assert rows[0][2] == "-1" and [r[0] for r in rows[:4]] == ["0", "1", "2", "3"]
    sps = [e["sp"] for e in batch["pages"]]
    leaf_lines = [line for line in lines if line.startswith("  sync sp [")]
    first = batch["leaves"][0]
    assert leaf_lines[0].startswith(f"  sync sp [3] {first['sp']} gfn {first['gfn']}  parents:")
    for line, leaf in zip(leaf_lines, batch["leaves"], strict=False):
        pos = int(line.split()[2].strip("[]"))
        assert sps[pos] == leaf["sp"] and batch["pages"][pos]["level"] == 1


def test_a_leaf_knows_its_vector_position() -> None:
    from kvminspect.commands.unsync import walk_pages

    s = session(SHADOW)
    vm = s.kernel.vms()[0]
    g = s.graph(vm)
    root = next(a for a in g.root_order() if g.sp(a).unsync_children)
    for b in replay_sync(root, walk_pages(s.kernel, g)).batches:
        for leaf in b.leaves:
            assert b.pages[leaf.pos].sp == leaf.sp and b.pages[leaf.pos].level == 1


# -- 6: diff on one boot, dumped before and after a zap ---------------------------------

PAIR = VMCORES / "6.1-shadow-pair"  # mkfixture --pair: PAIR/before, PAIR/after


def test_diff_of_the_pair_shows_what_the_zap_did(capsys) -> None:
    """No same-boot pair shipped, so diff on the fixtures only said removed and added."""
    status, out, err = run_main(["diff", str(PAIR / "before"), str(PAIR / "after"), "--json"],
                                capsys)
    assert status == 0 and err == ""
    (vm,) = json.loads(out)["vms"]
    t = truth("6.1-shadow-pair/before")
    assert vm["status"] == "changed" and vm["matched_by"] == "kvm" and vm["pid"] == t["vmm_pid"]
    assert vm["counters"]["mmu_valid_gen"] == {"old": 0, "new": 1}
    assert {p["gfn"] for p in vm["pages_zapped"] if p["unsync"]} == \
        {g for s in t["sets"] for g in s["unsync_gfns"]}
    assert all(p["changes"]["invalid"] == {"old": False, "new": True}
               for p in vm["pages_changed"])


@pytest.mark.parametrize("ident", ["0", "pid:{pid}", "kvm-{pid}"])
def test_diff_vm_selects_in_both_dumps(ident: str, capsys) -> None:
    """--vm took A's ID only; a pid or name now names the VM in each dump."""
    ident = ident.format(pid=truth("6.1-shadow-pair/before")["vmm_pid"])
    status, out, err = run_main(["diff", str(PAIR / "before"), str(PAIR / "after"),
                                 "--vm", ident], capsys)
    assert status == 0 and err == "" and "changed (matched by kvm)" in out.splitlines()[0]
    # another boot has no such VM: one line, exit 1, naming the dump
    status, out, err = run_main(["diff", str(VMCORES / SHADOW), str(PAIR / "after"),
                                 "--vm", ident], capsys)
    assert status == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("kvminspect: error: A (6.1-shadow): " if ident != "0" else
                          "kvminspect: error: B (after): no VM has A's VM 0's")


def test_diff_across_kernels_is_one_line_exit_1(capsys) -> None:
    """It was a usage error (exit 2): the command line was right, the dumps were not."""
    other = str(VMCORES / "6.12-shadow")
    status, out, err = run_main(["diff", str(VMCORES / SHADOW), other], capsys)
    assert (status, out) == (1, "")
    assert err == (f"kvminspect: error: {other}: kernel 6.12.117+deb12-amd64, but A's is "
                   "6.1.0-56-amd64: diff compares two vmcores of one kernel\n")
