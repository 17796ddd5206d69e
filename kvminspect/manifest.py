"""Every command's spec, made by kvminspect.registry: do not edit; after changing a
command, run python3 -m kvminspect.registry to write it anew."""

from typing import Any

COMMANDS: dict[str, dict[str, Any]] = {'vms': {'module': 'kvminspect.commands.vms',
         'description': 'list VMs (struct kvm on vm_list)',
         'long_description': "One row per VM: its struct kvm, owner process, its name (QEMU's "
                             '-name guest=, then kvm->stats_id "kvm-PID"; --vm takes either), '
                             'vCPUs, MMU kind (shadow, tdp_mmu, tdp_legacy), the vendor module '
                             "(kvm_amd, kvm_intel), shadow pages in use, the TDP MMU's pages and "
                             'the MMU generation. A TDX VM is listed, but its MMU is not read.\n'
                             '\n'
                             "Columns: VM the VM's index (* marks the selected VM); KVM the "
                             'struct kvm address; PID and COMM the owner process '
                             '(kvm->userspace_pid); NAME the guest name and kvm->stats_id; ST its '
                             'task state, as ps shows it (R running, S sleeping, D '
                             'uninterruptible, T stopped, Z zombie, I idle); VCPUS online/created '
                             'vCPUs; MMU the MMU kind (a non-default VM type in parentheses); '
                             "VENDOR the vendor module; SHADOW PAGES the shadow MMU's pages in "
                             'use / the maximum (kvm->arch.n_used_mmu_pages / n_max_mmu_pages; '
                             'kvm->stat.mmu_shadow_pages in 7.3): every page of a shadow or '
                             "tdp_legacy VM, only the nested guests' of a tdp_mmu VM; TDP PAGES "
                             '(shown when a VM has the TDP MMU) its pages, which the shadow count '
                             'leaves out: kvm->arch.tdp_mmu_pages, the non-root pages (a list to '
                             '6.1, a count 6.2-7.2; ? in 7.3, which keeps none), + the roots on '
                             'kvm->arch.tdp_mmu_roots (tree counts both); GEN '
                             'kvm->arch.mmu_valid_gen, the MMU generation a fast zap bumps; '
                             'MEMSLOTS memslots in use.',
         'usage': None,
         'epilog': None,
         'custom': False,
         'arguments': [{'args': ['--json'],
                        'kwargs': {'action': 'store_true', 'help': 'print one JSON document'}}]},
 'vm': {'module': 'kvminspect.commands.vm',
        'description': 'select a VM (index, pid:PID, struct kvm address or name) and show it',
        'long_description': "'vm ID' selects a VM: in a REPL, later commands work on it only (the "
                            "prompt shows it); 'vm all' clears the selection. 'vm' alone shows "
                            'the selected VM; with none selected, a REPL says so, and a one-shot '
                            "'kvminspect ... vm' shows every VM. 'vm --vm ID' shows that VM "
                            'without selecting it.\n'
                            '\n'
                            'Columns of memslots: AS the address space (1: SMM); ID the slot id; '
                            'BASE GFN its first guest frame; NPAGES its size in 4 KiB pages; '
                            'USERSPACE ADDR where the VMM mapped it; FLAGS its KVM_MEM_* flags '
                            '(1: LOG_DIRTY_PAGES, 2: READONLY).\n'
                            '\n'
                            "Also shown: the MMU notifier's invalidation sequence, count in "
                            'progress and range (kvm->mmu_invalidate_*, mmu_notifier_* before '
                            '6.0: a fault that overlaps an invalidation retries; the range is '
                            'host virtual addresses, "hva", to 6.7 and guest frame numbers, '
                            '"gfn", from 6.8), kvm.ko\'s nx_huge_pages and the pages on '
                            'kvm->arch.possible_nx_huge_pages, and the chain lengths of '
                            'kvm->arch.mmu_page_hash.',
        'usage': None,
        'epilog': None,
        'custom': False,
        'arguments': [{'args': ['id'],
                       'kwargs': {'nargs': '?',
                                  'metavar': 'ID',
                                  'help': 'VM index, pid:PID, struct kvm address, name (kvm-PID, '
                                          "QEMU's -name), or 'all'"}},
                      {'args': ['--vm'],
                       'kwargs': {'metavar': 'ID',
                                  'help': 'VM index (decimal), pid:PID, struct kvm address (hex, '
                                          "0x optional) or name (kvm-PID, QEMU's -name) (default: "
                                          'the selected VM, else all VMs; export: else the only '
                                          'VM)'}},
                      {'args': ['--json'],
                       'kwargs': {'action': 'store_true', 'help': 'print one JSON document'}}]},
 'vcpus': {'module': 'kvminspect.commands.vcpus',
           'description': 'list vCPUs (struct kvm_vcpu) with thread, state, CR3 and MMU',
           'long_description': 'One row per online vCPU: id and index, its thread, the CPU it '
                               'last ran on, vcpu->mode and mp_state, the guest CR3 '
                               '(vcpu->arch.cr3), which MMU is current (root_mmu or guest_mmu) '
                               'and its root.\n'
                               '\n'
                               'Columns: IDX vcpu->vcpu_idx (the index in kvm->vcpu_array); ID '
                               'vcpu->vcpu_id (the APIC ID userspace gave); VCPU the struct '
                               'kvm_vcpu address; TID the vCPU thread; CPU vcpu->cpu, the host '
                               'CPU it last ran on; MODE vcpu->mode (OUTSIDE_GUEST_MODE, '
                               'IN_GUEST_MODE, ...); MP_STATE vcpu->arch.mp_state (RUNNABLE, '
                               "HALTED, ...); CR3 the guest's CR3; MMU which MMU is current "
                               '(root_mmu, or guest_mmu: the shadow NPT/EPT MMU of a nested '
                               'guest), then in parentheses the other MMU and its root hpa when '
                               "it holds one, flagged nested; ROOT HPA that MMU's root (host "
                               'physical address of the top page table, or INVALID_PAGE); '
                               'REQUESTS the pending vcpu->requests bits (KVM_REQ_* without the '
                               'prefix; the names come from a table per kernel release, as the '
                               "macros are not in the debug info; 'bit N' where none fits).",
           'usage': None,
           'epilog': None,
           'custom': False,
           'arguments': [{'args': ['--vm'],
                          'kwargs': {'metavar': 'ID',
                                     'help': 'VM index (decimal), pid:PID, struct kvm address '
                                             "(hex, 0x optional) or name (kvm-PID, QEMU's -name) "
                                             '(default: the selected VM, else all VMs; export: '
                                             'else the only VM)'}},
                         {'args': ['--json'],
                          'kwargs': {'action': 'store_true', 'help': 'print one JSON document'}}]},
 'roots': {'module': 'kvminspect.commands.roots',
           'description': 'per vCPU: mmu->root and prev_roots[], shared roots marked',
           'long_description': "The 'vcpu[i] root_hpa' dump: for each vCPU its guest CR3, the "
                               'current root (hpa, pgd, its struct kvm_mmu_page: gfn, level, '
                               'root_count, unsync_children) and the prev_roots[] cache. A root '
                               'held by several vCPUs (or cached by them) is marked shared; '
                               "INVALID_PAGE roots show as such. A PAE guest's root is "
                               'mmu->pae_root: its present pae_root[i] entries follow, each with '
                               'its level-2 shadow page. --drgn prints the drgn code that reads '
                               'the same roots.\n'
                               '\n'
                               'Columns: VCPU the vCPU (vcpu[vcpu_idx]); CR3 its guest CR3; ROOT '
                               'root (mmu->root), prev_roots[i] (mmu->prev_roots[i]) or '
                               'pae_root[i]; PGD the guest page table the root shadows (the CR3 '
                               "it was built for); HPA the root's host physical address; SP its "
                               "struct kvm_mmu_page; GFN/LVL that page's gfn and level (L4: a "
                               '4-level table); FLAGS shared xN (N vCPUs have it as their current '
                               'root), direct, tdp, UNSYNC, unsync_children=N, invalid, obsolete, '
                               'root_count=N, ORPHAN, SMM (role.smm: a page of System Management '
                               'Mode, address space 1), nested (role.guest_mode, or a root of '
                               'guest_mmu); empty: an unused prev_roots slot.\n'
                               '\n'
                               'Nested guests: root and prev_roots[i] are those of vcpu->arch.mmu '
                               '(guest_mmu while the vCPU runs L2); the roots of its other MMU '
                               '(guest_mmu, the shadow NPT/EPT MMU of L2, or root_mmu while in '
                               'L2) follow as guest_mmu.root, guest_mmu.prev_roots[i] (or '
                               'root_mmu.*), when they are not INVALID_PAGE. --drgn reads '
                               'vcpu->arch.mmu only.',
           'usage': None,
           'epilog': None,
           'custom': False,
           'arguments': [{'args': ['--drgn'],
                          'kwargs': {'action': 'store_true',
                                     'help': 'print how to do the equivalent operation using drgn '
                                             'APIs'}},
                         {'args': ['--vm'],
                          'kwargs': {'metavar': 'ID',
                                     'help': 'VM index (decimal), pid:PID, struct kvm address '
                                             "(hex, 0x optional) or name (kvm-PID, QEMU's -name) "
                                             '(default: the selected VM, else all VMs; export: '
                                             'else the only VM)'}},
                         {'args': ['--json'],
                          'kwargs': {'action': 'store_true', 'help': 'print one JSON document'}}]},
 'tree': {'module': 'kvminspect.commands.tree',
          'description': 'the shadow-page tree from every root (or from SP) down',
          'long_description': 'Each page: its slot in the parent, struct kvm_mmu_page address, '
                              'gfn, level and state (UNSYNC, unsync_children, invalid/obsolete, '
                              'root_count, who holds it as a root). A page reached twice is '
                              'printed once. Orphan pages (on active_mmu_pages, reachable from no '
                              'root) follow the roots. --drgn prints the drgn code that walks the '
                              'same pages (spt[] down from each root).',
          'usage': 'tree [--depth N] [--unsync-only] [--drgn] [--vm ID] [--json] [SP]  (SP: hex, '
                   '0x optional; N: decimal, 0x accepted)',
          'epilog': None,
          'custom': False,
          'arguments': [{'args': ['sp'],
                         'kwargs': {'nargs': '?',
                                    'metavar': 'SP',
                                    'type': 'address',
                                    'help': 'start at this shadow page (struct kvm_mmu_page '
                                            'address, hex)'}},
                        {'args': ['--depth'],
                         'kwargs': {'type': 'count',
                                    'metavar': 'N',
                                    'help': 'levels to show below the top (0 or more)'}},
                        {'args': ['--unsync-only'],
                         'kwargs': {'action': 'store_true',
                                    'help': 'only the paths that lead to unsync pages'}},
                        {'args': ['--drgn'],
                         'kwargs': {'action': 'store_true',
                                    'help': 'print how to do the equivalent operation using drgn '
                                            'APIs'}},
                        {'args': ['--vm'],
                         'kwargs': {'metavar': 'ID',
                                    'help': 'VM index (decimal), pid:PID, struct kvm address '
                                            "(hex, 0x optional) or name (kvm-PID, QEMU's -name) "
                                            '(default: the selected VM, else all VMs; export: '
                                            'else the only VM)'}},
                        {'args': ['--json'],
                         'kwargs': {'action': 'store_true', 'help': 'print one JSON document'}}]},
 'sp': {'module': 'kvminspect.commands.sp',
        'description': 'one shadow page: fields, decoded role, parents and SPTEs',
        'long_description': 'Shows struct kvm_mmu_page at ADDR (or every page shadowing GFN): '
                            'gfn, level, the decoded role, root_count, unsync state and bitmap, '
                            'which vCPUs hold it as a root, its parents with the slots that point '
                            'at it, and every present SPTE (leaf, large or a table with its child '
                            'page). --drgn (with ADDR) prints the drgn code that reads the same '
                            'struct kvm_mmu_page and SPTEs.\n'
                            '\n'
                            "Columns of the SPTE table: IDX the entry's index in spt[] (0-511); "
                            'SPTE its value; KIND leaf (maps a 4 KiB page), large (maps a huge '
                            'page) or table (points to a lower shadow page); PFN the host page '
                            'frame it points to; W w when the SPTE is writable; CHILD SP the '
                            'child struct kvm_mmu_page of a table entry; CHILD GFN/LVL that '
                            "child's gfn and level; FLAGS the SPTE decoded by the kernel's own "
                            'masks (shadow_*_mask): R/W/X (- when clear), U user, NX, A accessed, '
                            'D dirty, hw host-writable, mw MMU-writable, enc encrypted, '
                            'ad=disabled/wrprot_only (EPT A/D type), acc-track with its saved '
                            'bits (see also walk).',
        'usage': 'sp [--gfn GFN] [--drgn] [--vm ID] [--json] [ADDR]  (ADDR, GFN: hex, 0x '
                 'optional)',
        'epilog': None,
        'custom': False,
        'arguments': [{'exclusive': True,
                       'arguments': [{'args': ['addr'],
                                      'kwargs': {'nargs': '?',
                                                 'metavar': 'ADDR',
                                                 'type': 'address',
                                                 'help': 'struct kvm_mmu_page address (hex, 0x '
                                                         'optional)'}},
                                     {'args': ['--gfn'],
                                      'kwargs': {'metavar': 'GFN',
                                                 'type': 'gfn',
                                                 'help': 'every shadow page of this guest frame '
                                                         '(hex, 0x optional)'}}]},
                      {'args': ['--drgn'],
                       'kwargs': {'action': 'store_true',
                                  'help': 'print how to do the equivalent operation using drgn '
                                          'APIs'}},
                      {'args': ['--vm'],
                       'kwargs': {'metavar': 'ID',
                                  'help': 'VM index (decimal), pid:PID, struct kvm address (hex, '
                                          "0x optional) or name (kvm-PID, QEMU's -name) (default: "
                                          'the selected VM, else all VMs; export: else the only '
                                          'VM)'}},
                      {'args': ['--json'],
                       'kwargs': {'action': 'store_true', 'help': 'print one JSON document'}}]},
 'walk': {'module': 'kvminspect.commands.walk',
          'description': "the path an address takes through a root: each level's SPTE, where it "
                         'stops',
          'long_description': "Walks ADDR as KVM's for_each_shadow_entry() does, in each VM --vm "
                              'names (as other commands: the selected VM, else every VM): from '
                              "the root (vCPU 0's current root, or --vcpu N's, or the shadow page "
                              "--root SP), at each level the SPTE at ADDR's index in that shadow "
                              'page, down to where it stops: a leaf (4 KiB or a large page, with '
                              "ADDR's offset in it), a non-present, MMIO or frozen SPTE, reserved "
                              'bits set, a pointer to no shadow page, or a table that cannot be '
                              'read. A shadow root translates a guest virtual address, a TDP or '
                              'direct root a guest physical one; a PAE root (32-bit guests) '
                              "starts at pae_root[ADDR bits 31:30]. A leaf's host page is then "
                              "checked against the memslot: its gfn, the memslot's userspace "
                              "address, and the page the VMM process's page tables map there.\n"
                              '\n'
                              "Columns: LVL the table's level; TABLE its struct kvm_mmu_page (or "
                              "the pae_root); GFN the shadow page's gfn; IDX the index in spt[] "
                              '(bits of ADDR); SPTE its value; FLAGS the SPTE decoded by the '
                              "kernel's own masks (R/W/X, U user, NX, A accessed, D dirty, hw "
                              'host-writable, mw MMU-writable, acc-track with its saved bits, '
                              'MMIO with its generation, FROZEN, RSVD reserved bits set); NEXT SP '
                              'the shadow page the SPTE points to.',
          'usage': 'walk [--vcpu N | --root SP] [--vm ID] [--json] ADDR  (ADDR, SP: hex, 0x '
                   'optional; N: decimal, 0x accepted)',
          'epilog': None,
          'custom': False,
          'arguments': [{'args': ['addr'],
                         'kwargs': {'metavar': 'ADDR',
                                    'type': 'address',
                                    'help': 'the address to walk (hex, 0x optional: 200000 is '
                                            '0x200000): a guest virtual address through a shadow '
                                            'root, a guest physical address through a TDP/direct '
                                            'root'}},
                        {'exclusive': False,
                         'arguments': [{'args': ['--vcpu'],
                                        'kwargs': {'metavar': 'N',
                                                   'type': 'count',
                                                   'help': "walk from vCPU N's current root (its "
                                                           'index, decimal; default 0)'}},
                                       {'args': ['--root'],
                                        'kwargs': {'metavar': 'SP',
                                                   'type': 'address',
                                                   'help': 'walk from this shadow page (struct '
                                                           'kvm_mmu_page address, hex) as the '
                                                           'top'}}]},
                        {'args': ['--vm'],
                         'kwargs': {'metavar': 'ID',
                                    'help': 'VM index (decimal), pid:PID, struct kvm address '
                                            "(hex, 0x optional) or name (kvm-PID, QEMU's -name) "
                                            '(default: the selected VM, else all VMs; export: '
                                            'else the only VM)'}},
                        {'args': ['--json'],
                         'kwargs': {'action': 'store_true', 'help': 'print one JSON document'}}]},
 'rmap': {'module': 'kvminspect.commands.rmap',
          'description': 'every SPTE that maps a gfn: its shadow page, index and bits (--stats: '
                         'rmap lengths)',
          'long_description': "For the shadow MMU (and the legacy TDP MMU), from the memslot's "
                              "reverse maps: slot->arch.rmap[level - 1] at the gfn's index, for "
                              '4K, 2M and 1G mappings, each struct kvm_rmap_head holding one '
                              'sptep or a struct pte_list_desc chain of them; each sptep is '
                              'resolved to its shadow page (the page_private of the spt page it '
                              'points into) and index. The TDP MMU keeps no rmaps: its SPTEs are '
                              "found by walking each root on kvm->arch.tdp_mmu_roots to the gfn's "
                              'address. A chain that loops, or an sptep into memory the dump '
                              'lacks, is named and skipped.\n'
                              '\n'
                              'Columns: AS the address space (shown when one is 1: SMM); LVL the '
                              'mapping size (4K, 2M, 1G); SP the struct kvm_mmu_page holding the '
                              "SPTE; SP GFN that page's gfn; IDX the index in its spt[]; SPTE the "
                              "value; FLAGS decoded by the kernel's own masks (as walk shows "
                              'them); FROM "rmap", or "root SP": the TDP MMU root walked. JSON '
                              "adds each SPTE's kernel address (sptep).\n"
                              '\n'
                              "--stats (no GFN) shows instead what the kernel's debugfs file "
                              'mmu_rmaps_stat (kvm_mmu_rmaps_stat_show(), 5.15+) shows live: for '
                              'each level, how many rmap heads of every memslot hold 0, 1, 2-3, '
                              '4-7, ... 512-1023 sptes, binned exactly as the kernel bins them: '
                              'by ffs(length), its lowest set bit, so a 3-entry rmap is counted '
                              'under 1 and a 24-entry one under 8-15 (a note lists such lengths; '
                              'JSON has the exact ones). Then the entries (one per present '
                              'shadow-MMU leaf SPTE), the longest rmap and '
                              'kvm->stat.max_mmu_rmap_size, the longest pte_list_add() ever met '
                              'before adding (5.15+). A VM without rmaps (TDP MMU only) has none: '
                              "the kernel's file is empty. Rmap arrays not in the dump, and "
                              'chains cut short, are named.',
          'usage': 'rmap [--stats] [--vm ID] [--json] [GFN]  (GFN: hex, 0x optional)',
          'epilog': None,
          'custom': False,
          'arguments': [{'args': ['gfn'],
                         'kwargs': {'metavar': 'GFN',
                                    'nargs': '?',
                                    'type': 'gfn',
                                    'help': 'the guest frame number (hex, 0x optional: 16 is '
                                            '0x16)'}},
                        {'args': ['--stats'],
                         'kwargs': {'action': 'store_true',
                                    'help': "instead of one gfn's SPTEs, the rmap length "
                                            'histogram per level (debugfs mmu_rmaps_stat, '
                                            'offline)'}},
                        {'args': ['--vm'],
                         'kwargs': {'metavar': 'ID',
                                    'help': 'VM index (decimal), pid:PID, struct kvm address '
                                            "(hex, 0x optional) or name (kvm-PID, QEMU's -name) "
                                            '(default: the selected VM, else all VMs; export: '
                                            'else the only VM)'}},
                        {'args': ['--json'],
                         'kwargs': {'action': 'store_true', 'help': 'print one JSON document'}}]},
 'unsync': {'module': 'kvminspect.commands.unsync',
            'description': "replay mmu_sync_children's unsync walk offline, in the kernel's order",
            'long_description': 'For SP, or every root with unsync_children (vCPU roots, '
                                'prev_roots, pages with root_count > 0): mmu_unsync_walk fills '
                                '16-entry kvm_mmu_pages batches, for_each_sp visits each unsync '
                                'leaf with its mmu_page_path parents, and mmu_pages_clear_parents '
                                'updates a copy of the bitmaps. Each root is replayed on its own '
                                'copy of the current state; the target is never modified. --zap '
                                'replays mmu_zap_unsync_children instead '
                                '(kvm_mmu_prepare_zap_page on each leaf; a level-1 SP has nothing '
                                'to zap).\n'
                                '\n'
                                "Columns of a batch: SP Index the entry's position in the "
                                "kvm_mmu_pages vector (pages->page[i], 0-15); SP Level its page's "
                                'level (both as the systemtap script this replaces prints them); '
                                "Slot in Parent the entry's idx, the page's slot in its parent's "
                                'spt[] (-1: the root the walk starts at); SP its struct '
                                'kvm_mmu_page. Then one line per leaf synced (zapped), its vector '
                                'position first ("sync sp [3] 0x...", the script\'s "Current sp : '
                                '[3]..."), and its mmu_page_path parents with their levels (the '
                                'script\'s "Level in Parents"). A "root sp" line is a root (held '
                                'by the vCPUs named); a plain "sp" line, a page below the roots.',
            'usage': 'unsync [--zap] [--vm ID] [--json] [SP]  (SP: hex, 0x optional)',
            'epilog': None,
            'custom': False,
            'arguments': [{'args': ['sp'],
                           'kwargs': {'nargs': '?',
                                      'metavar': 'SP',
                                      'type': 'address',
                                      'help': 'replay from this shadow page (struct kvm_mmu_page '
                                              'address, hex)'}},
                          {'args': ['--zap'],
                           'kwargs': {'action': 'store_true',
                                      'help': 'replay mmu_zap_unsync_children (the leaves are '
                                              'zapped, not synced)'}},
                          {'args': ['--vm'],
                           'kwargs': {'metavar': 'ID',
                                      'help': 'VM index (decimal), pid:PID, struct kvm address '
                                              "(hex, 0x optional) or name (kvm-PID, QEMU's -name) "
                                              '(default: the selected VM, else all VMs; export: '
                                              'else the only VM)'}},
                          {'args': ['--json'],
                           'kwargs': {'action': 'store_true',
                                      'help': 'print one JSON document'}}]},
 'stats': {'module': 'kvminspect.commands.stats',
           'description': 'MMU counters: kvm->stat and per vCPU vcpu->stat',
           'long_description': "The MMU counters of each VM's kvm->stat (mmu_*, nx_*, "
                               "pages_*/lpages, max_mmu_*, remote_tlb_flush*) and of each vCPU's "
                               'vcpu->stat (pf_* page faults, tlb_flush, invlpg), as the kernel '
                               'holds them: cumulative since the VM or vCPU was created.',
           'usage': None,
           'epilog': None,
           'custom': False,
           'arguments': [{'args': ['--vm'],
                          'kwargs': {'metavar': 'ID',
                                     'help': 'VM index (decimal), pid:PID, struct kvm address '
                                             "(hex, 0x optional) or name (kvm-PID, QEMU's -name) "
                                             '(default: the selected VM, else all VMs; export: '
                                             'else the only VM)'}},
                         {'args': ['--json'],
                          'kwargs': {'action': 'store_true', 'help': 'print one JSON document'}}]},
 'check': {'module': 'kvminspect.commands.check',
           'description': 'consistency checks: unsync bitmaps, root_count, obsolete roots, '
                          'orphans',
           'long_description': "Checks each VM's shadow pages the way the kernel maintains them: "
                               'unsync_children against the bits of unsync_child_bitmap; each set '
                               'bit against spt[i] and its child (stale bits, bits over '
                               'non-present SPTEs: info, the kernel clears them lazily in '
                               '__mmu_unsync_walk); every parent of an unsync page has its bit '
                               'set; only indirect level-1 pages are unsync; root_count against '
                               'the vCPU references (root, prev_roots[], pae_root[]; +1 for a '
                               'valid TDP MMU root on tdp_mmu_roots); obsolete roots still in use '
                               '(info while their vCPUs have the reload request pending, as right '
                               'after a fast zap; a warning for a vCPU without it); orphan pages; '
                               "the kernel's page counts against the pages found: "
                               'n_used_mmu_pages (kvm->stat.mmu_shadow_pages in 7.3) against the '
                               'shadow pages on active_mmu_pages plus the zapped roots vCPUs '
                               'still hold, kvm->arch.tdp_mmu_pages (the list to 6.1, the count '
                               '6.2-7.2) against the non-root TDP MMU pages reached (a difference '
                               'is info when the kernel explains it: a dump taken with mmu_lock '
                               'held, a live target, pages not in the dump; else an error); and '
                               'every object the model could not read or found impossible '
                               '(errors).\n'
                               '\n'
                               "--audit adds what the kernel's CONFIG_KVM_MMU_AUDIT (mmu_audit.c, "
                               'removed in 5.18 by "KVM: x86/mmu: Remove MMU auditing", '
                               '1bbc60d0c7e5) checked, reading every leaf table: each present '
                               'leaf SPTE maps the host page the memslot translation of its gfn '
                               "gives (gfn, memslot, userspace address, the VMM's page tables; "
                               'large SPTEs on their first 4K; pages the dump cannot confirm are '
                               'counted as not checkable, info); every shadow-MMU leaf SPTE has '
                               "an entry in its gfn's rmap at its level and every rmap entry "
                               'points at a present leaf SPTE of that gfn; no writable leaf SPTE '
                               'maps the gfn of a synced indirect shadow page (a write-protected '
                               'guest page table); a frozen TDP MMU SPTE (REMOVED_SPTE / '
                               'FROZEN_SPTE, a dump taken mid-update) is info naming what '
                               'mmu_lock and the vCPUs say about who may hold the lock; '
                               'kvm->stat.pages_4k/2m/1g (lpages before 5.15) against the present '
                               'leaf SPTEs of each level (a warning when nothing explains a '
                               'difference: the kernel acts on none of these statistics); and the '
                               'invariants the kernel keeps between a page and its parent '
                               '(kvminspect.invariants, errors naming the page, its gfn and the '
                               "parent): the child's role as kvm_mmu_child_role() derives it "
                               "(level one below, the inherited bits equal), a direct child's gfn "
                               'where kvm_mmu_page_get_gfn(parent, index) puts it, no MMIO SPTE '
                               'of the current memslot generation over a gfn the memslots map as '
                               'RAM, no present leaf outside every memslot (pages made obsolete '
                               'by a fast zap, and those below them, are exempt).\n'
                               '\n'
                               'The text folds the info findings of one check into one row (--all '
                               'lists each); --json lists every finding.',
           'usage': None,
           'epilog': None,
           'custom': False,
           'arguments': [{'args': ['--all'],
                          'kwargs': {'action': 'store_true',
                                     'help': 'list every info finding (by default those of one '
                                             'check are folded)'}},
                         {'args': ['--audit'],
                          'kwargs': {'action': 'store_true',
                                     'help': 'also the MMU audit (CONFIG_KVM_MMU_AUDIT, removed '
                                             "in 5.18): each leaf SPTE's pfn against the memslot, "
                                             'rmap <-> SPTE both ways, write protection of '
                                             "shadowed gfns, frozen TDP MMU SPTEs; each child's "
                                             "role and gfn against its parent's, MMIO SPTEs over "
                                             'RAM, leaves outside every memslot'}},
                         {'args': ['--vm'],
                          'kwargs': {'metavar': 'ID',
                                     'help': 'VM index (decimal), pid:PID, struct kvm address '
                                             "(hex, 0x optional) or name (kvm-PID, QEMU's -name) "
                                             '(default: the selected VM, else all VMs; export: '
                                             'else the only VM)'}},
                         {'args': ['--json'],
                          'kwargs': {'action': 'store_true', 'help': 'print one JSON document'}}]},
 'diagnose': {'module': 'kvminspect.commands.diagnose',
              'description': 'a verdict per VM (healthy, degraded, corrupt), what matters, and '
                             'stuck vCPUs',
              'long_description': 'Runs check and the audit (check --audit) on each VM and weighs '
                                  'them: a VM is corrupt with any error finding, degraded with a '
                                  'warning or a stuck-suspect vCPU, healthy otherwise; states the '
                                  'kernel calls normal (an obsolete root whose vCPUs have the '
                                  'reload request pending, orphans kept for reuse) are info, '
                                  'folded into one line per kind. Then each vCPU that cannot make '
                                  'progress, and why: its last exit is a page fault inside an MMU '
                                  'notifier invalidation in progress, or its root is invalid or '
                                  'obsolete with no reload request pending (README: Diagnose), '
                                  'with the evidence: mp_state and mode, pending requests, the '
                                  'root, the last exit and its address in the invalidation '
                                  "range's unit, the invalidation and mmu_lock. The exit status "
                                  'is 3 when a VM is corrupt (with --fail-on warning, degraded '
                                  'too).\n'
                                  '\n'
                                  'Many vmcores at once: kvminspect diagnose --jsonl CORE... [-j '
                                  'N] prints one line per core, in the order given: diagnose '
                                  '--json\'s document with "core", "kernel_release" and "elapsed" '
                                  'in front, or {"core", "error", "elapsed"} for a core that '
                                  'cannot be diagnosed (the others go on). Each core is read by '
                                  'its own process, at most N at once. Exit status: 1 if a core '
                                  'could not be diagnosed, else 3 if one has an error finding '
                                  '(with --fail-on warning, a warning), else 0 (README: Scripts).',
              'usage': 'diagnose [--fail-on {error,warning}] [--jsonl] [-j N] [--vm ID] [--json] '
                       '[CORE ...]  (N: decimal, 0x accepted)',
              'epilog': None,
              'custom': False,
              'arguments': [{'args': ['--fail-on'],
                             'kwargs': {'choices': ['error', 'warning'],
                                        'default': 'error',
                                        'help': 'the severity that makes the exit status 3 '
                                                '(default: error)'}},
                            {'args': ['--jsonl'],
                             'kwargs': {'action': 'store_true',
                                        'help': 'diagnose each CORE in its own process, one JSON '
                                                'line per core, in order (the command line only, '
                                                'without -c)'}},
                            {'args': ['-j', '--jobs'],
                             'kwargs': {'type': 'count',
                                        'metavar': 'N',
                                        'help': 'with --jsonl: at most N cores at once (default: '
                                                '1)'}},
                            {'args': ['cores'],
                             'kwargs': {'nargs': '*',
                                        'metavar': 'CORE',
                                        'help': 'with --jsonl: a vmcore or crash directory, as -c '
                                                'takes'}},
                            {'args': ['--vm'],
                             'kwargs': {'metavar': 'ID',
                                        'help': 'VM index (decimal), pid:PID, struct kvm address '
                                                "(hex, 0x optional) or name (kvm-PID, QEMU's "
                                                '-name) (default: the selected VM, else all VMs; '
                                                'export: else the only VM)'}},
                            {'args': ['--json'],
                             'kwargs': {'action': 'store_true',
                                        'help': 'print one JSON document'}}]},
 'export': {'module': 'kvminspect.commands.export',
            'description': "write one VM's shadow-page graph as DOT, GraphML, JSON or an SVG/PNG "
                           'picture',
            'long_description': 'Nodes are struct kvm_mmu_page (id: the address as 0x…) with '
                                'addr, gfn, level, direct, tdp_mmu_page, unsync, unsync_children, '
                                'root_count, invalid, obsolete, orphan, root and holders (who '
                                'holds it as a root); edges parent -> child carry the spt[] '
                                'indexes. One VM per file: --vm ID, else the selected VM, else '
                                'the only VM (with several VMs, run it once per VM). FILE - '
                                "writes to stdout; without --format the format is FILE's "
                                'extension; the status line goes to stderr. dot: Graphviz, roots '
                                "blue (a shared root's border doubled), unsync pages orange and "
                                'the paths down to them red, pages with unsync children yellow, '
                                'invalid/obsolete/orphan pages dashed grey. svg, png: that graph '
                                "drawn by Graphviz's dot (installed separately); above 2000 pages "
                                'only the roots and the paths to unsync pages are drawn. graphml: '
                                'lists as comma-separated strings. json: networkx node-link data '
                                '(nodes, edges) plus the VM.',
            'usage': None,
            'epilog': None,
            'custom': False,
            'arguments': [{'args': ['--format', '-f'],
                           'kwargs': {'choices': ('dot', 'graphml', 'json', 'svg', 'png'),
                                      'help': "output format (default: from FILE's extension: "
                                              '.dot .graphml .json .svg .png)'}},
                          {'args': ['file'],
                           'kwargs': {'metavar': 'FILE',
                                      'help': 'file to write (replaced if it exists); - is '
                                              'stdout'}},
                          {'args': ['--vm'],
                           'kwargs': {'metavar': 'ID',
                                      'help': 'VM index (decimal), pid:PID, struct kvm address '
                                              "(hex, 0x optional) or name (kvm-PID, QEMU's -name) "
                                              '(default: the selected VM, else all VMs; export: '
                                              'else the only VM)'}},
                          {'args': ['--json'],
                           'kwargs': {'action': 'store_true',
                                      'help': 'print one JSON document'}}]},
 'guest-core': {'module': 'kvminspect.commands.guestcore',
                'description': "write a guest's physical memory and vCPU registers as an ELF core "
                               'for drgn',
                'long_description': "Writes OUT, an ELF core (ET_CORE, x86-64) of one VM's guest "
                                    'physical memory (--vm ID, else the selected VM, else the '
                                    'only one): one PT_LOAD per run of consecutive guest pages '
                                    'the host dump holds (p_paddr: the guest physical address), '
                                    'over the memslots of address space 0 (1 with --smm); an '
                                    'NT_PRSTATUS per vCPU in vcpu_idx order, from the registers '
                                    'KVM saved (vcpu->arch.regs[]; on AMD RFLAGS and the segments '
                                    'from the VMCB save area; on Intel only what kvm_intel caches '
                                    "in memory, the rest is 0 and named); and the guest kernel's "
                                    'VMCOREINFO note, when its memory holds one (a Linux guest), '
                                    "so that drgn opens OUT as the guest kernel's vmcore: drgn -c "
                                    'OUT -s GUEST_VMLINUX.\n'
                                    '\n'
                                    "A guest page is written when the VMM's page tables map a "
                                    'host page at its address and the host dump holds that page '
                                    'by its own table (ELF program headers, the kdump bitmap); '
                                    'every other page is a hole, never zeros: not mapped by the '
                                    'VMM (never touched, or swapped out), or not in the dump '
                                    "(makedumpfile -d 31 drops the VMM's memory; -d 17 keeps it). "
                                    'The summary says how many pages were written and which gfn '
                                    'ranges are holes, where each register came from, and which '
                                    'vCPUs were in guest mode at the dump (their registers are '
                                    'stale). No page of the guest in the dump is an error; OUT is '
                                    'never overwritten.',
                'usage': None,
                'epilog': None,
                'custom': False,
                'arguments': [{'args': ['out'],
                               'kwargs': {'metavar': 'OUT',
                                          'help': 'the core file to write (never overwritten)'}},
                              {'args': ['--smm'],
                               'kwargs': {'action': 'store_true',
                                          'help': 'address space 1 (System Management Mode) '
                                                  'instead of 0'}},
                              {'args': ['--vm'],
                               'kwargs': {'metavar': 'ID',
                                          'help': 'VM index (decimal), pid:PID, struct kvm '
                                                  'address (hex, 0x optional) or name (kvm-PID, '
                                                  "QEMU's -name) (default: the selected VM, else "
                                                  'all VMs; export: else the only VM)'}},
                              {'args': ['--json'],
                               'kwargs': {'action': 'store_true',
                                          'help': 'print one JSON document'}}]},
 'guest': {'module': 'kvminspect.commands.guest',
           'description': "open a drgn program on a guest's memory: drgn's shell on it, or guest "
                          'in py',
           'long_description': "Opens one VM's guest (--vm ID, else the selected VM, else the "
                               'only one) as a drgn Program, without writing a file: its memory '
                               'is the guest physical memory the dump holds (the pages guest-core '
                               'would write; holes are faults), read through the host page by '
                               "page. When the guest's memory holds a Linux kernel's VMCOREINFO "
                               'note, the program is that kernel (drgn walks its page tables, '
                               'lists its tasks, reads its variables) with its debug info from -s '
                               "PATH, else the host's vmlinux when the guest runs the same build "
                               "(the same build id), else drgn's standard search (in a one-shot "
                               "command, -s after the command is kvminspect's own: give "
                               "--guest-debug PATH there). Without py: drgn's interactive shell "
                               'on the guest (prog is the guest; host, kvm, session, guest_regs '
                               'and guest_stack bound; Ctrl-D comes back). With py: guest, '
                               'guest_regs (vcpu_idx -> the registers KVM saved) and guest_stack '
                               "are bound for py (py guest['init_uts_ns'].name.release) and, "
                               "under drgn's %kvm, in drgn's shell. The program has no "
                               'NT_PRSTATUS, so drgn cannot unwind a task running on a vCPU by '
                               'itself ("registers for CPU N were not saved"): guest_stack(N) '
                               "unwinds from vCPU N's saved registers (a struct pt_regs), and "
                               'guest-core writes them into a core.',
           'usage': None,
           'epilog': None,
           'custom': False,
           'arguments': [{'args': ['mode'],
                          'kwargs': {'nargs': '?',
                                     'choices': ('py',),
                                     'metavar': 'py',
                                     'help': "bind the guest's program as guest for py instead of "
                                             "entering drgn's shell"}},
                         {'args': ['-s', '--guest-debug'],
                          'kwargs': {'dest': 'debug',
                                     'action': 'append',
                                     'default': [],
                                     'metavar': 'PATH',
                                     'help': "the guest kernel's debug info (vmlinux; file or "
                                             "directory, repeatable); default: drgn's search by "
                                             "the guest's build id"}},
                         {'args': ['--smm'],
                          'kwargs': {'action': 'store_true',
                                     'help': 'address space 1 (System Management Mode) instead of '
                                             '0'}},
                         {'args': ['--vm'],
                          'kwargs': {'metavar': 'ID',
                                     'help': 'VM index (decimal), pid:PID, struct kvm address '
                                             "(hex, 0x optional) or name (kvm-PID, QEMU's -name) "
                                             '(default: the selected VM, else all VMs; export: '
                                             'else the only VM)'}}]},
 'watch': {'module': 'kvminspect.commands.watch',
           'description': "sample every vCPU's roots on a live target: root switches, CR3s, "
                          'prev_roots hits',
           'long_description': "Live targets only (--live, --qemu): reads each vCPU's mmu->root "
                               'and prev_roots[] N times, S seconds apart, and reports per vCPU '
                               'how often its root changed between two samples, which CR3s (root '
                               'pgds) it was on, and for each change whether the new root was one '
                               "of the previous sample's prev_roots (a fast_pgd_switch() cache "
                               'hit) or not (kvm_mmu_load() found or built the root). A vCPU '
                               'caught between kvm_mmu_free_roots() and kvm_mmu_load() (root '
                               'INVALID_PAGE) is counted as unsettled. Switches between two '
                               'samples that leave no trace are not seen: a sample is a reading, '
                               'not a trace.',
           'usage': 'watch [--interval S] [--count N] [--vm ID] [--json]  (N: decimal, 0x '
                    'accepted)',
           'epilog': None,
           'custom': False,
           'arguments': [{'args': ['--interval'],
                          'kwargs': {'type': 'builtins.float',
                                     'default': 0.5,
                                     'metavar': 'S',
                                     'help': 'seconds between samples (default 0.5)'}},
                         {'args': ['--count'],
                          'kwargs': {'type': 'count',
                                     'default': 10,
                                     'metavar': 'N',
                                     'help': 'samples (default 10)'}},
                         {'args': ['--vm'],
                          'kwargs': {'metavar': 'ID',
                                     'help': 'VM index (decimal), pid:PID, struct kvm address '
                                             "(hex, 0x optional) or name (kvm-PID, QEMU's -name) "
                                             '(default: the selected VM, else all VMs; export: '
                                             'else the only VM)'}},
                         {'args': ['--json'],
                          'kwargs': {'action': 'store_true', 'help': 'print one JSON document'}}]},
 'diff': {'module': 'kvminspect.commands.diff',
          'description': 'what changed between this vmcore (A, before) and B (after)',
          'long_description': "One shot: 'kvminspect diff A B' (or 'kvminspect -c A diff B'); in "
                              "a REPL, 'diff B' compares the REPL's target with B. B is read with "
                              'the same -s debug paths, and must be a dump of the same kernel '
                              '(release and build id: else one line, exit 1). Per VM (matched by '
                              'struct kvm address, else by owner pid; VMs on one side only are '
                              'added/removed): mmu_valid_gen and the struct kvm counters old -> '
                              "new, kvm->stat's MMU counters, per vCPU (by vcpu_idx) each root "
                              'and prev_roots[] entry that changed (before and after rows), and '
                              'the shadow pages zapped, added and changed (unsync, '
                              'unsync_children, root_count, invalid, obsolete, orphan), matched '
                              'by gfn and role word (role.invalid aside) and, for shadow pages, '
                              'mmu_valid_gen: never by address, which is reused. --vm selects in '
                              'both dumps: pid:PID, a name or a struct kvm address names a VM in '
                              'each (the two must pair: by struct kvm, owner pid or that name), '
                              "an index names A's VM, found in B as every VM is; missing or "
                              'ambiguous in either dump: one line, exit 1.',
          'usage': None,
          'epilog': None,
          'custom': False,
          'arguments': [{'args': ['core'],
                         'kwargs': {'metavar': 'B',
                                    'help': 'the vmcore after (a file or fixture directory, as -c '
                                            'takes)'}},
                        {'args': ['--vm'],
                         'kwargs': {'metavar': 'ID',
                                    'help': 'VM index (decimal), pid:PID, struct kvm address '
                                            "(hex, 0x optional) or name (kvm-PID, QEMU's -name) "
                                            '(default: the selected VM, else all VMs; export: '
                                            'else the only VM)'}},
                        {'args': ['--json'],
                         'kwargs': {'action': 'store_true', 'help': 'print one JSON document'}}]},
 'rate': {'module': 'kvminspect.commands.rate',
          'description': 'root reloads (kvm_mmu_load) per second per vCPU, with a histogram; adds '
                         'a kprobe',
          'long_description': 'Changes the target: adds a kprobe event on kvm_mmu_load with a '
                              'hist trigger keyed by thread (tracefs), and removes both when it '
                              'stops (at the end, on Ctrl-C or an error). Prints each second the '
                              'calls per vCPU thread, and every 10 seconds a linear histogram '
                              "(0-100 by 10) of the per-second counts, like systemtap's "
                              '@hist_linear. Runs on the host itself (--live); not through --qemu '
                              'or on a vmcore.',
          'usage': 'rate [--seconds N] [--vm ID] [--json]  (N: decimal, 0x accepted)',
          'epilog': None,
          'custom': False,
          'arguments': [{'args': ['--seconds'],
                         'kwargs': {'type': 'count',
                                    'default': 10,
                                    'metavar': 'N',
                                    'help': 'how long to count (default 10; Ctrl-C stops early)'}},
                        {'args': ['--vm'],
                         'kwargs': {'metavar': 'ID',
                                    'help': 'VM index (decimal), pid:PID, struct kvm address '
                                            "(hex, 0x optional) or name (kvm-PID, QEMU's -name) "
                                            '(default: the selected VM, else all VMs; export: '
                                            'else the only VM)'}},
                        {'args': ['--json'],
                         'kwargs': {'action': 'store_true', 'help': 'print one JSON document'}}]},
 'py': {'module': 'kvminspect.commands.pyshell',
        'description': 'evaluate Python with prog, kvm (the selected struct kvm *) and session',
        'long_description': "Run Python code (an expression's value is printed as drgn's REPL "
                            "prints it) with prog (the drgn Program), kvm (the selected VM's "
                            "struct kvm *, or None), session and drgn's helpers bound. Names "
                            'assigned stay for the next py line. A pipe or redirect after the '
                            'code applies to its output: py kvm.nr_memslot_pages | cat. An '
                            'exception is one error line.',
        'usage': '**py** *code*',
        'epilog': None,
        'custom': True,
        'arguments': []},
 'drgn': {'module': 'kvminspect.commands.pyshell',
          'description': "drgn's interactive shell on this program (kvm and session bound)",
          'long_description': "Runs drgn's own REPL (drgn.cli.run_interactive) on the program "
                              "kvminspect opened, with kvm (the selected VM's struct kvm *, or "
                              "None) and session bound besides drgn's usual names; leave it with "
                              'Ctrl-D to come back here.',
          'usage': None,
          'epilog': None,
          'custom': False,
          'arguments': []},
 'help': {'module': 'kvminspect.commands.help',
          'description': "list commands, or show one command's usage and options",
          'long_description': None,
          'usage': None,
          'epilog': None,
          'custom': False,
          'arguments': [{'args': ['cmd'],
                         'kwargs': {'nargs': '?', 'metavar': 'CMD', 'help': 'a command name'}}]}}
