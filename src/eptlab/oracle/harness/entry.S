/* Harness entry, the VM-launch trampoline and the nested guest's two stub pages. */
    .section .text.entry, "ax"
    .globl _start
_start:
    mov $0x90000, %rsp
    call harness_main
1:  hlt
    jmp 1b

/* int vm_launch(const uint64_t regs[6]): r8, r9, r10, r12, r13, r14 for the guest stub;
 * returns 0 after a VM exit, 1 if VMLAUNCH failed (VM-instruction error in the VMCS). */
    .text
    .globl vm_launch
vm_launch:
    push %rbp
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
    mov $0x6c14, %rdx           /* HOST_RSP */
    vmwrite %rsp, %rdx
    lea vm_exit_entry(%rip), %rax
    mov $0x6c16, %rdx           /* HOST_RIP */
    vmwrite %rax, %rdx
    mov 0(%rdi), %r8
    mov 8(%rdi), %r9
    mov 16(%rdi), %r10
    mov 24(%rdi), %r12
    mov 32(%rdi), %r13
    mov 40(%rdi), %r14
    vmlaunch
    mov $1, %eax
    jmp 2f
vm_exit_entry:
    mov %rax, guest_gprs(%rip)      /* the guest's RAX, RBX, RDX (the #PF handler's report) */
    mov %rbx, guest_gprs+8(%rip)
    mov %rdx, guest_gprs+16(%rip)
    xor %eax, %eax
2:  pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    pop %rbp
    ret

/* The case's access at %r9 (%r10: 0 read, 1 write, else execute), then VMCALL to report.
 * Emitted in both stub pages: the supervisor one (CPL 0) and the user one (CPL 3), since the
 * access must run from the page whose privilege the case tests. */
    .macro ACCESS
    cmp $0, %r10
    je 3f
    cmp $1, %r10
    je 4f
    jmp *%r9
3:  mov (%r9), %al
    vmcall
4:  mov %al, (%r9)
    vmcall
    .endm

/* Supervisor stub page (guest CPL 0, a global supervisor page in the stub tables). */
    .section .stub_sup, "ax"
    .p2align 12
    .globl stub_sup, stub_sup2
stub_sup:
    test %r14, %r14
    jz 1f
    mov %r13d, %eax             /* CR4.PKE: load the case's PKRU (before any data access) */
    xor %ecx, %ecx
    xor %edx, %edx
    wrpkru
1:  movq $0, guest_sys+0xff8    /* fill the TLB (global, writable) for the guest's GDT, IDT,
                                   TSS and stack page: #PF delivery will not walk */
    test %r12, %r12
    jnz 2f
    mov %r8, %cr3               /* the case's tables; this page stays in the TLB (global) */
    jmp sup_access
2:  movabs $stub_user, %rcx     /* to CPL 3: SYSRET reads no descriptor */
    mov $2, %r11
    sysretq
stub_sup2:                      /* IA32_LSTAR: reached by the user stub's SYSCALL */
    mov %r8, %cr3
    sysretq
sup_access:
    ACCESS

/* The guest's #PF handler (IDT vector 14; this page is in the TLB since the VM entry): reports
 * the error code and CR2 with VMCALL, RAX = PF_MARKER. */
    .globl pf_handler
pf_handler:
    mov (%rsp), %rbx
    mov %cr2, %rdx
    mov $0x50460e, %eax
    vmcall

/* User stub page (global user page). Executed once at CPL 3 before the CR3 switch (which
 * fills its global TLB entry), then again after it. */
    .section .stub_user, "ax"
    .p2align 12
    .globl stub_user
stub_user:
    syscall
    ACCESS
/* The guest's GDT (+0), IDT (+0x200), TSS (+0x400) and stack (top of the page), one page. */
    .section .guest_sys, "aw"
    .p2align 12
    .globl guest_sys
guest_sys:
    .fill 4096, 1, 0

    .section .note.GNU-stack, "", @progbits
