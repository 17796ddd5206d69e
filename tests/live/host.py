"""An emulated KVM host with a running guest, for live tests.

``EmulatedHost`` boots Debian's 6.1.0-56-amd64 kernel (tests/live/kernel/, kept in
the repository) under qemu-system-x86_64 (TCG, a CPU with SVM), loads kvm and
kvm_amd from a busybox initramfs and runs the fixture VMM
(tests/vmcores/pipeline/vmm.c + guest.S) as the fixtures do, but keeps it all
running: the host's memory stays readable over QMP (``qmp_socket``, for
``drgn.Program.set_qemu_qmp``) until the context manager exits.

    with EmulatedHost() as host:
        prog = drgn.Program()
        prog.set_qemu_qmp(str(host.qmp_socket))
        prog.load_debug_info(host.debug_files, main=True)
        ...
        host.zap()   # the VMM adds and deletes a memslot: a fast zap

``zap()`` types ``zap`` on the host's serial console (QEMU's stdin); the host's
/init reads console lines and sends the VMM SIGUSR1, and the VMM (``-Z``) zaps
every VM and prints ``KVMINSPECT-ZAPPED n``. The record the VMM prints is
``record``; ``truth`` is the same record in the shape of the fixtures'
truth.json (tests/vmcores/README.md), as of boot (``zaps`` counts the zaps since).

QMP serves one client per socket at a time (a second one waits, it is not
refused), and a drgn Program keeps its connection while it lives: ask for more
sockets (``qmp=2``) to read the host from two programs at once.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import functools
import gzip
import hashlib
import itertools
import json
import lzma
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

from tests.live import pack
from tests.vmcores.pipeline import mkfixture

HERE = Path(__file__).resolve().parent
HOST_FILES = HERE / "kernel"
RELEASE = "6.1.0-56-amd64"
KERNEL = HOST_FILES / f"vmlinuz-{RELEASE}"
MODULES = ["irqbypass.ko", "kvm.ko", "ccp.ko", "kvm-amd.ko", "qemu_fw_cfg.ko"]  # load order
# the small debug set of this kernel (same build ids as the files above)
DEBUG_DIR = mkfixture.VMCORES / "6.1-shadow"
DEBUG_FILES = ["vmlinux", "kvm.ko", "kvm-amd.ko"]
QEMU = "qemu-system-x86_64"


class Unavailable(Exception):
    """This machine cannot run an emulated host (the reason is the message)."""


class HostError(RuntimeError):
    """The emulated host did not come up, or did not do what it was asked."""


class HostTimeout(HostError):
    """The host is running but did not print the awaited line in time."""


def _is_static(path: str) -> bool:
    """True if the ELF file at *path* has no program interpreter."""
    with open(path, "rb") as f:
        ehdr = f.read(64)
        if ehdr[:4] != b"\x7fELF" or ehdr[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", ehdr, 32)
        phentsize, phnum = struct.unpack_from("<HH", ehdr, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3  # PT_INTERP
               for i in range(phnum))


def check_tools() -> None:
    """Raise Unavailable unless QEMU and a static busybox are installed (a
    static libc is checked when the VMM is built)."""
    if shutil.which(QEMU) is None:
        raise Unavailable(f"{QEMU} is not installed")
    bb = mkfixture.busybox()
    if not os.path.exists(bb):
        raise Unavailable("busybox is not installed (busybox-static)")
    if not _is_static(bb):
        raise Unavailable(f"{bb} is not statically linked (install busybox-static)")
    if shutil.which("gcc") is None:
        raise Unavailable("gcc is not installed")


def _die_with_parent() -> None:
    """In QEMU, before exec: SIGTERM when the test process dies, even killed."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def decompress(src: Path, dst: Path) -> Path:
    """*src* (.xz) decompressed to *dst*."""
    dst.write_bytes(lzma.decompress(src.read_bytes()))
    return dst


class EmulatedHost:
    """A booted emulated KVM host whose VMM runs a guest (a context manager).

    mmu: "shadow" (kvm_amd npt=0), "tdp_mmu" or "tdp_legacy"; busy: the vCPUs
    spin in guest mode instead of halting; cycle: they keep loading every
    set's CR3 after the workload (the MMU never settles; ``truth``'s final CR3s
    are then only where they were at the report); vcpus, sets, windows,
    rounds: the guest's shape, as mkfixture's options (default: 6.1-shadow's).
    workdir: where the build, sockets and console log go (kept); default a
    temporary directory, deleted on exit.

    python: the initramfs also carries this machine's Python with kvminspect
    and its dependencies (tests/live/pack.py, /bin/kvminspect) and the debug
    set in /debug (``DEBUG_IN_HOST``), and ``run(command)`` runs a shell
    command inside the host and returns its exit status and output; memory
    then defaults to 2048 MB (the archive is ~270 MB, unpacked in RAM).
    """

    def __init__(self, *, mmu: str = "shadow", busy: bool = False, cycle: bool = False,
                 vcpus: int = 4, sets: int = 4, windows: str = "20,1,2,1", rounds: int = 3,
                 memory: int | None = None, cpus: int = 2, qmp: int = 1,
                 timeout: float = 240, workdir: Path | None = None,
                 python: bool = False) -> None:
        if mmu not in ("shadow", "tdp_mmu", "tdp_legacy"):
            raise ValueError(f"unknown mmu {mmu!r}")
        self.args = argparse.Namespace(
            mmu=mmu, busy=busy, zap=False, pae=False, la57=False, special=None, vms=1,
            vcpus=vcpus, sets=sets, windows=windows, rounds=rounds, large=False, smm=False,
            nx_huge_pages=None)
        self.cycle = cycle
        self.python = python
        if memory is None:
            memory = 2048 if python else 512
        self.memory, self.cpus, self.timeout = memory, cpus, timeout
        self._keep = workdir is not None
        self.workdir = Path(workdir) if workdir is not None else None
        self._nqmp = qmp
        self.qmp_sockets: list[Path] = []
        self.qemu: subprocess.Popen | None = None
        self.record: dict = {}
        self.truth: dict = {}
        self.params = ""
        self.zaps = 0
        self.boot_seconds = 0.0
        self.build_seconds = 0.0
        self._runs = itertools.count(1)
        self._debug: list[str] | None = None

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> EmulatedHost:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Build the VMM and the initramfs, boot, wait for the VMM's record."""
        check_tools()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="kvminspect-live-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_sockets = [self.workdir / f"qmp{i}.sock" for i in range(self._nqmp)]
        if len(str(self.qmp_sockets[-1])) > 100:  # sun_path is 108 bytes
            raise HostError(f"{self.workdir}: too long a path for a unix socket")
        try:
            vmm = mkfixture.build_vmm(self.workdir)
        except subprocess.CalledProcessError as e:
            raise Unavailable("gcc -static cannot build the VMM (no static libc?)") from e
        t0 = time.monotonic()
        initrd = mkfixture.write_initramfs(self.workdir / "initramfs.cpio", vmm,
                                           self.init_script(), self._modules())
        if self.python:
            try:
                archive = pack.python_archive()
            except pack.CannotPack as e:
                raise Unavailable(f"cannot pack Python into the initramfs: {e}") from e
            with open(initrd, "ab") as f:  # the kernel unpacks concatenated archives
                f.write(archive)
                f.write(pack.newc(_in_host_files(), first_ino=1 << 30))
        self.build_seconds = time.monotonic() - t0
        self._boot(initrd)

    def _modules(self) -> dict[str, bytes]:
        return {m: lzma.decompress((HOST_FILES / f"{m}.xz").read_bytes()) for m in MODULES}

    def init_script(self) -> str:
        """mkfixture's /init, but the VMM (-Z) runs in the background while a
        loop reads the console and turns each line "zap" into a SIGUSR1."""
        vmm = mkfixture.vmm_command(self.args) + " -Z" + " -c" * self.cycle
        return f"""{mkfixture.init_head(self.args)}stty -echo </dev/console
{self._run_head() if self.python else ""}{vmm} &
vmm=$!
(while read -r line; do
   case "$line" in
   zap) kill -USR1 $vmm ;;
   "run "*) id=${{line#run }}; id=${{id%% *}}
      (cd /; eval "${{line#run $id }}") </dev/null >/tmp/$id.out 2>/tmp/$id.err
      echo $? >/tmp/$id.rc; dump $id ;;
   "dump "*) dump ${{line#dump }} ;;
   esac
 done) </dev/console &
wait $vmm
echo KVMINSPECT-FAILED
sleep 100000
"""

    @staticmethod
    def _run_head() -> str:
        """The environment of commands run inside the host, and ``dump ID``:
        run ID's exit status, stdout and stderr on the console, each stream
        between markers, gzipped and in base64 lines tagged with the run's id
        and the stream (a kernel message that lands inside a line breaks the
        line's tag or its data: the sha256 in the BEGIN marker catches that)."""
        env = "".join(f"export {k}={v}\n" for k, v in pack.ENV.items())
        return f"""{env}mkdir -p /tmp/cache /root
mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
dump() {{
  for s in out err; do
    f=/tmp/$1.$s
    echo "KVMINSPECT-BEGIN $1 $s $(cat /tmp/$1.rc) $(sha256sum <$f | cut -d' ' -f1)"
    gzip -c $f | base64 | sed "s/^/KVMINSPECT-D $1 $s /"
    echo "KVMINSPECT-END $1 $s"
  done
}}
"""

    def _boot(self, initrd: Path) -> None:
        assert self.workdir is not None
        console = self.workdir / "console.log"
        cmd = [
            QEMU, "-accel", "tcg", "-cpu", "max,la57=off", "-smp", str(self.cpus),
            "-m", f"{self.memory}M", "-kernel", str(KERNEL), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 loglevel=4",
            "-device", "vmcoreinfo", "-display", "none", "-no-reboot", "-monitor", "none",
            "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
        ]
        for sock in self.qmp_sockets:
            cmd += ["-qmp", f"unix:{sock},server=on,wait=off"]
        for attempt in (1, 2):
            t0 = time.monotonic()
            with open(console, "wb") as out, open(self.workdir / "qemu.log", "wb") as err:
                self.qemu = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out,
                                             stderr=err, preexec_fn=_die_with_parent)
            try:
                text = self._wait_for("KVMINSPECT-READY", self.timeout)
                break
            except HostTimeout as e:
                if attempt == 2:
                    raise
                # Rare under TCG (about 1 boot in 50 on a slow machine): the
                # guest never reports; a second boot has always come up.
                warnings.warn(f"emulated host hung before KVMINSPECT-READY "
                              f"({self._cpu_state()}); booting it again: {e}", stacklevel=2)
                self._kill_qemu()
        self.boot_seconds = time.monotonic() - t0
        m = re.search(r"KVMINSPECT-RECORD (\{.*\})", text)
        p = re.search(r"KVMINSPECT-PARAMS (.*)", text)
        if not m or not p:
            raise HostError(f"no record on the console:\n{text[-4000:]}")
        self.record = json.loads(m.group(1))
        self.params = p.group(1).strip()
        self.truth = mkfixture.truth(self.record, RELEASE, self.args, self.params)
        self.truth["made_with"] = f"tests/live/host.py {self!r}"

    def _cpu_state(self) -> str:
        """Where the host's CPUs are (QMP query-cpus-fast and each CPU's RIP),
        for the report of a hung boot; never raises."""
        before = socket.getdefaulttimeout()
        socket.setdefaulttimeout(10)  # QMP's socket: a hung QEMU must not hang us
        try:
            qmp = mkfixture.QMP(self.qmp_sockets[0])
            regs = qmp.cmd("human-monitor-command", **{"command-line": "info registers -a"})
            qmp.sock.close()
            return "CPU RIPs " + (", ".join(re.findall(r"RIP=([0-9a-f]+)", str(regs)))
                                  or "unknown")
        except Exception as e:  # a diagnostic only
            return f"CPU state unavailable: {e}"
        finally:
            socket.setdefaulttimeout(before)

    def stop(self) -> None:
        """Kill QEMU and delete the temporary directory (idempotent)."""
        self._kill_qemu()
        if self.workdir is not None and not self._keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _kill_qemu(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL after 10 s); idempotent."""
        if self.qemu is not None:
            if self.qemu.poll() is None:
                self.qemu.send_signal(signal.SIGTERM)
                try:
                    self.qemu.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.qemu.kill()
                    self.qemu.wait()
            if self.qemu.stdin:
                try:
                    self.qemu.stdin.close()
                except OSError:
                    pass
            self.qemu = None

    def __repr__(self) -> str:
        a = self.args
        return (f"EmulatedHost(mmu={a.mmu!r}, busy={a.busy}, cycle={self.cycle}, "
                f"vcpus={a.vcpus}, sets={a.sets}, windows={a.windows!r}, rounds={a.rounds})")

    # -- use ---------------------------------------------------------------

    @property
    def qmp_socket(self) -> Path:
        """The (first) QMP socket: drgn.Program.set_qemu_qmp(str(host.qmp_socket))."""
        return self.qmp_sockets[0]

    @property
    def debug_files(self) -> list[str]:
        """The kernel's small debug set (vmlinux, kvm.ko, kvm-amd.ko of
        tests/vmcores/6.1-shadow), decompressed into the work directory."""
        if self._debug is None:
            assert self.workdir is not None
            d = self.workdir / "debug"
            d.mkdir(exist_ok=True)
            self._debug = [str(decompress(DEBUG_DIR / f"{n}.xz", d / n)) for n in DEBUG_FILES]
        return self._debug

    def console_text(self) -> str:
        """Everything the host wrote on its serial console so far."""
        if self.workdir is None:
            return ""
        return (self.workdir / "console.log").read_bytes().decode(errors="replace")

    def send(self, line: str) -> None:
        """Type *line* on the host's serial console."""
        if self.qemu is None or self.qemu.stdin is None or self.qemu.poll() is not None:
            raise HostError("the emulated host is not running")
        self.qemu.stdin.write(line.encode() + b"\n")
        self.qemu.stdin.flush()

    def zap(self, timeout: float = 60) -> int:
        """Make the VMM zap every VM once (a memslot added and deleted: fast zap,
        kvm->arch.mmu_valid_gen toggles) and wait until it is done; returns the
        zap count."""
        self.send("zap")
        self.zaps += 1
        self._wait_for(f"KVMINSPECT-ZAPPED {self.zaps}", timeout)
        return self.zaps

    def run(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the shell *command* inside the host (python=True hosts; from /,
        stdin /dev/null, one command at a time) and return its exit status,
        stdout and stderr (text). A dump that arrives damaged (the checksum
        differs) is asked for again, up to three times."""
        if not self.python:
            raise HostError("run() needs EmulatedHost(python=True)")
        if "\n" in command or len(command) > 3000:
            raise ValueError("one line of at most 3000 characters")
        rid = f"r{next(self._runs)}x{os.getpid()}"
        self.send(f"run {rid} {command}")
        for attempt in range(1, 4):
            text = self._wait_for(f"KVMINSPECT-END {rid} err", timeout, count=attempt)
            try:
                rc, out = _parse_dump(text, rid, "out")
                _, err = _parse_dump(text, rid, "err")
            except ValueError:
                self.send(f"dump {rid}")
                continue
            return subprocess.CompletedProcess(command, rc, out.decode(errors="replace"),
                                               err.decode(errors="replace"))
        raise HostError(f"run {command!r}: the output arrived damaged three times")

    def _wait_for(self, line: str, timeout: float, count: int = 1) -> str:
        """Wait until the console has the line *line* (the tty ends lines with
        CR LF) *count* times; returns the console text."""
        pattern = re.compile(rf"^{re.escape(line)}\r?$", re.M)
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_text()
            if len(pattern.findall(text)) >= count:
                return text
            failed = "KVMINSPECT-FAILED" in text or "Kernel panic" in text
            if failed or self.qemu is None or self.qemu.poll() is not None:
                raise HostError(f"the host failed before {line}:\n{text[-4000:]}")
            if time.monotonic() > deadline:
                raise HostTimeout(f"no {line} after {timeout:.0f} s:\n{text[-4000:]}")
            time.sleep(0.2)


DEBUG_IN_HOST = "/debug"  # python=True hosts: the debug set, decompressed


@functools.cache
def _in_host_files() -> list[tuple[str, int, bytes, int]]:
    """python=True hosts' extra files: /bin/kvminspect, /debug/*, /tmp."""
    out = [("tmp", 0o41777, b"", 0), ("root", 0o40700, b"", 0),
           (DEBUG_IN_HOST.strip("/"), 0o40755, b"", 0), pack.WRAPPER]
    for n in DEBUG_FILES:
        data = lzma.decompress((DEBUG_DIR / f"{n}.xz").read_bytes())
        out.append((f"{DEBUG_IN_HOST.strip('/')}/{n}", 0o100644, data, 0))
    return out


def _parse_dump(text: str, rid: str, stream: str) -> tuple[int, bytes]:
    """The last dump of run *rid*'s *stream* on the console *text*: (exit
    status, bytes); ValueError if it is incomplete or damaged."""
    begins = list(re.finditer(rf"^KVMINSPECT-BEGIN {rid} {stream} (\d+) ([0-9a-f]{{64}})\r?$",
                              text, re.M))
    if not begins:
        raise ValueError("no BEGIN marker")
    b = begins[-1]
    end = re.compile(rf"^KVMINSPECT-END {rid} {stream}\r?$", re.M).search(text, b.end())
    if end is None:
        raise ValueError("no END marker")
    tag = f"KVMINSPECT-D {rid} {stream} "
    lines = [ln.rstrip("\r") for ln in text[b.end():end.start()].splitlines()]
    data = "".join(ln[len(tag):] for ln in lines if ln.startswith(tag))
    try:
        raw = gzip.decompress(base64.b64decode(data, validate=True))
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"damaged: {e}") from None
    if hashlib.sha256(raw).hexdigest() != b.group(2):
        raise ValueError("checksum differs")
    return int(b.group(1)), raw


def booted(**options):
    """A pytest fixture body: one EmulatedHost(**options) for the module, or a skip
    saying why the host cannot run here; stopped at the end."""
    import pytest

    try:
        host = EmulatedHost(**options).__enter__()
    except Unavailable as e:
        pytest.skip(f"cannot run an emulated KVM host: {e}")
    try:
        yield host
    finally:
        host.stop()


def check_record(run, truth: dict) -> None:
    """vms, vcpus, roots (with prev_roots) and unsync of a live 4-set shadow-MMU
    host against the VMM's record; *run*(COMMAND) returns that command's JSON."""
    (vm,) = run("vms")["vms"]
    assert vm["pid"] == truth["vmm_pid"] and vm["mmu"] == "shadow"
    assert vm["vendor"] == "kvm_amd" and vm["online_vcpus"] == len(truth["vcpus"])
    (vm,) = run("vcpus")["vms"]
    assert [v["tid"] for v in vm["vcpus"]] == [v["tid"] for v in truth["vcpus"]]
    assert [v["cr3"] for v in vm["vcpus"]] == [v["cr3"] for v in truth["vcpus"]]
    (vm,) = run("roots")["vms"]
    sets = {s["cr3"] for s in truth["sets"]}
    assert len(sets) == 4
    for v, tv in zip(vm["vcpus"], truth["vcpus"], strict=True):
        page = v["root"]["page"]
        assert page["gfn"] == hex(int(tv["cr3"], 16) >> 12) and not page["invalid"]
        prev = {p["pgd"] for p in v["prev_roots"]}
        assert prev == sets - {tv["cr3"]}  # 4 sets: the other three are cached
    (vm,) = run("unsync")["vms"]
    synced = sorted(leaf["gfn"] for r in vm["roots"] for b in r["batches"]
                    for leaf in b["leaves"])
    assert synced == sorted(g for s in truth["sets"] for g in s["unsync_gfns"])
