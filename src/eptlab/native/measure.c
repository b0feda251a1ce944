/* eptlab native measurements: built at run time by eptlab.native.build (cc -O2 -shared -fPIC)
 * and called through ctypes from eptlab.native.measure. Plain C11 + GNU inline asm, x86-64.
 *
 * Time is read with the time-stamp counter (RDTSC / RDTSCP, fenced with LFENCE so the loads of
 * the timed region neither start before the first read nor finish after the second; SDM Vol. 2B
 * "RDTSCP" and Vol. 3B §18.17). The TSC ticks at a constant rate (CPUID flags constant_tsc,
 * nonstop_tsc); its rate is measured against CLOCK_MONOTONIC_RAW (ept_tsc_ghz) and the core
 * clock against the TSC by a chain of dependent one-cycle ADDs (ept_add_chain).
 *
 * Timed functions write TSC ticks per chunk to a caller's array and return 0 (-1 on bad
 * arguments); the Python side converts them. No function allocates except ept_map.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <x86intrin.h>

#define HUGE_2M (2UL << 20)

static inline uint64_t tsc_begin(void) {
    _mm_lfence();
    uint64_t t = __rdtsc();
    _mm_lfence();
    return t;
}

static inline uint64_t tsc_end(void) {
    unsigned aux;
    uint64_t t = __rdtscp(&aux);
    _mm_lfence();
    return t;
}

static inline uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* uniform in [0, n) by multiply-high (Lemire), no division */
static inline uint64_t below(uint64_t r, uint64_t n) {
    return (uint64_t)(((unsigned __int128)r * n) >> 64);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_RAW, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

int ept_version(void) { return 1; }

/* TSC ticks per nanosecond, measured over a window of window_ns against CLOCK_MONOTONIC_RAW. */
double ept_tsc_ghz(uint64_t window_ns) {
    uint64_t n0 = now_ns(), c0 = tsc_begin(), n1, c1;
    do {
        n1 = now_ns();
        c1 = tsc_begin();
    } while (n1 - n0 < window_ns);
    return (double)(c1 - c0) / (double)(n1 - n0);
}

/* chunks x iters x 64 dependent register ADDs (one core cycle each; a register operand, not an
 * immediate, which Golden Cove's renamer can fold away): ticks of each chunk to ticks[]. The
 * ratio 64 * iters / ticks is the core clock over the TSC rate. */
int ept_add_chain(uint64_t iters, uint64_t chunks, uint64_t *ticks) {
    uint64_t x = 0, one = 1;
    __asm__ volatile("" : "+r"(one));
    for (uint64_t c = 0; c < chunks; c++) {
        uint64_t t0 = tsc_begin();
        for (uint64_t i = 0; i < iters; i++) {
            __asm__ volatile(".rept 64\n\taddq %1, %0\n\t.endr" : "+r"(x) : "r"(one));
        }
        ticks[c] = tsc_end() - t0;
    }
    __asm__ volatile("" ::"r"(x));
    return 0;
}

/* chunks x iters CPUID (leaf 0) instructions: ticks of each chunk to ticks[]. In a virtual
 * machine CPUID causes a VM exit unconditionally (SDM Vol. 3C §26.1.2), so on a KVM guest each
 * one is an exit to the hypervisor below, its CPUID handler and the VM entry back. */
int ept_cpuid_run(uint64_t iters, uint64_t chunks, uint64_t *ticks) {
    for (uint64_t c = 0; c < chunks; c++) {
        uint64_t t0 = tsc_begin();
        for (uint64_t i = 0; i < iters; i++) {
            unsigned a = 0, b, cc = 0, d;
            __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(cc), "=d"(d));
        }
        ticks[c] = tsc_end() - t0;
    }
    return 0;
}

/* An anonymous private mapping of `bytes` aligned to 2 MiB, advised to use transparent huge
 * pages (huge != 0: MADV_HUGEPAGE) or not to (MADV_NOHUGEPAGE), and populated by writing one
 * byte per 4 KiB page. NULL (errno set) when the kernel refuses. */
void *ept_map(size_t bytes, int huge) {
    size_t span = bytes + HUGE_2M;
    char *raw = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    if (raw == MAP_FAILED) return NULL;
    uintptr_t start = ((uintptr_t)raw + HUGE_2M - 1) & ~(uintptr_t)(HUGE_2M - 1);
    char *p = (char *)start;
    if (p > raw) munmap(raw, (size_t)(p - raw));
    size_t tail = (size_t)(raw + span - (p + bytes));
    if (tail) munmap(p + bytes, tail);
    if (madvise(p, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) != 0) {
        int saved = errno;
        munmap(p, bytes);
        errno = saved;
        return NULL;
    }
    for (size_t off = 0; off < bytes; off += 4096) p[off] = 1;
    return p;
}

int ept_unmap(void *p, size_t bytes) { return munmap(p, bytes); }

/* A uniformly random cyclic order of `nodes` nodes, node k at byte offset k * stride + ((k *
 * 64) mod stride when stride > 64, else 0): with stride 64 one node per line; with stride 4096
 * one node per page, staggered across the lines of a page so the nodes spread over every L1
 * set. Each node's first word holds the absolute address of the next. A Fisher-Yates shuffle of
 * a compact array of node indices (4 bytes each, on huge pages where the OS gives them: far
 * fewer cache and TLB misses than shuffling the nodes themselves), then one pass linking
 * order[i] -> order[i + 1] (the last back to the first), whose stores are independent and
 * overlap. -1 for bad arguments, -2 when the index array cannot be mapped. */
static inline uint64_t node_offset(uint64_t k, uint64_t stride) {
    return k * stride + (stride > 64 ? (k * 64) % stride : 0);
}

int ept_chase_build(void *base, uint64_t nodes, uint64_t stride, uint64_t seed) {
    if (nodes < 2 || nodes > UINT32_MAX || stride < 64 || stride % 64) return -1;
    size_t bytes = (size_t)nodes * sizeof(uint32_t);
    uint32_t *order = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (order == MAP_FAILED) return -2;
    madvise(order, bytes, MADV_HUGEPAGE);
    for (uint64_t i = 0; i < nodes; i++) order[i] = (uint32_t)i;
    uint64_t s = seed;
    for (uint64_t i = nodes - 1; i > 0; i--) {
        uint64_t j = below(splitmix64(&s), i + 1);
        uint32_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    char *b = (char *)base;
    for (uint64_t i = 0; i < nodes; i++) {
        uint64_t next = order[i + 1 < nodes ? i + 1 : 0];
        *(uint64_t *)(b + node_offset(order[i], stride)) =
            (uint64_t)(uintptr_t)(b + node_offset(next, stride));
    }
    munmap(order, bytes);
    return 0;
}

/* Every run below performs `chunks` chunks of `chunk` accesses and stores the TSC ticks of each
 * chunk in ticks[]: a chunk during which the thread was preempted (the machine is shared) is an
 * outlier the caller's median discards, instead of inflating one long measurement. */

/* Dependent loads along the chain from `base` (chunk a multiple of 16); last pointer to *sink. */
int ept_chase_run(void *base, uint64_t chunk, uint64_t chunks, uint64_t *ticks, uint64_t *sink) {
    if (chunk % 16) return -1;
    void **p = (void **)base;
    for (uint64_t c = 0; c < chunks; c++) {
        uint64_t t0 = tsc_begin();
        for (uint64_t i = 0; i < chunk / 16; i++) {
            p = (void **)*p; p = (void **)*p; p = (void **)*p; p = (void **)*p;
            p = (void **)*p; p = (void **)*p; p = (void **)*p; p = (void **)*p;
            p = (void **)*p; p = (void **)*p; p = (void **)*p; p = (void **)*p;
            p = (void **)*p; p = (void **)*p; p = (void **)*p; p = (void **)*p;
        }
        ticks[c] = tsc_end() - t0;
    }
    *sink = (uint64_t)(uintptr_t)p;
    return 0;
}

/* Independent loads of 8-byte words at uniformly random word offsets of the first `bytes`
 * bytes (counter-based splitmix64 addresses: no load depends on another). */
int ept_random_run(void *base, uint64_t bytes, uint64_t seed, uint64_t chunk, uint64_t chunks,
                   uint64_t *ticks, uint64_t *sink) {
    const uint64_t *w = (const uint64_t *)base;
    uint64_t words = bytes / 8, s = seed, acc = 0;
    for (uint64_t c = 0; c < chunks; c++) {
        uint64_t t0 = tsc_begin();
        for (uint64_t i = 0; i < chunk; i++) acc += w[below(splitmix64(&s), words)];
        ticks[c] = tsc_end() - t0;
    }
    *sink = acc;
    return 0;
}

/* Dependent loads at random word offsets: each address is a hash of a counter and the value
 * the previous load returned, so the loads are serial like a pointer chase's but need no chain
 * (any footprint, no set-up). The hash adds the same few cycles per access on every page size. */
int ept_deprand_run(void *base, uint64_t bytes, uint64_t seed, uint64_t chunk, uint64_t chunks,
                    uint64_t *ticks, uint64_t *sink) {
    const uint64_t *w = (const uint64_t *)base;
    uint64_t words = bytes / 8, s = seed, v = 0;
    for (uint64_t c = 0; c < chunks; c++) {
        uint64_t t0 = tsc_begin();
        for (uint64_t i = 0; i < chunk; i++) {
            s += v; /* v is whatever memory holds: the next address waits for this load */
            v = w[below(splitmix64(&s), words)];
        }
        ticks[c] = tsc_end() - t0;
    }
    *sink = v;
    return 0;
}

/* HPCC RandomAccess (GUPS): read-modify-writes (XOR) of random 8-byte words; `chunk` updates. */
int ept_gups_run(void *base, uint64_t bytes, uint64_t seed, uint64_t chunk, uint64_t chunks,
                 uint64_t *ticks) {
    uint64_t *w = (uint64_t *)base;
    uint64_t words = bytes / 8, s = seed;
    for (uint64_t c = 0; c < chunks; c++) {
        uint64_t t0 = tsc_begin();
        for (uint64_t i = 0; i < chunk; i++) {
            uint64_t r = splitmix64(&s);
            w[below(r, words)] ^= r;
        }
        ticks[c] = tsc_end() - t0;
    }
    return 0;
}

/* Loads of 8-byte words at offsets 0, stride, 2*stride, ... wrapping at `bytes`.
 * Scalar on purpose (one load per access, as a trace counts them): no vectorisation. */
__attribute__((optimize("no-tree-vectorize")))
int ept_seq_run(void *base, uint64_t bytes, uint64_t stride, uint64_t chunk, uint64_t chunks,
                uint64_t *ticks, uint64_t *sink) {
    if (stride == 0 || stride % 8 || stride > bytes) return -1;
    const char *b = (const char *)base;
    uint64_t off = 0, acc = 0;
    for (uint64_t c = 0; c < chunks; c++) {
        uint64_t t0 = tsc_begin();
        for (uint64_t i = 0; i < chunk; i++) {
            acc += *(const volatile uint64_t *)(b + off);
            off += stride;
            if (off >= bytes) off = 0;
        }
        ticks[c] = tsc_end() - t0;
    }
    *sink = acc;
    return 0;
}

/* memcpy()s of `chunk` bytes from src to dst, chunk c at offset (c * chunk) mod bytes: walking
 * through buffers of `bytes` bytes (a multiple of chunk) so that large buffers stream from DRAM. */
int ept_copy_run(void *dst, const void *src, uint64_t bytes, uint64_t chunk, uint64_t chunks,
                 uint64_t *ticks) {
    if (chunk == 0 || bytes % chunk) return -1;
    for (uint64_t c = 0; c < chunks; c++) {
        uint64_t off = (c * chunk) % bytes;
        uint64_t t0 = tsc_begin();
        memcpy((char *)dst + off, (const char *)src + off, chunk);
        __asm__ volatile("" ::"r"(dst) : "memory");
        ticks[c] = tsc_end() - t0;
    }
    return 0;
}
