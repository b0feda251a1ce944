"""The confidential-VM pass: memory-encryption classes, MAC checks and SEV-SNP RMP checks priced
over the reference log of a run, after :func:`run.run_chunk` returned.

Encryption changes no hit or miss, and an RMP check reads its own table (not through the data
caches here), so neither feeds back into the walk: a separate pass over the log is exact for
this model and leaves the hot kernel untouched. Its input is the reference log (each row with
the cache level that served it, :data:`layout.REF_WHERE`) and, per access, the HPA and the level
that served the data. The policy (which class uses which key, what a line costs) is the Python
side's (:mod:`eptlab.mmu.protection`): the pass reads it from ``cfg``.
"""

from __future__ import annotations

from . import inline_kernel, kernel

# reference classes (cfg[CFG_ENC + c], cfg[CFG_MAC + c], out[X_LINES + c])
C_GUEST_PT = 0  # guest page-table reads
C_EPT = 1  # EPT reads that translate private memory (TDX: the secure EPT)
C_DATA = 2  # data lines of private memory
C_SHARED = 3  # data lines of shared memory and the EPT reads that translate them (TDX: shared EPT)
NCLASS = 4

# cfg[CFG_*]
CFG_DECRYPT = 0  # cycles to decrypt one line from DRAM
CFG_MAC = 1  # cycles to check one line's MAC
CFG_KEY_SHIFT = 2  # lowest key-ID bit of a host-physical address (MAXPHYADDR - key-ID bits)
CFG_KEY_MASK = 3  # key-ID mask after the shift (0: no key-ID bits, all memory is private)
CFG_RMP_LOOKUP = 4  # cycles of one RMP-entry read (an RMP-cache miss)
CFG_ENC = 5  # + class: 1 if the class's lines are encrypted
CFG_MACS = 9  # + class: 1 if the class's lines carry a MAC
NCFG = 13

# out[vcpu, X_*]
X_TRANSLATION_CYCLES = 0
X_DATA_CYCLES = 1
X_LINES = 2  # + class: lines DRAM served of that class
X_DECRYPTED = 6  # lines decrypted (DRAM lines of encrypted classes)
X_MACS = 7  # MACs checked
X_RMP_CHECKS = 8
X_RMP_LOOKUPS = 9  # RMP-cache misses: RMP entries read
X_RMP_CYCLES = 10
NX = 11

DRAM = 3
V_NESTED = 1  # vmode[vcpu] bits
V_RMP = 2


@kernel
def rmp_check(page, tags):  # type: ignore[no-untyped-def]
    """Look the RMP entry of host page ``page`` up in the RMP cache ``tags[set, way]`` (way 0 most
    recent, LRU; no sets: no cache) and insert it; returns True on a miss."""
    sets, ways = tags.shape[0], tags.shape[1]
    if sets == 0:
        return True
    row = page & (sets - 1)
    hit = ways - 1
    miss = True
    for w in range(ways):
        if tags[row, w] == page:
            hit, miss = w, False
            break
    for w in range(hit, 0, -1):
        tags[row, w] = tags[row, w - 1]
    tags[row, 0] = page
    return miss


@inline_kernel
def _line(out, v, c, cfg, cycles):  # type: ignore[no-untyped-def]
    """A line of class ``c`` that DRAM served: counted, decrypted and MAC-checked as its class
    says, the cycles charged to ``out[v, cycles]`` (translation or data)."""
    out[v, X_LINES + c] += 1
    if cfg[CFG_ENC + c]:
        out[v, X_DECRYPTED] += 1
        out[v, cycles] += cfg[CFG_DECRYPT]
    if cfg[CFG_MACS + c]:
        out[v, X_MACS] += 1
        out[v, cycles] += cfg[CFG_MAC]


@inline_kernel
def _rmp(out, v, page, cfg, tags):  # type: ignore[no-untyped-def]
    """The RMP check of host page ``page``: an RMP-entry read (translation cycles) on a miss."""
    out[v, X_RMP_CHECKS] += 1
    if rmp_check(page, tags):
        out[v, X_RMP_LOOKUPS] += 1
        out[v, X_RMP_CYCLES] += cfg[CFG_RMP_LOOKUP]
        out[v, X_TRANSLATION_CYCLES] += cfg[CFG_RMP_LOOKUP]


@kernel
def protect_pass(refs, n_refs, stop, hpa, where, vcpu, vmode, cfg, tags, out):  # type: ignore[no-untyped-def]
    """Price accesses ``0..stop-1`` of a chunk: for each, its walk references in the log
    (rows ``0..n_refs-1``, in order), then the RMP check of its data page if it walked
    (SEV-SNP holds the result in the TLB: a TLB hit checks nothing), then its data line.
    Every DRAM line of an encrypted class costs ``cfg[CFG_DECRYPT]``, plus ``cfg[CFG_MAC]`` if
    its class carries a MAC. ``vmode[vcpu]``: V_NESTED if it runs under EPT (only then can
    memory be shared: its EPT leaf carries key ID 0), V_RMP if its walks are RMP-checked: every
    host-physical access of a walk and the data page it ends on, each RMP-cache miss reading an
    RMP entry (``cfg[CFG_RMP_LOOKUP]`` cycles). Counts and cycles accumulate in
    ``out[vcpu, X_*]``."""
    shift, kmask = cfg[CFG_KEY_SHIFT], cfg[CFG_KEY_MASK]
    amask = (1 << shift) - 1  # the address below the key-ID bits
    r = 0
    for i in range(stop):
        v = vcpu[i]
        rmp_on = (vmode[v] & V_RMP) != 0
        shared = (vmode[v] & V_NESTED) != 0 and kmask != 0 and ((hpa[i] >> shift) & kmask) == 0
        walked = False
        while r < n_refs and refs[r, 0] == i:
            walked = True
            c = C_GUEST_PT
            if refs[r, 1] != 0:
                c = C_SHARED if shared and refs[r, 5] == 0 else C_EPT
            if refs[r, 6] == DRAM:
                _line(out, v, c, cfg, X_TRANSLATION_CYCLES)
            if rmp_on:
                _rmp(out, v, (refs[r, 3] & amask) >> 12, cfg, tags)
            r += 1
        if walked and rmp_on:
            _rmp(out, v, (hpa[i] & amask) >> 12, cfg, tags)
        if where[i] == DRAM:
            _line(out, v, C_SHARED if shared else C_DATA, cfg, X_DATA_CYCLES)
    return r
