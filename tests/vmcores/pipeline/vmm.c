/*
 * vmm: the fixture VMM. Runs inside the emulated KVM host (L1), creates one
 * VM whose vCPUs switch CR3 among several page-table sets and then write into
 * shadowed page tables (see guest.S), and prints a record of everything it
 * did as one line "KVMINSPECT-RECORD {json}" followed by "KVMINSPECT-READY".
 * It then sleeps so that the host's memory can be dumped.
 *
 * Usage: vmm [-v VCPUS] [-s SETS] [-w WIN,WIN,...] [-r ROUNDS] [-z] [-b] [-p]
 *   -w  windows (level-1 page tables written by the guest) per set
 *   -p  the guest runs in 32-bit protected mode with PAE paging (3 levels)
 *   -z  after the workload, add and delete a memslot (fast zap: roots invalid)
 *   -b  busy: vCPUs spin in guest mode instead of halting
 *
 * Built static (gcc -static) so that it runs from a busybox initramfs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_VCPUS 8
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

struct set_params {           /* layout shared with guest.S (S_*) */
	uint64_t cr3, nwin, winva, winpt[MAX_WIN];
};
struct guest_params {         /* layout shared with guest.S (P_*) */
	uint64_t nvcpus, nsets, rounds, barrier, newpte, busy, pad[2];
	struct set_params sets[MAX_SETS];
	uint64_t final_set[MAX_VCPUS];
};

extern const uint8_t guest_start[], guest32_start[], guest_end[];

static int kvm_fd, vm_fd, nvcpus = 4, nsets = 4, rounds = 3, zap, busy, pae;
static int nwin[MAX_SETS] = {1, 1, 1, 1, 1, 1, 1, 1};
static uint8_t *mem;
static uint64_t next_pt = PT_GPA;
static uint64_t set_pts[MAX_SETS][3 + MAX_WIN];  /* every page-table GPA of a set */
static int set_npts[MAX_SETS];
static uint64_t shared_pt;

struct vcpu {
	int idx, fd, tid, final_set, exit_reason;
	uint64_t cr3;
	struct kvm_run *run;
	pthread_t thread;
};
static struct vcpu vcpus[MAX_VCPUS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int reported;

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

static uint64_t alloc_pt(void)
{
	uint64_t gpa = next_pt;
	next_pt += 0x1000;
	if (next_pt > DATA_GPA)
		die("out of page-table space");
	memset(mem + gpa, 0, 0x1000);
	return gpa;
}

static uint64_t *pt(uint64_t gpa) { return (uint64_t *)(mem + gpa); }

/*
 * One 4-level page-table set: PML4 -> PDPT -> PD; PD[0] is the identity map
 * of the first 2 MiB (one level-1 table shared by all sets), PD[1 + j] is
 * window j's own level-1 table, mapping the window onto the data pages.
 */
static void build_set(struct guest_params *p, int k)
{
	struct set_params *s = &p->sets[k];
	uint64_t pd;

	set_npts[k] = 0;
	if (pae) {
		/* PAE: CR3 -> PDPT (4 entries; only P may be set) -> PD */
		uint64_t pdpt = alloc_pt();
		pd = alloc_pt();
		pt(pdpt)[0] = pd | PTE_P;
		set_pts[k][set_npts[k]++] = pdpt;
		s->cr3 = pdpt;
	} else {
		uint64_t pml4 = alloc_pt(), pdpt = alloc_pt();
		pd = alloc_pt();
		pt(pml4)[0] = pdpt | PTE_P | PTE_W;
		pt(pdpt)[0] = pd | PTE_P | PTE_W;
		set_pts[k][set_npts[k]++] = pml4;
		set_pts[k][set_npts[k]++] = pdpt;
		s->cr3 = pml4;
	}
	pt(pd)[0] = shared_pt | PTE_P | PTE_W;
	set_pts[k][set_npts[k]++] = pd;
	s->nwin = nwin[k];
	s->winva = WIN_VA;
	for (int j = 0; j < nwin[k]; j++) {
		uint64_t w = alloc_pt();
		for (int e = 0; e < 16; e++)
			pt(w)[e] = (DATA_GPA + e * 0x1000) | PTE_P | PTE_W;
		pt(pd)[1 + j] = w | PTE_P | PTE_W;
		s->winpt[j] = w;
		set_pts[k][set_npts[k]++] = w;
	}
}

static void setup_memory(struct guest_params **pp)
{
	mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	struct kvm_userspace_memory_region r = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
		.userspace_addr = (uint64_t)mem,
	};
	if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	memcpy(mem + CODE_GPA, guest_start, guest_end - guest_start);

	struct guest_params *p = (struct guest_params *)(mem + PARAMS_GPA);
	p->nvcpus = nvcpus;
	p->nsets = nsets;
	p->rounds = rounds;
	p->busy = busy;
	p->newpte = (DATA_GPA + 0x10000) | PTE_P | PTE_W;
	shared_pt = alloc_pt();
	for (uint64_t a = 0; a < 0x200000; a += 0x1000)
		pt(shared_pt)[a >> 12] = a | PTE_P | PTE_W;
	for (int k = 0; k < nsets; k++)
		build_set(p, k);
	/* vCPU i ends on set i % (sets - 1): the last set is only ever a
	 * previous root, and vCPUs that end on one set share its root. */
	for (int i = 0; i < nvcpus; i++)
		p->final_set[i] = nsets > 1 ? i % (nsets - 1) : 0;
	*pp = p;
}

static void setup_vcpu(struct vcpu *v, struct guest_params *p, struct kvm_cpuid2 *cpuid)
{
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	int mmap_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);

	v->fd = ioctl(vm_fd, KVM_CREATE_VCPU, v->idx);
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
	sregs.cr3 = p->sets[v->idx % nsets].cr3;
	if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA + (pae ? guest32_start - guest_start : 0);
	regs.rsp = STACK_GPA + (v->idx + 1) * 0x1000;
	regs.rdi = v->idx;
	regs.rsi = PARAMS_GPA;
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
			reported++;
			pthread_cond_broadcast(&cond);
			pthread_mutex_unlock(&lock);
			continue;
		}
		pthread_mutex_lock(&lock);
		v->exit_reason = v->run->exit_reason;
		reported = -1000;
		pthread_cond_broadcast(&cond);
		pthread_mutex_unlock(&lock);
		fprintf(stderr, "vmm: vcpu %d: unexpected exit %d\n", v->idx, v->run->exit_reason);
		return NULL;
	}
}

static void parse_windows(char *arg)
{
	int k = 0;
	for (char *t = strtok(arg, ","); t && k < MAX_SETS; t = strtok(NULL, ","))
		nwin[k++] = atoi(t);
	for (; k < MAX_SETS; k++)
		nwin[k] = nwin[k - 1];
}

static void print_record(struct guest_params *p)
{
	printf("KVMINSPECT-RECORD {\"vmm_pid\": %d, \"nvcpus\": %d, \"rounds\": %d, "
	       "\"zapped\": %s, \"busy\": %s, \"paging\": \"%s\", \"shared_pt\": \"0x%lx\", "
	       "\"vcpus\": [",
	       getpid(), nvcpus, rounds, zap ? "true" : "false", busy ? "true" : "false",
	       pae ? "pae" : "long", shared_pt);
	for (int i = 0; i < nvcpus; i++)
		printf("%s{\"vcpu_id\": %d, \"tid\": %d, \"cr3\": \"0x%lx\", \"final_set\": %d}",
		       i ? ", " : "", vcpus[i].idx, vcpus[i].tid, vcpus[i].cr3, vcpus[i].final_set);
	printf("], \"sets\": [");
	for (int k = 0; k < nsets; k++) {
		int is_final = 0;
		for (int i = 0; i < nvcpus; i++)
			is_final |= vcpus[i].final_set == k;
		printf("%s{\"cr3\": \"0x%lx\", \"pt_gpas\": [", k ? ", " : "", p->sets[k].cr3);
		for (int j = 0; j < set_npts[k]; j++)
			printf("%s\"0x%lx\"", j ? ", " : "", set_pts[k][j]);
		printf("], \"window_pts\": [");
		for (int j = 0; j < nwin[k]; j++)
			printf("%s\"0x%lx\"", j ? ", " : "", p->sets[k].winpt[j]);
		printf("], \"written\": %s}", is_final ? "true" : "false");
	}
	printf("]}\n");
	fflush(stdout);
}

int main(int argc, char **argv)
{
	int opt;
	while ((opt = getopt(argc, argv, "v:s:w:r:zbp")) != -1) {
		switch (opt) {
		case 'v': nvcpus = atoi(optarg); break;
		case 's': nsets = atoi(optarg); break;
		case 'w': parse_windows(optarg); break;
		case 'r': rounds = atoi(optarg); break;
		case 'z': zap = 1; break;
		case 'b': busy = 1; break;
		case 'p': pae = 1; break;
		default:
			fprintf(stderr, "usage: vmm [-v VCPUS] [-s SETS] [-w N,N,..] [-r ROUNDS] [-z] [-b] [-p]\n");
			return 2;
		}
	}
	if (nvcpus < 1 || nvcpus > MAX_VCPUS || nsets < 1 || nsets > MAX_SETS || rounds < 1) {
		fprintf(stderr, "vmm: bad arguments\n");
		return 2;
	}
	for (int k = 0; k < nsets; k++)
		if (nwin[k] < 0 || nwin[k] > MAX_WIN) {
			fprintf(stderr, "vmm: bad window count\n");
			return 2;
		}

	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		die("open /dev/kvm");
	vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	if (vm_fd < 0)
		die("KVM_CREATE_VM");
	if (ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0) < 0)
		die("KVM_CREATE_IRQCHIP");

	struct guest_params *p;
	setup_memory(&p);

	struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + 256 * sizeof(struct kvm_cpuid_entry2));
	cpuid->nent = 256;
	if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
		die("KVM_GET_SUPPORTED_CPUID");
	for (int i = 0; i < nvcpus; i++) {
		vcpus[i].idx = i;
		setup_vcpu(&vcpus[i], p, cpuid);
	}
	for (int i = 0; i < nvcpus; i++)
		if (pthread_create(&vcpus[i].thread, NULL, vcpu_thread, &vcpus[i]))
			die("pthread_create");

	pthread_mutex_lock(&lock);
	while (reported >= 0 && reported < nvcpus)
		pthread_cond_wait(&cond, &lock);
	pthread_mutex_unlock(&lock);
	if (reported < 0) {
		printf("KVMINSPECT-FAILED\n");
		fflush(stdout);
		pause();
	}
	/* let the vCPUs re-enter KVM_RUN and halt */
	usleep(200 * 1000);

	if (zap) {
		/* a memslot delete zaps all shadow pages (kvm_mmu_zap_all_fast) */
		void *m2 = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		struct kvm_userspace_memory_region r = {
			.slot = 1, .guest_phys_addr = 0x10000000, .memory_size = 1 << 20,
			.userspace_addr = (uint64_t)m2,
		};
		if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
			die("add memslot");
		r.memory_size = 0;
		if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
			die("delete memslot");
		usleep(200 * 1000);
	}
	print_record(p);
	printf("KVMINSPECT-READY\n");
	fflush(stdout);
	for (;;)
		pause();
}
