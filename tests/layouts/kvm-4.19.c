/*
 * TEST INPUT, NOT KERNEL CODE.  tests/test_layout_dwarf.py compiles this file
 * with `gcc -g` and loads only its DWARF into drgn, to check what
 * kvminspect.layout.probe() decides on a Linux 4.19 KVM layout.
 *
 * Cut-down transcription of Linux 4.19 declarations, from the public tree
 * 0x88888888/Linux-4.19 on GitHub (a 4.19 tree with added Chinese comments;
 * the code of these structs is unchanged):
 *   arch/x86/include/asm/kvm_host.h  (commit 153dcfa171cf8698fbe8682559701b6c32fb154f)
 *     union kvm_mmu_page_role, struct kvm_rmap_head, struct kvm_mmu_page,
 *     struct rsvd_bits_validate, struct kvm_mmu_root_info, struct kvm_mmu,
 *     struct kvm_vcpu_arch, struct kvm_lpage_info, struct kvm_arch_memory_slot,
 *     struct kvm_arch, struct kvm_vm_stat, struct kvm_vcpu_stat
 *   include/linux/kvm_host.h         (commit 19ad8f9143c94c521cc5ff0aceb091b5832d5265)
 *     struct kvm_vcpu, struct kvm_memory_slot, struct kvm_memslots, struct kvm,
 *     extern struct list_head vm_list
 *   include/linux/mm_types.h         (commit 0d2fdee8b10f0b1ad6567b90d6df19361f10e702)
 *     struct page (leading members only)
 * plus the vmlinux globals physical_mask, page_offset_base and vmemmap_base
 * (declarations only; nothing is ever read from them).
 * This is the 4.19.0 layout: 4.19.y stable later added lpage_disallowed*
 * (iTLB multihit, 4.19.84) and nx_lpage_splits, which no probe looks at.
 *
 * Rules: the KVM MMU structs that the probes look at (the role union,
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
typedef struct { atomic_t refs; } refcount_t;
typedef struct { unsigned int slock; } spinlock_t;
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
struct address_space;
#define DECLARE_BITMAP(name, bits) unsigned long name[((bits) + 63) / 64]

/* ---- constants (arch/x86/include/asm/kvm_host.h, 4.19) ---- */
#define KVM_MAX_VCPUS 288
#define KVM_USER_MEM_SLOTS 509
#define KVM_PRIVATE_MEM_SLOTS 3
#define KVM_MEM_SLOTS_NUM (KVM_USER_MEM_SLOTS + KVM_PRIVATE_MEM_SLOTS)
#define KVM_ADDRESS_SPACE_NUM 2
#define KVM_NR_BUSES 4
#define KVM_NR_PAGE_SIZES 3
#define KVM_PAGE_TRACK_MAX 1
#define KVM_MMU_HASH_SHIFT 12
#define KVM_NUM_MMU_PAGES (1 << KVM_MMU_HASH_SHIFT)
#define NR_VCPU_REGS 17
#define PT64_ROOT_MAX_LEVEL 5
#define KVM_MMU_NUM_PREV_ROOTS 3

/* ---- arch/x86/include/asm/kvm_host.h ---- */

union kvm_mmu_page_role {
	unsigned word;
	struct {
		unsigned level:4;
		unsigned cr4_pae:1;
		unsigned quadrant:2;
		unsigned direct:1;
		unsigned access:3;
		unsigned invalid:1;
		unsigned nxe:1;
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

struct kvm_rmap_head {
	unsigned long val;
};

struct kvm_mmu_page {
	struct list_head link;
	struct hlist_node hash_link;

	/*
	 * The following two entries are used to key the shadow page in the
	 * hash table.
	 */
	gfn_t gfn;
	union kvm_mmu_page_role role;

	u64 *spt;
	/* hold the gfn of each spte inside spt */
	gfn_t *gfns;
	bool unsync;
	int root_count;          /* Currently serving as active root */
	unsigned int unsync_children;
	struct kvm_rmap_head parent_ptes; /* rmap pointers to parent sptes */

	/* The page is obsolete if mmu_valid_gen != kvm->arch.mmu_valid_gen.  */
	unsigned long mmu_valid_gen;

	DECLARE_BITMAP(unsync_child_bitmap, 512);

	/* Number of writes since the last time traversal visited this page.  */
	atomic_t write_flooding_count;
};

struct rsvd_bits_validate {
	u64 rsvd_bits_mask[2][PT64_ROOT_MAX_LEVEL];
	u64 bad_mt_xwr;
};

struct kvm_mmu_root_info {
	gpa_t cr3;
	hpa_t hpa;
};

struct kvm_vcpu;

struct kvm_mmu {
	void (*set_cr3)(struct kvm_vcpu *vcpu, unsigned long root);
	unsigned long (*get_cr3)(struct kvm_vcpu *vcpu);
	u64 (*get_pdptr)(struct kvm_vcpu *vcpu, int index);
	int (*page_fault)(struct kvm_vcpu *vcpu, gva_t gva, u32 err,
			  bool prefault);
	void (*inject_page_fault)(struct kvm_vcpu *vcpu,
				  struct x86_exception *fault);
	gpa_t (*gva_to_gpa)(struct kvm_vcpu *vcpu, gva_t gva, u32 access,
			    struct x86_exception *exception);
	gpa_t (*translate_gpa)(struct kvm_vcpu *vcpu, gpa_t gpa, u32 access,
			       struct x86_exception *exception);
	int (*sync_page)(struct kvm_vcpu *vcpu,
			 struct kvm_mmu_page *sp);
	void (*invlpg)(struct kvm_vcpu *vcpu, gva_t gva, hpa_t root_hpa);
	void (*update_pte)(struct kvm_vcpu *vcpu, struct kvm_mmu_page *sp,
			   u64 *spte, const void *pte);
	hpa_t root_hpa;
	union kvm_mmu_page_role base_role;
	u8 root_level;
	u8 shadow_root_level;
	u8 ept_ad;
	bool direct_map;
	struct kvm_mmu_root_info prev_roots[KVM_MMU_NUM_PREV_ROOTS];

	u8 permissions[16];

	u32 pkru_mask;

	u64 *pae_root;
	u64 *lm_root;

	struct rsvd_bits_validate shadow_zero_check;

	struct rsvd_bits_validate guest_rsvd_check;

	/* Can have large pages at levels 2..last_nonleaf_level-1. */
	u8 last_nonleaf_level;

	bool nx;

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
	unsigned long cr8;
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
	bool tpr_access_reporting;
	u64 ia32_xss;
	u64 microcode_version;

	/*
	 * Paging state of the vcpu
	 */
	struct kvm_mmu mmu;

	/*
	 * Paging state of an L2 guest (used for nested npt)
	 */
	struct kvm_mmu nested_mmu;

	/*
	 * Pointer to the mmu context currently used for
	 * gva_to_gpa translations.
	 */
	struct kvm_mmu *walk_mmu;

	/* ... mmu_pte_list_desc_cache to l1tf_flush_l1d left out ... */
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
	unsigned int n_used_mmu_pages;
	unsigned int n_requested_mmu_pages;
	unsigned int n_max_mmu_pages;
	unsigned int indirect_shadow_pages;
	unsigned long mmu_valid_gen;
	struct hlist_head mmu_page_hash[KVM_NUM_MMU_PAGES];
	/*
	 * Hash table of struct kvm_mmu_page.
	 */
	struct list_head active_mmu_pages;
	struct list_head zapped_obsolete_pages;
	/* ... mmu_sp_tracker to guest_can_read_msr_platform_info left out ... */
};

struct kvm_vm_stat {
	ulong mmu_shadow_zapped;
	ulong mmu_pte_write;
	ulong mmu_pte_updated;
	ulong mmu_pde_zapped;
	ulong mmu_flooded;
	ulong mmu_recycled;
	ulong mmu_cache_miss;
	ulong mmu_unsync;
	ulong remote_tlb_flush;
	ulong lpages;
	ulong max_mmu_page_hash_collisions;
};

struct kvm_vcpu_stat {
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
	u64 halt_successful_poll;
	u64 halt_attempted_poll;
	u64 halt_poll_invalid;
	u64 halt_wakeup;
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
};

/* ---- include/linux/kvm_host.h ---- */

struct kvm;

struct kvm_vcpu {
	struct kvm *kvm;
	/* ... preempt_notifier (CONFIG_PREEMPT_NOTIFIERS) left out ... */
	int cpu;
	int vcpu_id;
	int srcu_idx;
	int mode;
	u64 requests;
	unsigned long guest_debug;

	int pre_pcpu;
	struct list_head blocked_vcpu_list;

	/* ... mutex, run, guest_xcr0_loaded, wq left out ... */
	struct pid *pid;
	int sigset_active;
	/* ... sigset left out ... */
	struct kvm_vcpu_stat stat;
	unsigned int halt_poll_ns;
	bool valid_wakeup;

	/* ... mmio_*, async_pf, spin_loop left out ... */
	bool preempted;
	struct kvm_vcpu_arch arch;
	struct dentry *debugfs_dentry;
};

struct kvm_memory_slot {
	gfn_t base_gfn;
	unsigned long npages;
	unsigned long *dirty_bitmap;
	struct kvm_arch_memory_slot arch;
	unsigned long userspace_addr;
	u32 flags;
	short id;
};

struct kvm_memslots {
	u64 generation;
	struct kvm_memory_slot memslots[KVM_MEM_SLOTS_NUM];
	/* The mapping table from slot id to the index in memslots[]. */
	short id_to_index[KVM_MEM_SLOTS_NUM];
	atomic_t lru_slot;
	int used_slots;
};

struct kvm {
	spinlock_t mmu_lock;
	struct mutex slots_lock;
	struct mm_struct *mm; /* userspace tied to this vm */
	struct kvm_memslots *memslots[KVM_ADDRESS_SPACE_NUM];
	struct kvm_vcpu *vcpus[KVM_MAX_VCPUS];

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
};

/* virt/kvm/kvm_main.c: LIST_HEAD(vm_list) */
struct list_head vm_list;

/*
 * vmlinux globals that probe() reads through the symbol table
 * (CONFIG_DYNAMIC_PHYSICAL_MASK, CONFIG_RANDOMIZE_MEMORY).  Only this file
 * defines them: with no memory behind the program, reading them faults and
 * probe() must fall back to its defaults; the other two files test the
 * symbol-missing path.
 */
u64 physical_mask;		/* phys_addr_t */
unsigned long page_offset_base;
unsigned long vmemmap_base;

/* ---- include/linux/mm_types.h ---- */

struct page {
	unsigned long flags;		/* Atomic flags, some possibly
					 * updated asynchronously */
	union {
		struct {	/* Page cache and anonymous pages */
			struct list_head lru;
			struct address_space *mapping;
			unsigned long index;	/* pgoff_t: Our offset within mapping. */
			unsigned long private;
		};
		/* ... slab, compound, page table and ZONE_DEVICE views left out ... */

		/** @rcu_head: You can use this to free a page by RCU. */
		struct rcu_head rcu_head;
	};

	union {		/* This union is 4 bytes in size. */
		atomic_t _mapcount;
		unsigned int page_type;
		unsigned int active;		/* SLAB */
		int units;			/* SLOB */
	};

	/* Usage count. *DO NOT USE DIRECTLY*. See page_ref.h */
	atomic_t _refcount;

	/* CONFIG_MEMCG */
	struct mem_cgroup *mem_cgroup;
} __attribute__((aligned(2 * sizeof(unsigned long))));
