#!/usr/bin/env python3
"""Make one real vmcore fixture of a KVM host running a small VM.

The emulated host (L1) boots a Debian stock kernel under qemu-system-x86_64
(TCG, a CPU model with SVM), loads kvm + kvm_amd from a busybox initramfs and
runs our VMM (vmm.c + guest.S). When the VMM prints its record, the host's
memory is dumped through QMP dump-guest-memory, filtered with makedumpfile,
compressed, and written next to the small debug-info set and truth.json.
With --vms 2 the VMM runs two VMs in one process. With --big-shadow N or
--big-tdp N the VMM runs a big workload instead (N level-1 shadow or TDP MMU
pages, one working vCPU; see vmm.c), for benchmarks: such a core is written
where --out says, and truth.json describes the workload (see big_truth).
With --vmms N the host runs N VMM processes at once, each with the VMM's
usual options (see vmms_script; truth.json gets every VMM's record).
With --pair the host is dumped twice in one boot, before and after the VMM
zaps every VM (a fast zap), into NAME/before and NAME/after (see write_pair).

    tests/vmcores/pipeline/mkfixture.py --kernel 6.1 --mmu shadow --name 6.1-shadow
    tests/vmcores/pipeline/mkfixture.py --kernel 6.1 --mmu shadow --pair \
        --share-debug 6.1-shadow --name 6.1-shadow-pair
    tests/vmcores/pipeline/mkfixture.py --kernel 6.1 --mmu shadow --big-shadow 100000 \
        --host-mem 3072 --timeout 900 --compress none --out /var/tmp/big-100k

See tests/vmcores/README.md for the whole recipe and the prerequisites.
"""

from __future__ import annotations

import argparse
import glob
import json
import lzma
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VMCORES = HERE.parent
KERNELS = {
    # short name -> (packages holding the image and modules, -dbg package): the
    # newest of each series in Debian's archive when the fixtures were made
    # (5.10: bullseye; 7.3: trixie-backports; see tests/vmcores/README.md)
    "5.10": (("linux-image-5.10.0-32-amd64-unsigned",), "linux-image-5.10.0-32-amd64-dbg"),
    "6.1": (("linux-image-6.1.0-56-amd64",), "linux-image-6.1.0-56-amd64-dbg"),
    "6.12": (("linux-image-6.12.117+deb12-amd64-unsigned",),
             "linux-image-6.12.117+deb12-amd64-dbg"),
    # 7.x splits the image: linux-image-KV is a metapackage, the kernel is in
    # linux-binary-KV (usr/lib/modules/KV/vmlinuz), the modules in linux-modules-KV
    "7.3": (("linux-binary-7.3.4+deb13-amd64", "linux-modules-7.3.4+deb13-amd64"),
            "linux-image-7.3.4+deb13-amd64-dbg"),
}
# makedumpfile -d per kernel: 1.7.2 does not know the slab marking of 6.12 and
# later (page_type), and -d 31 can drop slab pages such as kvm->vcpu_array's xa_node
DUMP_LEVEL = {"5.10": 31, "6.1": 31, "6.12": 17, "7.3": 17}
MODULES = [  # load order; kvm-amd needs kvm and ccp, kvm needs irqbypass
    "kernel/virt/lib/irqbypass.ko",
    "kernel/arch/x86/kvm/kvm.ko",
    "kernel/drivers/char/hw_random/rng-core.ko",  # 5.10: ccp needs it (built in later)
    "kernel/drivers/crypto/ccp/ccp.ko",
    "kernel/arch/x86/kvm/kvm-amd.ko",
    "kernel/drivers/firmware/qemu_fw_cfg.ko",
]


def log(msg: str) -> None:
    print(f"mkfixture: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def fetch_kernel(work: Path, kernel: str, dbg: bool = True) -> tuple[Path, Path, str]:
    """apt-get download + dpkg-deb -x the image and -dbg packages (cached;
    the -dbg package only with *dbg*).

    Returns the image tree (every image package extracted into one directory),
    the -dbg tree and the kernel release.
    """
    image_pkgs, dbg_pkg = KERNELS[kernel]
    dl = work / "debs"
    dl.mkdir(parents=True, exist_ok=True)
    image_tree = work / "trees" / image_pkgs[0]
    dbg_tree = work / "trees" / dbg_pkg
    wanted = [(image_pkgs, image_tree)] + [((dbg_pkg,), dbg_tree)] * dbg
    for pkgs, tree in wanted:
        if (tree / ".done").exists():
            continue
        tree.mkdir(parents=True, exist_ok=True)
        for pkg in pkgs:
            if not glob.glob(str(dl / f"{pkg}_*.deb")):
                log(f"apt-get download {pkg}")
                run(["apt-get", "download", pkg], cwd=dl)
            deb = glob.glob(str(dl / f"{pkg}_*.deb"))[0]
            log(f"extracting {deb}")
            run(["dpkg-deb", "-x", deb, str(tree)])
        (tree / ".done").touch()
    release = os.listdir(modules_dir(image_tree))[0]
    return image_tree, dbg_tree, release


def modules_dir(tree: Path) -> Path:
    """lib/modules, or usr/lib/modules in 7.x packages (merged /usr)."""
    for d in ("lib/modules", "usr/lib/modules"):
        if (tree / d).is_dir():
            return tree / d
    raise FileNotFoundError(f"{tree}: no lib/modules")


def kernel_image(tree: Path, release: str) -> Path:
    """boot/vmlinuz-KV, or usr/lib/modules/KV/vmlinuz in 7.x packages."""
    for p in (tree / "boot" / f"vmlinuz-{release}", modules_dir(tree) / release / "vmlinuz"):
        if p.exists():
            return p
    raise FileNotFoundError(f"{tree}: no vmlinuz for {release}")


def build_vmm(work: Path) -> Path:
    """Compile the VMM statically (it runs from the initramfs)."""
    out = work / "vmm"
    srcs = [HERE / "vmm.c", HERE / "guest.S"]
    if not out.exists() or any(s.stat().st_mtime > out.stat().st_mtime for s in srcs):
        run(["gcc", "-static", "-O2", "-Wall", "-o", str(out), *map(str, srcs), "-lpthread"])
    return out


def module_bytes(tree: Path, release: str, rel: str) -> bytes | None:
    """A module's bytes (None if this kernel has it built in or lacks it);
    6.12 and 7.x ship .ko.xz, which busybox insmod cannot load."""
    base = modules_dir(tree) / release / rel
    if base.exists():
        return base.read_bytes()
    xz = base.parent / (base.name + ".xz")
    if xz.exists():
        return lzma.decompress(xz.read_bytes())
    return None


def busybox() -> str:
    """The busybox binary to put into the initramfs (it must be static)."""
    return shutil.which("busybox") or "/bin/busybox"


def newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive (what the kernel unpacks as an initramfs) of
    (path, mode, data) entries, in order; a directory's mode is 0o40755."""
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
        bname = name.encode() + b"\0"
        nlink = 2 if mode & 0o40000 else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(bname), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + bname
        pad4()
        out += data
        pad4()
    return bytes(out)


def write_initramfs(out: Path, vmm: Path, init: str, modules: dict[str, bytes]) -> Path:
    """A newc cpio with busybox, the modules (/mods/NAME), the VMM and /init."""
    entries = [(d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys", "mods")]
    entries += [("bin/busybox", 0o100755, Path(busybox()).read_bytes()),
                ("bin/vmm", 0o100755, vmm.read_bytes()),
                ("init", 0o100755, init.encode())]
    entries += [(f"mods/{name}", 0o100644, data) for name, data in modules.items()]
    out.write_bytes(newc(entries))
    return out


def build_initramfs(work: Path, tree: Path, release: str, vmm: Path, init: str) -> Path:
    """A newc cpio with busybox, the five modules, the VMM and /init."""
    modules = {}
    for rel in MODULES:
        data = module_bytes(tree, release, rel)
        if data is not None:
            modules[Path(rel).name] = data
    return write_initramfs(work / "initramfs.cpio", vmm, init, modules)


def big_kind(args: argparse.Namespace) -> str | None:
    """"shadow" (--big-shadow N), "tdp" (--big-tdp N) or None (the usual guest)."""
    if getattr(args, "big_shadow", None):
        return "shadow"
    if getattr(args, "big_tdp", None):
        return "tdp"
    return None


# vmm.c's -T layout: the memslot is TDP_BASE + N * HUGE bytes from GPA 0
TDP_BASE, HUGE = 1 << 30, 2 << 20
TCG_PHYS_BITS = 40  # QEMU's TCG CPUs' default MAXPHYADDR


def host_cpu(args: argparse.Namespace) -> str:
    """QEMU's -cpu for the emulated host: max, la57 off unless --la57, and
    phys-bits=46 when --big-tdp's memslot ends past 1 TiB (KVM refuses a
    memslot beyond the host CPU's MAXPHYADDR)."""
    cpu = "max" if args.la57 else "max,la57=off"
    if TDP_BASE + (getattr(args, "big_tdp", None) or 0) * HUGE > 1 << TCG_PHYS_BITS:
        cpu += ",phys-bits=46"
    return cpu


def vmm_command(args: argparse.Namespace) -> str:
    """The VMM's command line in /init (a stand-in that records nothing for
    the special hosts)."""
    kind = big_kind(args)
    if kind == "shadow":  # one vCPU: the big workloads need no more
        unsync = "" if args.big_unsync is None else f" -U {args.big_unsync}"
        return f"/bin/vmm -v 1 -B {args.big_shadow}{unsync}"
    if kind == "tdp":
        return f"/bin/vmm -v 1 -T {args.big_tdp}"
    vmm = f"/bin/vmm -v {args.vcpus} -s {args.sets} -w {args.windows} -r {args.rounds}"
    vmm += " -z" * args.zap + " -b" * args.busy + " -p" * args.pae + " -L" * args.large
    vmm += " -M" * args.smm
    if args.vms > 1:  # a second VM in the same process, with its own shape
        vmm += f" -n {args.vms} -V {args.vm2_vcpus} -S {args.vm2_sets} -W {args.vm2_windows}"
    if args.special:  # a host without a VM, or without kvm at all
        vmm = "echo 'KVMINSPECT-RECORD {}'; echo KVMINSPECT-READY"
    return vmm


def init_head(args: argparse.Namespace) -> str:
    """The start of the host's /init: mounts, KVM loaded with the requested
    MMU, the module parameters printed; it ends in /, ready to run the VMM."""
    npt = 0 if args.mmu == "shadow" else 1
    # kvm's tdp_mmu parameter: off by default in 5.10, on from 5.15
    tdp = {"tdp_legacy": "tdp_mmu=N", "tdp_mmu": "tdp_mmu=Y"}.get(args.mmu, "")
    if args.nx_huge_pages:  # kvm's nx_huge_pages: auto (off on AMD) unless given
        tdp += f" nx_huge_pages={args.nx_huge_pages}"
    # --large: transparent huge pages for every anonymous mapping (the VMM's
    # memslot asks with MADV_HUGEPAGE too)
    thp = ("echo always > /sys/kernel/mm/transparent_hugepage/enabled\n"
           if args.large else "")
    kvm = "" if args.special == "no-kvm" else f"""insmod irqbypass.ko
insmod kvm.ko {tdp}
[ -e rng-core.ko ] && insmod rng-core.ko
insmod ccp.ko
insmod kvm-amd.ko npt={npt}
"""
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
{thp}cd /mods
{kvm}insmod qemu_fw_cfg.ko
echo "KVMINSPECT-PARAMS npt=$(cat /sys/module/kvm_amd/parameters/npt)" \\
     "tdp_mmu=$(cat /sys/module/kvm/parameters/tdp_mmu 2>/dev/null)" \\
     "nx_huge_pages=$(cat /sys/module/kvm/parameters/nx_huge_pages 2>/dev/null)" \\
     "thp=$(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null | tr ' ' ,)"
cd /
"""


def vmms_script(vmm: str, n: int) -> str:
    """/init's part with --vmms N: N VMM processes (*vmm*, each one's command
    line) started in the background one after the other, each writing into
    /tmp/vmm/I (I = 0 .. N-1, the launch order); when all N have said
    KVMINSPECT-READY, their records in launch order, then KVMINSPECT-READY.
    A VMM that exits (a working one never does) or says KVMINSPECT-FAILED
    fails the host: its other lines, then KVMINSPECT-FAILED."""
    ready = "$(cat /tmp/vmm/* | grep -c KVMINSPECT-READY)"
    return f"""mkdir -p /tmp/vmm
pids=
i=0
while [ $i -lt {n} ]; do
    {vmm} >/tmp/vmm/$i 2>&1 &
    pids="$pids $i:$!"
    i=$((i + 1))
done
t=0
until [ "{ready}" -ge {n} ]; do
    for ip in $pids; do
        if ! kill -0 ${{ip#*:}} 2>/dev/null || grep -q KVMINSPECT-FAILED /tmp/vmm/${{ip%:*}}; then
            echo "KVMINSPECT-VMM ${{ip%:*}} failed:"; grep -v ^KVMINSPECT- /tmp/vmm/${{ip%:*}}
            echo KVMINSPECT-FAILED; sleep 100000
        fi
    done
    sleep 1; t=$((t + 1))
    [ $((t % 30)) = 0 ] && echo "KVMINSPECT-WAITING ${{t}}s: {ready} of {n} VMMs ready"
done
i=0
while [ $i -lt {n} ]; do grep KVMINSPECT-RECORD /tmp/vmm/$i; i=$((i + 1)); done
echo KVMINSPECT-READY
wait"""


def init_script(args: argparse.Namespace) -> str:
    """The host's /init: load KVM with the requested MMU, run the VMM.

    With --pair the VMM (-Z) waits after its record, and each line "zap" typed
    on the host's console (QEMU's stdin: zap_and_dump) sends it SIGUSR1: it
    zaps every VM once and prints KVMINSPECT-ZAPPED N."""
    vmm = vmm_command(args)
    if getattr(args, "vmms", 1) > 1:
        vmm = vmms_script(vmm, args.vmms)
    if getattr(args, "pair", False):
        vmm = f"""stty -echo </dev/console
{vmm} -Z &
vmm=$!
(while read -r line; do [ "$line" = zap ] && kill -USR1 $vmm; done) </dev/console &
wait $vmm"""
    return f"""{init_head(args)}{vmm}
echo KVMINSPECT-FAILED
sleep 100000
"""


# --real-guest: Debian's own QEMU runs inside the emulated host with KVM and
# boots the same Debian kernel as a guest, with a busybox initramfs whose
# processes keep forking (tests/vmcores/README.md, "A real VMM and a real guest")
QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
QEMU_FIRMWARE = [  # what QEMU loads for -M pc -nodefaults -kernel
    "/usr/share/seabios/bios-256k.bin",
    "/usr/share/qemu/linuxboot_dma.bin",
    "/usr/share/qemu/kvmvapic.bin",
]
GUEST_APPEND = "console=ttyS0 loglevel=4 panic=-1"
GUEST_FORKS_BEFORE_UP = 20  # `sh -c true` runs before the guest says it is up
GUEST_SETTLE = 10  # seconds the guest goes on forking after that, before the dump


def guest_init() -> str:
    """The real guest's /init (busybox): report what the guest knows about
    itself on ttyS0, start two long-lived processes, then fork for ever."""
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp
echo "KVMINSPECT-GUEST-RELEASE $(uname -r)"
echo "KVMINSPECT-GUEST-CMDLINE $(cat /proc/cmdline)"
echo "KVMINSPECT-GUEST-CODE $(grep 'Kernel code' /proc/iomem)"
echo "KVMINSPECT-GUEST-TEXT $(grep ' _text$' /proc/kallsyms)"
sleep 1000000 &
echo "KVMINSPECT-GUEST-PROC $! sleep"
mkfifo /tmp/fifo
cat /tmp/fifo > /dev/null &
echo "KVMINSPECT-GUEST-PROC $! cat"
n=0
while [ $n -lt {GUEST_FORKS_BEFORE_UP} ]; do sh -c true; n=$((n + 1)); done
echo "KVMINSPECT-GUEST-UP forks=$n uptime=$(cut -d' ' -f1 /proc/uptime)"
while :; do sh -c true; done
"""


def guest_initramfs(work: Path) -> Path:
    """The real guest's initramfs: busybox and guest_init()."""
    entries = [(d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys")]
    entries += [("bin/busybox", 0o100755, Path(busybox()).read_bytes()),
                ("init", 0o100755, guest_init().encode())]
    out = work / "guest-initramfs.cpio"
    out.write_bytes(newc(entries))
    return out


def qemu_files() -> dict[str, Path]:
    """QEMU as the emulated host needs it: the binary, every library ldd names
    (at the path ldd names, the loader too) and the firmware; in-host path ->
    file on this machine (symlinks followed)."""
    files = {QEMU_BINARY: Path(QEMU_BINARY)}
    ldd = subprocess.run(["ldd", QEMU_BINARY], check=True, capture_output=True, text=True)
    for line in ldd.stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)  # "libX => /path (0x..)" or "/lib64/ld-... (0x..)"
        if m:
            files[m.group(1)] = Path(m.group(1))
    for fw in QEMU_FIRMWARE:
        files[fw] = Path(fw)
    return files


def qemu_command(args: argparse.Namespace) -> list[str]:
    """The command line the host's /init gives QEMU (the guest's kernel and
    initramfs are /guest/vmlinuz and /guest/initrd in the host)."""
    return [QEMU_BINARY, "-accel", "kvm", "-cpu", "host", "-M", "pc", "-nodefaults",
            "-no-user-config", "-display", "none", "-serial", "file:/tmp/guest.serial",
            "-net", "none", "-m", f"{args.guest_mem}M", "-smp", str(args.guest_cpus),
            "-name", f"guest={args.guest_name},debug-threads=on",
            "-kernel", "/guest/vmlinuz", "-initrd", "/guest/initrd", "-append", GUEST_APPEND,
            # QEMU's own record of its memslots (KVM_SET_USER_MEMORY_REGION calls)
            "-trace", "kvm_set_user_memory", "-D", "/tmp/qemu.log"]


def real_guest_init(args: argparse.Namespace) -> str:
    """The host's /init with --real-guest: KVM loaded as for the VMM, QEMU in
    the background; when the guest's serial file says it is up, print what
    the host knows (QEMU's pid and threads, its memslot calls, the guest's
    serial output) and KVMINSPECT-READY."""
    argv = " ".join(f"'{a}'" for a in qemu_command(args))
    return init_head(args) + f"""mkdir -p /tmp
{argv} </dev/null >/tmp/qemu.out 2>&1 &
QPID=$!
echo "KVMINSPECT-QEMU-PID $QPID"
t=0
until grep -q KVMINSPECT-GUEST-UP /tmp/guest.serial 2>/dev/null; do
    if ! kill -0 $QPID 2>/dev/null; then
        echo KVMINSPECT-QEMU-EXITED; cat /tmp/qemu.out /tmp/qemu.log /tmp/guest.serial
        echo KVMINSPECT-FAILED; sleep 100000
    fi
    sleep 1; t=$((t + 1))
    [ $((t % 30)) = 0 ] && echo "KVMINSPECT-WAITING ${{t}}s: $(wc -c </tmp/guest.serial) bytes"
done
echo "KVMINSPECT-GUEST-IS-UP ${{t}}s"
sleep {GUEST_SETTLE}
for d in /proc/$QPID/task/*; do echo "KVMINSPECT-THREAD ${{d##*/}} $(cat $d/comm)"; done
sed -n 's/.*kvm_set_user_memory /KVMINSPECT-SLOT /p' /tmp/qemu.log
tr -d '\\r' </tmp/guest.serial | grep KVMINSPECT-GUEST
echo KVMINSPECT-READY
sleep 100000
"""


def build_real_guest_initramfs(work: Path, tree: Path, release: str,
                               args: argparse.Namespace) -> Path:
    """The host's initramfs with --real-guest: busybox, the modules, QEMU
    (qemu_files()), the guest's kernel (this kernel's vmlinuz) and initramfs,
    and real_guest_init() as /init."""
    files = {path: src.read_bytes() for path, src in qemu_files().items()}
    files["/guest/vmlinuz"] = kernel_image(tree, release).read_bytes()
    files["/guest/initrd"] = guest_initramfs(work).read_bytes()
    dirs = {"bin", "dev", "proc", "sys", "mods", "tmp"}
    for path in files:
        parent = Path(path.lstrip("/")).parent
        while str(parent) != ".":
            dirs.add(str(parent))
            parent = parent.parent
    entries = [(d, 0o40755, b"") for d in sorted(dirs, key=lambda d: (d.count("/"), d))]
    entries += [("bin/busybox", 0o100755, Path(busybox()).read_bytes()),
                ("init", 0o100755, real_guest_init(args).encode())]
    for rel in MODULES:
        data = module_bytes(tree, release, rel)
        if data is not None:
            entries.append((f"mods/{Path(rel).name}", 0o100644, data))
    entries += [(path.lstrip("/"), 0o100755, data) for path, data in files.items()]
    out = work / "initramfs-real-guest.cpio"
    out.write_bytes(newc(entries))
    log(f"host initramfs {out.stat().st_size >> 20} MiB ({len(files)} files for QEMU)")
    return out


def memslot_calls(lines: list[str]) -> list[dict]:
    """QEMU's memslots when the host was dumped, from its trace of
    KVM_SET_USER_MEMORY_REGION calls ("Slot#S flags=F gpa=G size=N ua=U ret=R",
    S = address space << 16 | slot id): the last call per slot wins, size 0
    deletes. Sorted by address space and gpa."""
    slots: dict[tuple[int, int], dict] = {}
    for line in lines:
        m = re.search(r"Slot#(\d+) flags=(0x[0-9a-f]+) gpa=(0x[0-9a-f]+) size=(0x[0-9a-f]+) "
                      r"ua=(0x[0-9a-f]+) ret=(-?\d+)", line)
        if not m or int(m.group(6)) != 0:
            continue
        s = int(m.group(1))
        key = (s >> 16, s & 0xFFFF)
        if int(m.group(4), 16) == 0:
            slots.pop(key, None)
        else:
            slots[key] = {"as_id": key[0], "slot": key[1], "flags": int(m.group(2), 16),
                          "gpa": m.group(3), "size": m.group(4), "hva": m.group(5)}
    return sorted(slots.values(), key=lambda d: (d["as_id"], int(d["gpa"], 16)))


def real_guest_record(text: str) -> dict:
    """What the host's console says with --real-guest (real_guest_init())."""
    def all_of(tag: str) -> list[str]:
        return [m.strip() for m in re.findall(rf"^{tag} (.*)$", text, re.M)]

    def one(tag: str) -> str:
        found = all_of(tag)
        if not found:
            sys.exit(f"mkfixture: no {tag} line on the host's console")
        return found[0]

    threads = [(int(t), comm) for t, comm in (x.split(" ", 1) for x in all_of("KVMINSPECT-THREAD"))]
    vcpus = sorted(({"vcpu_id": int(m.group(1)), "tid": tid, "comm": comm}
                    for tid, comm in threads if (m := re.fullmatch(r"CPU (\d+)/KVM", comm))),
                   key=lambda v: v["vcpu_id"])
    code = re.search(r"([0-9a-f]+)-([0-9a-f]+) : Kernel code", one("KVMINSPECT-GUEST-CODE"))
    text_va = one("KVMINSPECT-GUEST-TEXT").split()[0]
    up = re.search(r"forks=(\d+) uptime=([\d.]+)", one("KVMINSPECT-GUEST-UP"))
    return {
        "vmm_pid": int(one("KVMINSPECT-QEMU-PID")),
        "threads": [{"tid": t, "comm": c} for t, c in threads],
        "vcpus": vcpus,
        "memslots": memslot_calls(all_of("KVMINSPECT-SLOT")),
        "guest": {
            "kernel_release": one("KVMINSPECT-GUEST-RELEASE"),
            "cmdline": one("KVMINSPECT-GUEST-CMDLINE"),
            "kernel_code_gpa": [hex(int(code.group(1), 16)), hex(int(code.group(2), 16) + 1)]
            if code else None,
            "text_va": hex(int(text_va, 16)),
            "processes": [{"pid": int(p), "comm": c} for p, c in
                          (x.split(" ", 1) for x in all_of("KVMINSPECT-GUEST-PROC"))],
            "forks_when_up": int(up.group(1)),
            "uptime_when_up": float(up.group(2)),
        },
    }


DUMP_TRIES = 20  # --real-guest: dumps until one finds the VM's MMU idle (mmu_busy())


def mmu_busy(dump: Path, vmlinux: Path, kvm_ko: Path, pid: int) -> str | None:
    """Why the MMU of QEMU's VM (kvm->userspace_pid *pid*) in this dump is
    caught in the middle of a change, or None if it is not: kvm->mmu_lock
    held (a vCPU thread of a forking guest often is, e.g. in
    mmu_sync_children() between clearing a page's unsync and its parents'
    unsync_child_bitmap bits) or an MMU notifier invalidation in progress."""
    import drgn
    from drgn.helpers.linux.list import list_for_each_entry

    prog = drgn.Program()
    prog.set_core_dump(str(dump))
    prog.load_debug_info([str(vmlinux), str(kvm_ko)])
    for kvm in list_for_each_entry("struct kvm", prog["vm_list"].address_of_(), "vm_list"):
        if kvm.userspace_pid.value_() != pid:
            continue
        cnts = kvm.mmu_lock.raw_lock.cnts.counter.value_()  # qrwlock: 0xff writer, >> 9 readers
        if cnts:
            return f"mmu_lock {'held for write' if cnts & 0xFF else 'held for read'} ({cnts:#x})"
        if kvm.mmu_invalidate_in_progress.value_():
            return "an MMU notifier invalidation in progress"
        return None
    return f"no VM of pid {pid} on vm_list"


# makedumpfile -d with --real-guest: zero (1), cache (2, 4) and free (16) pages
# out, user pages (8) kept: the guest's RAM is QEMU's anonymous memory
REAL_GUEST_DUMP_LEVEL = 23


def shared_debug(work: Path, shared: Path, release: str) -> tuple[Path, Path]:
    """vmlinux and kvm.ko of the small debug set in fixture *shared*,
    decompressed into the work directory, for drgn."""
    out = work / "shared-debug" / release
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("vmlinux", "kvm.ko"):
        dst = out / name
        if not dst.exists():
            dst.write_bytes(lzma.decompress((shared / f"{name}.xz").read_bytes()))
        paths.append(dst)
    return paths[0], paths[1]


def guest_ram_in_dump(raw: Path, filtered: Path, vmlinux: Path, record: dict) -> dict:
    """Check that the filter kept the guest's RAM: every page of QEMU's
    memslots (distinct host virtual addresses) that QEMU's page tables map
    and that is not all zeros in the raw dump must be in the filtered dump,
    with the same bytes. Exits if one is not; returns the counts."""
    import drgn
    from drgn.helpers.linux.mm import follow_phys
    from drgn.helpers.linux.pid import find_task

    progs = []
    for core in (raw, filtered):
        prog = drgn.Program()
        prog.set_core_dump(str(core))
        prog.load_debug_info([str(vmlinux)])
        progs.append(prog)
    mm = find_task(progs[0], record["vmm_pid"]).mm
    pages = set()
    for slot in record["memslots"]:
        hva, size = int(slot["hva"], 16), int(slot["size"], 16)
        pages.update(range(hva, hva + size, 4096))
    counts = {"pages": len(pages), "mapped": 0, "nonzero": 0, "kept": 0}
    for hva in sorted(pages):
        try:
            phys = follow_phys(mm, hva).value_()
        except drgn.FaultError:
            continue
        counts["mapped"] += 1
        data = progs[0].read(phys, 4096, True)
        if not any(data):
            continue
        counts["nonzero"] += 1
        try:
            kept = progs[1].read(phys, 4096, True)
        except drgn.FaultError:
            kept = None
        if kept != data:
            sys.exit(f"mkfixture: guest RAM page at hva {hva:#x} (phys {phys:#x}) is "
                     f"{'not' if kept is None else 'different'} in the filtered dump")
        counts["kept"] += 1
    return counts


def real_guest_truth(record: dict, release: str, args: argparse.Namespace, params: str
                     ) -> dict:
    """truth.json with --real-guest: what the host knew (tests/vmcores/README.md)."""
    return {
        "kernel_release": release,
        "mmu": args.mmu,
        "vmm": "qemu",
        "paging_levels": 4,
        "vmm_pid": record["vmm_pid"],
        "vmm_comm": Path(QEMU_BINARY).name[:15],  # TASK_COMM_LEN - 1
        "vmm_argv": qemu_command(args),
        "guest_name": args.guest_name,
        "nvcpus": args.guest_cpus,
        "guest_mem_bytes": args.guest_mem << 20,
        "vcpus": record["vcpus"],
        "threads": record["threads"],
        "memslots": record["memslots"],
        "guest": record["guest"],
        "dumps": record["dumps"],  # the host was dumped until the VM's MMU was idle
        "module_params": params,
        "made_with": " ".join(sys.argv[1:]),
    }


class QMP:
    """Just enough of QEMU's machine protocol to dump memory and quit."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        for _ in range(100):
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                time.sleep(0.1)
        self.f = self.sock.makefile("rw")
        self.f.readline()  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **arguments) -> dict:
        self.f.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "return" in reply or "error" in reply:
                if "error" in reply:
                    raise RuntimeError(f"QMP {name}: {reply['error']}")
                return reply["return"]


def boot_and_dump(work: Path, tree: Path, release: str, initrd: Path, args: argparse.Namespace,
                  busy=None, then=None) -> tuple[Path, dict, str]:
    """Boot the host, wait for the VMM's record, dump memory over QMP.

    *busy*(dump, record), if given, says why a dump is not wanted (a string)
    or None: the host then runs on for a moment and is dumped again
    (DUMP_TRIES in all). *then*(qemu, qmp, console), if given, runs after
    the dump, before QEMU quits (--pair: zap_and_dump). The host's serial
    console is QEMU's stdio: its output goes to work/console.log, and lines
    written to qemu.stdin are typed on it."""
    kernel = kernel_image(tree, release)
    qmp_path = work / "qmp.sock"
    console = work / "console.log"
    dump = work / "vmcore.elf"
    for p in (qmp_path, console, dump):
        p.unlink(missing_ok=True)
    cpu = host_cpu(args)
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", cpu, "-smp", str(args.host_cpus),
        "-m", f"{args.host_mem}M", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 loglevel=4",
        "-device", "vmcoreinfo", "-display", "none", "-no-reboot",
        "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
        "-qmp", f"unix:{qmp_path},server=on,wait=off", "-monitor", "none",
    ]
    log(" ".join(cmd))
    with open(console, "wb") as out:
        qemu = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out)
    try:
        qmp = QMP(qmp_path)
        deadline = time.time() + args.timeout
        text = ""
        said = 0  # progress lines logged (--real-guest waits minutes)
        while time.time() < deadline:
            text = console.read_text(errors="replace") if console.exists() else ""
            progress = re.findall(r"^KVMINSPECT-(?:QEMU|WAITING|GUEST-IS-UP).*", text, re.M)
            for line in progress[said:]:
                log(line.strip())
            said = len(progress)
            if "KVMINSPECT-READY" in text or "KVMINSPECT-FAILED" in text or qemu.poll() is not None:
                break
            time.sleep(0.5)
        if "KVMINSPECT-READY" not in text:
            sys.exit(f"mkfixture: the VMM did not finish; console:\n{text[-4000:]}")
        if args.busy:
            time.sleep(1)  # let the busy vCPUs spin in guest mode for a while
        if getattr(args, "real_guest", False):
            record = real_guest_record(text)
        else:  # --vmms N: N records, the first one's fields at the top level
            records = [json.loads(r) for r in re.findall(r"KVMINSPECT-RECORD (\{.*\})", text)]
            record = {**records[0], "vmms": records} if len(records) > 1 else records[0]
        params = re.search(r"KVMINSPECT-PARAMS (.*)", text).group(1).strip()
        for attempt in range(1, DUMP_TRIES + 1):
            log("dumping memory")
            qmp.cmd("stop")
            dump.unlink(missing_ok=True)
            qmp.cmd("dump-guest-memory", paging=False, protocol=f"file:{dump}")
            why = busy(dump, record) if busy else None
            if why is None:
                if busy:
                    record["dumps"] = attempt  # the busy ones included
                break
            if attempt == DUMP_TRIES:
                sys.exit(f"mkfixture: {DUMP_TRIES} dumps, all busy ({why})")
            log(f"dump {attempt}: {why}; once more")
            qmp.cmd("cont")
            time.sleep(1 + attempt % 3)
        if then is not None:
            then(qemu, qmp, console)
        qmp.cmd("quit")
    finally:
        try:
            qemu.wait(timeout=30)
        except subprocess.TimeoutExpired:
            qemu.kill()
    return dump, record, params


PAIR_SIDES = ("before", "after")  # --pair: the two dumps of one boot, in this order


def zap_and_dump(qemu: subprocess.Popen, qmp: QMP, console: Path, dump: Path,
                 timeout: float) -> None:
    """--pair, after the first dump: the host runs on, "zap" is typed on its
    console (init_script turns it into a SIGUSR1 to the VMM, which zaps every
    VM: a memslot added and deleted, kvm_mmu_zap_all_fast), and when the VMM
    says KVMINSPECT-ZAPPED 1 the host is stopped and dumped again into *dump*.
    The halted vCPUs keep their roots, now invalid and obsolete: the zap's
    KVM_REQ_MMU_FREE_OBSOLETE_ROOTS does not wake a vCPU in kvm_vcpu_block."""
    assert qemu.stdin is not None
    qmp.cmd("cont")
    qemu.stdin.write(b"zap\n")
    qemu.stdin.flush()
    zapped = re.compile(r"^KVMINSPECT-ZAPPED 1\r?$", re.M)
    deadline = time.time() + timeout
    while not zapped.search(text := console.read_text(errors="replace")):
        if time.time() > deadline or qemu.poll() is not None or "KVMINSPECT-FAILED" in text:
            sys.exit(f"mkfixture: the VMM did not zap; console:\n{text[-4000:]}")
        time.sleep(0.5)
    log("zapped; dumping memory again")
    qmp.cmd("stop")
    dump.unlink(missing_ok=True)
    qmp.cmd("dump-guest-memory", paging=False, protocol=f"file:{dump}")


def fix_elf_phdrs(path: Path) -> None:
    """Move QEMU 7.2's program headers to offset 64 (makedumpfile needs that).

    QEMU writes its section headers at 64 and the program headers at 192;
    makedumpfile 1.7.2 then says "Can't get the number of PT_LOAD". The
    section header table is dropped (e_shoff = e_shnum = 0).
    """
    with open(path, "r+b") as f:
        ehdr = bytearray(f.read(64))
        phoff, = struct.unpack_from("<Q", ehdr, 32)
        phentsize, phnum = struct.unpack_from("<HH", ehdr, 54)
        if phoff == 64:
            return
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        struct.pack_into("<Q", ehdr, 32, 64)
        struct.pack_into("<Q", ehdr, 40, 0)          # e_shoff
        struct.pack_into("<HHH", ehdr, 58, 0, 0, 0)  # e_shentsize, e_shnum, e_shstrndx
        f.seek(0)
        f.write(ehdr)
        f.seek(64)
        f.write(table)


def kernel_text_range(elf: Path, vmlinux: Path) -> tuple[int, int]:
    """Physical range of the kernel's .text (_stext.._etext) in this dump."""
    import drgn

    prog = drgn.Program()
    prog.set_core_dump(str(elf))
    prog.load_debug_info([str(vmlinux)])
    phys_base = prog.read_u64(prog.symbol("phys_base").address)
    start, end = (prog.symbol(s).address for s in ("_stext", "_etext"))
    to_phys = lambda va: (va - 0xFFFFFFFF80000000 + phys_base) & (2**64 - 1)  # noqa: E731
    return to_phys(start) & ~0xFFF, (to_phys(end) + 0xFFF) & ~0xFFF


def drop_range(src: Path, dst: Path, lo: int, hi: int) -> int:
    """Copy an ELF core without the bytes of physical range [lo, hi).

    makedumpfile cannot exclude the kernel's text, which is a third of a
    filtered dump and which nothing here reads; its PT_LOAD bytes are cut out
    the way makedumpfile cuts excluded pages (segments split, no holes).
    Returns the number of bytes dropped.
    """
    with open(src, "rb") as f:
        ehdr = bytearray(f.read(64))
        phoff, = struct.unpack_from("<Q", ehdr, 32)
        phnum, = struct.unpack_from("<H", ehdr, 56)
        f.seek(phoff)
        phdrs = [list(struct.unpack("<IIQQQQQQ", f.read(56))) for _ in range(phnum)]
        out: list[tuple[list[int], int]] = []  # (phdr, source offset)
        dropped = 0
        for ph in phdrs:
            p_type, _, off, va, pa, filesz, memsz, _ = ph
            if p_type != 1 or pa + filesz <= lo or pa >= hi:
                out.append((ph, off))
                continue
            dropped += min(pa + filesz, hi) - max(pa, lo)
            if pa < lo:
                out.append(([1, ph[1], 0, va, pa, lo - pa, lo - pa, ph[7]], off))
            if pa + filesz > hi:
                d = hi - pa
                rest = filesz - d
                out.append(([1, ph[1], 0, va + d, hi, rest, max(rest, memsz - d), ph[7]], off + d))
        with open(dst, "wb") as g:
            struct.pack_into("<H", ehdr, 56, len(out))
            g.write(ehdr)
            pos = 64 + 56 * len(out)
            for ph, _ in out:
                ph[2] = pos
                pos += ph[5]
            for ph, _ in out:
                g.write(struct.pack("<IIQQQQQQ", *ph))
            for ph, srcoff in out:
                f.seek(srcoff)
                left = ph[5]
                while left:
                    chunk = f.read(min(left, 1 << 20))
                    g.write(chunk)
                    left -= len(chunk)
    return dropped


def filter_dump(dump: Path, out: Path, level: int, vmlinux: Path, compress: str = "xz",
                keep_dump: bool = True) -> Path:
    """makedumpfile -E -d LEVEL (ELF output), kernel text dropped, then xz -9e
    (*compress* "xz"), zstd -T2 ("zstd") or nothing ("none": *out* is the ELF).
    Without *keep_dump* the raw *dump* is deleted as soon as makedumpfile has
    written the filtered one (a big host's raw dump is as big as its memory).

    Returns the uncompressed ELF that was compressed into *out* (the caller
    may read it and then deletes it), or *out* itself with "none".
    """
    fix_elf_phdrs(dump)
    filtered = dump.with_suffix(".filtered")
    notext = dump.with_suffix(".notext")
    filtered.unlink(missing_ok=True)
    # its progress meter floods stderr: keep only the lines that say something
    r = subprocess.run(["makedumpfile", "-E", "-d", str(level), str(dump), str(filtered)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in r.stderr.replace("\r", "\n").splitlines():
        if line.strip() and "%]" not in line:
            log(f"makedumpfile: {line.strip()}")
    if r.returncode:
        sys.exit(f"mkfixture: makedumpfile failed ({r.returncode})")
    if not keep_dump:
        dump.unlink()
    lo, hi = kernel_text_range(filtered, vmlinux)
    n = drop_range(filtered, notext, lo, hi)
    log(f"dropped {n >> 10} KiB of kernel text at {lo:#x}-{hi:#x}")
    filtered.unlink()
    if compress == "none":
        os.replace(notext, out)
        return out
    cmd = ["xz", "-9e", "-T2", "-c"] if compress == "xz" else ["zstd", "-q", "-T2", "-c"]
    with open(out, "wb") as f:
        run([*cmd, str(notext)], stdout=f)
    return notext


def vm_list_order(elf: Path, vmlinux: Path, kvm_ko: Path, record: dict) -> list[int]:
    """The VMs on the dump's vm_list, head first, as creation indices (with
    --vmms, the record's "vmms": as the VMMs' launch indices).

    kvm_create_vm() adds a VM at the head of vm_list, so the newest comes
    first; this reads the order from the dump instead of assuming it. A VM
    is recognised by its vCPU threads (every VM of the VMM has the same
    userspace_pid), and must have its VMM's pid. Exits if the VMs on vm_list
    are not the record's.
    """
    import drgn
    from drgn.helpers.linux.list import list_for_each_entry
    from drgn.helpers.linux.pid import pid_task
    from drgn.helpers.linux.xarray import xa_load

    prog = drgn.Program()
    prog.set_core_dump(str(elf))
    prog.load_debug_info([str(vmlinux), str(kvm_ko)])
    vms = ([(vm["index_created"], record["vmm_pid"], vm["vcpus"]) for vm in record["vms"]]
           if "vms" in record else
           [(i, vmm["vmm_pid"], vmm["vcpus"]) for i, vmm in enumerate(record["vmms"])])
    by_tids = {frozenset(v["tid"] for v in vcpus): (index, pid) for index, pid, vcpus in vms}
    order = []
    for kvm in list_for_each_entry("struct kvm", prog["vm_list"].address_of_(), "vm_list"):
        n = kvm.online_vcpus.counter.value_()
        try:
            vcpus = [drgn.cast("struct kvm_vcpu *", xa_load(kvm.vcpu_array.address_of_(), i))
                     for i in range(n)]
        except AttributeError:  # 5.10: kvm->vcpus[]
            vcpus = [kvm.vcpus[i] for i in range(n)]
        tids = frozenset(pid_task(v.pid, 0).pid.value_() for v in vcpus)
        index, pid = by_tids.get(tids, (None, None))
        if kvm.userspace_pid.value_() != pid:
            sys.exit(f"mkfixture: VM {kvm.value_():#x} on vm_list is not the VMM's "
                     f"(pid {kvm.userspace_pid.value_()}, vCPU tids {sorted(tids)})")
        order.append(index)
    if sorted(order) != sorted(index for index, _ in by_tids.values()):
        sys.exit(f"mkfixture: vm_list holds VMs {order}, the VMM made {len(by_tids)}")
    return order


def debug_set(work: Path, dbg: Path, release: str, outdir: Path, shared: Path | None) -> None:
    """The small debug-info set (mkdebug.py, xz -9), made once per kernel;
    with *shared*, symlinks to that fixture's set (nothing is built)."""
    if shared is not None:
        for name in ("vmlinux", "kvm.ko", "kvm-amd.ko"):
            if not (shared / f"{name}.xz").exists():
                sys.exit(f"mkfixture: {shared / name}.xz does not exist")
            target = outdir / f"{name}.xz"
            target.unlink(missing_ok=True)
            target.symlink_to(os.path.relpath(shared / f"{name}.xz", outdir))
        return
    cache = work / "debug" / release
    cache.mkdir(parents=True, exist_ok=True)
    src = dbg / "usr/lib/debug"
    jobs = {
        "vmlinux": ("vmlinux", src / "boot" / f"vmlinux-{release}"),
        "kvm.ko": ("module", src / "lib/modules" / release / "kernel/arch/x86/kvm/kvm.ko"),
        "kvm-amd.ko": ("module", src / "lib/modules" / release / "kernel/arch/x86/kvm/kvm-amd.ko"),
    }
    for name, (kind, path) in jobs.items():
        z = cache / f"{name}.xz"
        if not z.exists():
            small = cache / name
            run([sys.executable, str(HERE / "mkdebug.py"), kind, str(path), str(small)])
            with open(z, "wb") as f:
                run(["xz", "-9", "-T2", "-c", str(small)], stdout=f)
            small.unlink()
        target = outdir / f"{name}.xz"
        target.unlink(missing_ok=True)
        shutil.copy(z, target)


def vm_truth(rec: dict, vmm_pid: int, args: argparse.Namespace) -> dict:
    """One VM's part of truth.json, from its part of the VMM's record."""
    sets = []
    for s in rec["sets"]:
        sets.append({
            "cr3": s["cr3"],
            "pt_gpas": s["pt_gpas"],
            "window_pts": s["window_pts"],
            "unsync_gfns": [hex(int(g, 16) >> 12) for g in s["window_pts"]]
            if s["written"] and args.mmu == "shadow" and not args.zap else [],
        })
    return {
        "mmu": args.mmu,
        "zapped": args.zap,
        "busy": args.busy,
        "paging_levels": 5 if args.la57 else 4,
        "guest_paging": rec["paging"],  # long (4-level) or pae (32-bit, 3-level)
        "vmm_pid": vmm_pid,
        "vcpus": [{"vcpu_id": v["vcpu_id"], "tid": v["tid"], "cr3": v["cr3"],
                   "final_set": v["final_set"]} for v in rec["vcpus"]],
        "sets": sets,
        "shared_pt": rec["shared_pt"],
        **({"large": rec["large"]} if "large" in rec else {}),
        **({"smm": rec["smm"]} if "smm" in rec else {}),
    }


def big_truth(record: dict, release: str, args: argparse.Namespace, params: str) -> dict:
    """truth.json of a big core: the workload (the VMM's "big" record), the vCPUs,
    and the MMU pages the VMM expects at least, per level ("1" .. "4").

    Shadow (--big-shadow N): N level-1 shadow pages (one per guest table), one
    per guest table above them (the VMM's "upper"), beside those of the
    identity map (direct pages and their guest PD/PDPT, not counted);
    unsync_gfns are the tables the guest wrote. TDP MMU (--big-tdp N): N
    level-1 pages, one level-2 page per 512 of them, the root and one level-3
    page (beside those of the guest's first GiB, not counted).
    """
    b = record["big"]
    n = b["n"]
    if b["kind"] == "shadow":
        levels = {"1": n, "2": b["upper"][0], "3": b["upper"][1], "4": b["upper"][2]}
        base = int(b["pt_base"], 16) >> 12
        unsync = [hex(base + j * b["stride"]) for j in range(b["unsync"])]
    else:
        levels = {"1": n, "2": -(-n // 512), "3": 1, "4": 1}
        unsync = []
    return {
        "kernel_release": release,
        "mmu": args.mmu,
        "big": b,
        "paging_levels": 5 if args.la57 else 4,
        "vmm_pid": record["vmm_pid"],
        "vcpus": [{"vcpu_id": v["vcpu_id"], "tid": v["tid"], "cr3": v["cr3"]}
                  for v in record["vcpus"]],
        "expected_min_pages": sum(levels.values()),
        "expected_min_pages_by_level": levels,
        "unsync_gfns": unsync,
        "module_params": params,
        "made_with": " ".join(sys.argv[1:]),
    }


def big_counts(elf: Path, vmlinux: Path, kvm_ko: Path, tdp: bool) -> dict:
    """What the dump holds, read with plain drgn: the VM's n_used_mmu_pages
    (shadow pages KVM counts) and, with the TDP MMU (*tdp*) and 6.1's
    tdp_mmu_pages list, the TDP MMU pages on it plus the TDP roots (the lists
    are not initialised without the TDP MMU). A count this kernel lacks is
    left out."""
    import drgn
    from drgn.helpers.linux.list import list_count_nodes, list_for_each_entry

    prog = drgn.Program()
    prog.set_core_dump(str(elf))
    prog.load_debug_info([str(vmlinux), str(kvm_ko)])
    out: dict = {}
    for kvm in list_for_each_entry("struct kvm", prog["vm_list"].address_of_(), "vm_list"):
        arch = kvm.arch
        try:
            out["n_used_mmu_pages"] = arch.n_used_mmu_pages.value_()
        except AttributeError:
            pass
        try:
            if tdp and arch.tdp_mmu_pages.type_.tag == "list_head":
                out["tdp_mmu_pages"] = (list_count_nodes(arch.tdp_mmu_pages.address_of_())
                                        + list_count_nodes(arch.tdp_mmu_roots.address_of_()))
        except AttributeError:
            pass
        break  # the big workloads make one VM
    return out


def truth(record: dict, release: str, args: argparse.Namespace, params: str,
          vm_order: list[int] | None = None) -> dict:
    """truth.json: the VMM's record in the shape the tests expect.

    The top level describes the first VM created; with several VMs, "vms"
    holds each VM's truth in creation order (the first is the top level's)
    and "vm_list_order" their creation indices in vm_list order, as read
    from the dump. With several VMM processes (--vmms), the top level is the
    first VMM's, "vmms" holds each VMM's truth in launch order ("index", the
    VMM's own "vmm_pid", vcpus, sets, ...: its record) and "vm_list_order"
    their launch indices in vm_list order.
    """
    if args.special:
        return {"kernel_release": release, "special": args.special, "mmu": None,
                "zapped": False, "busy": False, "paging_levels": 5 if args.la57 else 4,
                "vmm_pid": None, "vcpus": [], "sets": [], "module_params": params,
                "made_with": " ".join(sys.argv[1:])}
    t = {
        "kernel_release": release,
        **vm_truth(record, record["vmm_pid"], args),
        "module_params": params,
        "made_with": " ".join(sys.argv[1:]),
    }
    if "vms" in record:
        t["vms"] = [{"index_created": vm["index_created"],
                     **vm_truth(vm, record["vmm_pid"], args)} for vm in record["vms"]]
        t["vm_list_order"] = vm_order
    if "vmms" in record:
        t["vmms"] = [{"index": i, **vm_truth(vmm, vmm["vmm_pid"], args)}
                     for i, vmm in enumerate(record["vmms"])]
        t["vm_list_order"] = vm_order
    return t


def write_pair(outdir: Path, dumps: list[Path], core_name: str, record: dict, release: str,
               args: argparse.Namespace, params: str, level: int,
               debug: tuple[Path, Path, Path, Path | None]) -> None:
    """--pair: *dumps* (before, after the zap: one boot) each filtered into its
    own fixture directory, outdir/before and outdir/after (PAIR_SIDES), with
    the debug set and truth.json. Both truths are the VMM's one record (it
    prints it once, before the zap); the after side's says "zapped" (no unsync
    pages: the zap freed them), and each says its side in "pair". *debug*:
    vmlinux and kvm.ko for drgn, the -dbg tree and the shared fixture (or None)."""
    vmlinux, kvm_ko, dbg, shared = debug
    for side, dump in zip(PAIR_SIDES, dumps, strict=True):
        d = outdir / side
        d.mkdir(parents=True, exist_ok=True)
        core = d / core_name
        elf = filter_dump(dump, core, level, vmlinux, args.compress)
        dump.unlink()
        vm_order = vm_list_order(elf, vmlinux, kvm_ko, record) if "vms" in record else None
        if elf != core:
            elf.unlink()
        if not args.skip_debug:
            debug_set(args.work, dbg, release, d, shared)
        after = side == PAIR_SIDES[1]
        t = truth(record, release, argparse.Namespace(**{**vars(args), "zap": after}), params,
                  vm_order)
        t["pair"] = {"side": side, "zaps": int(after), "sides": list(PAIR_SIDES)}
        t["dump_level"] = level
        (d / "truth.json").write_text(json.dumps(t, indent=1) + "\n")
        log(f"wrote {d}: {core.stat().st_size} bytes of {core_name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", choices=sorted(KERNELS), required=True)
    ap.add_argument("--mmu", choices=["shadow", "tdp_mmu", "tdp_legacy"], required=True)
    ap.add_argument("--name", help="fixture directory under tests/vmcores")
    ap.add_argument("--out", type=Path,
                    help="write the fixture into this directory instead (no --name needed)")
    ap.add_argument("--compress", choices=["xz", "zstd", "none"], default="xz",
                    help="the filtered dump as vmcore.xz (default), vmcore.zst or vmcore (ELF)")
    ap.add_argument("--big-shadow", type=int, metavar="N",
                    help="big workload: N guest level-1 tables, N level-1 shadow pages "
                    "(--mmu shadow; VMM -B)")
    ap.add_argument("--big-unsync", type=int, metavar="M",
                    help="with --big-shadow: tables the guest writes (default min(800, N))")
    ap.add_argument("--big-tdp", type=int, metavar="N",
                    help="big workload: N 2 MiB regions touched, N level-1 TDP MMU pages "
                    "(--mmu tdp_mmu; VMM -T)")
    ap.add_argument("--zap", action="store_true", help="delete a memslot after the workload")
    ap.add_argument("--pair", action="store_true",
                    help="dump the host twice in one boot, before and after the VMM zaps "
                    "(VMM -Z): NAME/before and NAME/after")
    ap.add_argument("--busy", action="store_true", help="vCPUs spin in guest mode")
    ap.add_argument("--special", choices=["no-vm", "no-kvm"],
                    help="a host with kvm loaded but no VM, or without kvm")
    ap.add_argument("--la57", action="store_true", help="5-level paging in the host")
    ap.add_argument("--pae", action="store_true",
                    help="the guest runs in 32-bit mode with PAE paging (pae_root roots)")
    ap.add_argument("--large", action="store_true",
                    help="host THP on, the guest maps two 2 MiB pages (data, code) over a "
                    "THP-backed 8 MiB memslot (VMM -L)")
    ap.add_argument("--smm", action="store_true",
                    help="the last vCPU takes an SMI (KVM_SMI) and halts in SMM, with "
                    "memslot 0 also in address space 1 (VMM -M)")
    ap.add_argument("--nx-huge-pages", choices=["Y", "N"],
                    help="kvm's nx_huge_pages parameter (default: the kernel's auto)")
    ap.add_argument("--vcpus", type=int, default=4)
    ap.add_argument("--sets", type=int, default=4)
    ap.add_argument("--windows", default="20,1,2,1",
                    help="level-1 page tables the guest writes, per set")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vms", type=int, choices=[1, 2], default=1,
                    help="VMs in the VMM process (VMM -n)")
    ap.add_argument("--vmms", type=int, default=1, metavar="N",
                    help="VMM processes in the host, each with the options above (one VM "
                    "each unless --vms 2); truth.json gets every one's record")
    ap.add_argument("--vm2-vcpus", type=int, default=2, help="vCPUs of the second VM")
    ap.add_argument("--vm2-sets", type=int, default=2, help="page-table sets of the second VM")
    ap.add_argument("--vm2-windows", default="1,3", help="windows per set of the second VM")
    ap.add_argument("--real-guest", action="store_true",
                    help="Debian's qemu-system-x86_64 in the host boots this kernel as a "
                    "guest with a forking busybox initramfs, instead of our VMM (--mmu shadow; "
                    "default --host-mem 2048, --timeout 1800, --dump-level 23)")
    ap.add_argument("--guest-mem", type=int, default=96, help="--real-guest: guest MiB")
    ap.add_argument("--guest-cpus", type=int, default=2, help="--real-guest: guest vCPUs")
    ap.add_argument("--guest-name", default="kvminspect-linux",
                    help="--real-guest: QEMU's -name guest=NAME")
    ap.add_argument("--host-mem", type=int, default=None, help="MiB (default 256)")
    ap.add_argument("--host-cpus", type=int, default=2)
    ap.add_argument("--dump-level", type=int, default=None,
                    help="makedumpfile -d (default: DUMP_LEVEL of the kernel, see README)")
    ap.add_argument("--share-debug", metavar="FIXTURE",
                    help="symlink the debug files of this fixture instead of copying")
    ap.add_argument("--skip-debug", action="store_true",
                    help="leave the debug files in the fixture directory as they are")
    ap.add_argument("--timeout", type=int, default=None, help="seconds (default 300)")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/kvminspect-fixtures"))
    args = ap.parse_args()
    if not args.name and not args.out:
        ap.error("give --name or --out")
    if args.smm and (args.pae or args.large or args.vms > 1 or args.busy or args.big_shadow
                     or args.big_tdp):
        ap.error("--smm takes no --pae, --large, --vms 2, --busy or big workload")
    if args.large and (args.pae or args.big_shadow or args.big_tdp):
        ap.error("--large takes no --pae, --big-shadow or --big-tdp")
    if args.big_shadow and args.big_tdp:
        ap.error("--big-shadow and --big-tdp exclude each other")
    if args.big_shadow and args.mmu != "shadow" or args.big_tdp and args.mmu != "tdp_mmu":
        ap.error("--big-shadow needs --mmu shadow, --big-tdp --mmu tdp_mmu")
    if args.real_guest and (args.mmu != "shadow" or args.special or args.big_shadow
                            or args.big_tdp or args.zap or args.busy or args.pae or args.large
                            or args.smm or args.vms > 1 or args.la57):
        # npt=1 under TCG crashed the emulated host after 13 minutes
        ap.error("--real-guest needs --mmu shadow and takes none of the VMM's options")
    if args.pair and (args.zap or args.busy or args.special or args.real_guest
                      or big_kind(args)):
        ap.error("--pair zaps between its two dumps: no --zap, --busy, --special, "
                 "--real-guest or big workload")
    if args.vmms < 1 or args.vmms > 1 and (args.vms > 1 or args.pair or args.special
                                           or args.real_guest or big_kind(args)):
        ap.error("--vmms N: N >= 1; more than one takes no --vms 2, --pair, --special, "
                 "--real-guest or big workload")
    if args.host_mem is None:
        args.host_mem = 2048 if args.real_guest else 256
    if args.timeout is None:
        args.timeout = 1800 if args.real_guest else 300

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    # with --share-debug, drgn reads the dump with that fixture's small debug set:
    # the -dbg package is not downloaded
    shared = VMCORES / args.share_debug if args.share_debug else None
    tree, dbg, release = fetch_kernel(work, args.kernel, dbg=shared is None)
    if args.real_guest:
        initrd = build_real_guest_initramfs(work, tree, release, args)
    else:
        vmm = build_vmm(work)
        initrd = build_initramfs(work, tree, release, vmm, init_script(args))
    if shared is not None:
        vmlinux, kvm_ko = shared_debug(work, shared, release)
    else:
        vmlinux = dbg / "usr/lib/debug/boot" / f"vmlinux-{release}"
        kvm_ko = dbg / "usr/lib/debug/lib/modules" / release / "kernel/arch/x86/kvm/kvm.ko"
    busy = None
    if args.real_guest:  # dump when no vCPU thread is changing the MMU
        busy = lambda dump, record: mmu_busy(dump, vmlinux, kvm_ko, record["vmm_pid"])  # noqa: E731
    then = None
    if args.pair:  # the same boot dumped again, after a fast zap
        after = work / "vmcore-after.elf"
        then = lambda qemu, qmp, console: zap_and_dump(qemu, qmp, console, after,  # noqa: E731
                                                       args.timeout)
    t0 = time.time()
    dump, record, params = boot_and_dump(work, tree, release, initrd, args, busy, then)
    log(f"booted and dumped in {time.time() - t0:.0f}s ({params})")

    outdir = args.out if args.out else VMCORES / args.name
    outdir.mkdir(parents=True, exist_ok=True)
    level = args.dump_level if args.dump_level is not None else (
        REAL_GUEST_DUMP_LEVEL if args.real_guest else DUMP_LEVEL[args.kernel])
    core = outdir / {"xz": "vmcore.xz", "zstd": "vmcore.zst", "none": "vmcore"}[args.compress]
    if args.pair:  # two fixture directories of one boot
        write_pair(outdir, [dump, after], core.name, record, release, args, params, level,
                   (vmlinux, kvm_ko, dbg, shared))
        return
    t0 = time.time()
    # the raw dump is kept only for guest_ram_in_dump
    elf = filter_dump(dump, core, level, vmlinux, args.compress, keep_dump=args.real_guest)
    log(f"filtered in {time.time() - t0:.0f}s")
    in_dump = None
    if args.real_guest:
        in_dump = guest_ram_in_dump(dump, elf, vmlinux, record)
        log(f"guest RAM in the dump: {in_dump}")
        dump.unlink()
    vm_order = None
    if "vms" in record or "vmms" in record:
        vm_order = vm_list_order(elf, vmlinux, kvm_ko, record)
        log(f"vm_list, head first: VMs {vm_order} "
            f"({'creation' if 'vms' in record else 'VMM launch'} order)")
    counts = big_counts(elf, vmlinux, kvm_ko, args.mmu == "tdp_mmu") if "big" in record else None
    if elf != core:
        elf.unlink()
    if not args.skip_debug:
        debug_set(work, dbg, release, outdir, shared)
    if counts is not None:
        t = big_truth(record, release, args, params)
        t["in_dump"] = counts
        log(f"in the dump: {counts}; expected at least {t['expected_min_pages']}")
    elif args.real_guest:
        t = real_guest_truth(record, release, args, params)
        t["in_dump"] = in_dump
    else:
        t = truth(record, release, args, params, vm_order)
    t["dump_level"] = level
    (outdir / "truth.json").write_text(json.dumps(t, indent=1) + "\n")
    sizes = {p.name: p.stat().st_size for p in outdir.iterdir() if not p.is_symlink()}
    log(f"wrote {outdir}: {sizes}")


if __name__ == "__main__":
    main()
