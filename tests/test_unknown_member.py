"""A kernel kvminspect has never seen: members it expects are missing.

The real 6.1 fixture is opened with a copy of its debug set in which some
struct members are renamed in the DWARF string table (kvm.ko, kvm-amd.ko):
to drgn that kernel simply lacks them. Every command must still exit 0, show
those fields as unknown (the string "unknown" in JSON, distinct from null
and from INVALID_PAGE), name each member and the kernel release in a warning
(stderr and the JSON "warnings" list), and print everything else as before.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import pytest

from tests.conftest import VMCORES, truth
from tests.conftest import run_main as run
from tests.test_schema import validate

FIXTURE = VMCORES / "6.1-shadow"
RELEASE = truth("6.1-shadow")["kernel_release"]
# (struct, member): renamed away in the DWARF; what shows it
HIDDEN = {
    ("struct kvm_arch", "n_used_mmu_pages"): "vms",
    ("struct kvm_vcpu_arch", "mp_state"): "vcpus",
    ("struct kvm_mmu_page", "root_count"): "roots",
    ("struct kvm_mmu_page", "unsync_child_bitmap"): "unsync",
}
COMMANDS = ["vms", "vm 0", "vcpus", "roots", "tree", "unsync", "stats", "check", "sp --gfn 0x101",
            "walk 0x200000"]
# kvm.ko globals renamed away (symbol and DWARF): SPTE bits they decode are unknown
HIDDEN_GLOBALS = ("shadow_mmu_writable_mask",)


def hide(data: bytes, member: str) -> bytes:
    """*data* with the NUL-delimited string *member* renamed (first byte -> 'X')."""
    old = b"\0" + member.encode() + b"\0"
    new = b"\0X" + member.encode()[1:] + b"\0"
    return data.replace(old, new)


@pytest.fixture(scope="module")
def hidden_debug(tmp_path_factory) -> Path:
    """The 6.1 debug set with the HIDDEN members renamed in kvm.ko and kvm-amd.ko."""
    d = tmp_path_factory.mktemp("hidden-debug")
    for name in ("vmlinux", "kvm.ko", "kvm-amd.ko"):
        data = lzma.decompress((FIXTURE / f"{name}.xz").read_bytes())
        if name != "vmlinux":
            for _, member in HIDDEN:
                data = hide(data, member)
            for name_ in HIDDEN_GLOBALS:
                data = hide(data, name_)
        (d / name).write_bytes(data)
    kvm = (d / "kvm.ko").read_bytes()
    for _, member in HIDDEN:  # the rename took: the kernel now lacks the member
        assert b"\0" + member.encode() + b"\0" not in kvm, member
    return d


def one_shot(debug: Path, command: str, capsys, json_: bool = False) -> tuple[int, str, str]:
    argv = ["-c", str(FIXTURE / "vmcore.xz"), "-s", str(debug), *command.split()]
    return run(argv + (["--json"] if json_ else []), capsys)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_warns_and_prints(hidden_debug: Path, command: str, capsys) -> None:
    status, out, err = one_shot(hidden_debug, command, capsys)
    assert status == 0, err
    assert out.strip(), f"{command} printed nothing"
    assert "Traceback" not in err and "internal error" not in err
    for struct, member in HIDDEN:
        line = f"{struct} has no member {member} in kernel {RELEASE}"
        assert line in err, (command, err)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "vm 0"])
def test_json_names_each_missing_member(hidden_debug: Path, command: str, capsys) -> None:
    status, out, err = one_shot(hidden_debug, command, capsys, json_=True)
    assert status == 0, err
    doc = json.loads(out)
    assert doc["errors"] == []
    validate(doc)  # "unknown" where the schema allows it, nowhere else
    named = {(w["member"], w["kernel"]) for w in doc["warnings"]}
    for struct, member in HIDDEN:
        assert (f"{struct}.{member}", RELEASE) in named


def test_unknown_values_in_json(hidden_debug: Path, capsys) -> None:
    t = truth("6.1-shadow")
    vm = json.loads(one_shot(hidden_debug, "vms", capsys, True)[1])["vms"][0]
    assert vm["n_used_mmu_pages"] == "unknown"
    assert vm["n_max_mmu_pages"] == 64 and vm["pid"] == t["vmm_pid"]  # the rest as before

    vcpus = json.loads(one_shot(hidden_debug, "vcpus", capsys, True)[1])["vms"][0]["vcpus"]
    assert [v["mp_state"] for v in vcpus] == ["unknown"] * len(t["vcpus"])
    assert [v["tid"] for v in vcpus] == [v["tid"] for v in t["vcpus"]]
    assert [int(v["cr3"], 16) for v in vcpus] == [int(v["cr3"], 16) for v in t["vcpus"]]

    roots = json.loads(one_shot(hidden_debug, "roots", capsys, True)[1])["vms"][0]["vcpus"]
    for v, want in zip(roots, t["vcpus"], strict=True):
        page = v["root"]["page"]
        assert page["root_count"] == "unknown"
        assert page["gfn"] == hex(int(want["cr3"], 16) >> 12)
        assert page["unsync_children"] >= 0  # still read: only the bitmap is hidden


def test_unknown_is_not_unreadable_nor_invalid(hidden_debug: Path, capsys) -> None:
    """"unknown" (a member the kernel lacks) vs null (unreadable / INVALID_PAGE)."""
    doc = json.loads(one_shot(hidden_debug, "roots", capsys, True)[1])
    prev = [p for v in doc["vms"][0]["vcpus"] for p in v["prev_roots"]]
    assert all(p["hpa"] not in ("INVALID_PAGE", "unreadable") and p["state"] == "page"
               and p["page"]["root_count"] == "unknown" for p in prev)


def test_text_shows_unknown(hidden_debug: Path, capsys) -> None:
    out = one_shot(hidden_debug, "vms", capsys)[1]
    assert "unknown/64" in out
    out = one_shot(hidden_debug, "vcpus", capsys)[1]
    assert out.count("unknown") == len(truth("6.1-shadow")["vcpus"])


def test_unsync_walk_skipped_not_guessed(hidden_debug: Path, capsys) -> None:
    """Without unsync_child_bitmap the walk cannot be replayed: no batches, no errors."""
    status, out, err = one_shot(hidden_debug, "unsync", capsys, True)
    doc = json.loads(out)
    assert status == 0 and doc["errors"] == []
    assert all(not vm["roots"] for vm in doc["vms"])
    status, out, _ = one_shot(hidden_debug, "check", capsys, True)
    assert status == 0
    kinds = {f["kind"] for vm in json.loads(out)["vms"] for f in vm["findings"]}
    assert "unsync-children" not in kinds and "root-count" not in kinds


@pytest.mark.parametrize("fmt", ["json", "dot", "graphml"])
def test_export_writes_unknown(hidden_debug: Path, fmt: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / f"g.{fmt}"
    status, _, err = one_shot(hidden_debug, f"export --format {fmt} {out}", capsys)
    assert status == 0, err
    assert "unknown" in out.read_text()


def test_same_values_as_full_debug_info(hidden_debug: Path, capsys) -> None:
    """Apart from the unknown fields, the output equals the one with all members."""
    full = json.loads(run(["-c", str(FIXTURE), "tree", "--json"], capsys)[1])
    part = json.loads(one_shot(hidden_debug, "tree", capsys, True)[1])

    def strip(node: dict) -> dict:
        return {k: (strip_all(v) if k == "children" else v) for k, v in node.items()
                if k not in ("root_count",)}

    def strip_all(nodes: list) -> list:
        return [strip(n) for n in nodes]

    assert [strip_all(vm["trees"]) for vm in full["vms"]] == \
        [strip_all(vm["trees"]) for vm in part["vms"]]


def test_missing_global_is_unknown_not_an_error(hidden_debug: Path, capsys) -> None:
    """A kernel without shadow_mmu_writable_mask: the MMU-writable bit of each
    SPTE is unknown (null), every other bit decodes as before."""
    status, out, err = one_shot(hidden_debug, "walk 0x2000", capsys, json_=True)
    assert status == 0, err
    (w,) = json.loads(out)["vms"][0]["walks"]
    leaf = w["steps"][-1]["bits"]
    assert leaf["mmu_writable"] is None and leaf["host_writable"] is True
    assert leaf["flags"] == "R-X A hw" and w["memslot"]["verdict"] == "match"
