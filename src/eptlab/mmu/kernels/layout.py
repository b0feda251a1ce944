"""Indices and codes shared by the kernels and :mod:`eptlab.mmu.engine` (plain ints, which numba
freezes as compile-time constants). Architectural values (exit reasons, misconfiguration
reasons) come from :mod:`eptlab.arch`; the rest are the kernels' own array layouts."""

from __future__ import annotations

from ...arch.ept import MISCONFIG_REASONS as MISCONFIG_REASONS
from ...arch.exits import ExitReason

# -- per-vCPU registers: regs[vcpu, REG_*] ---------------------------------------------------------
REG_CR0 = 0
REG_CR3 = 1
REG_CR4 = 2
REG_EFER = 3
REG_PKRU = 4
REG_RFLAGS = 5
REG_USE_EPT = 6
REG_EPT_ROOT = 7
REG_EPT_LEVELS = 8
REG_EPT_AD = 9
REG_MBEC = 10
REG_PML_ON = 11
REG_PML_ADDR = 12
REG_PML_INDEX = 13
REG_CTX = 14  # context id of (VPID, EPTP): tags TLB and guest paging-structure cache entries
REG_ECTX = 15  # context id of the EPTP: tags nested-TLB and EPT paging-structure cache entries
REG_OCCUPIED = 16  # bit s set once structure s received an entry (lets lookups skip empty ones)
NREGS = 17

# -- machine-wide features: feat[FEAT_*] -----------------------------------------------------------
FEAT_MAXPHY = 0
FEAT_EXEC_ONLY = 1
FEAT_ADV_INFO = 2
NFEAT = 3

# -- cost model: cost[COST_*] ----------------------------------------------------------------------
COST_L1_TLB = 0
COST_STLB = 1
COST_PSC = 2
COST_WALK_START = 3
COST_CACHE = 4  # 4 entries: L1, L2, LLC, DRAM latency
NCOST = 8

# -- set-associative translation structures: desc[S_*] = (first row, sets, ways) -------------------
# order = field order of eptlab.mmu.config.TlbConfig
S_L1D = 0  # + size index (0 = 4 KiB, 1 = 2 MiB, 2 = 1 GiB)
S_L1I = 3
S_STLB = 6
S_PSC = 9  # + (5 - level): PML5E, PML4E, PDPTE, PDE caches
S_NTLB = 13  # + size index
S_EPSC = 16  # + (5 - level)
NSTRUCT = 20

# flags kept in the low 12 bits of a TLB entry's data word (the HPA of the page is above them)
TF_US = 1 << 0  # user-mode address (U/S = 1 in every guest entry)
TF_RW = 1 << 1  # writable (R/W = 1 in every guest entry)
TF_XD = 1 << 2  # execute-disable (XD = 1 in some guest entry, with NXE)
TF_ER = 1 << 3  # EPT rights: read, write, execute, user-execute (AND over EPT entries)
TF_EW = 1 << 4
TF_EX = 1 << 5
TF_EXU = 1 << 6
TF_DIRTY = 1 << 7  # a write needs no walk: guest D set (and EPT D set, with EPT A/D)
TF_GLOBAL = 1 << 8
# a TLB entry's aux word: guest-physical page base | protection key (low 4 bits)
EPT_RIGHTS_SHIFT = 3  # TF_ER..TF_EXU are EPT bits 0,1,2 and 10 moved here

# -- data caches: cdesc[level] = (first row, sets, ways, per-vCPU) ---------------------------------
NCACHE = 3

# -- prefetcher: pcfg[PF_*] (configuration) and pf[vcpu, stream, PF_*] (stream table) -------------
PF_KIND = 0  # 0 off, 1 next-line, 2 stride
PF_DEGREE = 1
PF_DISTANCE = 2
PF_STREAMS = 3
PF_L1_NEXT_LINE = 4
NPCFG = 5
PF_KIND_NEXT_LINE = 1
PF_KIND_STRIDE = 2
PF_PAGE = 0  # 4 KiB page number of the stream (-1: empty)
PF_LAST = 1  # line offset of its last L1 miss
PF_STRIDE = 2  # last delta, in lines
NPF = 3  # row ``streams`` holds, at column 1, the position of the most recent stream
# (the stream table is a ring in recency order: cache._train; filled with -1, it is empty)

# -- statistics: stats[vcpu, ST_*] -----------------------------------------------------------
ST_ACCESSES = 0
ST_READS = 1
ST_WRITES = 2
ST_FETCHES = 3
ST_L1D_HITS = 4
ST_L1I_HITS = 5
ST_STLB_HITS = 6
ST_WALKS = 7
ST_REWALKS = 8  # TLB hits that could not be used (rights or a dirty flag to set)
ST_GUEST_REFS = 9  # + level - 1 (5 entries)
ST_EPT_REFS = 14  # + level - 1 (5 entries)
ST_PSC_HITS = 19  # + level - 1 (entries 1..4 used: levels 2..5)
ST_NTLB_HITS = 24
ST_EPSC_HITS = 25
ST_WALK_CACHE = 26  # + 0 L1, 1 L2, 2 LLC, 3 DRAM: where walk references were served
ST_DATA_CACHE = 30  # + same, for data accesses
ST_CYCLES = 34
ST_TRANSLATION_CYCLES = 35  # TLB lookups and walks
ST_DATA_CYCLES = 36
ST_GUEST_FAULTS = 37
ST_EPT_VIOLATIONS = 38
ST_EPT_MISCONFIGS = 39
ST_PML_FULL = 40
ST_PML_LOGGED = 41
ST_PF_ISSUED = 42  # prefetches that filled a line
ST_PF_USEFUL = 43  # demand data accesses that hit a line a prefetch brought
NSTATS = 44

# -- exits: exit_info[X_*] ------------------------------------------------------------------------
X_KIND = 0
X_QUAL = 1  # EPT-violation qualification, or #PF error code
X_GPA = 2
X_GLA = 3
X_VECTOR = 4
X_LEVEL = 5  # misconfiguration: level of the bad entry
X_WHY = 6  # misconfiguration: MISCONFIG_* code
X_INDEX = 7  # index of the access in the chunk
NEXIT = 8

# status of a kernel: a VM exit is its basic exit reason; negative codes are not exits
EXIT_NONE = -1
EXIT_GUEST_FAULT = -2  # a #PF or #GP delivered to the guest
EXIT_EPT_VIOLATION = int(ExitReason.EPT_VIOLATION)
EXIT_EPT_MISCONFIG = int(ExitReason.EPT_MISCONFIG)
EXIT_PML_FULL = int(ExitReason.PML_FULL)
# X_WHY of a misconfiguration: an index of MISCONFIG_REASONS (arch.ept.ept_misconfig_code)

# -- reference log rows: (access index, dim 0 guest / 1 ept, level, address, value, for_level,
# where: the cache level that served it, 0 L1 .. 3 DRAM) ------------------------------------------
NREFCOLS = 7
REF_WHERE = 6
