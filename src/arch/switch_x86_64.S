/*
 * x86_64 (System V) context switch.  See switch.h for the frame layout.
 * Saves only what the ABI says a callee must preserve: rbx, rbp, r12-r15,
 * rsp, and the control bits of MXCSR and the x87 control word.
 */
	.text
	.globl	loom__ctx_switch
	.hidden	loom__ctx_switch
	.type	loom__ctx_switch, @function
	.p2align 4
/* void loom__ctx_switch(loom__ctx *from, const loom__ctx *to) */
loom__ctx_switch:
	.cfi_startproc
	pushq	%rbp
	.cfi_adjust_cfa_offset 8
	.cfi_offset %rbp, -16
	pushq	%rbx
	.cfi_adjust_cfa_offset 8
	.cfi_offset %rbx, -24
	pushq	%r12
	.cfi_adjust_cfa_offset 8
	.cfi_offset %r12, -32
	pushq	%r13
	.cfi_adjust_cfa_offset 8
	.cfi_offset %r13, -40
	pushq	%r14
	.cfi_adjust_cfa_offset 8
	.cfi_offset %r14, -48
	pushq	%r15
	.cfi_adjust_cfa_offset 8
	.cfi_offset %r15, -56
	subq	$8, %rsp
	.cfi_adjust_cfa_offset 8
	stmxcsr	(%rsp)
	fnstcw	4(%rsp)
	movq	%rsp, (%rdi)
	movq	(%rsi), %rsp
	ldmxcsr	(%rsp)
	fldcw	4(%rsp)
	addq	$8, %rsp
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%rbx
	popq	%rbp
	ret
	.cfi_endproc
	.size	loom__ctx_switch, .-loom__ctx_switch

	.globl	loom__ctx_trampoline
	.hidden	loom__ctx_trampoline
	.type	loom__ctx_trampoline, @function
	.p2align 4
/* First code a new context runs: entry(arg) with r12 = entry, r13 = arg. */
loom__ctx_trampoline:
	.cfi_startproc
	.cfi_undefined rip
	movq	%r13, %rdi
	callq	*%r12
	ud2
	.cfi_endproc
	.size	loom__ctx_trampoline, .-loom__ctx_trampoline

	.section .note.GNU-stack,"",@progbits
