/* Atomic operations on a word of shared memory, for xenabi/atomic.py (loaded with ctypes).
 *
 * Every function takes the word's address and its width in bytes (1, 2, 4 or 8); the caller has checked
 * that the word is naturally aligned and lies inside a buffer it holds an export of.  The __atomic
 * builtins with __ATOMIC_SEQ_CST compile to the locked instructions Xen's guest_cmpxchg/test_and_set_bit
 * and a guest's sync_* use (lock cmpxchg, lock or, xchg...), so these serialise with them exactly.
 *
 * Built by ci/bootstrap.sh (python -m xenpv.xenabi.native); a plain C file with no Python headers, so one
 * .so serves every interpreter.
 */
#include <stddef.h>
#include <stdint.h>

#define DISPATCH(width, op)                                                                            \
    switch (width) {                                                                                   \
    case 1: op(uint8_t);                                                                               \
    case 2: op(uint16_t);                                                                              \
    case 4: op(uint32_t);                                                                              \
    default: op(uint64_t);                                                                             \
    }

uint64_t xpv_load(uintptr_t addr, int width)
{
#define LOAD(T) return __atomic_load_n((T *)addr, __ATOMIC_SEQ_CST)
    DISPATCH(width, LOAD)
#undef LOAD
}

void xpv_store(uintptr_t addr, int width, uint64_t value)
{
#define STORE(T) __atomic_store_n((T *)addr, (T)value, __ATOMIC_SEQ_CST); return
    DISPATCH(width, STORE)
#undef STORE
}

uint64_t xpv_exchange(uintptr_t addr, int width, uint64_t value)
{
#define XCHG(T) return __atomic_exchange_n((T *)addr, (T)value, __ATOMIC_SEQ_CST)
    DISPATCH(width, XCHG)
#undef XCHG
}

/* Returns the value found in memory: the exchange happened exactly when it equals `expected`. */
uint64_t xpv_cmpxchg(uintptr_t addr, int width, uint64_t expected, uint64_t desired)
{
#define CAS(T)                                                                                         \
    {                                                                                                  \
        T seen = (T)expected;                                                                          \
        __atomic_compare_exchange_n((T *)addr, &seen, (T)desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
        return seen;                                                                                   \
    }
    DISPATCH(width, CAS)
#undef CAS
}

uint64_t xpv_fetch_and(uintptr_t addr, int width, uint64_t mask)
{
#define AND(T) return __atomic_fetch_and((T *)addr, (T)mask, __ATOMIC_SEQ_CST)
    DISPATCH(width, AND)
#undef AND
}

uint64_t xpv_fetch_or(uintptr_t addr, int width, uint64_t bits)
{
#define OR(T) return __atomic_fetch_or((T *)addr, (T)bits, __ATOMIC_SEQ_CST)
    DISPATCH(width, OR)
#undef OR
}

/* test_and_set_bit / test_and_clear_bit: the old value of `bit` (0 or 1). */
int xpv_test_and_set_bit(uintptr_t addr, int width, int bit)
{
    return (int)(xpv_fetch_or(addr, width, (uint64_t)1 << bit) >> bit & 1);
}

int xpv_test_and_clear_bit(uintptr_t addr, int width, int bit)
{
    return (int)(xpv_fetch_and(addr, width, ~((uint64_t)1 << bit)) >> bit & 1);
}

/* Xen's evtchn_2l_set_pending on the shared_info page at `page` (xenabi/evtchn_2l.py states the rule and
 * the offsets; this is it in one call, for the vCPU's doorbell delivery): `pending` and `mask` are the
 * offsets of the bitmaps, `sel` and `upcall` those of the vcpu's evtchn_pending_sel and
 * evtchn_upcall_pending. The caller has checked that `port` is below 64 * 64 and that every word lies in
 * the page. Returns 1 when the vCPU must be interrupted (upcall_pending went from 0 to 1). */
int xpv_evtchn_2l_set_pending(uintptr_t page, unsigned int port, size_t pending, size_t mask, size_t sel,
                              size_t upcall)
{
    uintptr_t word = (uintptr_t)(port / 64) * 8;
    int bit = (int)(port % 64);

    if (xpv_test_and_set_bit(page + pending + word, 8, bit))
        return 0;
    if (xpv_load(page + mask + word, 8) >> bit & 1)
        return 0;
    if (xpv_test_and_set_bit(page + sel, 8, (int)(port / 64)))
        return 0;
    return !xpv_test_and_set_bit(page + upcall, 1, 0);
}
