/* eptlab VMX oracle harness: runs the cases stored on the disk after the harness, one VM
 * launch each, and prints one JSON line per case on port 0xE9 (Bochs's port_e9_hack).
 *
 * Per case: zero the listed pages, apply the (address, value) writes (guest page tables, EPT
 * tables, the bytes at the data address), configure a fresh VMCS (EPTP, PML, guest CR0/CR4/
 * EFER, exception bitmap = all), launch the nested guest at its supervisor stub with the
 * stub's own page tables; the stub loads PKRU, switches to the case's CR3 (its own pages stay
 * in the TLB as global pages), optionally goes to CPL 3 with SYSRET, and makes the one access.
 * Any exception VM-exits (exception bitmap), a success ends with VMCALL. Then it prints the
 * exit fields, every written word whose value changed, and the new PML log entries. */
#include <stdint.h>

typedef uint64_t u64;
typedef uint32_t u32;
typedef uint16_t u16;
typedef uint8_t u8;

#define CASE_HEADER_LBA 128
#define CASE_BASE 0x10000000ULL
#define CASE_MAGIC 0x45505443415345ULL /* "ESACTPE" */
#define STUB_PML4 0x300000ULL
#define STUB_PDPT 0x301000ULL
#define STUB_PD 0x302000ULL
#define STUB_PT 0x303000ULL
#define STUB_EPT_PDPT 0x304000ULL
#define PML_PAGE 0x305000ULL
#define VMXON_PAGE 0x306000ULL
#define VMCS_PAGE 0x307000ULL

extern int vm_launch(const u64 *regs);
extern char stub_sup[], stub_sup2[], stub_user[], pf_handler[];
extern u8 guest_sys[];
u64 guest_gprs[3]; /* RAX, RBX, RDX of the guest at the last VM exit (entry.S) */
#define PF_MARKER 0x50460eULL

/* -- port I/O and output ---------------------------------------------------------------- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static void puts_(const char *s) {
    while (*s) outb(0xe9, (u8)*s++);
}
static void puthex(u64 v) {
    char buf[19];
    int i = 18;
    buf[i] = 0;
    do {
        buf[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    outb(0xe9, '"');
    puts_(buf + i);
    outb(0xe9, '"');
}
static void putdec(u64 v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts_(buf + i);
}
static void field(const char *name, u64 v) {
    outb(0xe9, ',');
    outb(0xe9, '"');
    puts_(name);
    puts_("\":");
    puthex(v);
}
static void shutdown(void) {
    const char *s = "Shutdown";
    while (*s) outb(0x8900, (u8)*s++);
    for (;;) __asm__ volatile("hlt");
}
static void die(const char *why, u64 v) {
    puts_("{\"fatal\":\"");
    puts_(why);
    puts_("\"");
    field("value", v);
    puts_("}\n");
    shutdown();
}

/* -- disk (ATA PIO, primary master, LBA28) ----------------------------------------------- */
static void ata_read(u32 lba, u32 count, u64 dest) {
    u32 *p = (u32 *)dest;
    while (count) {
        u32 n = count > 256 ? 256 : count;
        while (inb(0x1f7) & 0x80) {}
        outb(0x1f6, (u8)(0xe0 | ((lba >> 24) & 0x0f)));
        outb(0x1f2, (u8)(n & 0xff));
        outb(0x1f3, (u8)lba);
        outb(0x1f4, (u8)(lba >> 8));
        outb(0x1f5, (u8)(lba >> 16));
        outb(0x1f7, 0x20);
        for (u32 s = 0; s < n; s++) {
            u8 st;
            while ((st = inb(0x1f7)) & 0x80) {}
            if (st & 1) die("ata error", lba + s);
            u64 words = 128;
            __asm__ volatile("cld; rep insl" : "+D"(p), "+c"(words) : "d"(0x1f0) : "memory");
        }
        lba += n;
        count -= n;
    }
}

/* -- MSRs, control registers, VMX instructions -------------------------------------------- */
static inline u64 rdmsr(u32 msr) {
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v) {
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}
#define READ_CR(n)                                             \
    static inline u64 read_cr##n(void) {                       \
        u64 v;                                                 \
        __asm__ volatile("mov %%cr" #n ", %0" : "=r"(v));      \
        return v;                                              \
    }                                                          \
    static inline void write_cr##n(u64 v) {                    \
        __asm__ volatile("mov %0, %%cr" #n ::"r"(v) : "memory"); \
    }
READ_CR(0)
READ_CR(3)
READ_CR(4)

static int vmx_op(const char *insn_fail, int failed) {
    if (failed) die(insn_fail, 0);
    return 0;
}
static void vmxon(u64 pa) {
    u8 bad;
    __asm__ volatile("vmxon %1; setbe %0" : "=q"(bad) : "m"(pa) : "cc", "memory");
    vmx_op("vmxon", bad);
}
static void vmclear(u64 pa) {
    u8 bad;
    __asm__ volatile("vmclear %1; setbe %0" : "=q"(bad) : "m"(pa) : "cc", "memory");
    vmx_op("vmclear", bad);
}
static void vmptrld(u64 pa) {
    u8 bad;
    __asm__ volatile("vmptrld %1; setbe %0" : "=q"(bad) : "m"(pa) : "cc", "memory");
    vmx_op("vmptrld", bad);
}
static u64 vmread(u64 f) {
    u64 v;
    __asm__ volatile("vmread %1, %0" : "=r"(v) : "r"(f) : "cc");
    return v;
}
static void vmwrite(u64 f, u64 v) {
    u8 bad;
    __asm__ volatile("vmwrite %1, %2; setbe %0" : "=q"(bad) : "r"(v), "r"(f) : "cc");
    if (bad) die("vmwrite", f);
}

/* VMCS field encodings (SDM Vol. 3D Appendix B) */
enum {
    VPID = 0x0000,
    G_ES_SEL = 0x0800, G_CS_SEL = 0x0802, G_SS_SEL = 0x0804, G_DS_SEL = 0x0806,
    G_FS_SEL = 0x0808, G_GS_SEL = 0x080a, G_LDTR_SEL = 0x080c, G_TR_SEL = 0x080e,
    G_PML_INDEX = 0x0812,
    H_ES_SEL = 0x0c00, H_CS_SEL = 0x0c02, H_SS_SEL = 0x0c04, H_DS_SEL = 0x0c06,
    H_FS_SEL = 0x0c08, H_GS_SEL = 0x0c0a, H_TR_SEL = 0x0c0c,
    PML_ADDRESS = 0x200e, EPT_POINTER = 0x201a, GUEST_PHYSICAL = 0x2400,
    VMCS_LINK = 0x2800, G_EFER = 0x2806, H_EFER = 0x2c02,
    PIN_CTLS = 0x4000, PROC_CTLS = 0x4002, EXC_BITMAP = 0x4004, PF_MASK = 0x4006,
    PF_MATCH = 0x4008, CR3_TARGET_COUNT = 0x400a, EXIT_CTLS = 0x400c, EXIT_MSR_STORE = 0x400e,
    EXIT_MSR_LOAD = 0x4010, ENTRY_CTLS = 0x4012, ENTRY_MSR_LOAD = 0x4014, ENTRY_INTR = 0x4016,
    PROC_CTLS2 = 0x401e,
    VM_INSN_ERROR = 0x4400, EXIT_REASON = 0x4402, EXIT_INTR_INFO = 0x4404,
    EXIT_INTR_ERROR = 0x4406,
    G_ES_LIMIT = 0x4800, G_ES_AR = 0x4814, G_GDTR_LIMIT = 0x4810, G_IDTR_LIMIT = 0x4812,
    G_INTERRUPTIBILITY = 0x4824, G_ACTIVITY = 0x4826, G_SYSENTER_CS = 0x482a,
    H_SYSENTER_CS = 0x4c00,
    CR0_MASK = 0x6000, CR4_MASK = 0x6002, CR0_SHADOW = 0x6004, CR4_SHADOW = 0x6006,
    CR3_TARGET0 = 0x6008,
    EXIT_QUALIFICATION = 0x6400, GUEST_LINEAR = 0x640a,
    G_CR0 = 0x6800, G_CR3 = 0x6802, G_CR4 = 0x6804, G_ES_BASE = 0x6806, G_GDTR_BASE = 0x6816,
    G_IDTR_BASE = 0x6818, G_DR7 = 0x681a, G_RSP = 0x681c, G_RIP = 0x681e, G_RFLAGS = 0x6820,
    G_PENDING_DBG = 0x6822, G_SYSENTER_ESP = 0x6824, G_SYSENTER_EIP = 0x6826,
    H_CR0 = 0x6c00, H_CR3 = 0x6c02, H_CR4 = 0x6c04, H_FS_BASE = 0x6c06, H_GS_BASE = 0x6c08,
    H_TR_BASE = 0x6c0a, H_GDTR_BASE = 0x6c0c, H_IDTR_BASE = 0x6c0e, H_SYSENTER_ESP = 0x6c10,
    H_SYSENTER_EIP = 0x6c12,
};

/* -- host GDT with a TSS (VM entry needs a non-null host TR) ------------------------------ */
static u64 gdt[6] __attribute__((aligned(16)));
static u8 tss[104] __attribute__((aligned(16)));

static void setup_gdt(void) {
    u64 base = (u64)tss, limit = sizeof(tss) - 1;
    gdt[0] = 0;
    gdt[1] = 0x00af9b000000ffffULL; /* 0x08 code64 */
    gdt[2] = 0x00cf93000000ffffULL; /* 0x10 data */
    gdt[3] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) |
             (((base >> 24) & 0xff) << 56); /* 0x18 TSS */
    gdt[4] = base >> 32;
    gdt[5] = 0;
    struct __attribute__((packed)) { u16 limit; u64 base; } d = {sizeof(gdt) - 1, (u64)gdt};
    __asm__ volatile("lgdt %0" ::"m"(d));
    __asm__ volatile("ltr %w0" ::"r"(0x18));
}

/* -- control fields, adjusted by the capability MSRs -------------------------------------- */
static u32 adjust(u32 msr, u32 want) {
    u64 cap = rdmsr(msr);
    return (want | (u32)cap) & (u32)(cap >> 32);
}

static u32 pin_ctls, proc_ctls, proc_ctls2_base, exit_ctls, entry_ctls;
static u64 cr0_fixed0, cr0_fixed1, cr4_fixed0, cr4_fixed1;
static u32 revision;

static void vmx_init(void) {
    u64 basic = rdmsr(0x480);
    int true_ctls = (basic >> 55) & 1;
    revision = (u32)basic & 0x7fffffff;
    u64 fc = rdmsr(0x3a);
    if (!(fc & 1)) wrmsr(0x3a, fc | 5);
    cr0_fixed0 = rdmsr(0x486);
    cr0_fixed1 = rdmsr(0x487);
    cr4_fixed0 = rdmsr(0x488);
    cr4_fixed1 = rdmsr(0x489);
    write_cr0((read_cr0() | cr0_fixed0) & cr0_fixed1);
    write_cr4((read_cr4() | cr4_fixed0 | (1 << 13)) & cr4_fixed1);
    *(volatile u32 *)VMXON_PAGE = revision;
    vmxon(VMXON_PAGE);
    pin_ctls = adjust(true_ctls ? 0x48d : 0x481, 0);
    /* primary: use MSR bitmaps off, activate secondary controls (31) */
    proc_ctls = adjust(true_ctls ? 0x48e : 0x482, 1u << 31);
    proc_ctls2_base = 1u << 1; /* enable EPT */
    /* exit: host address-space size (9), save EFER (20), load EFER (21) */
    exit_ctls = adjust(true_ctls ? 0x48f : 0x483, (1u << 9) | (1u << 20) | (1u << 21));
    /* entry: IA-32e mode guest (9), load EFER (15) */
    entry_ctls = adjust(true_ctls ? 0x490 : 0x484, (1u << 9) | (1u << 15));
    puts_("{\"vmx\":{\"basic\":");
    puthex(basic);
    field("ept_vpid_cap", rdmsr(0x48c));
    field("proc", proc_ctls);
    field("proc2_cap", rdmsr(0x48b));
    field("cr0_fixed0", cr0_fixed0);
    field("cr4_fixed0", cr4_fixed0);
    field("cr4_fixed1", cr4_fixed1);
    puts_("}}\n");
}

/* -- the stub's own page tables and EPT (global, accessed and dirty preset) --------------- */
static void zero_page(u64 pa) {
    u64 *p = (u64 *)pa;
    for (int i = 0; i < 512; i++) p[i] = 0;
}

static void setup_stub_tables(void) {
    for (u64 pa = STUB_PML4; pa <= STUB_EPT_PDPT; pa += 0x1000) zero_page(pa);
    u64 sup = (u64)stub_sup, user = (u64)stub_user;
    if ((sup >> 21) != 0 || (user >> 21) != 0) die("stubs above 2 MiB", sup);
    u64 *pml4 = (u64 *)STUB_PML4, *pdpt = (u64 *)STUB_PDPT, *pd = (u64 *)STUB_PD;
    u64 *pt = (u64 *)STUB_PT;
    pml4[0] = STUB_PDPT | 0x27; /* P RW US A */
    pdpt[0] = STUB_PD | 0x27;
    pd[0] = STUB_PT | 0x27;
    pt[sup >> 12] = sup | 0x163;   /* P RW A D G, supervisor */
    pt[user >> 12] = user | 0x167; /* P RW US A D G */
    u64 sys = (u64)guest_sys;
    if ((sys >> 21) != 0) die("guest_sys above 2 MiB", sys);
    pt[sys >> 12] = sys | 0x163; /* P RW A D G, supervisor */
    /* guest GDT: 0x08 64-bit code, 0x10 data (accessed bits preset: delivery writes nothing) */
    u64 *gdt_g = (u64 *)guest_sys;
    gdt_g[1] = 0x00af9b000000ffffULL;
    gdt_g[2] = 0x00cf93000000ffffULL;
    /* IDT vector 14: 64-bit interrupt gate to pf_handler, selector 0x08, IST 0 */
    u64 handler = (u64)pf_handler;
    u64 *gate = (u64 *)(guest_sys + 0x200 + 14 * 16);
    gate[0] = (handler & 0xffff) | (0x08ULL << 16) | (0x8eULL << 40) |
              (((handler >> 16) & 0xffff) << 48);
    gate[1] = handler >> 32;
    /* TSS: RSP0 (a user-mode #PF switches to it) = the top of the page */
    *(u64 *)(guest_sys + 0x400 + 4) = sys + 0x1000;
    /* EPT: GPA [0, 1 GiB) -> HPA identity, one 1 GiB page, RWX, WB, A and D */
    ((u64 *)STUB_EPT_PDPT)[0] = 0x7 | (6 << 3) | (1 << 7) | (1 << 8) | (1 << 9);
}

/* -- one case ----------------------------------------------------------------------------- */
struct case_header {
    u64 magic, id, n_zero, n_writes, eptp, cr0, cr3, cr4, efer, pkru, cpl3, access, gva,
        pml_enabled, pml_index;
};

static void segment(int i, u16 sel, u32 ar) {
    vmwrite(G_ES_SEL + 2 * i, sel);
    vmwrite(G_ES_LIMIT + 2 * i, 0xffffffff);
    vmwrite(G_ES_AR + 2 * i, ar);
    vmwrite(G_ES_BASE + 2 * i, 0);
}

static void configure(const struct case_header *c) {
    vmclear(VMCS_PAGE);
    *(volatile u32 *)VMCS_PAGE = revision;
    vmclear(VMCS_PAGE);
    vmptrld(VMCS_PAGE);
    vmwrite(PIN_CTLS, pin_ctls);
    vmwrite(PROC_CTLS, proc_ctls);
    u32 p2 = proc_ctls2_base | (c->pml_enabled ? 1u << 17 : 0);
    vmwrite(PROC_CTLS2, adjust(0x48b, p2));
    vmwrite(EXC_BITMAP, ~(1u << 14)); /* #PF goes to the guest's handler, the rest exits */
    vmwrite(PF_MASK, 0);
    vmwrite(PF_MATCH, 0);
    vmwrite(CR3_TARGET_COUNT, 1);
    vmwrite(CR3_TARGET0, c->cr3); /* in case CR3-load exiting cannot be cleared */
    vmwrite(EXIT_CTLS, exit_ctls);
    vmwrite(EXIT_MSR_STORE, 0);
    vmwrite(EXIT_MSR_LOAD, 0);
    vmwrite(ENTRY_CTLS, entry_ctls);
    vmwrite(ENTRY_MSR_LOAD, 0);
    vmwrite(ENTRY_INTR, 0);
    vmwrite(EPT_POINTER, c->eptp);
    if (c->pml_enabled) {
        vmwrite(PML_ADDRESS, PML_PAGE);
        vmwrite(G_PML_INDEX, c->pml_index);
    }
    vmwrite(VMCS_LINK, ~0ULL);
    vmwrite(CR0_MASK, 0);
    vmwrite(CR4_MASK, 0);
    /* host state */
    vmwrite(H_CR0, read_cr0());
    vmwrite(H_CR3, read_cr3());
    vmwrite(H_CR4, read_cr4());
    vmwrite(H_ES_SEL, 0x10);
    vmwrite(H_CS_SEL, 0x08);
    vmwrite(H_SS_SEL, 0x10);
    vmwrite(H_DS_SEL, 0x10);
    vmwrite(H_FS_SEL, 0x10);
    vmwrite(H_GS_SEL, 0x10);
    vmwrite(H_TR_SEL, 0x18);
    vmwrite(H_FS_BASE, 0);
    vmwrite(H_GS_BASE, 0);
    vmwrite(H_TR_BASE, (u64)tss);
    vmwrite(H_GDTR_BASE, (u64)gdt);
    vmwrite(H_IDTR_BASE, 0);
    vmwrite(H_SYSENTER_CS, 0);
    vmwrite(H_SYSENTER_ESP, 0);
    vmwrite(H_SYSENTER_EIP, 0);
    vmwrite(H_EFER, rdmsr(0xc0000080));
    /* guest state: 64-bit, CPL 0, at the supervisor stub, the stub's page tables */
    u64 cr0 = ((c->cr0 | cr0_fixed0) & cr0_fixed1);
    u64 cr4 = ((c->cr4 | (1 << 5) | (1 << 7) | cr4_fixed0) & cr4_fixed1); /* PAE PGE */
    vmwrite(G_CR0, cr0);
    vmwrite(CR0_SHADOW, cr0);
    vmwrite(G_CR3, STUB_PML4);
    vmwrite(G_CR4, cr4);
    vmwrite(CR4_SHADOW, cr4);
    vmwrite(G_EFER, c->efer | (1 << 8) | (1 << 10) | 1); /* LME LMA SCE */
    segment(0, 0x10, 0xc093);
    segment(1, 0x08, 0xa09b);
    segment(2, 0x10, 0xc093);
    segment(3, 0x10, 0xc093);
    segment(4, 0x10, 0xc093);
    segment(5, 0x10, 0xc093);
    segment(6, 0, 0x10000); /* LDTR unusable */
    vmwrite(G_TR_SEL, 0x18);
    vmwrite(G_ES_LIMIT + 14, 0x67);
    vmwrite(G_ES_AR + 14, 0x8b);
    vmwrite(G_ES_BASE + 14, (u64)guest_sys + 0x400);
    vmwrite(G_GDTR_BASE, (u64)guest_sys);
    vmwrite(G_GDTR_LIMIT, 0x1f);
    vmwrite(G_IDTR_BASE, (u64)guest_sys + 0x200);
    vmwrite(G_IDTR_LIMIT, 0xff);
    vmwrite(G_DR7, 0x400);
    vmwrite(G_RSP, (u64)guest_sys + 0x1000);
    vmwrite(G_RIP, (u64)stub_sup);
    vmwrite(G_RFLAGS, 2);
    vmwrite(G_PENDING_DBG, 0);
    vmwrite(G_INTERRUPTIBILITY, 0);
    vmwrite(G_ACTIVITY, 0);
    vmwrite(G_SYSENTER_CS, 0);
    vmwrite(G_SYSENTER_ESP, 0);
    vmwrite(G_SYSENTER_EIP, 0);
}

static const u64 *run_case(const u64 *rec) {
    const struct case_header *c = (const struct case_header *)rec;
    if (c->magic != CASE_MAGIC) die("bad case magic", c->id);
    const u64 *zeros = rec + sizeof(*c) / 8;
    const u64 *writes = zeros + c->n_zero;
    for (u64 i = 0; i < c->n_zero; i++) zero_page(zeros[i]);
    for (u64 i = 0; i < c->n_writes; i++) *(volatile u64 *)writes[2 * i] = writes[2 * i + 1];
    /* the case's EPT root also maps GPA [0, 512 GiB) for the stub (never a case address) */
    ((volatile u64 *)(c->eptp & ~0xfffULL))[0] = STUB_EPT_PDPT | 0x107;
    /* the stub's pages get a protection key that PKRU leaves open (Bochs applies PKRU to
     * supervisor-mode pages too, and #PF delivery writes the stack page) */
    u64 key = 0;
    for (u64 k = 0; k < 16; k++)
        if (!((c->pkru >> (2 * k)) & 3)) key = k;
    u64 *pt = (u64 *)STUB_PT;
    for (u64 va = (u64)stub_sup; va <= (u64)guest_sys; va += 0x1000)
        if (pt[va >> 12] & 1) pt[va >> 12] = (pt[va >> 12] & ~(0xfULL << 59)) | (key << 59);
    configure(c);
    /* SYSCALL/SYSRET: STAR (CS/SS bases), LSTAR = second supervisor stub, FMASK = 0 */
    wrmsr(0xc0000081, (0x18ULL << 48) | (0x08ULL << 32));
    wrmsr(0xc0000082, (u64)stub_sup2);
    wrmsr(0xc0000084, 0);
    u64 regs[6] = {c->cr3, c->gva, c->access, c->cpl3, c->pkru, (c->cr4 >> 22) & 1};
    int failed = vm_launch(regs);
    puts_("{\"id\":");
    putdec(c->id);
    if (failed) {
        field("launch_error", vmread(VM_INSN_ERROR));
    } else {
        field("reason", vmread(EXIT_REASON));
        field("qual", vmread(EXIT_QUALIFICATION));
        field("gla", vmread(GUEST_LINEAR));
        field("gpa", vmread(GUEST_PHYSICAL));
        field("intr", vmread(EXIT_INTR_INFO));
        field("error", vmread(EXIT_INTR_ERROR));
        field("rip", vmread(G_RIP));
        if ((vmread(EXIT_REASON) & 0xffff) == 18 && guest_gprs[0] == PF_MARKER) {
            field("pf_error", guest_gprs[1]);
            field("pf_cr2", guest_gprs[2]);
        }
        if (c->pml_enabled) {
            u64 after = vmread(G_PML_INDEX) & 0xffff;
            field("pml_index", after);
            puts_(",\"pml\":[");
            u64 logged = c->pml_index < 512 ? (c->pml_index - after) & 0xffff : 0;
            for (u64 i = 0; i < logged && i < 512; i++) { /* in logging order */
                if (i) outb(0xe9, ',');
                puthex(((u64 *)PML_PAGE)[c->pml_index - i]);
            }
            puts_("]");
        }
    }
    puts_(",\"changed\":[");
    int comma = 0;
    for (u64 i = 0; i < c->n_writes; i++) {
        u64 now = *(volatile u64 *)writes[2 * i];
        if (now != writes[2 * i + 1]) {
            if (comma) outb(0xe9, ',');
            outb(0xe9, '[');
            puthex(writes[2 * i]);
            outb(0xe9, ',');
            puthex(now);
            outb(0xe9, ']');
            comma = 1;
        }
    }
    puts_("]}\n");
    return writes + 2 * c->n_writes;
}

void harness_main(void) {
    setup_gdt();
    u64 hdr[64];
    ata_read(CASE_HEADER_LBA, 1, (u64)hdr);
    if (hdr[0] != CASE_MAGIC) die("bad image header", hdr[0]);
    u64 n_cases = hdr[1], sectors = hdr[2];
    ata_read(CASE_HEADER_LBA + 1, (u32)sectors, CASE_BASE);
    vmx_init();
    setup_stub_tables();
    const u64 *rec = (const u64 *)CASE_BASE;
    for (u64 i = 0; i < n_cases; i++) rec = run_case(rec);
    puts_("{\"done\":");
    putdec(n_cases);
    puts_("}\n");
    shutdown();
}
