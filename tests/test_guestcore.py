"""guest-core and guest (issue 17, points 1 and 2): a guest's memory and vCPUs from a host dump.

On the small-VMM fixtures (their guests are not Linux): the written core read back
with drgn holds the page tables the VMM built (truth.json's sets) on the pages the
dump has, and faults on the holes; one NT_PRSTATUS per vCPU in vcpu_idx order, RIP in
the guest's code and RSP on the stack the VMM gave it (pipeline/vmm.c: CODE_GPA,
STACK_GPA); holes are what the dump's own table says (a kdump-compressed copy's
bitmap); a dump without the VMM's memory is one error. The Linux paths (the
VMCOREINFO note found in memory, drgn opening the core and the custom program as a
kernel) run on the host's own physical memory taken as a "guest"; the tests on a
real Linux guest (6.1-shadow-qemu-linux) skip while that fixture is absent.
"""

from __future__ import annotations

import array
import contextlib
import io
import json
import shutil
import struct
import subprocess
from pathlib import Path

import drgn
import pytest

from kvminspect import cache, elfcore
from kvminspect.guestcore import (
    GuestFrames,
    GuestMemory,
    NoGuestMemory,
    Run,
    Why,
    find_vmcoreinfo,
    guest_frames,
    vcpu_registers,
    write_frames,
    write_guest_core,
)
from kvminspect.model import Kernel
from kvminspect.read_core import CoreKind
from kvminspect.session import Session
from kvminspect.target import open_core, open_guest
from tests.conftest import FIXTURES, VMCORES, open_fixture, run_main, truth

CODE_GPA, STACK_GPA = 0x2000, 0x10000  # pipeline/vmm.c
PT_ADDR = ((1 << 52) - 1) & ~0xFFF
LINUX_GUEST = "6.1-shadow-qemu-linux"  # a real QEMU + Linux guest (made by another pipeline)
GUEST_DEBUG = VMCORES / "6.1-shadow"  # the 6.1.0-56 debug set: the Linux guest's kernel too
# a spread of kernels and MMUs (every one-VM fixture would take a minute)
SOME = [n for n in ("5.10-shadow", "6.1-shadow", "6.1-tdp", "6.1-shadow-busy", "6.12-shadow",
                    "7.3-shadow", "7.3-shadow-pae") if n in FIXTURES]
WELL_KEPT = ("6.1-shadow", "6.1-tdp", "6.12-shadow", "7.3-shadow", "7.3-shadow-pae")


def makedumpfile() -> str:
    exe = shutil.which("makedumpfile")
    if exe is None:
        pytest.skip("makedumpfile is not installed (CI installs it)")
    return exe


def plain_core(name: str) -> Path:
    """The fixture's vmcore, decompressed (into the session's cache)."""
    return cache.decompressed(VMCORES / name / "vmcore.xz")


def phdrs(data: bytes) -> list[tuple[int, int, int, int, int]]:
    """(p_type, p_offset, p_vaddr, p_paddr, p_filesz) of each program header of
    the ELF core whose head is *data*."""
    phoff = struct.unpack_from("<Q", data, 32)[0]
    phnum = struct.unpack_from("<H", data, 56)[0]
    out = []
    for i in range(phnum):
        p_type, _, off, vaddr, paddr, filesz = struct.unpack_from("<IIQQQQ", data, phoff + 56 * i)
        out.append((p_type, off, vaddr, paddr, filesz))
    return out


def notes(path: Path) -> list[tuple[bytes, int, bytes]]:
    """The notes of an ELF core's PT_NOTE segments."""
    data = path.read_bytes()
    return [n for p_type, off, _, _, filesz in phdrs(data) if p_type == elfcore.PT_NOTE
            for n in elfcore.notes_of(data[off:off + filesz])]


def loads(path: Path) -> list[tuple[int, int, int, int]]:
    """(p_offset, p_vaddr, p_paddr, p_filesz) of an ELF core's PT_LOADs."""
    return [h[1:] for h in phdrs(path.read_bytes()[:1 << 20]) if h[0] == elfcore.PT_LOAD]


def read_core(path: Path) -> drgn.Program:
    prog = drgn.Program()
    prog.set_core_dump(str(path))
    return prog


# --- the format -----------------------------------------------------------------------

def test_prstatus_is_the_one_qemu_writes() -> None:
    """elfcore's struct elf_prstatus layout is the host dump's own: QEMU wrote one
    NT_PRSTATUS per host CPU, 336 bytes, a kernel RIP at pr_reg's ip."""
    found = [(n, t, d) for n, t, d in notes(plain_core("6.1-shadow"))
             if n == elfcore.CORE_NAME and t == elfcore.NT_PRSTATUS]
    assert len(found) == 2  # the emulated host's 2 CPUs
    for _, _, desc in found:
        assert len(desc) == elfcore.PRSTATUS_SIZE
        regs = elfcore.prstatus_regs(desc)
        assert regs["rip"] >= 0xFFFFFFFF80000000 and regs["cs"] == 0x10
    assert elfcore.prstatus_regs(elfcore.prstatus({"rip": 5, "rsp": 7})) == {
        **dict.fromkeys(elfcore.USER_REGS, 0), "rip": 5, "rsp": 7}


# --- small-VMM guests ------------------------------------------------------------------

def page_tables(t: dict) -> list[tuple[int, int, int]]:
    """(table gpa, index, the gpa its entry points to) of every entry the VMM wrote
    that links its page-table sets (vmm.c: PML4 -> PDPT -> PD, PD[0] the shared
    level-1 table, PD[1 + j] window j's; PAE: PDPT -> PD)."""
    out = []
    shared = int(t["shared_pt"], 16)
    for st in t["sets"]:
        gpas = [int(g, 16) for g in st["pt_gpas"]]
        windows = [int(w, 16) for w in st["window_pts"]]
        if t.get("guest_paging", "long") == "pae":
            pdpt, pd = gpas[0], gpas[1]
            out.append((pdpt, 0, pd))
        else:
            pml4, pdpt, pd = gpas[0], gpas[1], gpas[2]
            out += [(pml4, 0, pdpt), (pdpt, 0, pd)]
        out.append((pd, 0, shared))
        out += [(pd, 1 + j, w) for j, w in enumerate(windows)]
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """guest-core --json of each of SOME, through the command (in-process)."""
    from kvminspect.cli import run_one

    out = {}
    d = tmp_path_factory.mktemp("guestcore")
    for name in SOME:
        path = d / f"{name}.core"
        s = Session(open_fixture(name))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            run_one(s, ["guest-core", str(path), "--json"])
        path.with_suffix(".json").write_text(buf.getvalue())  # the whole document
        out[name] = path, json.loads(buf.getvalue())["vms"][0]
    return out


@pytest.mark.parametrize("name", SOME)
def test_page_tables_read_back(name: str, written) -> None:
    """The VMM's page-table entries read back from the core with drgn (physical
    reads) on the pages the dump holds; a hole is a fault, never zeros."""
    path, doc = written[name]
    prog = read_core(path)
    assert not prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    present = {int(r["gfn"], 16) + i for r in doc["runs"] for i in range(r["pages"])}
    checked = 0
    for table, index, target in page_tables(truth(name)):
        if table >> 12 not in present:
            with pytest.raises(drgn.FaultError):
                prog.read(table + 8 * index, 8, True)
            continue
        assert prog.read_u64(table + 8 * index, True) & PT_ADDR == target, (hex(table), index)
        checked += 1
    # the filtered dumps keep the guest's pages by chance (makedumpfile -E keeps short
    # runs of user pages): 5.10-shadow and 6.1-shadow-busy lost its page tables
    assert checked >= (15 if name in WELL_KEPT else 0)
    assert doc["pages"] == len(present) and doc["pages"] + doc["hole_pages"] == 1024
    assert all((off, vaddr) == (off, 0) and off % 4096 == 0 for off, vaddr, _, _ in loads(path))


@pytest.mark.parametrize("name", SOME)
def test_vcpus_in_order_with_plausible_registers(name: str, written) -> None:
    """One NT_PRSTATUS per vCPU in vcpu_idx order (pr_pid vcpu_idx + 1): RIP in the
    guest's code, RSP on its own stack page, CR3 the final set's (truth.json); vCPUs
    in guest mode at the dump are marked stale (6.1-shadow-busy)."""
    path, doc = written[name]
    t = truth(name)
    prs = [d for n, typ, d in notes(path) if n == elfcore.CORE_NAME and typ == elfcore.NT_PRSTATUS]
    assert len(prs) == len(t["vcpus"]) == len(doc["vcpus"])
    k = open_fixture(name).kernel
    modes = {v.vcpu_idx: v.mode for v in k.vcpus(k.vms()[0])}
    for i, (desc, v, tv) in enumerate(zip(prs, doc["vcpus"], t["vcpus"], strict=True)):
        assert v["vcpu_idx"] == i and v["vcpu_id"] == tv["vcpu_id"]
        assert struct.unpack_from("<i", desc, elfcore.PRSTATUS_PID)[0] == i + 1
        regs = elfcore.prstatus_regs(desc)
        assert CODE_GPA <= regs["rip"] < CODE_GPA + 0x2000, hex(regs["rip"])
        assert STACK_GPA + i * 0x1000 < regs["rsp"] <= STACK_GPA + (i + 1) * 0x1000
        assert regs["cs"] == 8 and regs["ss"] == 0x10  # vmm.c's selectors
        assert {r: int(x, 16) for r, x in v["registers"].items() if r in regs} == {
            r: regs[r] for r in v["registers"] if r in regs}
        assert int(v["registers"]["cr3"], 16) == int(tv["cr3"], 16)
        assert v["stale"] == (modes[i] in ("IN_GUEST_MODE", "EXITING_GUEST_MODE"))
        assert v["unknown"] == []  # kvm_amd: every register is in memory
    assert any(v["stale"] for v in doc["vcpus"]) == bool(t.get("busy"))


def test_text_summary(tmp_path, capsys) -> None:
    """The summary: pages written, holes by reason with their gfn ranges, no
    VMCOREINFO said clearly, each vCPU's registers, the drgn line to run next."""
    out = tmp_path / "g.core"
    status, text, err = run_main(["-c", str(VMCORES / "6.1-shadow"), "guest-core", str(out)],
                                 capsys)
    assert status == 0, err
    assert f"wrote {out} (" in text and "written: 38 pages in 6 PT_LOAD runs" in text
    assert "0x10e-0x10f, 0x118-0x11b: not in the dump" in text
    assert "0x14-0xff" in text and ": not mapped by the VMM" in text
    assert "VMCOREINFO: none found" in text
    assert "vcpu0  rip 0x2075  rsp 0x11000  rflags 0x46  cr3 0x101000" in text
    assert f"next: drgn -c {out}" in text


def test_refuses_to_overwrite(tmp_path, capsys) -> None:
    """An existing OUT is never touched: one error line, exit 1."""
    out = tmp_path / "g.core"
    out.write_bytes(b"keep me")
    status, text, err = run_main(["-c", str(VMCORES / "6.1-shadow"), "guest-core", str(out)],
                                 capsys)
    assert status == 1 and text == ""
    lines = [line for line in err.splitlines() if line]
    assert lines == [f"kvminspect: error: {out}: already exists (guest-core never "
                     "overwrites a file)"]
    assert out.read_bytes() == b"keep me"


def test_no_vmm_memory_is_one_error(tmp_path, capsys) -> None:
    """6.1-shadow-large's dump holds none of the VMM's memory (makedumpfile -d 31):
    one line saying so and what keeps it, exit 1, no file."""
    out = tmp_path / "g.core"
    status, text, err = run_main(["-c", str(VMCORES / "6.1-shadow-large"), "guest-core",
                                  str(out)], capsys)
    assert status == 1 and text == "" and not out.exists()
    (line,) = [x for x in err.splitlines() if x]
    assert line == ("kvminspect: error: VM 0: none of its 2048 guest pages (address space "
                    "0) is in the dump: 2048 not in the dump (makedumpfile -d 31 drops it "
                    "(user and cache pages); -d 17 keeps it)")


def test_smm_address_space(tmp_path) -> None:
    """--smm writes address space 1 (6.1-shadow-smm: memslot 0 is there too)."""
    k = open_fixture("6.1-shadow-smm").kernel
    vm = k.vms()[0]
    frames = guest_frames(k, vm, 1)
    assert frames.as_id == 1 and [s.as_id for s in frames.memslots] == [1]
    assert frames.pages == guest_frames(k, vm, 0).pages > 0


def bitmap2(core: Path) -> bytes:
    """The second bitmap of a kdump-compressed core (makedumpfile's diskdump_mod.h)."""
    data = core.read_bytes()
    block, sub, blocks = struct.unpack_from("<iiI", data, 428)
    half = block * blocks // 2
    return data[block * (1 + sub) + half:block * (1 + sub) + 2 * half]


@pytest.mark.parametrize("level", ["31", "1"])
def test_kdump_holes_are_the_bitmap(level: str, tmp_path) -> None:
    """A kdump-compressed copy (-d 31: only the host's zero page, which backs the
    page the guest only read, is left of the guest; -d 1: the zero pages go): a guest
    page is written exactly when its host page's bit is set in the core's own
    bitmap, and is a "not in the dump" hole when it is clear."""
    exe = makedumpfile()
    core = tmp_path / "dump"
    subprocess.run([exe, "-c", "-d", level, str(plain_core("6.1-shadow")), str(core)],
                   check=True, capture_output=True, timeout=120)
    k = open_core(str(core), [str(VMCORES / "6.1-shadow")]).kernel
    vm = k.vms()[0]
    frames = guest_frames(k, vm)
    assert frames.kind is CoreKind.KDUMP
    bits = bitmap2(core)
    mm = k.vm_reader.vmm_mm(vm)
    (slot,) = frames.memslots
    written = {r.gfn + i: p for r in frames.runs for i, p in enumerate(r.pfns)}
    not_dumped = {g for h in frames.holes if h.why is Why.NOT_DUMPED
                  for g in range(h.start, h.end)}
    mapped = 0
    for gfn in range(slot.npages):
        try:
            pfn = k.vm_reader.hva_to_pfn(mm, slot.userspace_addr + (gfn << 12))
        except drgn.FaultError:
            assert gfn not in written and gfn not in not_dumped
            continue
        mapped += 1
        bit = bool(bits[pfn >> 3] >> (pfn & 7) & 1)
        assert (gfn in written, gfn in not_dumped) == (bit, not bit), hex(gfn)
    assert mapped == 44 and len(written) == (1 if level == "31" else 38)


def test_flattened_presence_is_the_kdump_one(tmp_path) -> None:
    """makedumpfile -F (flattened): the same guest pages as the kdump-compressed file."""
    exe = makedumpfile()
    flat = tmp_path / "vmcore.flat"
    with open(flat, "wb") as f:
        subprocess.run([exe, "-F", "-c", "-d", "1", str(plain_core("6.1-shadow"))], stdout=f,
                       stderr=subprocess.DEVNULL, check=True, timeout=120)
    k = open_core(str(flat), [str(VMCORES / "6.1-shadow")]).kernel
    frames = guest_frames(k, k.vms()[0])
    assert frames.kind is CoreKind.FLAT
    assert frames.pages == 38 and frames.holes_by_why()[Why.NOT_DUMPED] == 6


def test_guest_py_in_the_repl(capsys) -> None:
    """guest py binds the guest's program: its physical memory is the guest's."""
    from kvminspect.cli import run_one

    s = Session(open_fixture("6.1-shadow"))
    run_one(s, ["guest", "py"])
    out = capsys.readouterr().out
    assert "guest of VM 0: 38 pages in the dump in 6 segments, 986 holes" in out
    assert "no VMCOREINFO" in out
    guest = s.py_globals["guest"]
    assert guest.read_u64(0x101000, True) & PT_ADDR == 0x102000  # PML4[0] -> the PDPT
    with pytest.raises(drgn.FaultError):
        guest.read(0x10E000, 8, True)  # a hole
    assert s.py_globals["guest_regs"][0]["rip"] == 0x2075
    run_one(s, ["py", "hex(guest.read_u64(0x102000, True))"])
    assert capsys.readouterr().out.strip() == "0x103023"


# --- the Linux paths, on the host's own memory --------------------------------------------

@pytest.fixture(scope="module")
def host_frames() -> tuple[Kernel, GuestFrames]:
    """The host's physical memory in the dump as a "guest": gfn = host pfn, from the
    host core's program headers."""
    k = open_fixture("6.1-shadow").kernel
    core = plain_core("6.1-shadow")
    runs = []
    for off, _, paddr, filesz in loads(core):
        del off
        start, end = -(-paddr // 4096), (paddr + filesz) // 4096
        if start < end:
            runs.append(Run(start, array.array("Q", range(start, end))))
    return k, GuestFrames(0, (), tuple(runs), (), CoreKind.ELF)


def test_linux_core_opens_as_a_kernel(host_frames, tmp_path) -> None:
    """The writer finds the kernel's VMCOREINFO note in memory and puts it in the
    core: drgn opens the core as that kernel (its page tables from swapper_pg_dir,
    p_vaddr 0) and reads its variables and tasks with the host's vmlinux."""
    k, frames = host_frames
    out = tmp_path / "host.core"
    vcpus = vcpu_registers(k, k.vms()[0])
    with open(out, "xb") as f:
        scan, zeroed = write_frames(f, k, frames, vcpus)
    assert zeroed == ()
    assert scan.found is not None and scan.at == (0x1202000,)
    assert scan.found.release == "6.1.0-56-amd64"
    assert scan.found.build_id == "eb4fbcd037e7253717950bf2b93bd5566f47c56f"
    prog = read_core(out)
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    prog.load_debug_info([str(cache.decompressed(GUEST_DEBUG / "vmlinux.xz"))], main=True)
    assert prog["init_uts_ns"].name.release.string_() == b"6.1.0-56-amd64"
    from drgn.helpers.linux.pid import find_task, for_each_task

    comms = {t.comm.string_() for t in for_each_task(prog)}
    assert b"init" in comms and b"kthreadd" in comms
    assert len(prog.stack_trace(find_task(prog, 2))) >= 2  # kthreadd, sleeping


def test_linux_custom_program(host_frames) -> None:
    """guest's program without a file: drgn's custom memory segments, physical, and
    its Linux kernel from the VMCOREINFO found (Program.set_linux_kernel_custom)."""
    k, frames = host_frames
    memory = GuestMemory(k, frames)
    scan = find_vmcoreinfo(k, frames, memory)
    assert scan.found is not None
    prog, warning = open_guest([(r.gpa, r.size) for r in frames.runs], memory.read,
                               scan.found.desc, [str(GUEST_DEBUG / "vmlinux.xz")])
    assert warning is None
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    assert prog["init_uts_ns"].name.release.string_() == b"6.1.0-56-amd64"
    _, warning = open_guest([(r.gpa, r.size) for r in frames.runs], memory.read,
                            scan.found.desc, [str(VMCORES / "6.12-shadow" / "vmlinux.xz")])
    assert warning is not None and "guest kernel 6.1.0-56-amd64 build id eb4fbcd0" in warning


def test_no_guest_memory_raises_before_writing(tmp_path) -> None:
    """write_guest_core makes no file when nothing is there to write."""
    k = open_fixture("6.1-shadow-large").kernel
    out = tmp_path / "g.core"
    with pytest.raises(NoGuestMemory) as e:
        write_guest_core(k, k.vms()[0], str(out))
    assert e.value.frames.hole_pages == 2048 and not out.exists()


# --- a real Linux guest (QEMU inside the emulated host) --------------------------------

def linux_guest() -> Path:
    d = VMCORES / LINUX_GUEST
    if not (d / "truth.json").exists():
        pytest.skip(f"fixture {LINUX_GUEST} (a QEMU + Linux guest) is not there yet")
    return d


@pytest.fixture(scope="module")
def linux_core(tmp_path_factory) -> tuple[Path, drgn.Program]:
    d = linux_guest()
    out = tmp_path_factory.mktemp("linux") / "guest.core"
    k = open_core(str(d), []).kernel
    write_guest_core(k, k.vms()[0], str(out))
    prog = read_core(out)
    prog.load_debug_info([str(cache.decompressed(GUEST_DEBUG / "vmlinux.xz"))], main=True)
    return out, prog


def test_linux_guest_tasks(linux_core) -> None:
    """drgn on the written core is the guest kernel: its release, and its tasks: the
    processes truth.json names (the guest's init script's children) under pid 1."""
    from drgn.helpers.linux.pid import find_task, for_each_task

    _, prog = linux_core
    t = truth(LINUX_GUEST)
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    assert prog["init_uts_ns"].name.release.string_() == t["guest"]["kernel_release"].encode()
    assert len(list(for_each_task(prog))) > 20  # kernel threads and the processes
    for p in t["guest"]["processes"]:
        task = find_task(prog, p["pid"])
        assert task and task.comm.string_() == p["comm"].encode()
        assert task.real_parent.pid == 1


def test_linux_guest_vcpu_stacks(linux_core) -> None:
    """Each vCPU's current task (the per-CPU current_task) unwinds from its
    NT_PRSTATUS: the trace starts at the RIP KVM saved."""
    path, prog = linux_core
    prs = [elfcore.prstatus_regs(d) for n, typ, d in notes(path)
           if n == elfcore.CORE_NAME and typ == elfcore.NT_PRSTATUS]
    assert len(prs) == len(truth(LINUX_GUEST)["vcpus"])
    offsets = prog["__per_cpu_offset"]
    current = prog.symbol("current_task").address
    kernel_frames = 0
    for cpu, regs in enumerate(prs):
        task = drgn.Object(prog, "struct task_struct *",
                           prog.read_u64(current + offsets[cpu].value_()))
        assert task.on_cpu
        trace = prog.stack_trace(task)
        assert trace[0].pc == regs["rip"], (cpu, trace)
        kernel_frames += sum(1 for f in trace if f.name and not f.name.startswith("0x"))
    assert kernel_frames >= 3


def test_linux_guest_in_the_repl(capsys) -> None:
    """guest py in the REPL opens the Linux guest as a kernel program: with -s, and
    without it from the host's own vmlinux (the guest runs the same build)."""
    from kvminspect.cli import run_one

    d = linux_guest()
    for extra in (["-s", str(GUEST_DEBUG / "vmlinux.xz")], []):
        s = Session(open_core(str(d), []))
        run_one(s, ["guest", "py", *extra])
        captured = capsys.readouterr()
        assert "Linux 6.1.0-56-amd64" in captured.out and "warning" not in captured.err
        guest = s.py_globals["guest"]
        assert guest["init_uts_ns"].name.release.string_() == b"6.1.0-56-amd64"
        regs = s.py_globals["guest_regs"]
        assert s.py_globals["guest_stack"](0)[0].pc == regs[0]["rip"]


def test_kvm_guest_py_in_drgn() -> None:
    """%kvm guest py, in drgn's shell, binds guest in that shell's globals."""
    from drgn.commands import run_command

    from tests.test_drgn_plugin import drgn_program

    prog = drgn_program()
    shell: dict = {"prog": prog}
    run_command(prog, "kvm guest py", globals=shell)
    assert shell["guest"].read_u64(0x101000, True) & PT_ADDR == 0x102000
    assert shell["guest_regs"][3]["rsp"] == 0x14000


def test_guest_stack_unwinds_from_saved_registers(host_frames) -> None:
    """guest_stack's struct pt_regs, made from a CPU's registers, unwinds the task
    running there as drgn does from that CPU's NT_PRSTATUS: checked on the host
    memory as a guest (CPU 0 runs its idle task, init_task, at the dump), where the
    custom program itself cannot unwind it."""
    from kvminspect.commands.guest import stack_from_regs
    from tests.test_drgn_plugin import drgn_program

    k, frames = host_frames
    memory = GuestMemory(k, frames)
    scan = find_vmcoreinfo(k, frames, memory)
    assert scan.found is not None
    guest, _ = open_guest([(r.gpa, r.size) for r in frames.runs], memory.read, scan.found.desc,
                          [str(GUEST_DEBUG / "vmlinux.xz")])
    idle = guest["init_task"].address_of_()
    assert idle.on_cpu and idle.thread_info.cpu == 0
    with pytest.raises(LookupError, match="were not saved"):
        guest.stack_trace(idle)
    cpu0 = next(elfcore.prstatus_regs(d) for n, t, d in notes(plain_core("6.1-shadow"))
                if n == elfcore.CORE_NAME and t == elfcore.NT_PRSTATUS)
    mine = [f.name for f in stack_from_regs(guest, cpu0)]
    host = drgn_program()
    theirs = [f.name for f in host.stack_trace(host["init_task"].address_of_())]
    assert mine == theirs and len(mine) >= 3, (mine, theirs)


@pytest.mark.parametrize("name", SOME)
def test_json_matches_the_schema(name: str, written) -> None:
    """guest-core --json against kvminspect/schema.json."""
    from tests.test_schema import validate

    path, _ = written[name]
    validate(json.loads(path.with_suffix(".json").read_text()))
