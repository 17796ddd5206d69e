"""diagnose --jsonl: many vmcores at once, one JSON line per core, in the order given.

    kvminspect diagnose --jsonl CORE... [-j N] [-s PATH]... [--vm ID] [--fail-on warning]

Each CORE (what -c takes: a vmcore, maybe compressed, or a crash directory)
is diagnosed by its own worker process, a fresh Python interpreter that
opens the core, runs ``diagnose --json`` on it, writes one line and exits:
libkdumpfile is not safe across threads, and a worker's memory (the drgn
program, its caches, the graph) goes back to the system when it exits. At
most N workers are alive at once (-j N, default 1). Each worker writes its
line and its stderr into temporary files, and this process copies them to
stdout and stderr in the order of the cores as soon as every earlier core is
done: it holds no line in memory, imports neither drgn nor the model, and a
slow core delays only the printing of the lines after it.

A line is diagnose --json's document, compact, after three fields of its own:

    {"core": PATH, "kernel_release": "6.1.0-56-amd64", "elapsed": 0.52,
     "schema_version": 2, "command": "diagnose", "vms": [...], "errors": [...],
     "warnings": [...]}

PATH as given; elapsed in seconds, opening (decompressing) the core included.
A core that cannot be diagnosed (missing, truncated, not a vmcore, no kvm,
no matching debug info, no such --vm, or a worker that died) is
{"core": PATH, "error": "<the one-line message kvminspect -c PATH diagnose
gives>", "elapsed": ...}; the others go on.

The exit status (README: Scripts): 1 if any core could not be diagnosed
(an error line, or a core whose VM list could not be read), else 3 if a
core's diagnosis has an error finding (with --fail-on warning, a warning
too), else 0: a failure first, as a script's first failure comes before
check's 3; the lines say which core is which.
"""

from __future__ import annotations

import codecs
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO

from kvminspect.errors import KvminspectError, UsageError
from kvminspect.options import BATCH_USAGE

FAILED = 1  # a core could not be diagnosed
FINDINGS = 3  # a core's diagnosis has error findings (or warnings, --fail-on warning)
STATUSES = (0, FAILED, FINDINGS)  # what a worker may exit with
CHUNK = 1 << 20

# A worker: a fresh interpreter that imports the kvminspect this process runs
# (argv[1], its parent directory, put where -c puts the current directory),
# then diagnoses the core its request (argv[2]) names.
WORKER = ("import sys; sys.path[0:1] = [] if sys.argv[1] in sys.path else [sys.argv[1]]; "
          "from kvminspect.batch import worker_main; sys.exit(worker_main(sys.argv[2]))")


@dataclass(frozen=True)
class Request:
    """What a batch does: the cores in order, how many at once, and each core's options."""

    cores: tuple[str, ...]
    jobs: int = 1
    symbols: tuple[str, ...] = ()
    vm: str | None = None
    fail_on: str = "error"


def request(words: list[str], symbols: list[str]) -> Request | None:
    """diagnose's words (after its name) as a batch, or None when they ask for
    none (no --jsonl, CORE or -j: the one-target diagnose). Options and cores may
    come in any order; a UsageError (one line, exit 2) when they make no batch."""
    from kvminspect import registry

    entry = registry.entry("diagnose")
    if entry is None:
        raise KvminspectError("no diagnose command (kvminspect's manifest is stale)")
    ns = registry.build_parser(entry.spec).parse_intermixed_args(words)
    cores, jobs = list(ns.cores or []), ns.jobs
    if not (ns.jsonl or cores or jobs is not None):
        return None
    if not ns.jsonl:
        what = "CORE arguments need" if cores else "-j needs"
        raise UsageError(f"diagnose: {what} --jsonl (one JSON line per core); usage: "
                         f"{BATCH_USAGE}")
    if not cores:
        raise UsageError(f"diagnose --jsonl needs at least one vmcore; usage: {BATCH_USAGE}")
    if jobs is not None and jobs < 1:
        raise UsageError(f"diagnose: -j takes 1 or more workers, not {jobs}")
    return Request(tuple(cores), jobs or 1, tuple(symbols), ns.vm, ns.fail_on)


# -- this process: start the workers, print their lines in order ---------------------------


def _compact(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"))


def error_line(core: str, message: str, elapsed: float) -> str:
    """The line of a core that could not be diagnosed."""
    return _compact({"core": core, "error": message, "elapsed": round(elapsed, 3)})


@dataclass
class _Worker:
    index: int
    core: str
    start: float
    out: IO[bytes]  # its stdout: the line
    err: IO[bytes]  # its stderr, copied after its line
    proc: subprocess.Popen[bytes] | None = None
    spawn_error: str | None = None
    end: float | None = None  # when it exited


def _package_parent() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _spawn(index: int, core: str, req: Request) -> _Worker:
    spec = json.dumps({"core": core, "symbols": list(req.symbols), "vm": req.vm,
                       "fail_on": req.fail_on})
    w = _Worker(index, core, time.monotonic(), tempfile.TemporaryFile(),
                tempfile.TemporaryFile())
    try:
        w.proc = subprocess.Popen([sys.executable, "-c", WORKER, _package_parent(), spec],
                                  stdin=subprocess.DEVNULL, stdout=w.out, stderr=w.err)
    except OSError as e:
        w.spawn_error = f"{core}: cannot start a worker process ({e.strerror or e})"
    return w


def _wait(w: _Worker, done: queue.Queue[int]) -> None:
    if w.proc is not None:
        w.proc.wait()
    w.end = time.monotonic()
    done.put(w.index)


def _copy(src: IO[bytes], dst: TextIO) -> None:
    """A worker's output file, as text, a MiB at a time."""
    src.seek(0)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := src.read(CHUNK):
        dst.write(decoder.decode(chunk))
    dst.write(decoder.decode(b"", final=True))


def _why(w: _Worker, code: int, partial: bool) -> str:
    """Why a worker gave no whole line: its signal, else its last line on stderr."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"{w.core}: its worker was killed by {name}{hint}"
    w.err.seek(0)
    last = [ln for ln in w.err.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    text = (last[-1].removeprefix("kvminspect: error: ") if last
            else "its line was cut short" if partial else "no line")
    return f"{w.core}: its worker exited with status {code}: {text}"


def _finish(w: _Worker, out: TextIO, err: TextIO) -> int:
    """Print worker *w*'s line (or an error line for it) and its stderr; its status."""
    try:
        code = w.proc.returncode if w.proc is not None else FAILED
        w.out.seek(0, os.SEEK_END)
        size = w.out.tell()
        whole = False
        if size:
            w.out.seek(size - 1)
            whole = w.out.read(1) == b"\n"
        if w.proc is not None and code in STATUSES and whole:
            _copy(w.out, out)
            status = code
        else:
            message = w.spawn_error or _why(w, code, size > 0)
            out.write(error_line(w.core, message, (w.end or time.monotonic()) - w.start) + "\n")
            status = FAILED
        out.flush()
        if w.err.seek(0, os.SEEK_END):  # the worker wrote to stderr
            _copy(w.err, err)
            err.flush()
        return status
    finally:
        w.out.close()
        w.err.close()


def run(req: Request, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Diagnose every core of *req*, at most req.jobs at once, each in its own
    process; print their lines in order; the batch's exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    done: queue.Queue[int] = queue.Queue()
    todo = deque(enumerate(req.cores))
    running: dict[int, _Worker] = {}
    finished: dict[int, _Worker] = {}
    statuses: list[int] = []
    try:
        while len(statuses) < len(req.cores):
            while todo and len(running) < req.jobs:
                i, core = todo.popleft()
                running[i] = _spawn(i, core, req)
                threading.Thread(target=_wait, args=(running[i], done), daemon=True).start()
            i = done.get()
            finished[i] = running.pop(i)
            while len(statuses) in finished:
                statuses.append(_finish(finished.pop(len(statuses)), out, err))
    finally:  # Ctrl-C, a closed stdout: no worker outlives the batch
        for w in running.values():
            if w.proc is not None and w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
        for w in [*running.values(), *finished.values()]:
            w.out.close()
            w.err.close()
    if FAILED in statuses:
        return FAILED
    return FINDINGS if FINDINGS in statuses else 0


# -- a worker: one core, one line --------------------------------------------------------


def diagnose_core(core: str, symbols: list[str], vm: str | None = None,
                  fail_on: str = "error") -> tuple[dict[str, Any], int]:
    """The line of one core (as a dict) and its status (0, FAILED, FINDINGS):
    ``kvminspect -c CORE diagnose --json`` with three fields in front, or an
    error line. Opens the core in this process: a worker's job."""
    import contextlib
    import io

    from kvminspect.commands import run_command
    from kvminspect.errors import describe
    from kvminspect.session import Session
    from kvminspect.target import open_core

    start = time.monotonic()
    try:
        target = open_core(core, symbols)
        session = Session(target)
        words = ["diagnose", "--json", "--fail-on", fail_on] + (["--vm", vm] if vm else [])
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            run_command(session, words)
        doc = json.loads(text.getvalue())
        status = session.exit_status()
        k = target.kernel_if_opened
        if k is not None and k.vms_if_read() == [] and k.problems:
            status = FAILED  # the VM list itself could not be read (as the one-shot says)
        head = {"core": core, "kernel_release": target.release,
                "elapsed": round(time.monotonic() - start, 3)}
        return {**head, **doc}, (status if status in STATUSES else FAILED)
    except Exception as e:  # one line, as kvminspect -c CORE diagnose says it
        kind, message, _ = describe(e, "see kvminspect --help")
        if kind != "error":
            if os.environ.get("KVMINSPECT_DEBUG"):
                import traceback

                traceback.print_exc()
            message = f"internal error: {message} (KVMINSPECT_DEBUG=1 shows the traceback)"
        return {"core": core, "error": message,
                "elapsed": round(time.monotonic() - start, 3)}, FAILED


def worker_main(spec: str) -> int:
    """A worker process: diagnose the core *spec* (JSON: core, symbols, vm,
    fail_on) names, write its line on stdout, exit with its status."""
    r = json.loads(spec)
    line, status = diagnose_core(r["core"], r["symbols"], r["vm"], r["fail_on"])
    sys.stdout.write(_compact(line) + "\n")
    sys.stdout.flush()
    return status


__all__ = ["Request", "diagnose_core", "error_line", "request", "run",
           "worker_main"]
