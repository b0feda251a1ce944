/* eptlab's in-process RTM probe (Intel TSX): transactions over a region, the abort status of
 * every attempt kept. Built at run time by eptlab.kvm.rtm_host (gcc -O2 -mrtm -shared -fPIC)
 * and called through ctypes.
 *
 * A transaction is `per_tx` runs (offset, count, stride): it stores its index at base +
 * offset + k * stride for k < count, for each run. Warm runs are performed first, outside any
 * transaction, as `or $0` (a write that keeps the value). The stream of transactions repeats
 * `rounds` times. Each attempt appends one log entry of two u64:
 *   word 0: kind << 56 | tx << 32 | status    (kind 0 abort, 1 commit, 2 fallback)
 *   word 1: cycles (RDTSC) from before XBEGIN to after XEND or to the abort path
 * An abort is retried up to `max_retries` times, then the transaction runs as a fallback
 * (plain stores, where page faults are delivered and handled).
 *
 * Never call eptlab_rtm_run or eptlab_rtm_trivial where eptlab_rtm_cpuid() is 0: XBEGIN raises
 * #UD (SIGILL) on a processor without RTM (SDM Vol. 2, XBEGIN "Exceptions").
 */
#include <cpuid.h>
#include <immintrin.h>
#include <stdint.h>
#include <x86intrin.h>

#define KIND_ABORT 0ULL
#define KIND_COMMIT 1ULL
#define KIND_FALLBACK 2ULL

/* CPUID.(EAX=07H, ECX=0):EBX bit 11 is RTM, bit 4 HLE (SDM Vol. 2, CPUID, Table 3-8). */
int eptlab_rtm_cpuid(void) {
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, 0) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (int)((b >> 11) & 1) | (int)((b >> 4) & 1) << 1;
}

/* How many of n empty transactions commit. */
int eptlab_rtm_trivial(int n) {
    int commits = 0;
    for (int i = 0; i < n; i++) {
        if (_xbegin() == _XBEGIN_STARTED) {
            _xend();
            commits++;
        }
    }
    return commits;
}

static inline void store_runs(uint8_t *base, const uint64_t *run, int64_t runs, uint64_t value) {
    for (int64_t r = 0; r < runs; r++, run += 3) {
        uint8_t *p = base + run[0];
        for (uint64_t k = 0; k < run[1]; k++, p += run[2]) *(volatile uint64_t *)p = value;
    }
}

/* Returns the number of log entries written, or -1 when the log would overflow. */
int64_t eptlab_rtm_run(uint8_t *base, const uint64_t *warm, int64_t n_warm, const uint64_t *runs,
                       int64_t n_tx, int64_t per_tx, int64_t max_retries, int64_t rounds,
                       uint64_t *log, int64_t log_cap) {
    int64_t n = 0;
    for (int64_t w = 0; w < n_warm; w++) {
        const uint64_t *run = warm + 3 * w;
        uint8_t *p = base + run[0];
        for (uint64_t k = 0; k < run[1]; k++, p += run[2]) *(volatile uint64_t *)p |= 0;
    }
    for (int64_t round = 0; round < rounds; round++) {
        for (int64_t t = 0; t < n_tx; t++) {
            const uint64_t *tx = runs + 3 * per_tx * t;
            for (int64_t attempt = 0;; attempt++) {
                if (n >= log_cap) return -1;
                uint64_t start = __rdtsc();
                unsigned status = _xbegin();
                if (status == _XBEGIN_STARTED) {
                    store_runs(base, tx, per_tx, (uint64_t)t);
                    _xend();
                    uint64_t end = __rdtsc();
                    log[2 * n] = KIND_COMMIT << 56 | (uint64_t)t << 32;
                    log[2 * n + 1] = end - start;
                    n++;
                    break;
                }
                uint64_t end = __rdtsc();
                log[2 * n] = KIND_ABORT << 56 | (uint64_t)t << 32 | status;
                log[2 * n + 1] = end - start;
                n++;
                if (attempt >= max_retries) {
                    if (n >= log_cap) return -1;
                    store_runs(base, tx, per_tx, (uint64_t)t);
                    log[2 * n] = KIND_FALLBACK << 56 | (uint64_t)t << 32;
                    log[2 * n + 1] = 0;
                    n++;
                    break;
                }
            }
        }
    }
    return n;
}

/* -- timing probes (eptlab.kvm.drk_host) ------------------------------------------------------
 * Each of `reps` repetitions times, with RDTSC fenced by LFENCE on both sides and RDTSCP at the
 * end, one of:
 *   mode 0  nothing (the timer's own overhead);
 *   mode 1  an empty transaction: XBEGIN; XEND;
 *   mode 2  XBEGIN; XABORT(1) -- the abort path of an explicit abort;
 *   mode 3  XBEGIN; load *addr; XEND   (aborts when the load faults: the DrK probe, read);
 *   mode 4  XBEGIN; store *addr; XEND  (aborts when the store faults: the DrK probe, write);
 *   mode 5  an uncontended spin lock: atomic exchange to acquire, a release store.
 * cycles[i] is the time of repetition i, status[i] the XBEGIN status (~0 for a commit). */
static volatile int64_t eptlab_lock_word;

static inline uint64_t t_begin(void) {
    _mm_lfence();
    uint64_t t = __rdtsc();
    _mm_lfence();
    return t;
}

static inline uint64_t t_end(void) {
    unsigned aux;
    uint64_t t = __rdtscp(&aux);
    _mm_lfence();
    return t;
}

int64_t eptlab_rtm_time(volatile uint8_t *addr, int64_t mode, int64_t reps, int64_t *cycles,
                        int64_t *status) {
    for (int64_t i = 0; i < reps; i++) {
        unsigned s = _XBEGIN_STARTED;
        uint64_t t0 = t_begin();
        if (mode == 1) {
            if ((s = _xbegin()) == _XBEGIN_STARTED) _xend();
        } else if (mode == 2) {
            if ((s = _xbegin()) == _XBEGIN_STARTED) _xabort(1);
        } else if (mode == 3) {
            if ((s = _xbegin()) == _XBEGIN_STARTED) {
                (void)*addr;
                _xend();
            }
        } else if (mode == 4) {
            if ((s = _xbegin()) == _XBEGIN_STARTED) {
                *addr = 1;
                _xend();
            }
        } else if (mode == 5) {
            while (__atomic_exchange_n(&eptlab_lock_word, 1, __ATOMIC_ACQUIRE)) {
            }
            __atomic_store_n(&eptlab_lock_word, 0, __ATOMIC_RELEASE);
        }
        uint64_t t1 = t_end();
        cycles[i] = (int64_t)(t1 - t0);
        status[i] = (int64_t)s;
    }
    return reps;
}
