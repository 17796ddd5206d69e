"""A real VMM and a real guest: Debian's QEMU in the emulated host runs Debian's
6.1 kernel with a busybox initramfs that keeps forking (mkfixture --real-guest,
tests/vmcores/README.md). truth.json is what the host knew: QEMU's pid and
threads, its memslots (from QEMU's own trace of KVM_SET_USER_MEMORY_REGION),
what the guest printed about itself. The host was dumped when no vCPU thread
held kvm->mmu_lock (truth["dumps"] counts the dumps that took).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import REAL_GUEST, VMCORES, open_fixture, run_main, truth

pytestmark = pytest.mark.skipif(not REAL_GUEST, reason="no --real-guest fixture")

# the user address every guest process maps: busybox (static, not PIE) at 0x400000,
# its ELF header, from the guest's page cache
BUSYBOX_HEADER = 0x400000

# every command, on its own (the addresses: the guest kernel's _text, busybox's
# header; the gfns: the guest kernel's first, filled in per fixture)
COMMANDS = ["vms", "vm", "vcpus", "roots", "tree", "check --audit", "diagnose", "unsync",
            "stats", "walk TEXT", "walk --vcpu 1 TEXT", f"walk {BUSYBOX_HEADER:#x}",
            "rmap CODE", "rmap --stats"]


def cli(name: str, args: list[str], capsys, monkeypatch, json_out: bool = False
        ) -> tuple[int, str, str]:
    monkeypatch.setenv("COLUMNS", "100")
    return run_main(["-c", str(VMCORES / name), *(["--json"] if json_out else []), *args],
                    capsys)


def doc(name: str, args: list[str], capsys, monkeypatch) -> dict:
    """One command's JSON document; nothing on stderr, no error or warning."""
    status, out, err = cli(name, args, capsys, monkeypatch, json_out=True)
    assert (status, err) == (0, ""), err
    d = json.loads(out)
    assert d["errors"] == [] and d["warnings"] == [], (d["errors"], d["warnings"])
    return d


def expand(command: str, t: dict) -> list[str]:
    code_gfn = int(t["guest"]["kernel_code_gpa"][0], 16) >> 12
    return (command.replace("TEXT", t["guest"]["text_va"])
            .replace("CODE", f"{code_gfn:#x}").split())


@pytest.mark.parametrize("name", REAL_GUEST)
def test_truth(name: str) -> None:
    """What the pipeline recorded: Debian's 6.1 kernel on both sides (the repo's
    6.1 debug set opens the guest too), QEMU's memslots in address spaces 0
    and 1, and every non-zero page of the guest's RAM in the filtered dump."""
    t = truth(name)
    assert t["vmm"] == "qemu" and t["mmu"] == "shadow"
    assert t["kernel_release"] == t["guest"]["kernel_release"] == "6.1.0-56-amd64"
    assert t["guest"]["cmdline"] == t["vmm_argv"][t["vmm_argv"].index("-append") + 1]
    assert {s["as_id"] for s in t["memslots"]} == {0, 1}
    assert [v["vcpu_id"] for v in t["vcpus"]] == list(range(t["nvcpus"]))
    assert t["in_dump"]["kept"] == t["in_dump"]["nonzero"] > 0
    ram = sum(int(s["size"], 16) for s in t["memslots"] if s["as_id"] == 0 and s["flags"] == 0)
    assert ram == t["guest_mem_bytes"]  # the RAM slots add up to -m (the BIOS ROM is read-only)


@pytest.mark.parametrize("name", REAL_GUEST)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_runs_clean(name: str, command: str, capsys, monkeypatch) -> None:
    """Text and JSON: exit 0, nothing on stderr, no error or warning finding."""
    args = expand(command, truth(name))
    status, out, err = cli(name, args, capsys, monkeypatch)
    assert (status, err) == (0, "") and out
    assert "error" not in out.lower() or args[0] in ("check", "diagnose")
    doc(name, args, capsys, monkeypatch)


@pytest.mark.parametrize("name", REAL_GUEST)
def test_vms_shows_qemu_and_the_guest_name(name: str, capsys, monkeypatch) -> None:
    t = truth(name)
    status, out, _ = cli(name, ["vms"], capsys, monkeypatch)
    assert status == 0  # the text's layout is test_commands'; here: what it says
    assert t["vmm_comm"] in out.split()
    assert f"{t['guest_name']} (kvm-{t['vmm_pid']})" in out
    (vm,) = doc(name, ["vms"], capsys, monkeypatch)["vms"]
    assert (vm["pid"], vm["comm"], vm["guest_name"], vm["stats_id"]) == (
        t["vmm_pid"], t["vmm_comm"], t["guest_name"], f"kvm-{t['vmm_pid']}")
    assert vm["online_vcpus"] == vm["created_vcpus"] == t["nvcpus"]
    assert vm["mmu"] == "shadow" and vm["vendor"] == "kvm_amd"


@pytest.mark.parametrize("name", REAL_GUEST)
def test_vm_selected_by_guest_name(name: str, capsys, monkeypatch) -> None:
    t = truth(name)
    (vm,) = doc(name, ["vm", "--vm", t["guest_name"]], capsys, monkeypatch)["vms"]
    assert vm["pid"] == t["vmm_pid"]


@pytest.mark.parametrize("name", REAL_GUEST)
def test_memslots_are_qemus(name: str, capsys, monkeypatch) -> None:
    """The memslots KVM holds are those QEMU's trace of its
    KVM_SET_USER_MEMORY_REGION calls leaves (last call per slot, size 0 deletes)."""
    (vm,) = doc(name, ["vm"], capsys, monkeypatch)["vms"]
    got = sorted((m["as_id"], m["id"], int(m["base_gfn"], 16), m["npages"],
                  int(m["userspace_addr"], 16), m["flags"]) for m in vm["memslots"])
    want = sorted((s["as_id"], s["slot"], int(s["gpa"], 16) >> 12, int(s["size"], 16) >> 12,
                   int(s["hva"], 16), s["flags"]) for s in truth(name)["memslots"])
    assert got == want


@pytest.mark.parametrize("name", REAL_GUEST)
def test_vcpus_are_qemus_threads(name: str, capsys, monkeypatch) -> None:
    (vm,) = doc(name, ["vcpus"], capsys, monkeypatch)["vms"]
    assert [(v["vcpu_id"], v["tid"], v["comm"]) for v in vm["vcpus"]] == [
        (v["vcpu_id"], v["tid"], v["comm"]) for v in truth(name)["vcpus"]]
    assert all(v["mmu"] == "root_mmu" and v["root_level"] == 4 for v in vm["vcpus"])


@pytest.mark.parametrize("name", REAL_GUEST)
def test_roots(name: str, capsys, monkeypatch) -> None:
    """Every vCPU has a 4-level shadow root for its CR3, and Linux's context
    switches left several other L4 roots in prev_roots."""
    (vm,) = doc(name, ["roots"], capsys, monkeypatch)["vms"]
    prev = set()
    for v in vm["vcpus"]:
        assert v["root"]["state"] == "page" and v["root"]["page"]["level"] == 4
        assert v["root"]["pgd"] == v["cr3"]
        assert int(v["root"]["page"]["gfn"], 16) == int(v["cr3"], 16) >> 12
        prev |= {r["page"]["sp"] for r in v["prev_roots"]
                 if r["state"] == "page" and r["page"]["level"] == 4}
    assert len(prev) >= 2


@pytest.mark.parametrize("name", REAL_GUEST)
def test_audit_clean(name: str, capsys, monkeypatch) -> None:
    """check --audit: no error, no warning (info only: the lazily cleared
    unsync_child_bitmap bits and orphans a forking guest leaves)."""
    (vm,) = doc(name, ["check", "--audit"], capsys, monkeypatch)["vms"]
    assert (vm["summary"]["error"], vm["summary"]["warning"]) == (0, 0)
    assert {f["severity"] for f in vm["findings"]} <= {"info"}


@pytest.mark.parametrize("name", REAL_GUEST)
def test_diagnose_healthy_on_one_screen(name: str, capsys, monkeypatch) -> None:
    status, out, err = cli(name, ["diagnose"], capsys, monkeypatch)
    assert (status, err) == (0, "")
    assert ": HEALTHY (0 errors, 0 warnings," in out
    assert "mmu_lock free" in out and "no invalidation in progress" in out
    assert "none stuck" in out
    lines = out.splitlines()
    assert len(lines) <= 30 and max(map(len, lines)) <= 100
    (vm,) = doc(name, ["diagnose"], capsys, monkeypatch)["vms"]
    assert vm["verdict"] == "healthy"
    assert vm["audit"]["pages"] > 100 and vm["audit"]["leaves"] > 1000
    assert vm["audit"]["unchecked"] == 0


@pytest.mark.parametrize("name", REAL_GUEST)
def test_walk_guest_kernel_text(name: str, capsys, monkeypatch) -> None:
    """The guest kernel's _text, from every vCPU's root: a 2 MiB SPTE onto the
    gfn of the guest's "Kernel code" (/proc/iomem), the page the memslot maps."""
    t = truth(name)
    code_gfn = int(t["guest"]["kernel_code_gpa"][0], 16) >> 12
    for vcpu in range(t["nvcpus"]):
        (vm,) = doc(name, ["walk", "--vcpu", str(vcpu), t["guest"]["text_va"]],
                    capsys, monkeypatch)["vms"]
        (w,) = vm["walks"]
        assert w["kind"] == "gva" and w["stop"] == "large"
        assert w["steps"][-1]["level"] == 2 and w["steps"][-1]["bits"]["large"]
        assert w["steps"][-1]["bits"]["x"] and not w["steps"][-1]["bits"]["w"]
        assert int(w["memslot"]["gfn"], 16) == code_gfn
        assert w["memslot"]["verdict"] == "match"


@pytest.mark.parametrize("name", REAL_GUEST)
def test_rmap_of_guest_kernel_code(name: str, capsys, monkeypatch) -> None:
    """rmap of the guest kernel's first gfn: the 2 MiB SPTE the walk found."""
    t = truth(name)
    (vm,) = doc(name, ["walk", t["guest"]["text_va"]], capsys, monkeypatch)["vms"]
    leaf = vm["walks"][0]["steps"][-1]
    code_gfn = int(t["guest"]["kernel_code_gpa"][0], 16) >> 12
    (vm,) = doc(name, ["rmap", f"{code_gfn:#x}"], capsys, monkeypatch)["vms"]
    found = {(s["sp"], s["index"], s["value"], s["size"]) for s in vm["sptes"]}
    assert (leaf["table"], leaf["index"], leaf["value"], "2M") in found


@pytest.mark.parametrize("name", REAL_GUEST)
def test_walk_and_rmap_of_a_guest_user_page(name: str, capsys, monkeypatch) -> None:
    """busybox's ELF header, mapped at 0x400000 in the guest process a vCPU
    runs: a 4 KiB SPTE onto the page the memslot maps, whose bytes (guest RAM,
    QEMU's anonymous memory, kept by the filter) start with the ELF magic; and
    rmap of its gfn lists that SPTE."""
    prog = open_fixture(name).prog
    leaves = 0
    for vcpu in range(truth(name)["nvcpus"]):
        (vm,) = doc(name, ["walk", "--vcpu", str(vcpu), hex(BUSYBOX_HEADER)],
                    capsys, monkeypatch)["vms"]
        (w,) = vm["walks"]
        if w["stop"] != "leaf":
            continue
        leaves += 1
        leaf = w["steps"][-1]
        assert leaf["level"] == 1 and w["memslot"]["verdict"] == "match"
        assert prog.read(int(w["pfn"], 16) << 12, 4, True) == b"\x7fELF"
        (vm,) = doc(name, ["rmap", w["memslot"]["gfn"]], capsys, monkeypatch)["vms"]
        assert (leaf["table"], leaf["index"], leaf["value"]) in {
            (s["sp"], s["index"], s["value"]) for s in vm["sptes"]}
    assert leaves


@pytest.mark.parametrize("name", REAL_GUEST)
def test_tree_and_stats(name: str, capsys, monkeypatch) -> None:
    """Hundreds of shadow pages (most of them orphans the exited processes
    left), the same count in tree, stats and vms; 2 MiB SPTEs counted."""
    (tree,) = doc(name, ["tree"], capsys, monkeypatch)["vms"]
    (stats,) = doc(name, ["stats"], capsys, monkeypatch)["vms"]
    (vm,) = doc(name, ["vms"], capsys, monkeypatch)["vms"]
    assert tree["pages"] == vm["n_used_mmu_pages"] > 100
    assert tree["roots"] >= 2 * truth(name)["nvcpus"] and tree["orphans"] > 0
    assert stats["stat"]["pages_2m"] > 0 and stats["stat"]["pages_4k"] > 1000
