"""diagnose: one verdict per VM, and why each stuck vCPU cannot make progress.

The findings are check's and the audit's (kvminspect.check, kvminspect.audit);
this module weighs them and reads what the kernel's page-fault path would do
with each vCPU:

* a VM is **corrupt** with any error finding, **degraded** with a warning or
  a stuck-suspect vCPU, **healthy** otherwise; states the kernel calls normal
  (an obsolete root right after a fast zap while its vCPUs have the reload
  request pending, orphans kept for reuse) are info findings, folded into one
  line per kind;
* a vCPU is **stuck-suspect** when

  - its last exit is a page fault (NPF, or #PF under shadow paging) whose
    address lies inside an MMU notifier invalidation in progress: the fault
    handler's is_page_fault_stale() -> mmu_invalidate_retry_gfn() makes
    kvm_mmu_page_fault() return RET_PF_RETRY until the invalidation ends, so a
    leaked mmu_invalidate_in_progress retries it forever; or
  - its root is invalid (role.invalid) or obsolete (is_obsolete_sp: an old
    mmu_valid_gen) with no reload request pending (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
    KVM_REQ_MMU_RELOAD before 5.16): is_page_fault_stale() says every fault on
    that root is stale, and nothing makes the vCPU drop it.

  A root of INVALID_PAGE is not a reason: kvm_mmu_reload() loads one at the
  next VM entry. The evidence shown is what the kernel maintainers ask for:
  mp_state and guest mode, pending requests, the root's state, the
  invalidation sequence, count and range, the last exit and its address
  translated to the range's unit (an hva to 6.7, a gfn from 6.8), mmu_lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kvminspect.accounting import Leaves, check_accounting
from kvminspect.audit import audit_vm
from kvminspect.check import (
    Finding,
    FindingKind,
    Severity,
    by_severity,
    check_vm,
    infos_by_kind,
    reload_pending,
    summary,
)
from kvminspect.graph import VMGraph
from kvminspect.layout import known
from kvminspect.leaves import AuditState, collect
from kvminspect.model import Kernel
from kvminspect.objects import LastExit, VCpu, is_obsolete_sp
from kvminspect.read_vmstate import Invalidation, MmuLock, RangeUnit
from kvminspect.rmap import RmapHistogram, RmapReader, rmap_histogram


class Verdict(Enum):
    """One VM's verdict (the README's Diagnose rules)."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    CORRUPT = "corrupt"


class RootHealth(Enum):
    """What the fault path makes of a vCPU's current root."""

    VALID = "valid"
    INVALID_PAGE = "invalid_page"  # none loaded: kvm_mmu_reload() loads one at VM entry
    INVALID = "invalid"  # role.invalid: zapped (kvm_tdp_mmu_invalidate_all_roots, ...)
    OBSOLETE = "obsolete"  # sp->mmu_valid_gen != kvm->arch.mmu_valid_gen
    SPECIAL = "special"  # pae_root and friends: no struct kvm_mmu_page to judge
    UNREADABLE = "unreadable"


class StuckReason(Enum):
    """Why a vCPU cannot make progress (the README's Diagnose rules)."""

    FAULT_IN_INVALIDATION = "fault-in-invalidation"
    STALE_ROOT_NO_RELOAD = "stale-root-no-reload"


@dataclass(frozen=True)
class FaultAddress:
    """The last exit's fault address, in the invalidation range's unit.

    *gfn* and *hva* are None where the translation stopped; *how* says the
    path taken or why it stopped; *inside* is None when the question cannot be
    answered (no range, or no address in its unit).
    """

    address: int
    kind: str  # "gpa", "gva"
    gfn: int | None
    hva: int | None
    how: str
    inside: bool | None


@dataclass(frozen=True)
class VcpuDiagnosis:
    """One vCPU: its stuck reasons (none: it can make progress) and the evidence."""

    vcpu: VCpu
    reasons: tuple[StuckReason, ...]
    root: RootHealth
    reload_pending: bool
    fault: FaultAddress | None
    last_exit: LastExit | None  # None where the vendor module's debug info cannot say

    @property
    def stuck(self) -> bool:
        return bool(self.reasons)


@dataclass(frozen=True)
class AuditSummary:
    """What the audit checked: pages, present leaf SPTEs, and those it could not check."""

    pages: int
    leaves: int
    unchecked: int


@dataclass(frozen=True)
class Folded:
    """Info findings of one kind, as one line: how many, and the first one."""

    kind: FindingKind
    count: int
    first: Finding


@dataclass(frozen=True)
class VmDiagnosis:
    """One VM's diagnosis: the verdict, every finding, the audit's reach, the vCPUs."""

    verdict: Verdict
    findings: list[Finding]  # every finding, errors first
    counts: dict[Severity, int]
    audit: AuditSummary
    rmaps: RmapHistogram  # the rmap length histogram (debugfs mmu_rmaps_stat, offline)
    invalidation: Invalidation
    mmu_lock: MmuLock
    vcpus: list[VcpuDiagnosis]

    @property
    def shown(self) -> list[Finding]:
        """The findings that matter: errors, then warnings."""
        return [f for f in self.findings if f.severity is not Severity.INFO]

    @property
    def folded(self) -> list[Folded]:
        """The info findings, one per kind, in the order first met."""
        return [Folded(kind, len(same), same[0])
                for kind, same in infos_by_kind(self.findings).items()]


def verdict_of(counts: dict[Severity, int], stuck: int = 0) -> Verdict:
    """Corrupt with any error, degraded with any warning or stuck-suspect vCPU,
    healthy otherwise."""
    if counts[Severity.ERROR]:
        return Verdict.CORRUPT
    if counts[Severity.WARNING] or stuck:
        return Verdict.DEGRADED
    return Verdict.HEALTHY


def root_health(k: Kernel, vg: VMGraph, v: VCpu) -> RootHealth:
    """The current root as is_page_fault_stale() judges it (is_obsolete_sp())."""
    r = v.root
    if r is None:
        return RootHealth.UNREADABLE
    if r.hpa is None:
        return RootHealth.INVALID_PAGE
    if r.sp is None:
        return RootHealth.SPECIAL if r.special is not None else RootHealth.UNREADABLE
    if r.sp.role.invalid:
        return RootHealth.INVALID
    if is_obsolete_sp(r.sp, vg.vm):
        return RootHealth.OBSOLETE
    return RootHealth.VALID


def diagnose_vcpu(k: Kernel, vg: VMGraph, v: VCpu, inv: Invalidation) -> VcpuDiagnosis:
    """One vCPU against the two stuck rules (the module docstring)."""
    health = root_health(k, vg, v)
    reload = reload_pending(v)
    reasons: list[StuckReason] = []
    if health in (RootHealth.INVALID, RootHealth.OBSOLETE) and not reload:
        reasons.append(StuckReason.STALE_ROOT_NO_RELOAD)
    exit_ = k.last_exit(v)
    fault = fault_address(k, vg, v, exit_, inv)
    if fault is not None and fault.inside:
        reasons.append(StuckReason.FAULT_IN_INVALIDATION)
    return VcpuDiagnosis(v, tuple(reasons), health, reload, fault, exit_)


def fault_address(k: Kernel, vg: VMGraph, v: VCpu, exit_: LastExit | None,
                  inv: Invalidation) -> FaultAddress | None:
    """The last exit's fault address translated to the invalidation range's unit
    (None when the last exit was no page fault)."""
    if exit_ is None or exit_.address is None:
        return None
    address, kind = exit_.address, exit_.address_kind.value
    if kind not in ("gpa", "gva"):
        return None
    from kvminspect.guestwalk import translate

    gfn, hva, how = translate(k, vg.vm, v, address, kind)
    point = hva if inv.unit is RangeUnit.HVA else gfn
    if point is not None:
        inside = inv.in_range(point, inv.unit)
    else:  # no address in the range's unit: only "nothing in progress" can be said
        inside = False if known(inv.in_progress) and inv.in_progress == 0 else None
    return FaultAddress(address, kind, gfn, hva, how, inside)


def audit_summary(vg: VMGraph, st: AuditState, findings: list[Finding]) -> AuditSummary:
    """What the audit reached: the graph's pages, the present leaf SPTEs collect()
    found, and the leaves the leaf-pfn check could not confirm (its summary finding)."""
    unchecked = sum(f.count for f in findings if f.check is FindingKind.LEAF_PFN_UNCHECKED)
    return AuditSummary(len(vg), len(st.leaves), unchecked)


def diagnose_vm(k: Kernel, vg: VMGraph, live: bool = False) -> VmDiagnosis:
    """Every check, the kernel's accounting and the audit on one VM's graph, its
    verdict, its vCPUs and its rmaps' lengths (*live*: a running kernel, whose
    counters may move while they are read)."""
    st = collect(k, vg)
    reader = RmapReader(k)
    findings = by_severity(check_vm(k, vg) + check_accounting(k, vg, Leaves.of(st), live=live)
                           + audit_vm(k, vg, reader, st=st))
    counts = summary(findings)
    state = k.vm_state(vg.vm, hash_chains=False)
    inv = state.invalidation
    vcpus = [diagnose_vcpu(k, vg, v, inv) for v in vg.vcpus]
    stuck = sum(1 for v in vcpus if v.stuck)
    return VmDiagnosis(verdict_of(counts, stuck), findings, counts,
                       audit_summary(vg, st, findings), rmap_histogram(k, vg.vm, reader),
                       inv, k.vm_states.mmu_lock(vg.vm), vcpus)
