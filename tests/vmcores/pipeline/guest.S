/*
 * Guest (L2) code for the fixture VMM. 64-bit, position independent, copied
 * by vmm.c to GUEST_CODE_GPA and entered in long mode with:
 *   rdi = vCPU index, rsi = GPA (== VA) of struct guest_params (vmm.c).
 *
 * Each vCPU cycles CR3 through every page-table set for `rounds` rounds,
 * touching every window of the set after each switch (so KVM shadows each
 * window's level-1 page table), then loads its final set, waits at a barrier
 * until every vCPU has done the same, and writes one PTE into each window
 * page table of its final set: KVM then marks those shadow pages unsync.
 * It reports with OUT 0x10 (the VMM reads its registers) and halts forever,
 * or spins in guest mode (busy), or cycles CR3 through every set forever
 * (cycle: loads each set in turn and touches its windows, as in the rounds).
 *
 * guest32_start is the same program in 32-bit protected mode with PAE paging
 * (vmm -p): edi = vCPU index, esi = GPA of struct guest_params; the u64
 * fields of the parameters are read by their low half (all below 4 GiB).
 */
#define P_NVCPUS   0
#define P_NSETS    8
#define P_ROUNDS   16
#define P_BARRIER  24
#define P_NEWPTE   32
#define P_BUSY     40
#define P_CYCLE    48
#define P_LARGE    56      /* vmm -L: VA of the data 2 MiB page, 0 without */
#define LARGE_EXEC_OFF 0x3000   /* the RET in the code 2 MiB page after it */
#define P_SETS     64      /* struct set_params[MAX_SETS] */
#define S_CR3      0
#define S_NWIN     8
#define S_WINVA    16      /* VA of window 0; window j at +j*2MiB */
#define S_WINPT    24      /* u64[MAX_WIN]: GPA of window j's page table */
#define S_SIZE     (24 + 8 * 32)
#define P_FINAL    (P_SETS + 8 * S_SIZE)   /* u64[MAX_VCPUS]: final set per vCPU */

	.text
	.code64
	.globl guest_start, guest_end
guest_start:
	mov	P_ROUNDS(%rsi), %r8
1:	xor	%r10, %r10			/* set index */
2:	call	load_set
	inc	%r10
	cmp	P_NSETS(%rsi), %r10
	jb	2b
	dec	%r8
	jnz	1b

	/* final set of this vCPU */
	mov	P_FINAL(%rsi,%rdi,8), %r10
	call	load_set

	/* barrier: nobody writes a page table before all final CR3 loads */
	lock incq P_BARRIER(%rsi)
3:	pause
	mov	P_BARRIER(%rsi), %rax
	cmp	P_NVCPUS(%rsi), %rax
	jb	3b

	/* write PTE slot (100 + vCPU) of every window page table of the set */
	imul	$S_SIZE, %r10, %r11
	lea	P_SETS(%rsi,%r11), %r11		/* r11 = &sets[final] */
	mov	S_NWIN(%r11), %rcx
	xor	%rdx, %rdx
4:	cmp	%rcx, %rdx
	jae	5f
	mov	S_WINPT(%r11,%rdx,8), %rbx	/* GPA == VA (identity map) */
	mov	P_NEWPTE(%rsi), %rax
	mov	%rax, 800(%rbx,%rdi,8)		/* slot 100 + vCPU */
	inc	%rdx
	jmp	4b

5:	mov	$0x10, %dx
	mov	%r10d, %eax
	out	%eax, (%dx)			/* report: VMM reads CR3 */
	cmpq	$0, P_CYCLE(%rsi)
	jne	10f
	cmpq	$0, P_BUSY(%rsi)
	jne	7f
6:	hlt
	jmp	6b
7:	pause					/* busy variant: spin in guest mode */
	jmp	7b
10:	xor	%r10, %r10			/* cycle variant: every set, forever */
11:	call	load_set
	inc	%r10
	cmp	P_NSETS(%rsi), %r10
	jb	11b
	jmp	10b

/* load_set: CR3 <- sets[r10].cr3, then read one word of every window;
 * with vmm -L also one word of the data 2 MiB page, and call the RET in the
 * code 2 MiB page */
load_set:
	imul	$S_SIZE, %r10, %r11
	lea	P_SETS(%rsi,%r11), %r11
	mov	S_CR3(%r11), %rax
	mov	%rax, %cr3
	mov	S_NWIN(%r11), %rcx
	mov	S_WINVA(%r11), %rbx
8:	test	%rcx, %rcx
	jz	9f
	mov	(%rbx), %rax
	add	$0x200000, %rbx
	dec	%rcx
	jmp	8b
9:	mov	P_LARGE(%rsi), %rax
	test	%rax, %rax
	jz	12f
	mov	(%rax), %rcx
	add	$(0x200000 + LARGE_EXEC_OFF), %rax
	call	*%rax
12:	ret

	.code32
	.globl guest32_start
guest32_start:
	mov	P_ROUNDS(%esi), %ebp
1:	xor	%ebx, %ebx			/* set index */
2:	call	load_set32
	inc	%ebx
	cmp	P_NSETS(%esi), %ebx
	jb	2b
	dec	%ebp
	jnz	1b

	mov	P_FINAL(%esi,%edi,8), %ebx	/* final set of this vCPU */
	call	load_set32

	lock incl P_BARRIER(%esi)		/* barrier, as in 64-bit mode */
3:	pause
	mov	P_BARRIER(%esi), %eax
	cmp	P_NVCPUS(%esi), %eax
	jb	3b

	imul	$S_SIZE, %ebx, %edx
	lea	P_SETS(%esi,%edx), %edx		/* edx = &sets[final] */
	mov	S_NWIN(%edx), %ecx
	push	%ebx
	xor	%ebp, %ebp
4:	cmp	%ecx, %ebp
	jae	5f
	mov	S_WINPT(%edx,%ebp,8), %eax	/* GPA == VA (identity map) */
	mov	P_NEWPTE(%esi), %ebx
	mov	%ebx, 800(%eax,%edi,8)		/* slot 100 + vCPU, low half */
	inc	%ebp
	jmp	4b
5:	pop	%ebx
	mov	$0x10, %dx
	mov	%ebx, %eax
	out	%eax, (%dx)
	cmpl	$0, P_CYCLE(%esi)
	jne	10f
	cmpl	$0, P_BUSY(%esi)
	jne	7f
6:	hlt
	jmp	6b
7:	pause
	jmp	7b
10:	xor	%ebx, %ebx			/* cycle, as in 64-bit mode */
11:	call	load_set32
	inc	%ebx
	cmp	P_NSETS(%esi), %ebx
	jb	11b
	jmp	10b

/* load_set32: CR3 <- sets[ebx].cr3 (a PDPT), then read one word of every window */
load_set32:
	imul	$S_SIZE, %ebx, %edx
	lea	P_SETS(%esi,%edx), %edx
	mov	S_CR3(%edx), %eax
	mov	%eax, %cr3
	mov	S_NWIN(%edx), %ecx
	mov	S_WINVA(%edx), %edx
8:	test	%ecx, %ecx
	jz	9f
	mov	(%edx), %eax
	add	$0x200000, %edx
	dec	%ecx
	jmp	8b
9:	ret
guest_end:

/*
 * guest_big_start: the big workloads (vmm -B, -T), copied alone to
 * GUEST_CODE_GPA and entered in long mode on the VMM's tables with rdi = vCPU
 * index, rsi = GPA (== VA) of struct big_params (vmm.c). vCPU 0 touches one
 * word at va + i * 2 MiB for i < n (reads it, or writes it if `write`), then
 * writes `newpte` into PTE slot 100 of `nunsync` level-1 tables, `stride`
 * bytes apart from `ptbase` (identity-mapped), reports with OUT 0x10 and
 * halts. Other vCPUs report and halt at once.
 */
#define B_N        0
#define B_VA       8
#define B_WRITE    16
#define B_NUNSYNC  24
#define B_PTBASE   32
#define B_STRIDE   40
#define B_NEWPTE   48

	.code64
	.globl guest_big_start, guest_big_end
guest_big_start:
	test	%rdi, %rdi
	jnz	4f
	mov	B_N(%rsi), %rcx
	mov	B_VA(%rsi), %rbx
	mov	B_WRITE(%rsi), %r8
1:	test	%rcx, %rcx
	jz	3f
	test	%r8, %r8
	jnz	2f
	mov	(%rbx), %rax			/* read: a shadow page per table */
	jmp	21f
2:	mov	%rcx, (%rbx)			/* write: a 4 KiB leaf per region */
21:	add	$0x200000, %rbx
	dec	%rcx
	jmp	1b

3:	mov	B_NUNSYNC(%rsi), %rcx
	mov	B_PTBASE(%rsi), %rbx
	mov	B_STRIDE(%rsi), %r9
	mov	B_NEWPTE(%rsi), %rax
31:	test	%rcx, %rcx
	jz	4f
	mov	%rax, 800(%rbx)			/* PTE slot 100: KVM marks it unsync */
	add	%r9, %rbx
	dec	%rcx
	jmp	31b

4:	mov	$0x10, %dx
	xor	%eax, %eax
	out	%eax, (%dx)			/* report: VMM reads CR3 */
5:	hlt
	jmp	5b
guest_big_end:

/*
 * vmm -M: the SMI handler, copied to SMBASE + 0x8000 (default SMBASE 0x30000).
 * KVM enters it in SMM with paging off, CS base SMBASE, 16-bit code and 4 GiB
 * data segments at base 0 (KVM's enter_smm), so every access goes through
 * KVM's SMM address space (kvm->memslots[1]) and shadow pages with role.smm.
 * It reads the windows' data page, writes a word in SMRAM, reports with OUT
 * 0x11 and halts in SMM, where the dump finds it.
 */
#define SMM_READ   0x200000	/* DATA_GPA */
#define SMM_WRITE  0x37000	/* SMRAM, below the handler */
	.code16
	.globl guest_smm_start, guest_smm_end
guest_smm_start:
	movl	$SMM_READ, %ebx
	addr32 movl (%ebx), %eax
	movl	$SMM_WRITE, %ebx
	movl	$0x534d4d21, %eax		/* "SMM!" */
	addr32 movl %eax, (%ebx)
	mov	$0x11, %dx
	out	%al, (%dx)
1:	hlt
	jmp	1b
guest_smm_end:

	.section .note.GNU-stack,"",@progbits
