/*
 * vmm: the fixture VMM. Runs inside the emulated KVM host (L1), creates one
 * VM (or two) whose vCPUs switch CR3 among several page-table sets and then
 * write into shadowed page tables (see guest.S), and prints a record of
 * everything it did as one line "KVMINSPECT-RECORD {json}" followed by
 * "KVMINSPECT-READY". It then sleeps so that the host's memory can be dumped
 * (or, with -Z, waits for zap requests from a live test harness).
 *
 * Usage: vmm [-v VCPUS] [-s SETS] [-w WIN,WIN,...] [-r ROUNDS] [-z] [-b] [-p]
 *            [-n VMS] [-V VCPUS] [-S SETS] [-W WIN,WIN,...] [-Z] [-c] [-L] [-M]
 *        vmm [-v VCPUS] -B N [-U M] | -T N      (the big workloads)
 *   -v, -s  vCPUs (default 4) and page-table sets (default 4) of the first VM
 *   -w  windows (level-1 page tables written by the guest) per set (default 1)
 *   -p  the guest runs in 32-bit protected mode with PAE paging (3 levels)
 *   -z  after the workload, add and delete a memslot (fast zap: roots invalid)
 *   -b  busy: vCPUs spin in guest mode instead of halting
 *   -c  cycle: after reporting, vCPUs keep loading every set's CR3 in turn,
 *       forever, instead of halting or spinning (wins over -b; the MMU never
 *       settles)
 *   -n  VMs in this process, 1 (default) or 2: the second VM has its own VM fd,
 *       memory, memslot, irqchip and vCPU threads and runs the same guest
 *   -V, -S, -W  vCPUs, sets and windows of the second VM (default 2, 2, 1,3)
 *   -L  large pages (not with -p): the memslot is 8 MiB at a 2 MiB-aligned
 *       host address with MADV_HUGEPAGE (transparent huge pages), and every
 *       set's PD maps two 2 MiB guest pages (PS=1): LARGE_VA -> LARGE_GPA (data:
 *       each vCPU reads from it after each CR3 load) and LARGE_VA + 2 MiB ->
 *       LARGE_GPA + 2 MiB (code: each vCPU calls a RET at LARGE_EXEC_OFF there).
 *       The VMM writes every 4 KiB page of both (so the host backs them with
 *       huge pages): its first word is LARGE_MARK | gfn. KVM can then map both
 *       with 2 MiB SPTEs; with kvm's nx_huge_pages on, the executed one is
 *       split into 4 KiB SPTEs (an NX huge page, on possible_nx_huge_pages).
 *       The record gets "large": {"va", "gpa", "exec_va", "exec_gpa",
 *       "exec_off", "size", "hva" (of the memslot), "mark"}.
 *   -M  SMM (one VM, not with -p or -L; needs KVM_CAP_X86_SMM): memslot 0 is
 *       also given to address space 1 (KVM's SMM address space: slot id
 *       1 << 16), the SMI handler (guest.S, guest_smm_start) is copied to
 *       SMM_ENTRY (default SMBASE 0x30000 + 0x8000), and after reporting the
 *       last vCPU's thread issues KVM_SMI on its own vCPU fd: the vCPU enters
 *       SMM, reads DATA_GPA and writes SMM_WRITE with paging off (KVM builds
 *       shadow pages with role.smm = 1 for them), reports with OUT 0x11 and
 *       halts in SMM. The record gets "smm": {"vcpu", "smbase", "entry",
 *       "read", "write"}.
 *   -Z  after KVMINSPECT-READY, on each SIGUSR1 zap every VM as -z does once
 *       and print "KVMINSPECT-ZAPPED N" (N = 1, 2, ...); signals that arrive
 *       while a zap is under way merge into one (send the next after ZAPPED)
 * -r, -p, -z, -b, -c and -Z apply to every VM. With -n 1 the record is the one-VM
 * record; with -n 2 it also has "vms": every VM's fields in creation order.
 * -c and -Z do not change the record.
 *
 * The big workloads (one VM; -v, default 4, still sets the vCPUs, but only
 * vCPU 0 works: the others report and halt at once; no other option applies):
 *   -B N  shadow MMU (npt=0): N distinct guest level-1 page tables, table i
 *         mapping VA BIG_VA + i * 2 MiB (its entry 0 -> one of BIG_POOL data
 *         pages, so no gfn has more than RMAP_RECYCLE_THRESHOLD mappings up to
 *         N = 512k). The VMM writes every table before the vCPU starts; the
 *         memslot holds them (N * 4 KiB and the upper levels), the rest of the
 *         guest is identity-mapped with 2 MiB pages. The VM's shadow page limit
 *         is raised with KVM_SET_NR_MMU_PAGES (N + N / 16 + 4096). vCPU 0 reads
 *         one word under each table (KVM makes one level-1 shadow page per
 *         table, plus their level-2..4 parents), then writes PTE slot 100 of M
 *         tables, evenly spaced from the first (through the identity map): KVM
 *         marks those M shadow pages unsync.
 *   -U M  unsync tables of -B (default min(800, N))
 *   -T N  TDP MMU (npt=1): a guest identity-mapped with 2 MiB pages writes one
 *         word at the start of each of N distinct 2 MiB regions from 1 GiB up
 *         (GPA 1 GiB + i * 2 MiB): N level-1 TDP pages and their parents. The
 *         memslot (1 GiB + N * 2 MiB) is MAP_NORESERVE anonymous memory with
 *         MADV_NOHUGEPAGE, so only touched pages cost and every leaf is 4 KiB.
 * The big record: "vmm_pid", "nvcpus", "vcpus" (as above, "final_set" 0) and
 * "big": {"kind": "shadow"|"tdp", "n", "unsync", "stride" (tables between two
 * written ones), "pt_base" (GPA of table 0; tables are contiguous), "va" (of
 * table 0's range, or the first touched GPA), "memsize", "tables" (guest
 * page-table pages besides the N), "upper": [level-2, level-3, level-4 guest
 * tables above the N], "nr_mmu_pages" (the limit set; 0 for -T)}.
 *
 * Built static (gcc -static) so that it runs from a busybox initramfs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_VMS 2
#define MAX_VCPUS 8          /* per VM */
#define MAX_SETS 8
#define MAX_WIN 32
#define MEM_SIZE (4ul << 20)
#define PARAMS_GPA 0x1000ul
#define CODE_GPA 0x2000ul
#define STACK_GPA 0x10000ul   /* vCPU i: stack page STACK_GPA + i * 0x1000 */
#define PT_GPA 0x100000ul     /* page-table pages are allocated from here */
#define DATA_GPA 0x200000ul   /* data pages mapped by the windows */
#define WIN_VA 0x200000ul     /* window j of every set at WIN_VA + j * 2 MiB */
#define PTE_P 1ul
#define PTE_W 2ul
#define PTE_PS 0x80ul
#define HUGE (2ul << 20)
#define BIG_VA (1ul << 39)    /* -B: table i maps BIG_VA + i * 2 MiB (PML4[1] up) */
#define BIG_PT_GPA 0x400000ul /* -B, -T: guest page tables from here (above the pool) */
#define BIG_POOL 512ul        /* -B: data pages (2 MiB from DATA_GPA) the tables map */
#define TDP_BASE (1ul << 30)  /* -T: touched region i at TDP_BASE + i * 2 MiB */
#define LARGE_MEM_SIZE (8ul << 20)  /* -L: the memslot */
#define LARGE_GPA 0x400000ul  /* -L: the data 2 MiB page; the code one follows */
#define LARGE_PDE 256         /* -L: PD[256], PD[257] of every set */
#define LARGE_VA (LARGE_PDE * HUGE)
#define LARGE_EXEC_OFF 0x3000ul
#define SMBASE 0x30000ul        /* -M: the default SMBASE (KVM's vCPU reset) */
#define SMM_ENTRY (SMBASE + 0x8000)
#define SMM_READ DATA_GPA       /* -M: guest.S reads and writes these in SMM */
#define SMM_WRITE 0x37000ul
#define LARGE_MARK 0x4c41524745000000ul  /* "LARGE" << 24 | gfn */

struct set_params {           /* layout shared with guest.S (S_*) */
	uint64_t cr3, nwin, winva, winpt[MAX_WIN];
};
struct guest_params {         /* layout shared with guest.S (P_*) */
	uint64_t nvcpus, nsets, rounds, barrier, newpte, busy, cycle, large_va;
	struct set_params sets[MAX_SETS];
	uint64_t final_set[MAX_VCPUS];
};

struct big_params {           /* layout shared with guest.S (B_*) */
	uint64_t n, va, write, nunsync, ptbase, stride, newpte, pad;
};

extern const uint8_t guest_start[], guest32_start[], guest_end[];
extern const uint8_t guest_big_start[], guest_big_end[];
extern const uint8_t guest_smm_start[], guest_smm_end[];

struct vm;
struct vcpu {
	int idx, fd, tid, final_set, exit_reason;
	uint64_t cr3;
	struct kvm_run *run;
	pthread_t thread;
	struct vm *vm;
};

/* One VM: its own VM fd, memory, memslot, irqchip, page-table sets and vCPUs */
struct vm {
	int index, fd, nvcpus, nsets, nwin[MAX_SETS];
	int reported;                 /* vCPUs that reported; < 0 on a failure */
	uint8_t *mem;
	uint64_t memsize;
	uint64_t next_pt, shared_pt;
	uint64_t set_pts[MAX_SETS][3 + MAX_WIN];  /* every page-table GPA of a set */
	int set_npts[MAX_SETS];
	struct guest_params *p;
	struct vcpu vcpus[MAX_VCPUS];
};

static int kvm_fd, nvms = 1, rounds = 3, zap, busy, pae, cycle, zap_wait, large, smm;
static int smm_entered;   /* -M: the vCPU reported from SMM */

/* -B / -T: the big workload's shape (kind 0: none) */
static struct {
	char kind;                    /* 'B' (shadow) or 'T' (TDP) */
	long n, nunsync;
	uint64_t stride, memsize, ptbase, va, cr3, nr_mmu_pages, limit;
	long tables, upper[3];        /* guest tables: all but the N, and per level 2..4 */
} big = { .nunsync = -1 };
static struct vm vms[MAX_VMS] = {
	{ .nvcpus = 4, .nsets = 4, .nwin = {1, 1, 1, 1, 1, 1, 1, 1} },
	{ .nvcpus = 2, .nsets = 2, .nwin = {1, 3, 3, 3, 3, 3, 3, 3} },
};
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "vmm: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, " (%s)\n", strerror(errno));
	va_end(ap);
	exit(1);
}

static uint64_t alloc_pt(struct vm *vm)
{
	uint64_t gpa = vm->next_pt;
	vm->next_pt += 0x1000;
	if (vm->next_pt > DATA_GPA)
		die("out of page-table space");
	memset(vm->mem + gpa, 0, 0x1000);
	return gpa;
}

static uint64_t *pt(struct vm *vm, uint64_t gpa) { return (uint64_t *)(vm->mem + gpa); }

/*
 * One 4-level page-table set: PML4 -> PDPT -> PD; PD[0] is the identity map
 * of the first 2 MiB (one level-1 table shared by all sets), PD[1 + j] is
 * window j's own level-1 table, mapping the window onto the data pages.
 */
static void build_set(struct vm *vm, int k)
{
	struct set_params *s = &vm->p->sets[k];
	uint64_t *pts = vm->set_pts[k];
	int *n = &vm->set_npts[k];
	uint64_t pd;

	*n = 0;
	if (pae) {
		/* PAE: CR3 -> PDPT (4 entries; only P may be set) -> PD */
		uint64_t pdpt = alloc_pt(vm);
		pd = alloc_pt(vm);
		pt(vm, pdpt)[0] = pd | PTE_P;
		pts[(*n)++] = pdpt;
		s->cr3 = pdpt;
	} else {
		uint64_t pml4 = alloc_pt(vm), pdpt = alloc_pt(vm);
		pd = alloc_pt(vm);
		pt(vm, pml4)[0] = pdpt | PTE_P | PTE_W;
		pt(vm, pdpt)[0] = pd | PTE_P | PTE_W;
		pts[(*n)++] = pml4;
		pts[(*n)++] = pdpt;
		s->cr3 = pml4;
	}
	pt(vm, pd)[0] = vm->shared_pt | PTE_P | PTE_W;
	pts[(*n)++] = pd;
	s->nwin = vm->nwin[k];
	s->winva = WIN_VA;
	for (int j = 0; j < vm->nwin[k]; j++) {
		uint64_t w = alloc_pt(vm);
		for (int e = 0; e < 16; e++)
			pt(vm, w)[e] = (DATA_GPA + e * 0x1000) | PTE_P | PTE_W;
		pt(vm, pd)[1 + j] = w | PTE_P | PTE_W;
		s->winpt[j] = w;
		pts[(*n)++] = w;
	}
	if (large) {
		pt(vm, pd)[LARGE_PDE] = LARGE_GPA | PTE_P | PTE_W | PTE_PS;
		pt(vm, pd)[LARGE_PDE + 1] = (LARGE_GPA + HUGE) | PTE_P | PTE_W | PTE_PS;
	}
}

/* -L: 8 MiB at a 2 MiB-aligned address, transparent huge pages asked for */
static uint8_t *map_large(void)
{
	uint8_t *m = mmap(NULL, LARGE_MEM_SIZE + HUGE, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (m == MAP_FAILED)
		die("mmap");
	m = (uint8_t *)(((uint64_t)m + HUGE - 1) & ~(HUGE - 1));
	if (madvise(m, LARGE_MEM_SIZE, MADV_HUGEPAGE) < 0)
		die("madvise MADV_HUGEPAGE");
	return m;
}

static void setup_memory(struct vm *vm)
{
	vm->memsize = large ? LARGE_MEM_SIZE : MEM_SIZE;
	vm->mem = large ? map_large() : mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (vm->mem == MAP_FAILED)
		die("mmap");
	if (large) {
		for (uint64_t a = LARGE_GPA; a < LARGE_GPA + 2 * HUGE; a += 0x1000)
			*(uint64_t *)(vm->mem + a) = LARGE_MARK | a >> 12;
		vm->mem[LARGE_GPA + HUGE + LARGE_EXEC_OFF] = 0xc3;   /* ret */
	}
	struct kvm_userspace_memory_region r = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = vm->memsize,
		.userspace_addr = (uint64_t)vm->mem,
	};
	if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	memcpy(vm->mem + CODE_GPA, guest_start, guest_end - guest_start);
	if (smm) {
		if (ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_X86_SMM) <= 0)
			die("no KVM_CAP_X86_SMM");
		r.slot = 1 << 16 | 0;   /* address space 1: SMM */
		if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
			die("KVM_SET_USER_MEMORY_REGION (SMM)");
		memcpy(vm->mem + SMM_ENTRY, guest_smm_start, guest_smm_end - guest_smm_start);
	}

	struct guest_params *p = (struct guest_params *)(vm->mem + PARAMS_GPA);
	vm->p = p;
	p->nvcpus = vm->nvcpus;
	p->nsets = vm->nsets;
	p->rounds = rounds;
	p->busy = busy;
	p->cycle = cycle;
	p->large_va = large ? LARGE_VA : 0;
	p->newpte = (DATA_GPA + 0x10000) | PTE_P | PTE_W;
	vm->next_pt = PT_GPA;
	vm->shared_pt = alloc_pt(vm);
	for (uint64_t a = 0; a < 0x200000; a += 0x1000)
		pt(vm, vm->shared_pt)[a >> 12] = a | PTE_P | PTE_W;
	for (int k = 0; k < vm->nsets; k++)
		build_set(vm, k);
	/* vCPU i ends on set i % (sets - 1): the last set is only ever a
	 * previous root, and vCPUs that end on one set share its root. */
	for (int i = 0; i < vm->nvcpus; i++)
		p->final_set[i] = vm->nsets > 1 ? i % (vm->nsets - 1) : 0;
}

/* -B, -T: the next guest page-table page (zero: the memory is fresh) */
static uint64_t big_alloc(struct vm *vm)
{
	uint64_t gpa = vm->next_pt;

	vm->next_pt += 0x1000;
	if (vm->next_pt > big.limit)
		die("out of big page-table space");
	big.tables++;
	return gpa;
}

/* -B, -T: the level-LEVEL entry (1: PTE, 2: PDE, ...) of VA under the PML4,
 * making the tables above it; new tables are counted per level in big.upper */
static uint64_t *big_entry(struct vm *vm, uint64_t pml4, uint64_t va, int level)
{
	uint64_t table = pml4;

	for (int l = 4; l > level; l--) {
		uint64_t *e = &pt(vm, table)[(va >> (12 + 9 * (l - 1))) & 511];
		if (!*e) {
			*e = big_alloc(vm) | PTE_P | PTE_W;
			big.upper[l - 3]++;   /* a new level-(l - 1) table */
		}
		table = *e & ~0xffful;
	}
	return &pt(vm, table)[(va >> (12 + 9 * (level - 1))) & 511];
}

/*
 * -B, -T: memory slot 0 (MAP_NORESERVE, MADV_NOHUGEPAGE), the big guest's
 * code, parameters and page tables: the identity map of the whole slot with
 * 2 MiB pages, and with -B the N level-1 tables (contiguous from BIG_PT_GPA)
 * and the tables above them. Only the N tables' own upper levels are counted
 * in big.upper (the identity map's are not).
 */
static void setup_big(struct vm *vm)
{
	long n = big.n;

	if (big.kind == 'B') {
		long extra = n / 256 + 64;   /* upper levels, identity map, PML4 */
		big.memsize = (BIG_PT_GPA + (n + extra) * 0x1000ul + HUGE - 1) & ~(HUGE - 1);
	} else {
		big.memsize = TDP_BASE + n * HUGE;
	}
	big.limit = big.kind == 'B' ? big.memsize : TDP_BASE;
	vm->mem = mmap(NULL, big.memsize, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (vm->mem == MAP_FAILED)
		die("mmap %lu bytes", big.memsize);
	if (madvise(vm->mem, big.memsize, MADV_NOHUGEPAGE) < 0)
		die("madvise");
	struct kvm_userspace_memory_region r = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = big.memsize,
		.userspace_addr = (uint64_t)vm->mem,
	};
	if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	memcpy(vm->mem + CODE_GPA, guest_big_start, guest_big_end - guest_big_start);

	struct big_params *p = (struct big_params *)(vm->mem + PARAMS_GPA);
	vm->next_pt = BIG_PT_GPA;
	if (big.kind == 'B') {
		if (big.nunsync < 0)
			big.nunsync = n < 800 ? n : 800;
		if (big.nunsync > n)
			big.nunsync = n;
		big.stride = big.nunsync ? n / big.nunsync : 0;
		big.ptbase = BIG_PT_GPA;
		big.va = BIG_VA;
		vm->next_pt += n * 0x1000ul;   /* the N tables: not counted in big.tables */
		if (vm->next_pt > big.limit)
			die("out of big page-table space");
	} else {
		big.nunsync = 0;
		big.va = TDP_BASE;
	}
	uint64_t pml4 = big_alloc(vm);
	big.upper[2] = 1;
	big.cr3 = pml4;
	for (long i = 0; i < (big.kind == 'B' ? n : 0); i++) {
		uint64_t t = big.ptbase + i * 0x1000ul;
		pt(vm, t)[0] = (DATA_GPA + (i % BIG_POOL) * 0x1000) | PTE_P | PTE_W;
		*big_entry(vm, pml4, BIG_VA + i * HUGE, 2) = t | PTE_P | PTE_W;
	}
	long counted[3] = { big.upper[0], big.upper[1], big.upper[2] };
	for (uint64_t a = 0; a < big.memsize; a += HUGE)
		*big_entry(vm, pml4, a, 2) = a | PTE_P | PTE_W | PTE_PS;
	memcpy(big.upper, counted, sizeof(counted));

	p->n = n;
	p->va = big.va;
	p->write = big.kind == 'T';
	p->nunsync = big.nunsync;
	p->ptbase = big.ptbase;
	p->stride = big.stride * 0x1000;
	p->newpte = (DATA_GPA + 0x10000) | PTE_P | PTE_W;

	if (big.kind == 'B') {
		big.nr_mmu_pages = n + n / 16 + 4096;
		if (ioctl(vm->fd, KVM_SET_NR_MMU_PAGES, big.nr_mmu_pages) < 0)
			die("KVM_SET_NR_MMU_PAGES %lu", big.nr_mmu_pages);
	}
}

/* KVM_CREATE_VM, the in-kernel irqchip, memory slot 0 and the guest's tables */
static void create_vm(struct vm *vm)
{
	vm->fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	if (vm->fd < 0)
		die("KVM_CREATE_VM");
	if (ioctl(vm->fd, KVM_CREATE_IRQCHIP, 0) < 0)
		die("KVM_CREATE_IRQCHIP");
	if (big.kind)
		setup_big(vm);
	else
		setup_memory(vm);
}

static void setup_vcpu(struct vcpu *v, struct kvm_cpuid2 *cpuid)
{
	struct vm *vm = v->vm;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	int mmap_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);

	v->fd = ioctl(vm->fd, KVM_CREATE_VCPU, v->idx);
	if (v->fd < 0)
		die("KVM_CREATE_VCPU %d", v->idx);
	v->run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
	if (v->run == MAP_FAILED)
		die("mmap kvm_run");
	if (ioctl(v->fd, KVM_SET_CPUID2, cpuid) < 0)
		die("KVM_SET_CPUID2");
	if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	struct kvm_segment cs = {
		.base = 0, .limit = 0xffffffff, .selector = 8, .type = 11,
		.present = 1, .dpl = 0, .db = pae, .s = 1, .l = !pae, .g = 1,
	};
	struct kvm_segment ds = cs;
	ds.selector = 16;
	ds.type = 3;
	ds.l = 0;
	ds.db = 1;
	sregs.cs = cs;
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = ds;
	sregs.cr0 = 0x80050033;    /* PG | WP | NE | ET | MP | PE */
	sregs.cr4 = 0x20;          /* PAE */
	sregs.efer = pae ? 0 : 0x500;  /* LMA | LME in long mode */
	sregs.cr3 = big.kind ? big.cr3 : vm->p->sets[v->idx % vm->nsets].cr3;
	if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA + (pae ? guest32_start - guest_start : 0);
	regs.rsp = STACK_GPA + (v->idx + 1) * 0x1000;
	regs.rdi = v->idx;
	regs.rsi = PARAMS_GPA;
	if (big.kind)
		regs.rip = CODE_GPA;
	regs.rflags = 2;
	if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
	/* with the in-kernel irqchip, application processors wait for INIT/SIPI */
	struct kvm_mp_state mp = { .mp_state = KVM_MP_STATE_RUNNABLE };
	if (ioctl(v->fd, KVM_SET_MP_STATE, &mp) < 0)
		die("KVM_SET_MP_STATE");
}

/*
 * vCPU thread: runs the guest until it reports (OUT 0x10), records its own
 * final CR3 (vCPU ioctls block while another thread is in KVM_RUN), then
 * re-enters KVM_RUN, where it stays: halted (blocked in the kernel) or busy.
 */
static void *vcpu_thread(void *arg)
{
	struct vcpu *v = arg;
	struct kvm_sregs sregs;

	v->tid = syscall(SYS_gettid);
	for (;;) {
		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("KVM_RUN vcpu %d", v->idx);
		}
		if (v->run->exit_reason == KVM_EXIT_IO && v->run->io.port == 0x10) {
			if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
				die("KVM_GET_SREGS");
			pthread_mutex_lock(&lock);
			v->cr3 = sregs.cr3;
			v->final_set = *(uint32_t *)((uint8_t *)v->run + v->run->io.data_offset);
			v->vm->reported++;
			pthread_cond_broadcast(&cond);
			pthread_mutex_unlock(&lock);
			/* -M: the last vCPU takes an SMI (its own fd: vCPU ioctls
			 * wait for KVM_RUN to return) */
			if (smm && v->idx == v->vm->nvcpus - 1 && ioctl(v->fd, KVM_SMI, 0) < 0)
				die("KVM_SMI");
			continue;
		}
		if (v->run->exit_reason == KVM_EXIT_IO && v->run->io.port == 0x11 && smm) {
			pthread_mutex_lock(&lock);
			smm_entered = 1;
			pthread_cond_broadcast(&cond);
			pthread_mutex_unlock(&lock);
			continue;
		}
		pthread_mutex_lock(&lock);
		v->exit_reason = v->run->exit_reason;
		v->vm->reported = -1000;
		pthread_cond_broadcast(&cond);
		pthread_mutex_unlock(&lock);
		if (nvms > 1)
			fprintf(stderr, "vmm: vm %d vcpu %d: unexpected exit %d\n",
				v->vm->index, v->idx, v->run->exit_reason);
		else
			fprintf(stderr, "vmm: vcpu %d: unexpected exit %d\n", v->idx,
				v->run->exit_reason);
		return NULL;
	}
}

static void parse_windows(int *nwin, char *arg)
{
	int k = 0;
	for (char *t = strtok(arg, ","); t && k < MAX_SETS; t = strtok(NULL, ","))
		nwin[k++] = atoi(t);
	for (; k < MAX_SETS; k++)
		nwin[k] = nwin[k - 1];
}

static int check_vm(const struct vm *vm)
{
	if (vm->nvcpus < 1 || vm->nvcpus > MAX_VCPUS || vm->nsets < 1 || vm->nsets > MAX_SETS) {
		fprintf(stderr, "vmm: bad arguments\n");
		return 0;
	}
	for (int k = 0; k < vm->nsets; k++)
		if (vm->nwin[k] < 0 || vm->nwin[k] > MAX_WIN) {
			fprintf(stderr, "vmm: bad window count\n");
			return 0;
		}
	return 1;
}

/* The record's fields of one VM (after "vmm_pid" at the top level) */
static void print_vm(const struct vm *vm)
{
	const struct guest_params *p = vm->p;

	printf("\"nvcpus\": %d, \"rounds\": %d, "
	       "\"zapped\": %s, \"busy\": %s, \"paging\": \"%s\", \"shared_pt\": \"0x%lx\", "
	       "\"vcpus\": [",
	       vm->nvcpus, rounds, zap ? "true" : "false", busy ? "true" : "false",
	       pae ? "pae" : "long", vm->shared_pt);
	for (int i = 0; i < vm->nvcpus; i++) {
		const struct vcpu *v = &vm->vcpus[i];
		printf("%s{\"vcpu_id\": %d, \"tid\": %d, \"cr3\": \"0x%lx\", \"final_set\": %d}",
		       i ? ", " : "", v->idx, v->tid, v->cr3, v->final_set);
	}
	printf("], \"sets\": [");
	for (int k = 0; k < vm->nsets; k++) {
		int is_final = 0;
		for (int i = 0; i < vm->nvcpus; i++)
			is_final |= vm->vcpus[i].final_set == k;
		printf("%s{\"cr3\": \"0x%lx\", \"pt_gpas\": [", k ? ", " : "", p->sets[k].cr3);
		for (int j = 0; j < vm->set_npts[k]; j++)
			printf("%s\"0x%lx\"", j ? ", " : "", vm->set_pts[k][j]);
		printf("], \"window_pts\": [");
		for (int j = 0; j < vm->nwin[k]; j++)
			printf("%s\"0x%lx\"", j ? ", " : "", p->sets[k].winpt[j]);
		printf("], \"written\": %s}", is_final ? "true" : "false");
	}
	printf("]");
	if (smm)
		printf(", \"smm\": {\"vcpu\": %d, \"smbase\": \"0x%lx\", \"entry\": \"0x%lx\", "
		       "\"read\": \"0x%lx\", \"write\": \"0x%lx\"}",
		       vm->nvcpus - 1, SMBASE, SMM_ENTRY, SMM_READ, SMM_WRITE);
	if (large)
		printf(", \"large\": {\"va\": \"0x%lx\", \"gpa\": \"0x%lx\", "
		       "\"exec_va\": \"0x%lx\", \"exec_gpa\": \"0x%lx\", \"exec_off\": \"0x%lx\", "
		       "\"size\": %lu, \"hva\": \"0x%lx\", \"mark\": \"0x%lx\"}",
		       LARGE_VA, LARGE_GPA, LARGE_VA + HUGE, LARGE_GPA + HUGE, LARGE_EXEC_OFF,
		       HUGE, (uint64_t)vm->mem, LARGE_MARK);
}

/*
 * One JSON line: the first VM's fields at the top level (the one-VM record);
 * with -n 2 also "vms", every VM's fields in creation order.
 */
static void print_record(void)
{
	printf("KVMINSPECT-RECORD {\"vmm_pid\": %d, ", getpid());
	print_vm(&vms[0]);
	if (nvms > 1) {
		printf(", \"vms\": [");
		for (int n = 0; n < nvms; n++) {
			printf("%s{\"index_created\": %d, ", n ? ", " : "", vms[n].index);
			print_vm(&vms[n]);
			printf("}");
		}
		printf("]");
	}
	printf("}\n");
	fflush(stdout);
}

/* -B, -T: the big record (one VM) */
static void print_big_record(void)
{
	const struct vm *vm = &vms[0];

	printf("KVMINSPECT-RECORD {\"vmm_pid\": %d, \"nvcpus\": %d, \"vcpus\": [",
	       getpid(), vm->nvcpus);
	for (int i = 0; i < vm->nvcpus; i++) {
		const struct vcpu *v = &vm->vcpus[i];
		printf("%s{\"vcpu_id\": %d, \"tid\": %d, \"cr3\": \"0x%lx\", \"final_set\": %d}",
		       i ? ", " : "", v->idx, v->tid, v->cr3, v->final_set);
	}
	printf("], \"big\": {\"kind\": \"%s\", \"n\": %ld, \"unsync\": %ld, "
	       "\"stride\": %lu, \"pt_base\": \"0x%lx\", \"va\": \"0x%lx\", "
	       "\"memsize\": %lu, \"tables\": %ld, \"upper\": [%ld, %ld, %ld], "
	       "\"nr_mmu_pages\": %lu}}\n",
	       big.kind == 'B' ? "shadow" : "tdp", big.n, big.nunsync, big.stride, big.ptbase,
	       big.va, big.memsize, big.tables, big.upper[0], big.upper[1], big.upper[2],
	       big.nr_mmu_pages);
	fflush(stdout);
}

/* Wait until every vCPU of every VM has reported; 0 if one of them failed */
static int wait_reports(void)
{
	int ok = 1, done = 0;

	pthread_mutex_lock(&lock);
	while (ok && !done) {
		done = 1;
		for (int n = 0; n < nvms; n++) {
			ok &= vms[n].reported >= 0;
			done &= vms[n].reported >= vms[n].nvcpus;
		}
		done &= !smm || smm_entered;
		if (ok && !done)
			pthread_cond_wait(&cond, &lock);
	}
	pthread_mutex_unlock(&lock);
	return ok;
}

/* A memslot delete zaps all shadow pages (kvm_mmu_zap_all_fast) */
static void zap_vm(struct vm *vm)
{
	void *m2 = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE,
			MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct kvm_userspace_memory_region r = {
		.slot = 1, .guest_phys_addr = 0x10000000, .memory_size = 1 << 20,
		.userspace_addr = (uint64_t)m2,
	};
	if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
		die("add memslot");
	r.memory_size = 0;
	if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
		die("delete memslot");
}

/* Zap every VM, then let the vCPUs settle */
static void zap_all(void)
{
	for (int n = 0; n < nvms; n++)
		zap_vm(&vms[n]);
	usleep(200 * 1000);
}

/* -Z: zap every VM on each SIGUSR1 (blocked in every thread: see main) */
static void wait_zaps(const sigset_t *usr1)
{
	for (int n = 1;; n++) {
		int sig;

		errno = sigwait(usr1, &sig);
		if (errno)
			die("sigwait");
		zap_all();
		printf("KVMINSPECT-ZAPPED %d\n", n);
		fflush(stdout);
	}
}

static const char usage[] =
	"usage: vmm [-v VCPUS] [-s SETS] [-w N,N,..] [-r ROUNDS] [-z] [-b] [-p]\n"
	"           [-n VMS] [-V VCPUS] [-S SETS] [-W N,N,..] [-Z] [-c] [-L] [-M]\n"
	"       vmm [-v VCPUS] -B N [-U M] | -T N\n";

int main(int argc, char **argv)
{
	sigset_t usr1;
	int opt;

	while ((opt = getopt(argc, argv, "v:s:w:r:zbpn:V:S:W:ZcB:U:T:LM")) != -1) {
		switch (opt) {
		case 'v': vms[0].nvcpus = atoi(optarg); break;
		case 's': vms[0].nsets = atoi(optarg); break;
		case 'w': parse_windows(vms[0].nwin, optarg); break;
		case 'r': rounds = atoi(optarg); break;
		case 'z': zap = 1; break;
		case 'b': busy = 1; break;
		case 'p': pae = 1; break;
		case 'n': nvms = atoi(optarg); break;
		case 'V': vms[1].nvcpus = atoi(optarg); break;
		case 'S': vms[1].nsets = atoi(optarg); break;
		case 'W': parse_windows(vms[1].nwin, optarg); break;
		case 'Z': zap_wait = 1; break;
		case 'c': cycle = 1; break;
		case 'L': large = 1; break;
		case 'M': smm = 1; break;
		case 'B': case 'T': big.kind = opt; big.n = atol(optarg); break;
		case 'U': big.nunsync = atol(optarg); break;
		default:
			fputs(usage, stderr);
			return 2;
		}
	}
	if (nvms < 1 || nvms > MAX_VMS || rounds < 1) {
		fprintf(stderr, "vmm: bad arguments\n");
		return 2;
	}
	for (int n = 0; n < nvms; n++)
		if (!check_vm(&vms[n]))
			return 2;
	if (smm && (pae || big.kind || large || nvms > 1 || busy || cycle)) {
		fprintf(stderr, "vmm: -M takes no -p, -B, -T, -L, -n, -b or -c\n");
		return 2;
	}
	if (large && (pae || big.kind)) {
		fprintf(stderr, "vmm: -L takes no -p, -B or -T\n");
		return 2;
	}
	if (big.kind && (big.n < 1 || nvms > 1 || pae || zap || busy || cycle || zap_wait)) {
		fprintf(stderr, "vmm: -B and -T take N >= 1 and no -n, -p, -z, -b, -c or -Z\n");
		return 2;
	}

	/* -Z: SIGUSR1 blocked before any thread starts (they inherit the mask),
	 * so that it stays pending until the main thread's sigwait() */
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	if (zap_wait && pthread_sigmask(SIG_BLOCK, &usr1, NULL))
		die("pthread_sigmask");

	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		die("open /dev/kvm");
	for (int n = 0; n < nvms; n++) {
		vms[n].index = n;
		create_vm(&vms[n]);
	}

	struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + 256 * sizeof(struct kvm_cpuid_entry2));
	cpuid->nent = 256;
	if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
		die("KVM_GET_SUPPORTED_CPUID");
	for (int n = 0; n < nvms; n++)
		for (int i = 0; i < vms[n].nvcpus; i++) {
			struct vcpu *v = &vms[n].vcpus[i];
			v->idx = i;
			v->vm = &vms[n];
			setup_vcpu(v, cpuid);
		}
	for (int n = 0; n < nvms; n++)
		for (int i = 0; i < vms[n].nvcpus; i++)
			if (pthread_create(&vms[n].vcpus[i].thread, NULL, vcpu_thread,
					   &vms[n].vcpus[i]))
				die("pthread_create");

	if (!wait_reports()) {
		printf("KVMINSPECT-FAILED\n");
		fflush(stdout);
		pause();
	}
	/* let the vCPUs re-enter KVM_RUN and halt */
	usleep(200 * 1000);

	if (zap)
		zap_all();
	if (big.kind)
		print_big_record();
	else
		print_record();
	printf("KVMINSPECT-READY\n");
	fflush(stdout);
	if (zap_wait)
		wait_zaps(&usr1);
	for (;;)
		pause();
}
