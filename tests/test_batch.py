"""diagnose --jsonl CORE... [-j N]: many vmcores, one JSON line each (kvminspect.batch).

The scheduler (order, at most N workers alive, dead workers, stderr, exit
status) is tested with a stand-in worker that starts in milliseconds; the
slow tests run the real command over every fixture, at -j 1 and -j 2.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvminspect import batch, cache
from kvminspect.batch import Request
from tests.conftest import ALL, VMCORES, run_main, truth

ROOT = Path(__file__).resolve().parent.parent
CLEAN = [n for n in ALL if not truth(n).get("special")]  # every fixture with a VM
HEAD = ("core", "kernel_release", "elapsed")  # the fields a line adds to diagnose --json's


def batch_cli(argv: list[str]) -> tuple[int, list[dict], str]:
    """python -m kvminspect ARGV, as a user runs it: (status, the lines parsed, stderr)."""
    r = subprocess.run([sys.executable, "-m", "kvminspect", *argv], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    lines = r.stdout.splitlines()
    assert r.stdout.endswith("\n") and all(line.startswith("{") for line in lines), r.stdout
    return r.returncode, [json.loads(line) for line in lines], r.stderr


def without(line: dict, *keys: str) -> dict:
    return {k: v for k, v in line.items() if k not in keys}


def one_shot_error(argv: list[str], capsys) -> str:
    """The one-line message `kvminspect ARGV` fails with."""
    status, out, err = run_main(argv, capsys)
    assert status == 1 and out == "" and err.count("\n") == 1, err
    return err.removeprefix("kvminspect: error: ").rstrip("\n")


# -- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize("argv, needle", [
    (["diagnose", "--jsonl"], "diagnose --jsonl needs at least one vmcore; usage: "
     "kvminspect diagnose --jsonl CORE..."),
    (["diagnose", "--jsonl", "--json", "--fail-on", "warning"], "needs at least one vmcore"),
    (["diagnose", "A", "B"], "CORE arguments need --jsonl"),
    (["diagnose", "-j", "2"], "-j needs --jsonl"),
    (["diagnose", "--jsonl", "-j", "0", "A"], "-j takes 1 or more workers, not 0"),
    (["diagnose", "--jsonl", "-j", "x", "A"], "not a number: 'x' (decimal, 0x accepted)"),
    (["diagnose", "--jsonl", "--bogus", "A"], "unrecognized arguments: --bogus"),
    (["-c", "A", "diagnose", "--jsonl", "B"], "takes its vmcores as arguments, not -c A"),
    (["diagnose", "--jsonl", "B", "--sample"], "not --sample"),
])
def test_usage_errors_are_one_line(argv: list[str], needle: str, capsys) -> None:
    status, out, err = run_main(argv, capsys)
    assert (status, out) == (2, "")
    assert err.startswith("kvminspect: error: ") and err.count("\n") == 1, err
    assert needle in err


def test_in_a_session_it_is_a_usage_error(capsys) -> None:
    """-e, the REPL, -c CORE: one target; the batch is the command line's."""
    status, out, err = run_main(["-c", str(VMCORES / "6.1-shadow"), "-e", "diagnose --jsonl A"],
                                capsys)
    assert (status, out) == (2, "")
    assert "--jsonl, -j and CORE are for the command line" in err and err.count("\n") == 1


def test_help_says_it(capsys) -> None:
    status, out, _ = run_main(["--help"], capsys)
    assert status == 0
    usage, text = " ".join(out.split("\n\n")[0].split()), " ".join(out.split())
    assert "usage: kvminspect [-c CORE" in usage and "kvminspect diagnose --jsonl CORE..." in usage
    assert "'kvminspect diagnose --jsonl CORE... [-j N]' diagnoses many vmcores" in text
    status, out, _ = run_main(["help", "diagnose"], capsys)
    assert status == 0
    text = " ".join(out.split())
    assert "[--jsonl] [-j N]" in text and "[CORE ...]" in text
    assert "kvminspect diagnose --jsonl CORE... [-j N] prints one line per core" in text


def test_the_parent_imports_nothing_heavy(tmp_path: Path) -> None:
    """The process that runs the batch imports neither drgn's helpers, the model nor
    networkx: its memory stays small whatever the cores (the workers read them)."""
    from tests.test_registry import HEAVY, PROBE

    r = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{PROBE}", "diagnose",
                        "--jsonl", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [1, []]


# -- the scheduler, with a stand-in worker ----------------------------------------------------

# argv[2] is the request; the core's name says what to do: "sleep:S", "kill",
# "fail" (a one-line error on stderr, no line), "partial" (half a line),
# "findings" (exit 3), "chatty" (a note on stderr), anything else: a line
FAKE = """
import json, os, signal, sys, time
r = json.loads(sys.argv[2])
kind, _, arg = r["core"].partition(":")
t0 = time.time()
if kind == "sleep":
    time.sleep(float(arg))
if kind == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if kind == "fail":
    print("kvminspect: error: boom", file=sys.stderr)
    sys.exit(2)
if kind == "partial":
    sys.stdout.write('{"core": ')
    sys.exit(0)
if kind == "chatty":
    print("a note from " + r["core"], file=sys.stderr)
print(json.dumps({"core": r["core"], "pid": os.getpid(), "t0": t0, "t1": time.time(),
                  "request": r}))
sys.exit(3 if kind == "findings" else 0)
"""


def fake_run(monkeypatch, cores: list[str], jobs: int = 1, **kw) -> tuple[int, list[dict], str]:
    monkeypatch.setattr(batch, "WORKER", FAKE)
    out, err = io.StringIO(), io.StringIO()
    status = batch.run(Request(tuple(cores), jobs, **kw), out, err)
    return status, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_lines_in_order_at_most_n_alive(jobs: int, monkeypatch) -> None:
    """The first cores are the slowest: lines still come in the order given, each
    worker a process of its own, and never more than N alive at once."""
    cores = [f"sleep:{s}" for s in (0.6, 0.4, 0.2, 0, 0, 0.3, 0)]
    status, lines, err = fake_run(monkeypatch, cores, jobs)
    assert (status, err) == (0, "")
    assert [x["core"] for x in lines] == cores
    assert len({x["pid"] for x in lines}) == len(cores)
    events = sorted([(x["t0"], 1) for x in lines] + [(x["t1"], -1) for x in lines])
    alive = peak = 0
    for _, step in events:
        alive += step
        peak = max(peak, alive)
    assert peak <= jobs
    if jobs > 1:
        assert peak > 1  # they did run side by side


def test_options_reach_every_worker(monkeypatch) -> None:
    status, lines, _ = fake_run(monkeypatch, ["a", "-b"], 2, symbols=("/d/vmlinux", "x y"),
                                vm="pid:5", fail_on="warning")
    assert status == 0
    assert [x["request"] for x in lines] == [
        {"core": c, "symbols": ["/d/vmlinux", "x y"], "vm": "pid:5", "fail_on": "warning"}
        for c in ("a", "-b")]


def test_a_dead_worker_is_an_error_line_and_the_others_go_on(monkeypatch) -> None:
    status, lines, err = fake_run(monkeypatch, ["a", "kill", "fail", "partial", "b"], 2)
    assert status == 1
    assert [x["core"] for x in lines] == ["a", "kill", "fail", "partial", "b"]
    assert "error" not in lines[0] and "error" not in lines[4]
    assert lines[1]["error"] == "kill: its worker was killed by SIGKILL (out of memory?)"
    assert lines[2]["error"] == "fail: its worker exited with status 2: boom"
    assert lines[3]["error"] == "partial: its worker exited with status 0: its line was cut short"
    assert all(set(x) == {"core", "error", "elapsed"} for x in lines[1:4])
    assert err == "kvminspect: error: boom\n"  # its stderr, after its line


def test_stderr_follows_the_order_of_the_lines(monkeypatch) -> None:
    status, _, err = fake_run(monkeypatch, ["chatty:1", "sleep:0.3", "chatty:2", "chatty:3"], 3)
    assert status == 0
    assert err == "a note from chatty:1\na note from chatty:2\na note from chatty:3\n"


@pytest.mark.parametrize("cores, status", [
    (["a", "b"], 0),
    (["a", "findings"], 3),
    (["findings", "fail", "a"], 1),  # a core not diagnosed comes first
    (["kill"], 1),
])
def test_exit_status(cores: list[str], status: int, monkeypatch) -> None:
    assert fake_run(monkeypatch, cores, 2)[0] == status


def test_a_worker_that_cannot_start(monkeypatch) -> None:
    monkeypatch.setattr(batch.sys, "executable", "/nonexistent/python")
    status, lines, _ = fake_run(monkeypatch, ["a", "b"], 2)
    assert status == 1
    assert [x["core"] for x in lines] == ["a", "b"]
    assert lines[0]["error"].startswith("a: cannot start a worker process (")


# -- the real command over the fixtures -------------------------------------------------------


@pytest.fixture(scope="module")
def every_fixture() -> tuple[int, list[dict], str]:
    return batch_cli(["diagnose", "--jsonl", *(str(VMCORES / n) for n in ALL)])


@pytest.mark.slow
def test_one_line_per_fixture(every_fixture) -> None:
    status, lines, err = every_fixture
    assert status == 1, err  # 6.1-no-kvm could not be diagnosed
    assert [x["core"] for x in lines] == [str(VMCORES / n) for n in ALL]
    for name, line in zip(ALL, lines, strict=True):
        t = truth(name)
        assert isinstance(line["elapsed"], float) and line["elapsed"] >= 0
        if t.get("special") == "no-kvm":
            assert line == {"core": str(VMCORES / name),
                            "error": f"kernel {t['kernel_release']} has no kvm module loaded",
                            "elapsed": line["elapsed"]}
            continue
        assert list(line)[:5] == [*HEAD, "schema_version", "command"], name
        assert line["kernel_release"] == t["kernel_release"]
        assert line["command"] == "diagnose" and line["errors"] == [], name
        if t.get("special") == "no-vm":
            assert line["vms"] == []
        else:
            assert len(line["vms"]) == len(t.get("vms", [None])), name
            assert {v["verdict"] for v in line["vms"]} == {"healthy"}, name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["6.1-shadow", "6.1-shadow-2vm", "7.3-tdp"])
def test_a_line_is_the_diagnose_json_document(name: str, every_fixture, capsys) -> None:
    """Without its three fields, a line is what kvminspect -c CORE diagnose --json prints."""
    status, out, _ = run_main(["-c", str(VMCORES / name), "diagnose", "--json"], capsys)
    line = every_fixture[1][ALL.index(name)]
    assert without(line, *HEAD) == json.loads(out)


@pytest.mark.slow
def test_two_workers_give_the_same_lines(every_fixture) -> None:
    """-j 2, the cores in reverse order: the same lines (but elapsed), in the order given."""
    status, lines, _ = batch_cli(["diagnose", "--jsonl", "-j", "2",
                                  *(str(VMCORES / n) for n in reversed(ALL))])
    assert status == every_fixture[0]
    assert [without(x, "elapsed") for x in lines] == \
        [without(x, "elapsed") for x in reversed(every_fixture[1])]


@pytest.mark.slow
def test_missing_and_truncated_cores(tmp_path: Path, capsys) -> None:
    """Error lines say what -c says; a plain vmcore with -s is diagnosed between them."""
    plain = cache.decompressed(VMCORES / "6.1-shadow" / "vmcore.xz")
    cut = tmp_path / "cut"  # a crash directory whose vmcore was cut at 20 MiB
    cut.mkdir()
    with open(plain, "rb") as f:
        (cut / "vmcore").write_bytes(f.read(20 << 20))
    debug = sorted((VMCORES / "6.1-shadow").glob("*.ko.xz")) + [
        VMCORES / "6.1-shadow" / "vmlinux.xz"]
    for d in debug:
        (cut / d.name).symlink_to(d)
    half = tmp_path / "vmcore.xz"  # a compressed vmcore cut in half
    src = (VMCORES / "6.1-shadow" / "vmcore.xz").read_bytes()
    half.write_bytes(src[: len(src) // 2])
    missing = tmp_path / "missing"
    cores = [str(missing), str(cut), str(plain), str(half)]
    symbols = [a for d in debug for a in ("-s", str(d))]
    status, out, err = run_main(["diagnose", "--jsonl", "-j", "2", *symbols, *cores], capsys)
    assert status == 1, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["core"] for x in lines] == cores
    for core, line in zip(cores, lines, strict=True):
        if core == str(plain):
            assert line["vms"][0]["verdict"] == "healthy"
            continue
        assert set(line) == {"core", "error", "elapsed"}
        assert line["error"] == one_shot_error([*symbols, "-c", core, "diagnose"], capsys)
    assert lines[0]["error"] == f"{missing}: no such file or directory"
    assert "truncated vmcore: 20971520 bytes, its headers need" in lines[1]["error"]
    assert "truncated xz file" in lines[3]["error"]


@pytest.mark.slow
def test_exit_status_of_findings(damaged, tmp_path: Path, capsys) -> None:
    """3 for an error finding (with --fail-on warning, a warning too); 1 when a core
    could not be diagnosed comes first."""
    corrupt = str(damaged("6.1-shadow", "private-mismatch"))
    degraded = str(damaged("6.1-shadow-zapped", "reload-request-cleared"))
    status, out, _ = run_main(["diagnose", "--jsonl", "-j", "2", degraded, corrupt], capsys)
    assert status == 3
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["vms"][0]["verdict"] for x in lines] == ["degraded", "corrupt"]
    assert run_main(["diagnose", "--jsonl", degraded], capsys)[0] == 0
    assert run_main(["diagnose", "--jsonl", degraded, "--fail-on", "warning"], capsys)[0] == 3
    status, out, _ = run_main(["diagnose", "--jsonl", corrupt, str(tmp_path / "gone")], capsys)
    assert status == 1 and len(out.splitlines()) == 2


def test_fixture_list_has_the_edges() -> None:
    """The slow tests rely on a fixture without kvm and one without VMs."""
    assert {"no-kvm", "no-vm"} <= {truth(n).get("special") for n in ALL}
    assert CLEAN

