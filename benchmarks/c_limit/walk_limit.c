/* The software limit of eptlab's bench streams: a plain C loop running the same accesses
 * through the same two-dimensional walk (the same guest page tables and EPT, read from the
 * engine's own memory arrays, found as the engine finds them: the same direct frame table, else the
 * same hash table) behind the same first-level and second-level 4 KiB TLBs (same
 * sets, ways, set index, exact LRU, a write through a clean entry re-walks), and nothing else.
 *
 * Left out, on purpose, so the loop is a floor for the work and not a model: the data caches
 * and their prefetchers, the paging-structure caches and the nested TLB (every miss walks all
 * 4 x 5 + 4 references), cycle accounting and per-level statistics, the reference log, the
 * access-rights, protection-key, reserved-bit and misconfiguration checks (only presence is
 * tested), EPT A/D and PML (the guest's A/D flags are set as the engine sets them), 2 MiB and
 * 1 GiB pages in the TLBs, instruction fetches and several vCPUs.
 *
 * Built at run time by eptlab.bench_limit with the system C compiler (no binary in git).
 */
#include <stdint.h>
#include <string.h>

#define P_A (1ULL << 5)
#define P_D (1ULL << 6)
#define P_PS (1ULL << 7)

struct mem {
    uint64_t *rows;
    const int64_t *htable; /* (pfn | -1 empty | -2 tombstone, row) pairs */
    uint64_t hmask;
    const int32_t *frames; /* direct frame table: frames[pfn - base], row or -1 */
    int64_t nframes, base;
};

static inline int64_t frame_row(const struct mem *m, int64_t pfn)
{
    int64_t index = pfn - m->base;
    if (index >= 0 && index < m->nframes)
        return m->frames[index];
    uint64_t slot = (((uint64_t)pfn * 0x9E3779B97F4A7C15ULL) >> 32) & m->hmask;
    for (;;) {
        int64_t key = m->htable[2 * slot];
        if (key == pfn)
            return m->htable[2 * slot + 1];
        if (key == -1)
            return -1;
        slot = (slot + 1) & m->hmask;
    }
}

static inline uint64_t *word_at(const struct mem *m, uint64_t address)
{
    int64_t row = frame_row(m, (int64_t)(address >> 12));
    return row < 0 ? 0 : &m->rows[row * 512 + ((address & 4095) >> 3)];
}

static inline uint64_t mask(int hi, int lo) { return ((1ULL << (hi - lo + 1)) - 1) << lo; }

/* EPT walk of one guest-physical address; returns 0 when not present (a violation). */
static inline int ept(const struct mem *m, uint64_t root, int levels, int maxphy, uint64_t gpa,
                      uint64_t *hpa, uint64_t *refs)
{
    uint64_t table = root;
    for (int level = levels; level >= 1; level--) {
        uint64_t *w = word_at(m, table + ((gpa >> (12 + 9 * (level - 1))) & 511) * 8);
        uint64_t v = w ? *w : 0;
        (*refs)++;
        if (!(v & 7))
            return 0;
        if (level == 1 || (level <= 3 && (v & P_PS))) {
            int shift = 12 + 9 * (level - 1);
            *hpa = (v & mask(maxphy - 1, shift)) | (gpa & ((1ULL << shift) - 1));
            return 1;
        }
        table = v & mask(maxphy - 1, 12);
    }
    return 0;
}

struct tlb {
    int64_t *tag, *data; /* sets x ways, way 0 most recent; data: page HPA | 1 if dirty */
    int64_t sets, ways;
};

static inline int64_t *tlb_find(struct tlb *t, int64_t key, int64_t **data)
{
    int64_t base = (key & (t->sets - 1)) * t->ways;
    int64_t *tag = t->tag + base, *dat = t->data + base;
    for (int64_t w = 0; w < t->ways; w++) {
        if (tag[w] == key) { /* move to front: exact LRU */
            int64_t d = dat[w];
            memmove(tag + 1, tag, w * sizeof *tag);
            memmove(dat + 1, dat, w * sizeof *dat);
            tag[0] = key;
            dat[0] = d;
            *data = dat;
            return tag;
        }
    }
    return 0;
}

static inline void tlb_insert(struct tlb *t, int64_t key, int64_t value)
{
    int64_t *data;
    int64_t *tag = tlb_find(t, key, &data);
    if (tag) {
        data[0] = value;
        return;
    }
    int64_t base = (key & (t->sets - 1)) * t->ways;
    memmove(t->tag + base + 1, t->tag + base, (t->ways - 1) * sizeof(int64_t));
    memmove(t->data + base + 1, t->data + base, (t->ways - 1) * sizeof(int64_t));
    t->tag[base] = key;
    t->data[base] = value;
}

/* Run n accesses. p: rows, htable, hmask, frames, nframes, frame base, cr3, EPT root,
 * EPT levels, MAXPHYADDR, L1 sets, L1 ways, L2 sets, L2 ways; tlbs: 2*(L1 + L2 entries)
 * int64 of scratch, filled with -1 by the caller. counts: walks, walk references, sum of HPAs.
 * Returns the index of the first access that faulted, or n. */
int64_t walk_limit_run(const int64_t *p, const int64_t *gva, const int8_t *kind, int64_t n,
                       int64_t *tlbs, uint64_t *counts)
{
    struct mem m = {(uint64_t *)p[0], (const int64_t *)p[1], (uint64_t)p[2],
                    (const int32_t *)p[3], p[4], p[5]};
    uint64_t cr3 = (uint64_t)p[6], root = (uint64_t)p[7];
    int levels = (int)p[8], maxphy = (int)p[9];
    int64_t l1n = p[10] * p[11], l2n = p[12] * p[13];
    struct tlb l1 = {tlbs, tlbs + l1n, p[10], p[11]};
    struct tlb l2 = {tlbs + 2 * l1n, tlbs + 2 * l1n + l2n, p[12], p[13]};
    uint64_t walks = 0, refs = 0, sum = 0;
    for (int64_t i = 0; i < n; i++) {
        uint64_t va = (uint64_t)gva[i];
        int write = kind[i] == 1;
        int64_t key = (int64_t)((va & ((1ULL << 57) - 1)) >> 12);
        int64_t *data = 0;
        uint64_t hpa;
        int64_t *hit = tlb_find(&l1, key, &data);
        int from_l2 = 0;
        if (!hit) {
            hit = tlb_find(&l2, key, &data);
            from_l2 = hit != 0;
        }
        if (hit && write && !(data[0] & 1)) {
            *hit = -1; /* a write through a clean entry: drop it and walk (sets D) */
            hit = 0;
        }
        if (hit) {
            if (from_l2)
                tlb_insert(&l1, key, data[0]);
            hpa = ((uint64_t)data[0] & ~4095ULL) | (va & 4095);
        } else {
            walks++;
            uint64_t *entry[5];
            uint64_t table = cr3 & mask(maxphy - 1, 12), leaf = 0, gpa = 0;
            int used = 0;
            for (int level = 4; level >= 1; level--) {
                uint64_t egpa = table + ((va >> (12 + 9 * (level - 1))) & 511) * 8, ehpa;
                if (!ept(&m, root, levels, maxphy, egpa, &ehpa, &refs))
                    goto fault;
                uint64_t *w = word_at(&m, ehpa);
                uint64_t v = w ? *w : 0;
                refs++;
                if (!(v & 1) || !w)
                    goto fault;
                entry[used++] = w;
                if (level == 1 || (level <= 3 && (v & P_PS))) {
                    int shift = 12 + 9 * (level - 1);
                    gpa = (v & mask(maxphy - 1, shift)) | (va & ((1ULL << shift) - 1));
                    break;
                }
                table = v & mask(maxphy - 1, 12);
            }
            for (int k = 0; k < used; k++) { /* guest A/D flags (SDM Vol. 3A 4.8) */
                uint64_t v = *entry[k] | P_A | ((k == used - 1 && write) ? P_D : 0);
                if (v != *entry[k])
                    *entry[k] = v;
            }
            leaf = *entry[used - 1];
            if (!ept(&m, root, levels, maxphy, gpa, &hpa, &refs))
                goto fault;
            int64_t value = (int64_t)((hpa & ~4095ULL) | ((leaf & P_D) ? 1 : 0));
            tlb_insert(&l1, key, value);
            tlb_insert(&l2, key, value);
        }
        sum += hpa;
        continue;
    fault:
        counts[0] = walks;
        counts[1] = refs;
        counts[2] = sum;
        return i;
    }
    counts[0] = walks;
    counts[1] = refs;
    counts[2] = sum;
    return n;
}
