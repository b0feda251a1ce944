"""One access through the fast engine: TLBs, then a two-dimensional walk that uses the
paging-structure caches and the nested TLB, then the data access through the cache model.

With every cache disabled this is the reference walker (:mod:`eptlab.mmu.walker`) step for step:
same references in the same order, same A/D and PML writes, same faults and exits. Read the two
side by side; the modelling choices listed in the walker's docstring hold here too. What caching
adds (SDM Vol. 3A §4.10, Vol. 3C §29.4):

* TLB entries hold *combined* GVA->HPA translations of size min(guest page, EPT page) with the
  rights of both dimensions; a hit whose rights do not allow the access, or a write through an
  entry whose dirty flags are not both set, is dropped and the access walks (which then sets
  the flags or reports the exact fault).
* Guest paging-structure caches map the upper bits of a linear address to the host-physical
  address of the next guest table (combined), with the rights above it, so a hit skips both the
  guest entries and their EPT walks. The nested TLB and EPT paging-structure caches do the same
  for guest-physical addresses.
* Cached entries are used until invalidated (INVLPG, INVVPID, INVEPT, MOV to CR3): a remap
  without invalidation is not seen, exactly as on hardware.
"""

from __future__ import annotations

import numpy as np

from ...arch.access import Access
from ...arch.ept import EPT_A, EPT_D, EPT_R, EPT_W, EPT_X, EPT_XU, ept_misconfig_code
from ...arch.exits import EptQual
from ...arch.paging import PKEY_SHIFT as _PKEY_SHIFT
from ...arch.paging import RFLAGS_AC as _RFLAGS_AC
from ...arch.paging import Cr0, Cr4, Efer, PageFaultError, Pte
from ..context import PML_ENTRIES as _PML_ENTRIES
from . import inline_kernel, kernel
from .assoc import AUX, DATA, drop, entry_word, insert, lookup
from .cache import access_line
from .layout import (
    COST_CACHE,
    COST_L1_TLB,
    COST_PSC,
    COST_STLB,
    COST_WALK_START,
    EXIT_EPT_MISCONFIG,
    EXIT_EPT_VIOLATION,
    EXIT_GUEST_FAULT,
    EXIT_NONE,
    EXIT_PML_FULL,
    FEAT_ADV_INFO,
    FEAT_EXEC_ONLY,
    FEAT_MAXPHY,
    REG_CR0,
    REG_CR3,
    REG_CR4,
    REG_CTX,
    REG_ECTX,
    REG_EFER,
    REG_EPT_AD,
    REG_EPT_LEVELS,
    REG_EPT_ROOT,
    REG_MBEC,
    REG_OCCUPIED,
    REG_PKRU,
    REG_PML_ADDR,
    REG_PML_INDEX,
    REG_PML_ON,
    REG_RFLAGS,
    REG_USE_EPT,
    S_EPSC,
    S_L1D,
    S_L1I,
    S_NTLB,
    S_PSC,
    S_STLB,
    ST_EPSC_HITS,
    ST_EPT_MISCONFIGS,
    ST_EPT_REFS,
    ST_EPT_VIOLATIONS,
    ST_GUEST_FAULTS,
    ST_GUEST_REFS,
    ST_L1D_HITS,
    ST_L1I_HITS,
    ST_NTLB_HITS,
    ST_PML_FULL,
    ST_PML_LOGGED,
    ST_PSC_HITS,
    ST_REWALKS,
    ST_STLB_HITS,
    ST_WALK_CACHE,
    ST_WALKS,
    TF_DIRTY,
    TF_GLOBAL,
    TF_RW,
    TF_US,
    TF_XD,
    X_GLA,
    X_GPA,
    X_KIND,
    X_LEVEL,
    X_QUAL,
    X_VECTOR,
    X_WHY,
)
from .physmem import read_word, write_word

READ, WRITE, FETCH = int(Access.READ), int(Access.WRITE), int(Access.FETCH)
DIM_GUEST, DIM_EPT = 0, 1

# guest entry bits (SDM Vol. 3A Tables 4-15..4-20)
P, RW, US, A, D, PS, G = (int(f) for f in (Pte.P, Pte.RW, Pte.US, Pte.A, Pte.D, Pte.PS, Pte.G))
# EPT entry bits (SDM Vol. 3C Tables 29-1..29-7)
ER, EW, EX, EA, ED, EXU = EPT_R, EPT_W, EPT_X, EPT_A, EPT_D, EPT_XU
ALL_EPT_RIGHTS = ER | EW | EX | EXU
# EPT-violation exit qualification (SDM Vol. 3C Table 28-7)
Q_READ, Q_WRITE, Q_FETCH = int(EptQual.READ), int(EptQual.WRITE), int(EptQual.FETCH)
Q_READABLE, Q_WRITABLE = int(EptQual.READABLE), int(EptQual.WRITABLE)
Q_EXECUTABLE, Q_USER_EXEC = int(EptQual.EXECUTABLE), int(EptQual.USER_EXECUTABLE)
Q_GLA_VALID, Q_GLA_TRANSLATION = int(EptQual.GLA_VALID), int(EptQual.GLA_TRANSLATION)
Q_USER_LINEAR, Q_WRITABLE_LINEAR = int(EptQual.USER_LINEAR), int(EptQual.WRITABLE_LINEAR)
Q_XD_LINEAR = int(EptQual.XD_LINEAR)
# #PF error code (SDM Vol. 3A §4.7)
PF_P, PF_WR, PF_US = int(PageFaultError.P), int(PageFaultError.WR), int(PageFaultError.US)
PF_RSVD, PF_ID, PF_PK = int(PageFaultError.RSVD), int(PageFaultError.ID), int(PageFaultError.PK)
# control bits (SDM Vol. 3A §2.5, §2.2.1)
CR0_WP = int(Cr0.WP)
CR4_LA57, CR4_SMEP, CR4_SMAP, CR4_PKE = int(Cr4.LA57), int(Cr4.SMEP), int(Cr4.SMAP), int(Cr4.PKE)
EFER_NXE = int(Efer.NXE)
RFLAGS_AC = int(_RFLAGS_AC)
PKEY_SHIFT = _PKEY_SHIFT
VA_MASK = (1 << 57) - 1
PML_ENTRIES = _PML_ENTRIES
# rows of the scratch array run_chunk lends to each walk (5 columns: one per level)
PATH_ENTRY = 0
PATH_VALUE = 1
PATH_RIGHTS = 2
STEP_LEVEL = 3
STEP_GPA = 4
STEP_HPA = 5
STEP_VALUE = 6
STEP_RIGHTS = 7
NSCRATCH = 8


@inline_kernel
def bit_range(hi, lo):  # type: ignore[no-untyped-def]
    if hi < lo:
        return np.int64(0)
    return ((np.int64(1) << (hi - lo + 1)) - 1) << lo


@inline_kernel
def pack_rights(raw):  # type: ignore[no-untyped-def]
    """EPT bits 0, 1, 2, 10 -> 4 contiguous bits."""
    return (raw & 7) | ((raw >> 7) & 8)


@inline_kernel
def unpack_rights(packed):  # type: ignore[no-untyped-def]
    return (packed & 7) | ((packed & 8) << 7)


@inline_kernel
def rights_qualification(rights, mbec):  # type: ignore[no-untyped-def]
    """Qualification bits 3-6 from the AND of the EPT entries walked."""
    q = 0
    if rights & ER:
        q |= Q_READABLE
    if rights & EW:
        q |= Q_WRITABLE
    if rights & EX:
        q |= Q_EXECUTABLE
    if mbec and rights & EXU:
        q |= Q_USER_EXEC
    return q


@inline_kernel
def ept_present(value, mbec):  # type: ignore[no-untyped-def]
    return (value & 7) != 0 or (mbec and (value & EXU) != 0)


@inline_kernel
def ept_leaf(value, level):  # type: ignore[no-untyped-def]
    return level == 1 or ((level == 2 or level == 3) and (value & PS) != 0)


# the EPT-misconfiguration rule (SDM Vol. 3C §29.3.3.1): the one copy, in eptlab.arch.ept
ept_misconfig = inline_kernel(ept_misconfig_code)


@inline_kernel
def guest_reserved(value, level, maxphy, nxe):  # type: ignore[no-untyped-def]
    """Reserved bits of a present guest entry (SDM Vol. 3A §4.5)."""
    reserved = bit_range(51, maxphy)
    if not nxe:
        reserved |= np.int64(-0x8000000000000000)  # bit 63
    if level >= 4:
        reserved |= PS
    elif level == 3 and (value & PS):
        reserved |= bit_range(29, 13)
    elif level == 2 and (value & PS):
        reserved |= bit_range(20, 13)
    return value & reserved


@inline_kernel
def guest_allows(access, user, us, rw, xd, cr0, cr4, rflags):  # type: ignore[no-untyped-def]
    """Access rights from paging (SDM Vol. 3A §4.6.1)."""
    if access == FETCH:
        if xd:
            return False
        if user:
            return us
        return not (us and (cr4 & CR4_SMEP))
    if user:
        return us and (access == READ or rw)
    if us and (cr4 & CR4_SMAP) and not (rflags & RFLAGS_AC):
        return False
    return access == READ or rw or not (cr0 & CR0_WP)


@inline_kernel
def pkey_allows(access, user, us, pkey, cr0, cr4, pkru):  # type: ignore[no-untyped-def]
    """Protection keys (SDM Vol. 3A §4.6.2)."""
    if not (cr4 & CR4_PKE) or access == FETCH or not us:
        return True
    if (pkru >> (2 * pkey)) & 1:
        return False
    write_disabled = (pkru >> (2 * pkey + 1)) & 1
    return not (access == WRITE and write_disabled and (user or (cr0 & CR0_WP)))


@inline_kernel
def page_fault_code(error, access, user, cr4, efer):  # type: ignore[no-untyped-def]
    if access == WRITE:
        error |= PF_WR
    if user:
        error |= PF_US
    if access == FETCH and ((efer & EFER_NXE) or (cr4 & CR4_SMEP)):
        error |= PF_ID
    return error


@inline_kernel
def reference(at, dim, level, address, value, for_level, caches, machine, log):  # type: ignore[no-untyped-def]
    """Account one paging-structure read of the access ``at = (index, vcpu, va, kind)``: log it,
    count it, send it through the caches; returns its cycles."""
    i, vcpu = at[0], at[1]
    where = access_line(caches.cache, caches.cdesc, vcpu, address, caches.heads)
    n = log.ref_count[0]
    if n < log.refs.shape[0]:
        log.refs[n, 0] = i
        log.refs[n, 1] = dim
        log.refs[n, 2] = level
        log.refs[n, 3] = address
        log.refs[n, 4] = value
        log.refs[n, 5] = for_level
        log.refs[n, 6] = where  # read by the confidential-VM pass (kernels/protect.py)
    log.ref_count[0] = n + 1
    log.stats[vcpu, (ST_GUEST_REFS if dim == DIM_GUEST else ST_EPT_REFS) + level - 1] += 1
    log.stats[vcpu, ST_WALK_CACHE + where] += 1
    return machine.cost[COST_CACHE + where]


@inline_kernel
def ept_violation(qual, gpa, va, vcpu, log):  # type: ignore[no-untyped-def]
    """Record an EPT violation (SDM Vol. 3C §29.3.3.2); returns its status."""
    log.exit_info[X_KIND] = EXIT_EPT_VIOLATION
    log.exit_info[X_QUAL] = qual
    log.exit_info[X_GPA] = gpa
    log.exit_info[X_GLA] = va
    log.stats[vcpu, ST_EPT_VIOLATIONS] += 1
    return EXIT_EPT_VIOLATION


@inline_kernel
def ept_failed(status):  # type: ignore[no-untyped-def]
    """The result of an EPT translation that ends in ``status`` (an exit)."""
    zero = np.int64(0)
    return status, zero, zero, zero, False, zero


@inline_kernel
def ept_translate(gpa, for_level, linear, at, mem, caches, machine, log):  # type: ignore[no-untyped-def]
    """Translate one guest-physical address (SDM Vol. 3C §29.3.2) for the access ``at = (index,
    vcpu, va, kind)``: for the guest entry of level ``for_level``, or for the data access when
    ``for_level`` is 0 (``linear``: its qualification bits 9-11). Returns (status, hpa, EPT
    rights, leaf level, dirty-after, cycles); status is EXIT_NONE on success."""
    i, vcpu, va, access = at
    regs, feat, cost = machine.regs, machine.feat, machine.cost
    tlb, desc = caches.tlb, caches.desc
    stats, exit_info, scratch = log.stats, log.exit_info, log.scratch
    paging_entry = for_level != 0
    cycles = np.int64(0)
    if regs[vcpu, REG_USE_EPT] == 0:
        # no EPT: no second-dimension page size limits the TLB entry
        return EXIT_NONE, gpa, np.int64(ALL_EPT_RIGHTS), np.int64(3), True, cycles
    maxphy = feat[FEAT_MAXPHY]
    table_mask = bit_range(maxphy - 1, 12)
    ad = regs[vcpu, REG_EPT_AD] != 0
    mbec = regs[vcpu, REG_MBEC] != 0
    ectx = regs[vcpu, REG_ECTX]

    if paging_entry:
        qual = Q_READ | (Q_WRITE if ad else 0)
    elif access == READ:
        qual = Q_READ
    elif access == WRITE:
        qual = Q_WRITE
    else:
        qual = Q_FETCH
    qual |= Q_GLA_VALID
    if not paging_entry:
        qual |= Q_GLA_TRANSLATION
        if feat[FEAT_ADV_INFO]:
            qual |= linear
    write_like = (qual & Q_WRITE) != 0
    needed = 0
    if qual & Q_READ:
        needed |= ER
    if write_like:
        needed |= EW
    if qual & Q_FETCH:
        needed |= EXU if (mbec and (linear & Q_USER_LINEAR)) else EX

    levels = regs[vcpu, REG_EPT_LEVELS]
    if gpa >> (12 + 9 * levels):
        # SDM Vol. 3C §29.3.2: GPA bits above the EPT walk's reach make an EPT violation; no
        # entry is read and qualification bits 5:3 are clear
        return ept_failed(ept_violation(qual, gpa, va, vcpu, log))

    # nested TLB: GPA -> HPA, per page size
    occupied = regs[vcpu, REG_OCCUPIED]
    for s in range(3):
        if (occupied >> (S_NTLB + s)) & 1 == 0:
            continue
        shift = 12 + 9 * s
        hit = lookup(tlb, desc, S_NTLB + s, vcpu, gpa >> shift, ectx)
        if hit >= 0:
            word = entry_word(tlb, DATA, hit)
            rights = unpack_rights((word >> 3) & 15)
            dirty = (word & TF_DIRTY) != 0
            if (rights & needed) == needed and not (write_like and ad and not dirty):
                stats[vcpu, ST_NTLB_HITS] += 1
                hpa = (word & ~np.int64(4095)) | (gpa & ((np.int64(1) << shift) - 1))
                return EXIT_NONE, hpa, rights, np.int64(s + 1), dirty, cycles
            drop(tlb, hit)
            break

    # EPT paging-structure caches: start the walk as low as a cached entry allows
    table = regs[vcpu, REG_EPT_ROOT]
    rights = np.int64(ALL_EPT_RIGHTS)
    level = levels
    for cached in range(2, levels + 1):
        if desc[S_EPSC + 5 - cached, 1] == 0:
            continue
        cycles += cost[COST_PSC]
        hit = lookup(tlb, desc, S_EPSC + 5 - cached, vcpu, gpa >> (12 + 9 * (cached - 1)), ectx)
        if hit >= 0:
            stats[vcpu, ST_EPSC_HITS] += 1
            table = entry_word(tlb, DATA, hit)
            rights = entry_word(tlb, AUX, hit)
            level = cached - 1
            break

    n = 0
    while True:
        entry = table + ((gpa >> (12 + 9 * (level - 1))) & 511) * 8
        value = read_word(mem, entry)
        cycles += reference(at, DIM_EPT, level, entry, value, for_level, caches, machine, log)
        rights &= value
        if not ept_present(value, mbec):
            return ept_failed(
                ept_violation(qual | rights_qualification(rights, mbec), gpa, va, vcpu, log)
            )
        why = ept_misconfig(value, level, maxphy, feat[FEAT_EXEC_ONLY] != 0, mbec)
        if why != 0:
            exit_info[X_KIND] = EXIT_EPT_MISCONFIG
            exit_info[X_GPA] = gpa
            exit_info[X_LEVEL] = level
            exit_info[X_WHY] = why
            stats[vcpu, ST_EPT_MISCONFIGS] += 1
            return ept_failed(EXIT_EPT_MISCONFIG)
        scratch[PATH_ENTRY, n] = entry
        scratch[PATH_VALUE, n] = value
        scratch[PATH_RIGHTS, n] = rights
        n += 1
        if ept_leaf(value, level):
            break
        table = value & table_mask
        level -= 1

    if (rights & needed) != needed:
        return ept_failed(
            ept_violation(qual | rights_qualification(rights, mbec), gpa, va, vcpu, log)
        )

    leaf_value = scratch[PATH_VALUE, n - 1]
    if ad:  # SDM Vol. 3C §29.3.5 (A/D) and §29.3.6 (PML)
        if regs[vcpu, REG_PML_ON] and regs[vcpu, REG_PML_INDEX] >= PML_ENTRIES:
            # the log is full: any A or D flag to set is a log-full exit (none is set)
            needs_update = write_like and not (leaf_value & ED)
            for k in range(n):
                if not (scratch[PATH_VALUE, k] & EA):
                    needs_update = True
            if needs_update:
                exit_info[X_KIND] = EXIT_PML_FULL
                stats[vcpu, ST_PML_FULL] += 1
                return ept_failed(EXIT_PML_FULL)
        if write_like and not (leaf_value & ED) and regs[vcpu, REG_PML_ON]:
            index = regs[vcpu, REG_PML_INDEX]
            write_word(mem, regs[vcpu, REG_PML_ADDR] + index * 8, gpa & ~np.int64(4095))
            regs[vcpu, REG_PML_INDEX] = (index - 1) & 0xFFFF
            stats[vcpu, ST_PML_LOGGED] += 1
        for k in range(n):
            new = scratch[PATH_VALUE, k] | EA
            if k == n - 1 and write_like:
                new |= ED
            if new != scratch[PATH_VALUE, k]:
                write_word(mem, scratch[PATH_ENTRY, k], new)
                scratch[PATH_VALUE, k] = new
    dirty_after = (not ad) or ((scratch[PATH_VALUE, n - 1] & ED) != 0)

    shift = 12 + 9 * (level - 1)
    base = scratch[PATH_VALUE, n - 1] & bit_range(maxphy - 1, shift)
    # fill the EPT paging-structure caches (entries walked that reference tables) and nested TLB
    for k in range(n - 1):
        entry_level = level + (n - 1 - k)
        insert(
            tlb,
            desc,
            S_EPSC + 5 - entry_level,
            vcpu,
            gpa >> (12 + 9 * (entry_level - 1)),
            ectx,
            scratch[PATH_VALUE, k] & table_mask,
            scratch[PATH_RIGHTS, k],
        )
    insert(
        tlb,
        desc,
        S_NTLB + level - 1,
        vcpu,
        gpa >> shift,
        ectx,
        base | (pack_rights(rights) << 3) | (TF_DIRTY if dirty_after else 0),
        0,
    )
    regs[vcpu, REG_OCCUPIED] |= 1 << (S_NTLB + level - 1)
    hpa = base | (gpa & ((np.int64(1) << shift) - 1))
    return EXIT_NONE, hpa, rights, np.int64(level), dirty_after, cycles


@inline_kernel
def guest_fault(vector, error, va, vcpu, log):  # type: ignore[no-untyped-def]
    """Record a fault delivered to the guest (#PF, #GP); returns its status."""
    log.exit_info[X_KIND] = EXIT_GUEST_FAULT
    log.exit_info[X_VECTOR] = vector
    log.exit_info[X_QUAL] = error
    log.exit_info[X_GLA] = va
    log.stats[vcpu, ST_GUEST_FAULTS] += 1
    return EXIT_GUEST_FAULT


@inline_kernel
def tlb_probe(first_struct, va, vcpu, ctx, regs, tlb, desc):  # type: ignore[no-untyped-def]
    """Probe the three page-size structures from ``first_struct``; (flat index, size) or -1.
    Structures that never received an entry for this vCPU are skipped."""
    key = va & VA_MASK
    occupied = regs[vcpu, REG_OCCUPIED]
    for s in range(3):
        if (occupied >> (first_struct + s)) & 1 == 0:
            continue
        hit = lookup(tlb, desc, first_struct + s, vcpu, key >> (12 + 9 * s), ctx)
        if hit >= 0:
            return hit, s
    return -1, 0


@inline_kernel
def tlb_translate(va, access, user, vcpu, caches, machine, log):  # type: ignore[no-untyped-def]
    """The TLBs (SDM Vol. 3A §4.10.2): (True, HPA, cycles) when a cached translation may be used
    for this access, else (False, 0, cycles of the lookups). An entry that does not allow the
    access (or a write whose dirty flags are not set) is dropped."""
    regs, tlb, desc, stats = machine.regs, caches.tlb, caches.desc, log.stats
    cr0 = regs[vcpu, REG_CR0]
    cr4 = regs[vcpu, REG_CR4]
    pkru = regs[vcpu, REG_PKRU]
    rflags = regs[vcpu, REG_RFLAGS]
    ctx = regs[vcpu, REG_CTX]
    mbec = regs[vcpu, REG_MBEC] != 0
    key = va & VA_MASK
    l1 = S_L1I if access == FETCH else S_L1D
    cycles = machine.cost[COST_L1_TLB]
    hit, s = tlb_probe(l1, va, vcpu, ctx, regs, tlb, desc)
    from_stlb = False
    if hit < 0:
        cycles += machine.cost[COST_STLB]
        hit, s = tlb_probe(S_STLB, va, vcpu, ctx, regs, tlb, desc)
        from_stlb = hit >= 0
    if hit < 0:
        return False, np.int64(0), cycles
    word = entry_word(tlb, DATA, hit)
    extra = entry_word(tlb, AUX, hit)
    us = (word & TF_US) != 0
    rights = unpack_rights((word >> 3) & 15)
    if access == READ:
        needed = ER
    elif access == WRITE:
        needed = EW
    else:
        needed = EXU if (mbec and us) else EX
    usable = (
        guest_allows(access, user, us, (word & TF_RW) != 0, (word & TF_XD) != 0, cr0, cr4, rflags)
        and pkey_allows(access, user, us, extra & 15, cr0, cr4, pkru)
        and (rights & needed) == needed
        and not (access == WRITE and not (word & TF_DIRTY))
    )
    if not usable:
        drop(tlb, hit)  # not usable as cached: walk (sets flags or finds the exact fault)
        stats[vcpu, ST_REWALKS] += 1
        return False, np.int64(0), cycles
    shift = 12 + 9 * s
    if from_stlb:
        stats[vcpu, ST_STLB_HITS] += 1
        insert(tlb, desc, l1 + s, vcpu, key >> shift, ctx, word, extra)
        regs[vcpu, REG_OCCUPIED] |= 1 << (l1 + s)
    else:
        stats[vcpu, ST_L1I_HITS if access == FETCH else ST_L1D_HITS] += 1
    return True, (word & ~np.int64(4095)) | (va & ((np.int64(1) << shift) - 1)), cycles


@kernel
def walk_translate(va, access, user, i, vcpu, cycles, mem, caches, machine, log):  # type: ignore[no-untyped-def]
    """The two-dimensional walk after a TLB miss (``cycles``: those of the TLB lookups).
    Returns (status, HPA, cycles of the lookups and the walk); status is EXIT_NONE on success,
    else exit_info describes the exit or fault. Fills the paging-structure caches and TLBs."""
    regs, feat, cost = machine.regs, machine.feat, machine.cost
    tlb, desc = caches.tlb, caches.desc
    stats, scratch = log.stats, log.scratch
    zero = np.int64(0)
    cr0 = regs[vcpu, REG_CR0]
    cr4 = regs[vcpu, REG_CR4]
    efer = regs[vcpu, REG_EFER]
    pkru = regs[vcpu, REG_PKRU]
    rflags = regs[vcpu, REG_RFLAGS]
    ctx = regs[vcpu, REG_CTX]
    use_ept = regs[vcpu, REG_USE_EPT] != 0
    mbec = regs[vcpu, REG_MBEC] != 0
    ad = use_ept and regs[vcpu, REG_EPT_AD] != 0
    maxphy = feat[FEAT_MAXPHY]
    table_mask = bit_range(maxphy - 1, 12)
    nxe = (efer & EFER_NXE) != 0
    key = va & VA_MASK
    at = (i, vcpu, va, access)

    l1 = S_L1I if access == FETCH else S_L1D
    # -- the two-dimensional walk (SDM Vol. 3A §4.5 with Vol. 3C §29.3.2) ------------------------
    stats[vcpu, ST_WALKS] += 1
    cycles += cost[COST_WALK_START]
    width_bits = 57 if (cr4 & CR4_LA57) else 48
    top = va >> (width_bits - 1)
    if top != 0 and top != -1:
        return guest_fault(13, 0, va, vcpu, log), zero, cycles  # non-canonical: #GP(0)
    levels = 5 if (cr4 & CR4_LA57) else 4

    # paging-structure caches: the lowest hit gives the next table and the rights above it
    table_gpa = regs[vcpu, REG_CR3] & table_mask
    table_hpa = np.int64(-1)
    table_rights = np.int64(0)
    above_us, above_rw, above_xd = True, True, False
    level = levels
    for cached in range(2, levels + 1):
        psc = S_PSC + 5 - cached
        if desc[psc, 1] == 0:
            continue
        cycles += cost[COST_PSC]
        hit = lookup(tlb, desc, psc, vcpu, key >> (12 + 9 * (cached - 1)), ctx)
        if hit >= 0:
            stats[vcpu, ST_PSC_HITS + cached - 1] += 1
            word = entry_word(tlb, DATA, hit)
            table_hpa = word & table_mask
            table_gpa = entry_word(tlb, AUX, hit)
            table_rights = unpack_rights((word >> 3) & 15)
            above_us = (word & TF_US) != 0
            above_rw = (word & TF_RW) != 0
            above_xd = (word & TF_XD) != 0
            level = cached - 1
            break

    acc_us, acc_rw, acc_xd = above_us, above_rw, above_xd
    n = 0
    while True:
        entry_gpa = table_gpa + ((va >> (12 + 9 * (level - 1))) & 511) * 8
        if table_hpa >= 0 and not (ad and not (table_rights & EW)):
            entry_hpa = table_hpa + (entry_gpa & 4095)
            page_rights = table_rights
        else:
            status, entry_hpa, page_rights, _, _, spent = ept_translate(
                entry_gpa, level, 0, at, mem, caches, machine, log
            )
            if status != EXIT_NONE:
                return status, zero, cycles
            cycles += spent
        value = read_word(mem, entry_hpa)
        cycles += reference(at, DIM_GUEST, level, entry_hpa, value, level, caches, machine, log)
        if not (value & P):
            error = page_fault_code(0, access, user, cr4, efer)
            return guest_fault(14, error, va, vcpu, log), zero, cycles
        if guest_reserved(value, level, maxphy, nxe):
            error = page_fault_code(PF_P | PF_RSVD, access, user, cr4, efer)
            return guest_fault(14, error, va, vcpu, log), zero, cycles
        scratch[STEP_LEVEL, n] = level
        scratch[STEP_GPA, n] = entry_gpa
        scratch[STEP_HPA, n] = entry_hpa
        scratch[STEP_VALUE, n] = value
        scratch[STEP_RIGHTS, n] = page_rights
        n += 1
        acc_us = acc_us and (value & US) != 0
        acc_rw = acc_rw and (value & RW) != 0
        acc_xd = acc_xd or (nxe and value < 0)  # XD is bit 63
        if level == 1 or ((level == 2 or level == 3) and (value & PS)):
            break
        table_gpa = value & table_mask
        table_hpa = -1
        level -= 1

    leaf = scratch[STEP_VALUE, n - 1]
    pkey = (leaf >> PKEY_SHIFT) & 15
    allowed = guest_allows(access, user, acc_us, acc_rw, acc_xd, cr0, cr4, rflags)
    pk_ok = pkey_allows(access, user, acc_us, pkey, cr0, cr4, pkru)
    if not (allowed and pk_ok):
        error = page_fault_code(PF_P | (0 if pk_ok else PF_PK), access, user, cr4, efer)
        return guest_fault(14, error, va, vcpu, log), zero, cycles

    # guest A/D flags (SDM Vol. 3A §4.8): processor writes, EPT writes without EPT A/D
    for k in range(n):
        new = scratch[STEP_VALUE, k] | A
        if k == n - 1 and access == WRITE:
            new |= D
        if new == scratch[STEP_VALUE, k]:
            continue
        if use_ept and not ad and not (scratch[STEP_RIGHTS, k] & EW):
            qual = Q_READ | Q_WRITE | Q_GLA_VALID
            qual |= rights_qualification(scratch[STEP_RIGHTS, k], mbec)
            return ept_violation(qual, scratch[STEP_GPA, k], va, vcpu, log), zero, cycles
        write_word(mem, scratch[STEP_HPA, k], new)
        scratch[STEP_VALUE, k] = new

    guest_level = scratch[STEP_LEVEL, n - 1]
    guest_shift = 12 + 9 * (guest_level - 1)
    gpa = (scratch[STEP_VALUE, n - 1] & bit_range(maxphy - 1, guest_shift)) | (
        va & ((np.int64(1) << guest_shift) - 1)
    )
    linear = (
        (Q_USER_LINEAR if acc_us else 0)
        | (Q_WRITABLE_LINEAR if acc_rw else 0)
        | (Q_XD_LINEAR if acc_xd else 0)
    )
    status, hpa, ept_rights, ept_level, ept_dirty, spent = ept_translate(
        gpa, 0, linear, at, mem, caches, machine, log
    )
    if status != EXIT_NONE:
        return status, zero, cycles
    cycles += spent

    # fill the guest paging-structure caches: each walked entry that references a table
    run_us, run_rw, run_xd = above_us, above_rw, above_xd
    for k in range(n - 1):
        v = scratch[STEP_VALUE, k]
        run_us = run_us and (v & US) != 0
        run_rw = run_rw and (v & RW) != 0
        run_xd = run_xd or (nxe and v < 0)
        entry_level = scratch[STEP_LEVEL, k]
        word = (
            (scratch[STEP_HPA, k + 1] & ~np.int64(4095))
            | (pack_rights(scratch[STEP_RIGHTS, k + 1]) << 3)
            | (TF_US if run_us else 0)
            | (TF_RW if run_rw else 0)
            | (TF_XD if run_xd else 0)
        )
        insert(
            tlb,
            desc,
            S_PSC + 5 - entry_level,
            vcpu,
            key >> (12 + 9 * (entry_level - 1)),
            ctx,
            word,
            scratch[STEP_GPA, k + 1] & ~np.int64(4095),
        )
    # and the TLBs: a combined entry of size min(guest page, EPT page)
    size_level = min(guest_level, ept_level)
    shift = 12 + 9 * (size_level - 1)
    page_mask = ~((np.int64(1) << shift) - 1)
    dirty = (scratch[STEP_VALUE, n - 1] & D) != 0 and ept_dirty
    word = (
        (hpa & page_mask)
        | (pack_rights(ept_rights) << 3)
        | (TF_US if acc_us else 0)
        | (TF_RW if acc_rw else 0)
        | (TF_XD if acc_xd else 0)
        | (TF_DIRTY if dirty else 0)
        | (TF_GLOBAL if (leaf & G) else 0)
    )
    extra = (gpa & page_mask) | pkey
    insert(tlb, desc, l1 + size_level - 1, vcpu, key >> shift, ctx, word, extra)
    insert(tlb, desc, S_STLB + size_level - 1, vcpu, key >> shift, ctx, word, extra)
    regs[vcpu, REG_OCCUPIED] |= (1 << (l1 + size_level - 1)) | (1 << (S_STLB + size_level - 1))
    return EXIT_NONE, hpa, cycles
