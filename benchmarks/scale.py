"""Scale benchmark: kvminspect on large real vmcores, against a naive drgn walk.

    python -m benchmarks.scale                     # generate what is missing, measure, print
    python -m benchmarks.scale --write-readme      # the same, then the table into README.md
    python -m benchmarks.scale --sizes shadow-20k,tdp-100k --runs 5
    python -m benchmarks.scale --generate-only
    python -m benchmarks.scale --from-results --write-readme   # the last run's table again

The cores are made on demand by the fixture pipeline (tests/vmcores/pipeline/
mkfixture.py --big-shadow N / --big-tdp N: a Debian 6.1 host under QEMU TCG
whose VMM runs a guest with N distinct level-1 page tables, or N touched 2 MiB
regions under the TDP MMU; --vmms N: N VMM processes, each the fixtures' usual
guest with 2 vCPUs) into a cache outside the repository:
$KVMINSPECT_BENCH_DIR, else ~/.cache/kvminspect-bench/, one directory per
core (vmcore: the filtered ELF, uncompressed; truth.json; the 6.1 debug set,
copied from tests/vmcores/6.1-shadow; gen.json: how long generation took). A
core already there is not made again; one whose making needs more free disk
than there is (Spec.disk_need: the host's raw dump and the filtered core) is
skipped, with a message.

For each core, in one run (after reading the whole core once, so that the page
cache holds it, and one warm-up ``vms``: the debug files
decompressed into kvminspect's cache, the core in the page cache):
  * in-process (a child process per core, so that its peak RSS is the core's):
    open time (kvminspect.target.open_core), model + graph time (Session.graph
    of every VM of session.kernel.vms()), peak RSS after that, then each
    command's REPL latency: the command run through kvminspect.repl.run_line
    (how the REPL dispatches a line) once, then timed a second time; then the
    naive walk (see naive_walk) on a fresh Program, and its ratio to the model;
  * whole process: ``python -m kvminspect -c CORE CMD --json`` for each command
    (the median wall time of --runs runs after one warm-up, and the peak RSS
    of the child from wait4()), and per shadow page the memory above the
    ``vms`` floor: (peak RSS of CMD - peak RSS of vms) / pages;
  * the truth: the pages ``diagnose --json`` audits, the naive walk's pages
    and the count the pipeline read from the dump (truth.json "in_dump"), or
    for --vmms cores the VMs' pids against the VMMs' records (check_truth).

"pages" is what the naive walk reaches from the roots (every page for these
cores: they have no orphans). Nothing here asserts a speed: it reports.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
README = Path(__file__).resolve().parent / "README.md"
MKFIXTURE = ROOT / "tests" / "vmcores" / "pipeline" / "mkfixture.py"
DEBUG_FROM = ROOT / "tests" / "vmcores" / "6.1-shadow"  # the 6.1 fixtures' one debug set
DEBUG_FILES = ("vmlinux.xz", "kvm.ko.xz", "kvm-amd.ko.xz")
FIXTURE_WORK = Path("/var/tmp/kvminspect-fixtures")  # mkfixture's default --work
COMMANDS = ("vms", "vcpus", "roots", "tree", "unsync", "check", "stats", "diagnose")
BEGIN = "<!-- scale:begin (python -m benchmarks.scale --write-readme) -->"
END = "<!-- scale:end -->"


@dataclass(frozen=True)
class Spec:
    """One benchmark core: its name in the cache and how mkfixture makes it."""

    name: str
    kind: str  # "shadow", "tdp" (one big VM) or "vms" (n VMM processes)
    n: int  # level-1 pages the guest makes, or VMMs
    mem: int = 0  # MiB for the emulated host, when not host_mem's estimate

    @property
    def workload(self) -> list[str]:
        """mkfixture's options for the workload: --mmu and the VMM's shape."""
        if self.kind == "vms":  # the fixtures' usual guest (4 sets), 2 vCPUs per VM
            return ["--mmu", "shadow", "--vmms", str(self.n), "--vcpus", "2"]
        return ["--mmu", "shadow" if self.kind == "shadow" else "tdp_mmu",
                f"--big-{self.kind}", str(self.n)]

    @property
    def host_mem(self) -> int:
        """MiB for the emulated host: *mem*, else ~13 KiB per level-1 page
        (shadow: the guest's table, spt, shadowed_translation, rmap; TDP: the
        data page, the host's PTE page, the TDP page) above a 1.5 GiB base, at
        least 3 GiB."""
        return self.mem or max(3072, 1536 + self.n * 13 // 1024)

    @property
    def timeout(self) -> int:
        """Seconds for the guest to finish (generous: ~30 s per 100k is typical)."""
        return 300 + (self.n * 10 if self.kind == "vms" else self.n // 250)

    @property
    def disk_need(self) -> int:
        """Bytes of free disk while the core is made: the host's raw dump (its
        memory; mkfixture deletes it once makedumpfile has written the filtered
        dump) and the filtered dump, twice (the kernel text is cut out into a
        copy): ~9 KiB per page above ~200 MB (tdp-100k: 962 MB), 1 GiB spare."""
        core = 200 * 10**6 + (self.n * 9 * 1024 if self.kind != "vms" else 0)
        return max(self.host_mem * 2**20 + core, 2 * core) + 2**30


SPECS = {s.name: s for s in (
    Spec("shadow-20k", "shadow", 20_000),
    Spec("shadow-100k", "shadow", 100_000),
    Spec("shadow-300k", "shadow", 300_000),
    Spec("tdp-100k", "tdp", 100_000),
    # 12 KiB per 2 MiB region touched (TDP page, guest page, the VMM's PTE
    # page): an 11 GiB host ran out of memory at 10^6
    Spec("tdp-1m", "tdp", 1_000_000, mem=15 * 1024),
    Spec("vms-64", "vms", 64, mem=2048),
)}


def log(msg: str) -> None:
    """One progress line on stderr."""
    print(f"scale: {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """$KVMINSPECT_BENCH_DIR, else ~/.cache/kvminspect-bench."""
    env = os.environ.get("KVMINSPECT_BENCH_DIR")
    return Path(env) if env else Path.home() / ".cache" / "kvminspect-bench"


# -- generation -------------------------------------------------------------


def work_dir(cache: Path, fixture_work: Path) -> Path:
    """mkfixture's --work for the benchmark: its own (dump, console, VMM build),
    with the kernel packages and trees of *fixture_work* linked in when there."""
    work = cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("debs", "trees", "debug"):
        src, dst = fixture_work / sub, work / sub
        if src.is_dir() and not dst.exists():
            dst.symlink_to(src)
    return work


def is_made(path: Path) -> bool:
    """Whether *path* holds a finished core."""
    return all((path / f).exists() for f in ("vmcore", "truth.json", "gen.json", *DEBUG_FILES))


def generate(spec: Spec, cache: Path, fixture_work: Path) -> bool:
    """Make *spec*'s core in the cache with mkfixture (one emulator at a time).

    The pipeline's own drgn steps read the dump with the 6.1 fixtures' small
    debug set (--share-debug: no -dbg package). False, with a message, if the
    core is not there and the disk has not the room to make it."""
    out = cache / spec.name
    if is_made(out):
        return True
    tmp = cache / f"{spec.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    free = shutil.disk_usage(cache).free
    if free < spec.disk_need:
        log(f"skipping {spec.name}: making it needs {spec.disk_need / 1e9:.1f} GB of free "
            f"disk in {cache} (a {spec.host_mem} MiB host's raw dump, the filtered core), "
            f"there are {free / 1e9:.1f} GB")
        return False
    cmd = [sys.executable, str(MKFIXTURE), "--kernel", "6.1", *spec.workload,
           "--host-mem", str(spec.host_mem),
           "--timeout", str(spec.timeout), "--compress", "none", "--skip-debug",
           "--share-debug", DEBUG_FROM.name,
           "--out", str(tmp), "--work", str(work_dir(cache, fixture_work))]
    log(f"generating {spec.name}: {' '.join(cmd[1:])}")
    t0 = time.monotonic()
    subprocess.run(cmd, check=True)
    seconds = time.monotonic() - t0
    for f in DEBUG_FILES:
        shutil.copy(DEBUG_FROM / f, tmp / f)  # follows the symlinks
    (tmp / "gen.json").write_text(json.dumps({
        "seconds": round(seconds, 1), "host_mem_mib": spec.host_mem,
        "made_with": cmd[2:], "date": datetime.date.today().isoformat()}, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"generated {spec.name} in {seconds:.0f}s")
    return True


# -- the naive baseline -------------------------------------------------------


def naive_walk(prog: Any) -> dict[str, int]:
    """The MMU hierarchy of every VM, walked with plain drgn Objects.

    From each VM's roots (every vCPU's mmu->root.hpa and prev_roots[].hpa,
    and kvm->arch.tdp_mmu_roots), each page found through
    pfn_to_page(hpa >> 12)->private; of each page its fields by member access
    (gfn, role.word, unsync, unsync_children, unsync_child_bitmap,
    root_count, spt), and of each non-leaf page (role.word's level > 1) its
    512 SPTEs as sp.spt[i]; a shadow-present (bit 11), non-large (bit 7)
    SPTE's address bits lead to the child. Leaf pages' entries are not read.
    Returns the pages reached and the present SPTEs seen.
    """
    import drgn
    from drgn.helpers.linux.list import list_for_each_entry
    from drgn.helpers.linux.mm import pfn_to_page
    from drgn.helpers.linux.xarray import xa_load

    sp_type = prog.type("struct kvm_mmu_page *")
    addr_mask = ((1 << 52) - 1) & ~0xFFF

    def page_of(hpa: int) -> Any:
        if hpa in (0, (1 << 64) - 1):
            return None
        private = pfn_to_page(prog, hpa >> 12).private.value_()
        return drgn.Object(prog, sp_type, private) if private else None

    seen: set[int] = set()
    present = 0
    for kvm in list_for_each_entry("struct kvm", prog["vm_list"].address_of_(), "vm_list"):
        stack = []
        for i in range(kvm.online_vcpus.counter.value_()):
            vcpu = drgn.cast("struct kvm_vcpu *", xa_load(kvm.vcpu_array.address_of_(), i))
            mmu = vcpu.arch.mmu
            stack += [page_of(mmu.root.hpa.value_())]
            stack += [page_of(r.hpa.value_()) for r in mmu.prev_roots]
        try:  # the list is set up only with the TDP MMU: 6.1's per-VM flag, later a global
            tdp = kvm.arch.tdp_mmu_enabled.value_()
        except AttributeError:
            tdp = prog["tdp_mmu_enabled"].value_()
        if tdp:
            stack += list(list_for_each_entry("struct kvm_mmu_page",
                                              kvm.arch.tdp_mmu_roots.address_of_(), "link"))
        while stack:
            sp = stack.pop()
            if sp is None or sp.value_() in seen:
                continue
            seen.add(sp.value_())
            _ = (sp.gfn.value_(), sp.unsync.value_(), sp.unsync_children.value_(),
                 [w.value_() for w in sp.unsync_child_bitmap], sp.root_count.value_())
            level = sp.role.word.value_() & 0xF
            spt = sp.spt
            if level <= 1:
                continue
            for i in range(512):
                e = spt[i].value_()
                if e & (1 << 11):
                    present += 1
                    if not e & (1 << 7):
                        stack.append(page_of(e & addr_mask))
    return {"pages": len(seen), "present_sptes": present}


# -- measuring ------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak RSS so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def inproc(core: Path, runs: int) -> dict[str, Any]:
    """The in-process figures of one core (run in a child: see main)."""
    from kvminspect.commands import load_all
    from kvminspect.repl import run_line
    from kvminspect.session import Session
    from kvminspect.target import open_core

    out: dict[str, Any] = {"rss_start_mb": peak_rss_mb()}
    t0 = time.perf_counter()
    target = open_core(str(core), [])
    out["open_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    session = Session(target)
    for vm in session.kernel.vms():
        session.graph(vm)
    out["graph_s"] = time.perf_counter() - t0
    out["rss_graph_mb"] = peak_rss_mb()

    load_all()  # as run_repl does before the first line
    repl: dict[str, float] = {}
    stdout = sys.stdout
    with open(os.devnull, "w") as null:
        try:
            sys.stdout = null
            for cmd in COMMANDS:
                line = f"{cmd} --json"
                run_line(session, line)  # the first run of this command
                times = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    run_line(session, line)
                    times.append(time.perf_counter() - t0)
                repl[cmd] = statistics.median(times)
        finally:
            sys.stdout = stdout
    out["repl_s"] = repl
    out["rss_repl_mb"] = peak_rss_mb()

    prog = open_core(str(core), []).prog  # a fresh Program: nothing read yet
    t0 = time.perf_counter()
    out["naive"] = naive_walk(prog)
    out["naive_s"] = time.perf_counter() - t0
    return out


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (MB) and exit status of one child process."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, p.returncode


def child_env() -> dict[str, str]:
    """The environment of every child: this checkout's kvminspect first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def whole_process(core: Path, runs: int) -> dict[str, dict[str, Any]]:
    """Each command as a whole process: median wall, max peak RSS, exit status."""
    env = child_env()
    out = {}
    for cmd in COMMANDS:
        argv = [sys.executable, "-m", "kvminspect", "-c", str(core), cmd, "--json"]
        rows = [run_child(argv, env) for _ in range(runs)]
        out[cmd] = {"wall_s": statistics.median(r[0] for r in rows),
                    "wall_min_s": min(r[0] for r in rows),
                    "wall_max_s": max(r[0] for r in rows),
                    "rss_mb": max(r[1] for r in rows),
                    "status": sorted({r[2] for r in rows})}
        log(f"  {core.name} {cmd}: {out[cmd]['wall_s']:.2f}s {out[cmd]['rss_mb']:.0f} MB")
    return out


def warm_page_cache(path: Path) -> None:
    """Read *path* once, 16 MiB at a time, so that measuring does not read the disk."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


def check_truth(core: Path, truth: dict[str, Any], naive_pages: int) -> dict[str, Any]:
    """kvminspect's count against the truth: the pages ``diagnose --json``
    audits (every VM's) and the naive walk's against the pages the pipeline
    counted in the dump (the TDP MMU's lists, else n_used_mmu_pages); for a
    core of several VMMs, the VMs' pids against the VMMs' records (and the
    audit's pages against the naive walk's). "ok" says whether they agree."""
    r = subprocess.run([sys.executable, "-m", "kvminspect", "-c", str(core), "diagnose",
                        "--json"], env=child_env(), stdout=subprocess.PIPE, text=True)
    vms = json.loads(r.stdout)["vms"] if r.stdout.strip() else []
    out: dict[str, Any] = {"kvminspect": sum(vm["audit"]["pages"] for vm in vms),
                           "naive": naive_pages, "vms": len(vms)}
    if "vmms" in truth:
        out["expected_vm_pids"] = sorted(v["vmm_pid"] for v in truth["vmms"])
        out["ok"] = (sorted(vm["pid"] for vm in vms) == out["expected_vm_pids"]
                     and out["kvminspect"] == naive_pages)
        return out
    counted = truth.get("in_dump", {})
    out["expected"] = counted.get("tdp_mmu_pages", counted.get("n_used_mmu_pages"))
    out["ok"] = out["expected"] == out["kvminspect"] == naive_pages
    return out


def measure(spec: Spec, cache: Path, runs: int) -> dict[str, Any]:
    """Every figure of one core."""
    core = cache / spec.name
    truth = json.loads((core / "truth.json").read_text())
    gen = json.loads((core / "gen.json").read_text())
    # warm-up: the whole core read once into the page cache (this VM's kernel reclaims
    # cold file pages: a core read from disk made model + graph 2-4x slower, 10 s of
    # drgn reads for 100k pages), then the debug files decompressed into kvminspect's cache
    warm_page_cache(core / "vmcore")
    run_child([sys.executable, "-m", "kvminspect", "-c", str(core), "vms"], child_env())
    log(f"{spec.name}: in-process")
    r = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--inproc", str(core),
                        "--runs", str(runs)], env=child_env(), cwd=ROOT,
                       stdout=subprocess.PIPE, text=True, check=True)
    res = json.loads(r.stdout)
    log(f"{spec.name}: open {res['open_s']:.2f}s, model+graph {res['graph_s']:.2f}s, "
        f"naive {res['naive_s']:.2f}s ({res['naive']['pages']} pages)")
    log(f"{spec.name}: whole process, {runs} runs each")
    res["commands"] = whole_process(core, runs)
    res["truth"] = check_truth(core, truth, res["naive"]["pages"])
    log(f"{spec.name}: truth {'agrees' if res['truth']['ok'] else 'DISAGREES'}: "
        f"{res['truth']}")
    res["name"] = spec.name
    res["kind"] = spec.kind
    res["core_mb"] = (core / "vmcore").stat().st_size / 1e6
    res["gen_s"] = gen["seconds"]
    res["host_mem_mib"] = gen["host_mem_mib"]
    res["unsync"] = len(truth.get("unsync_gfns", [])) + sum(  # big cores; VMMs' sets
        len(s["unsync_gfns"]) for vmm in truth.get("vmms", []) for s in vmm["sets"])
    res["in_dump"] = truth.get("in_dump", {})
    return res


# -- reporting ------------------------------------------------------------------


def machine() -> str:
    """One line: CPU, cores, memory, OS, Python, drgn, the checkout's commit."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except OSError:
        mem = 0.0
    try:
        import drgn
        drgn_version = drgn.__version__
    except ImportError:
        drgn_version = "?"
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "log", "-1", "--format=%h", "--", "kvminspect"],
                            capture_output=True, text=True).stdout.strip() or "?"
    if subprocess.run([*git, "status", "--porcelain", "--", "kvminspect"],
                      capture_output=True, text=True).stdout.strip():
        commit += " (modified)"
    os_name = platform.freedesktop_os_release().get("PRETTY_NAME", platform.system()) \
        if hasattr(platform, "freedesktop_os_release") else platform.system()
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {os_name}, "
            f"Python {platform.python_version()}, drgn {drgn_version}, kvminspect {commit}")


def table(results: list[dict[str, Any]], measured: str) -> str:
    """The results as Markdown: one table of cores, one of commands; *measured*
    says when and on what."""
    lines = [
        f"Measured {measured}.",
        "",
        "| core | pages | unsync | vmcore MB | generated in | open s | model + graph s "
        "| peak RSS MB | naive walk s | naive / model |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        pages = r["naive"]["pages"]
        wrong = "" if r.get("truth", {}).get("ok", True) else " (not the truth's)"
        lines.append(
            f"| {r['name']} | {pages:,}{wrong} | {r['unsync']} | {r['core_mb']:,.0f} "
            f"| {r['gen_s']:.0f} s ({r['host_mem_mib'] // 1024} GiB host) "
            f"| {r['open_s']:.2f} | {r['graph_s']:.2f} | {r['rss_graph_mb']:.0f} "
            f"| {r['naive_s']:.2f} | {r['naive_s'] / r['graph_s']:.2f}x |")
    lines += [
        "",
        "Each command with `--json`: whole process (`python -m kvminspect -c CORE CMD --json`, "
        "median wall of the runs, peak RSS), memory per page above the `vms` floor, "
        "and REPL latency (the command's second run in a session whose graphs are built).",
        "",
        "| core | command | whole process s | peak RSS MB | KiB/page above vms | REPL ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        pages = r["naive"]["pages"]
        floor = r["commands"]["vms"]["rss_mb"]
        for cmd in COMMANDS:
            c = r["commands"][cmd]
            per_page = max(0.0, (c["rss_mb"] - floor) * 1024 / pages) if pages else 0.0
            ms = r["repl_s"][cmd] * 1000
            repl = f"{ms:.0f}" if ms >= 10 else f"{ms:.1f}"
            bad = "" if c["status"] == [0] else f" (exit {c['status']})"
            lines.append(f"| {r['name']} | {cmd} | {c['wall_s']:.2f}{bad} | {c['rss_mb']:.0f} "
                         f"| {per_page:.2f} | {repl} |")
    return "\n".join(lines) + "\n"


def write_readme(text: str) -> None:
    """Put *text* between the markers of benchmarks/README.md."""
    doc = README.read_text()
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=",".join(SPECS),
                    help=f"cores, comma-separated (default all: {','.join(SPECS)})")
    ap.add_argument("--runs", type=int, default=3,
                    help="timed runs of each whole-process command and REPL line (median)")
    ap.add_argument("--generate-only", action="store_true", help="make the cores, measure nothing")
    ap.add_argument("--write-readme", action="store_true",
                    help="write the table into benchmarks/README.md")
    ap.add_argument("--fixture-work", type=Path, default=FIXTURE_WORK,
                    help="mkfixture's work directory whose kernel packages to reuse")
    ap.add_argument("--from-results", action="store_true",
                    help="measure nothing: print (and with --write-readme write) the table of "
                    "the last run's results.json")
    ap.add_argument("--inproc", type=Path, help=argparse.SUPPRESS)  # the per-core child
    args = ap.parse_args()
    if args.inproc:
        print(json.dumps(inproc(args.inproc, args.runs)))
        return
    names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        ap.error(f"unknown sizes {unknown}: choose from {','.join(SPECS)}")
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        doc = json.loads((cache / "results.json").read_text())
        report(doc["cores"], doc["measured"], args.write_readme)
        return
    names = [n for n in names if generate(SPECS[n], cache, args.fixture_work)]
    if args.generate_only:
        return
    byte_compile()
    results = [measure(SPECS[n], cache, args.runs) for n in names]
    measured = f"{datetime.date.today().isoformat()} on: {machine()}"
    (cache / "results.json").write_text(
        json.dumps({"measured": measured, "cores": results}, indent=1) + "\n")
    report(results, measured, args.write_readme)


def byte_compile() -> None:
    """This checkout's kvminspect byte-compiled (__pycache__, as pip install does):
    with PYTHONDONTWRITEBYTECODE set, each child would compile every module
    again, about 0.3 s of every command that no installed kvminspect pays."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "kvminspect")],
                   check=True, stdout=subprocess.DEVNULL)  # (writes them whatever that says)


def report(results: list[dict[str, Any]], measured: str, readme: bool) -> None:
    """Print the table; with *readme*, write it into benchmarks/README.md too."""
    text = table(results, measured)
    print(text)
    if readme:
        write_readme(text)
        log(f"wrote {README}")


if __name__ == "__main__":
    main()
