/* Boot sector of the eptlab VMX oracle harness (GNU as). The BIOS loads it at 0x7c00; it
 * loads the harness (KERNEL_SECTORS sectors after it) to 0x8000 with INT 13h AH=42h,
 * identity-maps the first 4 GiB with 1 GiB pages (PML4 at 0x1000, PDPT at 0x2000), enters
 * long mode and jumps to the harness entry at 0x8000 with a stack at 0x90000. */
    .code16
    .text
    .globl _boot
_boot:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %sp
    mov %dl, boot_drive
    /* load the harness: disk address packet */
    mov $dap, %si
    mov $0x42, %ah
    mov boot_drive, %dl
    int $0x13
    jc fail
    /* A20 via port 0x92 */
    in $0x92, %al
    or $2, %al
    and $0xfe, %al
    out %al, $0x92
    /* page tables: zero 0x1000..0x2fff, PML4[0] -> 0x2000, PDPT[0..3] = 1 GiB pages */
    mov $0x1000, %di
    mov $0x1000, %cx
    xor %ax, %ax
    rep stosw
    movl $0x2003, 0x1000
    movl $0x00000083, 0x2000
    movl $0x40000083, 0x2008
    movl $0x80000083, 0x2010
    movl $0xc0000083, 0x2018
    lgdt gdt_desc
    mov %cr4, %eax
    or $0x20, %eax          /* PAE */
    mov %eax, %cr4
    mov $0x1000, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx   /* IA32_EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax    /* PG | PE */
    mov %eax, %cr0
    ljmp $0x08, $long_entry
fail:
    mov $'E', %al
    out %al, $0xe9
1:  hlt
    jmp 1b

    .code64
long_entry:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $0x90000, %rsp
    mov $0x8000, %rax
    jmp *%rax

    .p2align 3
gdt:
    .quad 0
    .quad 0x00af9b000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf93000000ffff    /* 0x10: data */
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt
dap:
    .byte 0x10, 0
    .word KERNEL_SECTORS
    .word 0x8000, 0         /* offset, segment */
    .quad 1                 /* LBA */
boot_drive:
    .byte 0
    .org 510
    .byte 0x55, 0xaa
