# A "kernel" for the integrity monitor: code pages executed in a loop, data pages written as
# ordinary work, legitimate patches of its code (static-key style) and a schedule of injected
# malicious writes into its code pages, each logged (the ground truth) in guest memory.
#   r8  the parameter block (u64 words, offsets below), written by the VMM
# Boot: copy the function template to the start of every code page and fill the rest of each
# page with words (the page's "code bytes"), touch every data page, then ROUND(-1): the VMM
# takes its golden copy and arms its policy. Measured loop, iteration i:
#   run the function of code page i mod N (it reads FUNC_READS words of its page);
#   store i into DATA_WRITES data words (page after page, then the next word of each page);
#   every PATCH_EVERY iterations toggle the patch site (first 8 bytes) of the next of the first
#   PATCH_PAGES code pages between "nop5; nop3" and "jmp +3; nop3" (same behaviour);
#   perform the schedule's entries for iteration i (32 bytes each: iteration, GPA, value, kind;
#   kind 0 hook, 1 transient (the word is saved first), 2 restore (writes the saved word)):
#   RDTSC, the 8-byte store, RDTSC, a read back; log entry (64 bytes): iteration, GPA, value
#   written, TSC before, TSC after, read back, kind, 0;
#   every REVIEW_EVERY iterations (0: never) ROUND(i + 1) with RCX = RDTSC: the review tick;
#   or, when REVIEW_TSC is set, the first time every 64 iterations that the TSC passed the next
#   deadline (deadlines REVIEW_TSC cycles apart: a review every so many ms);
#   before every STAMP_EVERY-th iteration (a power of two) an RDTSC into the stamp array, and
#   one more at the end (chunk costs, for robust medians).
# End: REPORT(1, loop cycles), REPORT(2, checksum of what the functions read),
# REPORT(3, TSC at the end), DONE(log entries).
    .include "common.inc"

.set P_CODE, 0            # first code page (GPA)
.set P_NCODE, 8           # code pages
.set P_DATA, 16           # first data page
.set P_NDATA, 24          # data pages
.set P_ITERS, 32
.set P_DWRITES, 40        # data writes per iteration
.set P_REVIEW, 48         # review tick period (iterations, 0 = none)
.set P_SCHED, 56          # schedule address
.set P_NSCHED, 64         # schedule entries
.set P_LOG, 72            # log address (the next entry: advanced by the guest)
.set P_PATCH, 80          # patch period (iterations, 0 = none)
.set P_NPATCH, 88         # code pages with a patch site
.set P_SAVED, 96          # the word a transient write replaced
.set P_PATCHPAGE, 104     # the next patch site's page index
.set P_LOGBASE, 112       # the log's first entry (kept by the guest)
.set P_START, 120         # TSC at the start of the measured loop
.set P_SMASK, 128         # stamp period - 1 (a power of two minus one)
.set P_SPTR, 136          # where the next stamp goes
.set P_RTSC, 144          # review period in TSC cycles (0: every P_REVIEW iterations)
.set P_DEADLINE, 152      # TSC of the next timed review
.set TAIL, 256            # code page bytes past the function (the template fits below)
.set FUNC_READS, 32
.set FUNC_STRIDE, 112     # 32 reads x 112 bytes cover 256..3840
.set NOP_SITE, 0x001f0f0000441f0f   # nopl 0(%rax,%rax,1); nopl (%rax)
.set JMP_SITE, 0x001f0f00000003e9   # jmp +3; nopl (%rax)

    mov %r8, %rbp
    mov P_LOG(%rbp), %rax
    mov %rax, P_LOGBASE(%rbp)
    movq $0, P_PATCHPAGE(%rbp)
    movq $0, P_SAVED(%rbp)

# -- boot: load the code pages, touch the data pages ---------------------------------------
    mov P_CODE(%rbp), %r9
    mov P_NCODE(%rbp), %r10
    movabs $0x9e3779b97f4a7c15, %r11
load_page:
    test %r10, %r10
    jz loaded
    lea kfunc(%rip), %rsi
    mov %r9, %rdi
    mov $(kfunc_end - kfunc), %ecx
    rep movsb
    lea TAIL(%r9), %rdi
fill:
    mov %rdi, %rax
    imul %r11, %rax
    mov %rax, (%rdi)
    add $8, %rdi
    lea 4096(%r9), %rax
    cmp %rax, %rdi
    jb fill
    add $4096, %r9
    dec %r10
    jmp load_page
loaded:
    mov P_DATA(%rbp), %rdi
    mov P_NDATA(%rbp), %rcx
touch:
    test %rcx, %rcx
    jz booted
    movq $0, (%rdi)
    add $4096, %rdi
    dec %rcx
    jmp touch
booted:
    mov $-1, %rbx
    HC HC_ROUND

# -- the measured loop ----------------------------------------------------------------------
    RDTSC64 %rdi
    mov %rdi, P_START(%rbp)
    mov %rdi, %rax
    add P_RTSC(%rbp), %rax
    mov %rax, P_DEADLINE(%rbp)
    xor %rsi, %rsi                    # i
    mov P_CODE(%rbp), %r9             # this iteration's code page
    mov P_DATA(%rbp), %r10            # next data word
    mov P_PATCH(%rbp), %r11           # patch countdown (0: never)
    mov P_REVIEW(%rbp), %r12          # tick countdown (0: never)
    xor %r13, %r13                    # checksum
    mov P_SCHED(%rbp), %r15           # next schedule entry
    mov P_NSCHED(%rbp), %r8
    shl $5, %r8
    add %r15, %r8                     # end of the schedule
loop:
    cmp P_ITERS(%rbp), %rsi
    jae finish
    mov %rsi, %rax                    # a TSC stamp before every P_SMASK + 1 iterations
    and P_SMASK(%rbp), %rax
    jnz work
    RDTSC64 %rdi
    mov P_SPTR(%rbp), %rax
    mov %rdi, (%rax)
    add $8, %rax
    mov %rax, P_SPTR(%rbp)
work:
    # kernel work: the function of this code page
    mov %r9, %rdi
    lea ret(%rip), %r14
    jmp *%rdi
ret:
    add %rax, %r13
    add $4096, %r9
    mov P_NCODE(%rbp), %rax
    shl $12, %rax
    add P_CODE(%rbp), %rax
    cmp %rax, %r9
    jb data
    mov P_CODE(%rbp), %r9
data:
    mov P_DWRITES(%rbp), %rcx
    mov P_NDATA(%rbp), %rdx
    shl $12, %rdx                     # the data region's span
dwrite:
    test %rcx, %rcx
    jz patch
    mov %rsi, (%r10)
    add $4096, %r10
    mov P_DATA(%rbp), %rax
    add %rdx, %rax
    cmp %rax, %r10
    jb dnext
    sub %rdx, %r10                    # back to the first page, next word
    add $8, %r10
    test $0xfff, %r10
    jnz dnext
    sub $4096, %r10                   # every word done: the first one again
dnext:
    dec %rcx
    jmp dwrite
patch:
    test %r11, %r11
    jz inject
    dec %r11
    jnz inject
    mov P_PATCH(%rbp), %r11
    mov P_PATCHPAGE(%rbp), %rax
    lea 1(%rax), %rcx
    cmp P_NPATCH(%rbp), %rcx
    jb 1f
    xor %ecx, %ecx
1:  mov %rcx, P_PATCHPAGE(%rbp)
    shl $12, %rax
    add P_CODE(%rbp), %rax
    mov %rax, %rdi
    mov (%rdi), %rax
    movabs $NOP_SITE, %rcx
    movabs $JMP_SITE, %rdx
    cmp %rcx, %rax
    cmove %rdx, %rcx
    mov %rcx, (%rdi)
inject:
    cmp %r8, %r15
    jae tick
    cmp (%r15), %rsi
    jne tick
    mov 8(%r15), %rdi                 # GPA
    mov 16(%r15), %rcx                # value
    mov 24(%r15), %rax                # kind
    cmp $1, %rax
    jne 2f
    mov (%rdi), %rax                  # transient: save the word it replaces
    mov %rax, P_SAVED(%rbp)
    jmp 3f
2:  cmp $2, %rax
    jne 3f
    mov P_SAVED(%rbp), %rcx           # restore: write the saved word back
3:  RDTSC64 %rbx
    mov %rcx, (%rdi)                  # the injected write
    RDTSC64 %rax
    mov (%rdi), %rdx                  # read back: did it land?
    mov P_LOG(%rbp), %r14
    mov %rsi, (%r14)
    mov %rdi, 8(%r14)
    mov %rcx, 16(%r14)
    mov %rbx, 24(%r14)
    mov %rax, 32(%r14)
    mov %rdx, 40(%r14)
    mov 24(%r15), %rax
    mov %rax, 48(%r14)
    movq $0, 56(%r14)
    add $64, %r14
    mov %r14, P_LOG(%rbp)
    add $32, %r15
    jmp inject
tick:
    cmpq $0, P_RTSC(%rbp)
    jne timed
    test %r12, %r12
    jz next
    dec %r12
    jnz next
    mov P_REVIEW(%rbp), %r12
    RDTSC64 %rcx
    lea 1(%rsi), %rbx
    HC HC_ROUND
    jmp next
timed:                                # a review when the TSC passed the deadline (checked
    test $63, %rsi                    # every 64 iterations)
    jnz next
    RDTSC64 %rcx
    cmp P_DEADLINE(%rbp), %rcx
    jb next
    mov %rcx, %rax
    add P_RTSC(%rbp), %rax
    mov %rax, P_DEADLINE(%rbp)
    lea 1(%rsi), %rbx
    HC HC_ROUND
next:
    inc %rsi
    jmp loop
finish:
    RDTSC64 %rdi
    mov P_SPTR(%rbp), %rax            # the last stamp: the end of the loop
    mov %rdi, (%rax)
    mov %rdi, %rcx
    sub P_START(%rbp), %rcx
    mov $1, %ebx
    HC HC_REPORT
    mov $2, %ebx
    mov %r13, %rcx
    HC HC_REPORT
    mov $3, %ebx
    mov %rdi, %rcx
    HC HC_REPORT
    mov P_LOG(%rbp), %rbx
    sub P_LOGBASE(%rbp), %rbx
    shr $6, %rbx
    HC HC_DONE
    hlt

# -- the function every code page starts with (position independent) -----------------------
# rdi = its page, r14 = where to return; the sum of FUNC_READS words of the page in rax.
kfunc:
    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x0f, 0x1f, 0x00    # the patch site (NOP_SITE)
    xor %eax, %eax
    mov $FUNC_READS, %ecx
    lea TAIL(%rdi), %rdx
1:  add (%rdx), %rax
    add $FUNC_STRIDE, %rdx
    dec %ecx
    jnz 1b
    jmp *%r14
kfunc_end:
