/*
 * TEST INPUT, NOT KERNEL CODE.  tests/test_layout_dwarf.py compiles this file
 * with `gcc -g` and loads only its DWARF into drgn, to check what
 * kvminspect.layout.probe() decides on a Linux 5.15 KVM layout.
 *
 * Cut-down transcription of Linux 5.15.y declarations:
 * - from the public tree Tptogiar/linux-5.15.85 on GitHub (5.15.85 with
 *   added Chinese comments; the code of these structs is unchanged),
 *   commit 0272a4bd39836b7faa74a695c3de261219828004:
 *     arch/x86/include/asm/kvm_host.h
 *       union kvm_mmu_page_role, union kvm_mmu_extended_role, union kvm_mmu_role,
 *       struct kvm_rmap_head, struct rsvd_bits_validate, struct kvm_mmu_root_info,
 *       struct kvm_mmu, struct kvm_vcpu_arch, struct kvm_arch, struct kvm_vm_stat,
 *       struct kvm_vcpu_stat (KVM_MAX_VCPUS is 1024 in 5.15.85)
 *     include/linux/kvm_host.h
 *       struct kvm_vcpu, struct kvm_memory_slot, struct kvm_memslots, struct kvm
 * - arch/x86/kvm/mmu/mmu_internal.h, struct kvm_mmu_page: that tree does not
 *   carry the file; transcribed from the 5.14/5.15-era version held by the
 *   public-code search index (INVALID_PAE_ROOT, the root_count /
 *   tdp_mmu_root_count union, no mmio_cached, tdp_mmu_page + rcu_head under
 *   CONFIG_X86_64, parent_ptes not yet in a union with ptep), which the index
 *   does not attribute to a repository; it agrees with the 5.15.135 row of
 *   the layout notes this project was started from.
 * - struct kvm_lpage_info / kvm_arch_memory_slot (asm/kvm_host.h) are the
 *   4.19/5.4 ones; no probe looks inside them.
 * struct page is deliberately left out: probe() must fall back to its x86-64
 * defaults when vmlinux's struct page is not in the debug info.
 *
 * Rules: the KVM MMU structs that the probes look at (the role unions,
 * struct kvm_mmu_page, struct kvm_mmu, struct kvm_mmu_root_info, the memslot
 * structs) are complete, members in their real order and with their real
 * types, so the DWARF bitfield positions are the real ones.  In the bigger
 * structs, runs of members no probe reads are left out where marked "...".
 * The kernel infrastructure types at the top are stand-ins, not faithful.
 * CONFIG_X86_64=y, CONFIG_X86_32 unset.
 */

/* ---- stand-ins for kernel infrastructure types (not faithful) ---- */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long s64;
typedef _Bool bool;
typedef int pid_t;
typedef int int32_t;
typedef unsigned long ulong;
typedef u64 gpa_t;
typedef u64 hpa_t;
typedef u64 gfn_t;
typedef unsigned long gva_t;
typedef struct { int counter; } atomic_t;
typedef struct { long long counter; } atomic64_t;
typedef struct { atomic_t refs; } refcount_t;
typedef struct { unsigned int slock; } spinlock_t;
typedef struct { unsigned int lock; } rwlock_t;
struct mutex { long owner; spinlock_t wait_lock; void *osq; void *wait_list[2]; };
struct list_head { struct list_head *next, *prev; };
struct hlist_node { struct hlist_node *next, **pprev; };
struct hlist_head { struct hlist_node *first; };
struct rcu_head { struct rcu_head *next; void (*func)(struct rcu_head *head); };
struct mm_struct;
struct pid;
struct dentry;
struct kvm_lapic;
struct kvm_io_bus;
struct x86_exception;
/* include/linux/kvm_types.h; contents not transcribed (no probe reads them) */
struct kvm_vm_stat_generic { u64 remote_tlb_flush; };
struct kvm_vcpu_stat_generic { u64 halt_successful_poll; };
#define DECLARE_BITMAP(name, bits) unsigned long name[((bits) + 63) / 64]
#define SHRT_MAX 32767

/* ---- constants (arch/x86/include/asm/kvm_host.h, include/linux/kvm_host.h, 5.15) ---- */
#define KVM_MAX_VCPUS 1024
#define KVM_PRIVATE_MEM_SLOTS 3
#define KVM_MEM_SLOTS_NUM SHRT_MAX
#define KVM_ADDRESS_SPACE_NUM 2
#define KVM_NR_BUSES 4
#define KVM_NR_PAGE_SIZES 3
#define KVM_PAGE_TRACK_MAX 1
#define KVM_MMU_HASH_SHIFT 12
#define KVM_NUM_MMU_PAGES (1 << KVM_MMU_HASH_SHIFT)
#define NR_VCPU_REGS 17
#define PT64_ROOT_MAX_LEVEL 5
#define KVM_MMU_NUM_PREV_ROOTS 3
#define KVM_STATS_NAME_SIZE 48 /* include/linux/kvm_host.h; not re-checked against the tree */

/* ---- arch/x86/include/asm/kvm_host.h ---- */

union kvm_mmu_page_role {
	u32 word;
	struct {
		unsigned level:4;
		unsigned gpte_is_8_bytes:1;
		unsigned quadrant:2;
		unsigned direct:1;
		unsigned access:3;
		unsigned invalid:1;
		unsigned efer_nx:1;
		unsigned cr0_wp:1;
		unsigned smep_andnot_wp:1;
		unsigned smap_andnot_wp:1;
		unsigned ad_disabled:1;
		unsigned guest_mode:1;
		unsigned :6;

		/*
		 * This is left at the top of the word so that
		 * kvm_memslots_for_spte_role can extract it with a
		 * simple shift.  While there is room, give it a whole
		 * byte so it is also faster to load it from memory.
		 */
		unsigned smm:8;
	};
};

union kvm_mmu_extended_role {
	u32 word;
	struct {
		unsigned int valid:1;
		unsigned int execonly:1;
		unsigned int cr0_pg:1;
		unsigned int cr4_pae:1;
		unsigned int cr4_pse:1;
		unsigned int cr4_pke:1;
		unsigned int cr4_smap:1;
		unsigned int cr4_smep:1;
		unsigned int cr4_la57:1;
		unsigned int efer_lma:1;
	};
};

union kvm_mmu_role {
	u64 as_u64;
	struct {
		union kvm_mmu_page_role base;
		union kvm_mmu_extended_role ext;
	};
};

struct kvm_rmap_head {
	unsigned long val;
};

struct rsvd_bits_validate {
	u64 rsvd_bits_mask[2][PT64_ROOT_MAX_LEVEL];
	u64 bad_mt_xwr;
};

struct kvm_mmu_root_info {
	gpa_t pgd;
	hpa_t hpa;
};

struct kvm_vcpu;
struct kvm_mmu_page;

struct kvm_mmu {
	unsigned long (*get_guest_pgd)(struct kvm_vcpu *vcpu);
	u64 (*get_pdptr)(struct kvm_vcpu *vcpu, int index);
	int (*page_fault)(struct kvm_vcpu *vcpu, gpa_t cr2_or_gpa, u32 err,
			  bool prefault);
	void (*inject_page_fault)(struct kvm_vcpu *vcpu,
				  struct x86_exception *fault);
	gpa_t (*gva_to_gpa)(struct kvm_vcpu *vcpu, gpa_t gva_or_gpa,
			    u32 access, struct x86_exception *exception);
	gpa_t (*translate_gpa)(struct kvm_vcpu *vcpu, gpa_t gpa, u32 access,
			       struct x86_exception *exception);
	int (*sync_page)(struct kvm_vcpu *vcpu,
			 struct kvm_mmu_page *sp);
	void (*invlpg)(struct kvm_vcpu *vcpu, gva_t gva, hpa_t root_hpa);
	hpa_t root_hpa;
	gpa_t root_pgd;
	union kvm_mmu_role mmu_role;
	u8 root_level;
	u8 shadow_root_level;
	u8 ept_ad;
	bool direct_map;
	struct kvm_mmu_root_info prev_roots[KVM_MMU_NUM_PREV_ROOTS];

	u8 permissions[16];

	u32 pkru_mask;

	u64 *pae_root;
	u64 *pml4_root;
	u64 *pml5_root;

	struct rsvd_bits_validate shadow_zero_check;

	struct rsvd_bits_validate guest_rsvd_check;

	u64 pdptrs[4]; /* pae */
};

struct kvm_vcpu_arch {
	unsigned long regs[NR_VCPU_REGS];
	u32 regs_avail;
	u32 regs_dirty;

	unsigned long cr0;
	unsigned long cr0_guest_owned_bits;
	unsigned long cr2;
	unsigned long cr3;
	unsigned long cr4;
	unsigned long cr4_guest_owned_bits;
	unsigned long cr4_guest_rsvd_bits;
	unsigned long cr8;
	u32 host_pkru;
	u32 pkru;
	u32 hflags;
	u64 efer;
	u64 apic_base;
	struct kvm_lapic *apic;    /* kernel irqchip context */
	bool apicv_active;
	bool load_eoi_exitmap_pending;
	DECLARE_BITMAP(ioapic_handled_vectors, 256);
	unsigned long apic_attention;
	int32_t apic_arb_prio;
	int mp_state;
	u64 ia32_misc_enable_msr;
	u64 smbase;
	u64 smi_count;
	bool at_instruction_boundary;
	bool tpr_access_reporting;
	bool xsaves_enabled;
	u64 ia32_xss;
	u64 microcode_version;
	u64 arch_capabilities;
	u64 perf_capabilities;

	/*
	 * Paging state of the vcpu
	 */
	struct kvm_mmu *mmu;

	/* Non-nested MMU for L1 */
	struct kvm_mmu root_mmu;

	/* L1 MMU when running nested */
	struct kvm_mmu guest_mmu;

	/*
	 * Paging state of an L2 guest (used for nested npt)
	 */
	struct kvm_mmu nested_mmu;

	/*
	 * Pointer to the mmu context currently used for
	 * gva_to_gpa translations.
	 */
	struct kvm_mmu *walk_mmu;

	/* ... mmu_pte_list_desc_cache to the end left out ... */
};

struct kvm_lpage_info {
	int disallow_lpage;
};

struct kvm_arch_memory_slot {
	struct kvm_rmap_head *rmap[KVM_NR_PAGE_SIZES];
	struct kvm_lpage_info *lpage_info[KVM_NR_PAGE_SIZES - 1];
	unsigned short *gfn_track[KVM_PAGE_TRACK_MAX];
};

struct kvm_arch {
	unsigned long n_used_mmu_pages;
	unsigned long n_requested_mmu_pages;
	unsigned long n_max_mmu_pages;
	unsigned int indirect_shadow_pages;
	u8 mmu_valid_gen;
	struct hlist_head mmu_page_hash[KVM_NUM_MMU_PAGES];
	struct list_head active_mmu_pages;
	struct list_head zapped_obsolete_pages;
	struct list_head lpage_disallowed_mmu_pages;
	/* ... mmu_sp_tracker to nx_lpage_recovery_thread left out ... */

	/* CONFIG_X86_64 */
	/*
	 * Whether the TDP MMU is enabled for this VM. This contains a
	 * snapshot of the TDP MMU module parameter from when the VM was
	 * created and remains unchanged for the life of the VM. If this is
	 * true, TDP MMU handler functions will run for various MMU
	 * operations.
	 */
	bool tdp_mmu_enabled;

	/*
	 * List of struct kvm_mmu_pages being used as roots.
	 * All struct kvm_mmu_pages in the list should have
	 * tdp_mmu_page set.
	 */
	struct list_head tdp_mmu_roots;

	/*
	 * List of struct kvmp_mmu_pages not being used as roots.
	 * All struct kvm_mmu_pages in the list should have
	 * tdp_mmu_page set and a tdp_mmu_root_count of 0.
	 */
	struct list_head tdp_mmu_pages;

	spinlock_t tdp_mmu_pages_lock;
	/* end CONFIG_X86_64 */

	/*
	 * If set, rmaps have been allocated for all memslots and should be
	 * allocated for any newly created or modified memslots.
	 */
	bool memslots_have_rmaps;

	/* ... hv_root_tdp, hv_root_tdp_lock (CONFIG_HYPERV) left out ... */
};

struct kvm_vm_stat {
	struct kvm_vm_stat_generic generic;
	u64 mmu_shadow_zapped;
	u64 mmu_pte_write;
	u64 mmu_pde_zapped;
	u64 mmu_flooded;
	u64 mmu_recycled;
	u64 mmu_cache_miss;
	u64 mmu_unsync;
	union {
		struct {
			atomic64_t pages_4k;
			atomic64_t pages_2m;
			atomic64_t pages_1g;
		};
		atomic64_t pages[KVM_NR_PAGE_SIZES];
	};
	u64 nx_lpage_splits;
	u64 max_mmu_page_hash_collisions;
	u64 max_mmu_rmap_size;
};

struct kvm_vcpu_stat {
	struct kvm_vcpu_stat_generic generic;
	u64 pf_fixed;
	u64 pf_guest;
	u64 tlb_flush;
	u64 invlpg;

	u64 exits;
	u64 io_exits;
	u64 mmio_exits;
	u64 signal_exits;
	u64 irq_window_exits;
	u64 nmi_window_exits;
	u64 l1d_flush;
	u64 halt_exits;
	u64 request_irq_exits;
	u64 irq_exits;
	u64 host_state_reload;
	u64 fpu_reload;
	u64 insn_emulation;
	u64 insn_emulation_fail;
	u64 hypercalls;
	u64 irq_injections;
	u64 nmi_injections;
	u64 req_event;
	u64 nested_run;
	u64 directed_yield_attempted;
	u64 directed_yield_successful;
	u64 preemption_reported;
	u64 preemption_other;
	u64 guest_mode;
};

/* ---- arch/x86/kvm/mmu/mmu_internal.h ---- */

struct kvm_mmu_page {
	struct list_head link;
	struct hlist_node hash_link;
	struct list_head lpage_disallowed_link;

	bool unsync;
	u8 mmu_valid_gen;
	bool lpage_disallowed; /* Can't be replaced by an equiv large page */

	/*
	 * The following two entries are used to key the shadow page in the
	 * hash table.
	 */
	union kvm_mmu_page_role role;
	gfn_t gfn;

	u64 *spt;
	/* hold the gfn of each spte inside spt */
	gfn_t *gfns;
	/* Currently serving as active root */
	union {
		int root_count;
		refcount_t tdp_mmu_root_count;
	};
	unsigned int unsync_children;
	struct kvm_rmap_head parent_ptes; /* rmap pointers to parent sptes */
	DECLARE_BITMAP(unsync_child_bitmap, 512);

	/* Number of writes since the last time traversal visited this page.  */
	atomic_t write_flooding_count;

	/* CONFIG_X86_64 */
	bool tdp_mmu_page;

	/* Used for freeing the page asynchronously if it is a TDP MMU page. */
	struct rcu_head rcu_head;
};

/* ---- include/linux/kvm_host.h ---- */

struct kvm;

struct kvm_vcpu {
	struct kvm *kvm;
	/* ... preempt_notifier (CONFIG_PREEMPT_NOTIFIERS) left out ... */
	int cpu;
	int vcpu_id; /* id given by userspace at creation */
	int vcpu_idx; /* index in kvm->vcpus array */
	int srcu_idx;
	int mode;
	u64 requests;
	unsigned long guest_debug;

	int pre_pcpu;
	struct list_head blocked_vcpu_list;

	/* ... mutex, run, wait left out ... */
	struct pid *pid;
	int sigset_active;
	/* ... sigset left out ... */
	unsigned int halt_poll_ns;
	bool valid_wakeup;

	/* ... mmio_*, async_pf, spin_loop left out ... */
	bool preempted;
	bool ready;
	struct kvm_vcpu_arch arch;
	struct kvm_vcpu_stat stat;
	char stats_id[KVM_STATS_NAME_SIZE];
	/* ... dirty_ring left out ... */

	/*
	 * The index of the most recently used memslot by this vCPU. It's ok
	 * if this becomes stale due to memslot changes since we always check
	 * it is a valid slot.
	 */
	int last_used_slot;
};

struct kvm_memory_slot {
	gfn_t base_gfn;
	unsigned long npages;
	unsigned long *dirty_bitmap;
	struct kvm_arch_memory_slot arch;
	unsigned long userspace_addr;
	u32 flags;
	short id;
	u16 as_id;
};

struct kvm_memslots {
	u64 generation;
	/* The mapping table from slot id to the index in memslots[]. */
	short id_to_index[KVM_MEM_SLOTS_NUM];
	atomic_t last_used_slot;
	int used_slots;
	struct kvm_memory_slot memslots[];
};

struct kvm {
	/* KVM_HAVE_MMU_RWLOCK (x86) */
	rwlock_t mmu_lock;

	struct mutex slots_lock;

	struct mutex slots_arch_lock;
	struct mm_struct *mm; /* userspace tied to this vm */
	struct kvm_memslots *memslots[KVM_ADDRESS_SPACE_NUM];
	struct kvm_vcpu *vcpus[KVM_MAX_VCPUS];

	/* Used to wait for completion of MMU notifiers.  */
	spinlock_t mn_invalidate_lock;
	unsigned long mn_active_invalidate_count;
	/* ... mn_memslots_update_rcuwait left out ... */

	atomic_t online_vcpus;
	int created_vcpus;
	int last_boosted_vcpu;
	struct list_head vm_list;
	struct mutex lock;
	struct kvm_io_bus *buses[KVM_NR_BUSES];
	/* ... irqfds, ioeventfds (CONFIG_HAVE_KVM_EVENTFD) left out ... */
	struct kvm_vm_stat stat;
	struct kvm_arch arch;
	refcount_t users_count;
	/* ... coalesced_mmio_ring to irq_srcu left out ... */
	pid_t userspace_pid;
	unsigned int max_halt_poll_ns;
	u32 dirty_ring_size;
	bool vm_bugged;
	/* ... pm_notifier (CONFIG_HAVE_KVM_PM_NOTIFIER) left out ... */
	char stats_id[KVM_STATS_NAME_SIZE];
};

/* virt/kvm/kvm_main.c: LIST_HEAD(vm_list) */
struct list_head vm_list;
