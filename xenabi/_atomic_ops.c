/* Atomic operations on a word of shared memory, for xenabi/atomic.py (loaded with ctypes).
 *
 * Every function takes the word's address and its width in bytes (1, 2, 4 or 8); the caller has checked
 * that the word is naturally aligned and lies inside a buffer it holds an export of.  The __atomic
 * builtins with __ATOMIC_SEQ_CST compile to the locked instructions Xen's guest_cmpxchg/test_and_set_bit
 * and a guest's sync_* use (lock cmpxchg, lock or, xchg...), so these serialise with them exactly.
 *
 * The rules that change several words in one call follow: the 2-level event channel's set-pending and the
 * grant pins (xenabi/evtchn_2l.py and xenabi/grant_pins.py state them and pass every offset).
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

/* ---- grant pins (xenabi/grant_pins.py states the protocol, the word and every offset) ---------------------
 *
 * xpv_pin and xpv_unpin are PinTable.pin and PinTable.unpin, each in one call: take the entry's word (the
 * active entry lock), check the party's generation and its count limits, set GTF_reading/GTF_writing on the
 * guest's grant entry the way Xen's _set_status_v1 does, check the page, store the party's count and the new
 * totals (which releases the entry).  Nothing about the layout is stated here: xenabi/grant_pins.py fills a
 * struct xpv_pins per table from its ctypes layouts and passes it with every call, with the address of the
 * pin table and that of the grant entry (`entry`, in whichever grant frame holds it); the caller holds both
 * buffers and has checked that `ref` is below the table's entries.
 *
 * A call returns a code in its low 8 bits (enum xpv_pin_code) and a value above them: the frame pinned, or
 * what the caller needs to word its refusal exactly as before.
 */
#include <sched.h>
#include <time.h>

struct xpv_pins {
    uint64_t size; /* sizeof(struct xpv_pins): the caller checks it matches its own layout */
    /* the pin table's header */
    uint64_t party_gen, party_gen_width, ram_pages, ram_pages_width;
    uint64_t overlay_seq, overlay_seq_width, overlay_count, overlay_count_width, overlay, overlay_width, max_overlay;
    uint64_t overlay_attempts;
    /* its entries and the parties' counts */
    uint64_t entries, entry_size, word, word_width, gfn, gfn_width, domid, domid_width;
    uint64_t counts, count_width, max_entries, count_w_shift, count_mask;
    /* the entry word */
    uint64_t holder_mask, op_pin, op_unpin, op_writable, old_r_shift, old_w_shift, total_r_shift, total_w_shift;
    uint64_t total_mask, max_party_pins, xenhv_party;
    uint64_t lock_wait_ns;
    /* the guest's grant entry (offsets from `entry`) and its flags */
    uint64_t combo, combo_width, flags, flags_width, frame, frame_width, domid_shift, flags_mask;
    uint64_t gtf_permit_access, gtf_readonly, gtf_reading, gtf_writing;
    uint64_t cmpxchg_attempts;
};

size_t xpv_pins_size(void)
{
    return sizeof(struct xpv_pins);
}

enum xpv_pin_code {
    XPV_PIN_OK = 0,           /* value: the frame pinned */
    XPV_PIN_BUSY = 1,         /* the entry stayed held past the deadline; value: the holder */
    XPV_PIN_REVOKED = 2,      /* the party's generation changed: its link was detached */
    XPV_PIN_NO_SPACE = 3,     /* the party's count or the totals are at their limit */
    XPV_PIN_NOT_GRANTED = 4,  /* value: the flags and domid word seen (flags | domid << domid_shift) */
    XPV_PIN_READ_ONLY = 5,    /* a write pin on a GTF_readonly entry */
    XPV_PIN_CHANGING = 6,     /* the guest kept changing the entry for cmpxchg_attempts swaps */
    XPV_PIN_IN_USE = 7,       /* pinned by another domain; value: that domain */
    XPV_PIN_NOT_LOCAL = 8,    /* the frame is not guest RAM, or a hypervisor page covers it; value: the frame */
    XPV_PIN_PAGE_CHECK = 9,   /* the caller checks the page: the entry stays held until xpv_pin_finish;
                               * value: the frame | 1 << 32 on the entry's first pin */
    XPV_PIN_NO_PIN = 10,      /* unpin: the owner holds no pin of that kind */
    XPV_PIN_LOST = 11,        /* xpv_pin_finish: the entry is no longer held by the party */
};

/* A call's arguments past the layout, packed in two words (fewer arguments are a cheaper ctypes call):
 * `who` is the ref | the party << 32 | the mapping domain (xpv_pin) or the owner (xpv_unpin) << 40;
 * `how` is the flag bits that must read GTF_permit_access (xpv_pin) in its low 16 bits, the flags below,
 * and the party's generation << 32. */
#define XPV_WHO_PARTY_SHIFT 32
#define XPV_WHO_DOMAIN_SHIFT 40
#define XPV_HOW_MASK 0xFFFFu
#define XPV_HOW_WRITABLE (1u << 16)
#define XPV_HOW_CALLER_CHECKS_PAGE (1u << 17)
#define XPV_HOW_GENERATION_SHIFT 32

/* Points where a test's hook runs (xenabi.grant_pins.native_hook): a process can die at any of them. */
enum xpv_pin_point {
    XPV_AT_HELD = 1,      /* the entry was just taken */
    XPV_AT_STATUS = 2,    /* before each compare-and-swap of the guest's flags and domid */
    XPV_AT_SETTLE = 3,    /* before GTF_reading/GTF_writing are settled (a release, or a pin undone) */
    XPV_AT_COUNTED = 4,   /* the party's count is stored, the entry not yet released */
};

static void (*volatile pin_hook)(int point, unsigned int ref);

void xpv_pins_set_hook(void (*hook)(int point, unsigned int ref))
{
    pin_hook = hook;
}

static inline void at(int point, unsigned int ref)
{
    void (*hook)(int, unsigned int) = pin_hook;

    if (hook)
        hook(point, ref);
}

static inline uint64_t result(enum xpv_pin_code code, uint64_t value)
{
    return (uint64_t)code | value << 8;
}

static uint64_t monotonic_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* One change of one entry by one party, from the lock to the release. */
struct pin_op {
    const struct xpv_pins *p;
    uintptr_t word, count, entry, pinned; /* addresses: the entry word, the party's count, the grant entry,
                                           * the active entry (its gfn and domid) */
    unsigned int ref;
    uint64_t before, counts; /* the word before it was taken, and the counted party's counts then */
};

static void locate(struct pin_op *op, const struct xpv_pins *p, uintptr_t table, uintptr_t entry, unsigned int ref,
                   unsigned int count_party)
{
    op->p = p;
    op->pinned = table + p->entries + (uintptr_t)ref * p->entry_size;
    op->word = op->pinned + p->word;
    op->count = table + p->counts + ((uintptr_t)count_party * p->max_entries + ref) * p->count_width;
    op->entry = entry;
    op->ref = ref;
}

static uint64_t totals_r(const struct xpv_pins *p, uint64_t word)
{
    return word >> p->total_r_shift & p->total_mask;
}

static uint64_t totals_w(const struct xpv_pins *p, uint64_t word)
{
    return word >> p->total_w_shift & p->total_mask;
}

static uint64_t totals(const struct xpv_pins *p, uint64_t readers, uint64_t writers)
{
    return readers << p->total_r_shift | writers << p->total_w_shift;
}

/* PinTable's _lock: take the entry for `holder`, noting in the word what it does and the counted party's
 * counts before the change.  Spins (yielding) while another party holds it, up to the deadline. */
static uint64_t lock_entry(struct pin_op *op, unsigned int holder, uint64_t op_bits)
{
    const struct xpv_pins *p = op->p;
    uint64_t word = xpv_load(op->word, (int)p->word_width), deadline = 0;

    for (;;) {
        if ((word & p->holder_mask) == 0) {
            uint64_t counts = xpv_load(op->count, (int)p->count_width);
            uint64_t locked = word | holder | op_bits | (counts & p->count_mask) << p->old_r_shift |
                              (counts >> p->count_w_shift) << p->old_w_shift;
            uint64_t seen = xpv_cmpxchg(op->word, (int)p->word_width, word, locked);

            if (seen == word) {
                op->before = word;
                op->counts = counts;
                at(XPV_AT_HELD, op->ref);
                return XPV_PIN_OK;
            }
            word = seen;
            continue;
        }
        if (deadline == 0)
            deadline = monotonic_ns() + p->lock_wait_ns;
        else if (monotonic_ns() > deadline)
            return result(XPV_PIN_BUSY, word & p->holder_mask);
        sched_yield();
        word = xpv_load(op->word, (int)p->word_width);
    }
}

/* Store the totals, which releases the entry. */
static void unlock_entry(struct pin_op *op, uint64_t word)
{
    xpv_store(op->word, (int)op->p->word_width, word & ~(((uint64_t)1 << op->p->total_r_shift) - 1));
}

/* Make the guest's GTF_reading/GTF_writing say what the totals say (after a release). */
static void settle_flags(struct pin_op *op, uint64_t readers, uint64_t writers)
{
    const struct xpv_pins *p = op->p;

    at(XPV_AT_SETTLE, op->ref);
    if (readers + writers == 0)
        xpv_fetch_and(op->entry + p->flags, (int)p->flags_width, ~(p->gtf_reading | p->gtf_writing));
    else if (writers == 0)
        xpv_fetch_and(op->entry + p->flags, (int)p->flags_width, ~p->gtf_writing);
}

/* Xen's _set_status_v1: GTF_reading (and GTF_writing unless `readonly`) for `mapper`, checking that the
 * entry grants it when `check_grant` (the first pin) and that a write pin is not on a read-only grant, with
 * a compare-and-swap of flags and domid together. */
static uint64_t set_status(struct pin_op *op, unsigned int mapper, int readonly, uint64_t mask, int check_grant)
{
    const struct xpv_pins *p = op->p;
    int width = (int)p->combo_width;
    uint64_t combo = xpv_load(op->entry + p->combo, width);

    for (uint64_t attempt = 0; attempt < p->cmpxchg_attempts; attempt++) {
        uint64_t flags = combo & p->flags_mask, domid = combo >> p->domid_shift, new_flags = flags | p->gtf_reading;
        uint64_t seen;

        if (check_grant && ((flags & mask) != p->gtf_permit_access || domid != mapper))
            return result(XPV_PIN_NOT_GRANTED, combo);
        if (!readonly) {
            if (flags & p->gtf_readonly)
                return XPV_PIN_READ_ONLY;
            new_flags |= p->gtf_writing;
        }
        at(XPV_AT_STATUS, op->ref);
        seen = xpv_cmpxchg(op->entry + p->combo, width, combo, domid << p->domid_shift | new_flags);
        if (seen == combo)
            return XPV_PIN_OK;
        combo = seen;
    }
    return XPV_PIN_CHANGING;
}

/* The seqlock'ed overlay list of the header: whether a hypervisor page covers `gfn` (1 as well when
 * xenhv kept rewriting it: xenhv decides that one). */
static int overlaid(const struct xpv_pins *p, uintptr_t table, uint64_t gfn)
{
    for (uint64_t attempt = 0; attempt < p->overlay_attempts; attempt++) {
        uint64_t seq = xpv_load(table + p->overlay_seq, (int)p->overlay_seq_width), count;
        int found = 0;

        if (seq & 1) {
            sched_yield();
            continue;
        }
        count = xpv_load(table + p->overlay_count, (int)p->overlay_count_width);
        if (count > p->max_overlay)
            count = p->max_overlay;
        for (uint64_t i = 0; i < count && !found; i++)
            found = xpv_load(table + p->overlay + i * p->overlay_width, (int)p->overlay_width) == gfn;
        if (xpv_load(table + p->overlay_seq, (int)p->overlay_seq_width) == seq)
            return found;
    }
    return 1;
}

/* Undo a pin that was refused after the entry was taken: clear what it set, release the entry unchanged. */
static uint64_t pin_undo(struct pin_op *op, uint64_t set_bits, uint64_t refusal)
{
    if (set_bits)
        settle_flags(op, totals_r(op->p, op->before), totals_w(op->p, op->before));
    unlock_entry(op, op->before);
    return refusal;
}

static uint64_t pin_commit(struct pin_op *op, int writable, unsigned int mapper, uint64_t gfn)
{
    const struct xpv_pins *p = op->p;
    uint64_t before = op->before;

    if (totals_r(p, before) + totals_w(p, before) == 0) {
        xpv_store(op->pinned + p->gfn, (int)p->gfn_width, gfn);
        xpv_store(op->pinned + p->domid, (int)p->domid_width, mapper);
    }
    xpv_store(op->count, (int)p->count_width, op->counts + (writable ? (uint64_t)1 << p->count_w_shift : 1));
    at(XPV_AT_COUNTED, op->ref);
    unlock_entry(op, before + ((uint64_t)1 << (writable ? p->total_w_shift : p->total_r_shift)));
    return result(XPV_PIN_OK, gfn);
}

/* The GTF bits this pin set on the guest's entry, from the word before it: all of them on a first pin,
 * GTF_writing on the first write pin of a pinned entry. */
static uint64_t pin_set_bits(const struct xpv_pins *p, uint64_t before, int writable)
{
    uint64_t readers = totals_r(p, before), writers = totals_w(p, before);

    if (readers + writers == 0)
        return p->gtf_reading | (writable ? p->gtf_writing : 0);
    return writable && writers == 0 ? p->gtf_writing : 0;
}

static int party_revoked(const struct xpv_pins *p, uintptr_t table, unsigned int party, uint32_t generation)
{
    return party != p->xenhv_party &&
           xpv_load(table + p->party_gen + party * p->party_gen_width, (int)p->party_gen_width) != generation;
}

/* A call's `who` and `how` (XPV_WHO_*, XPV_HOW_*), unpacked: `domain` is the mapping domain of a pin or
 * the owner of an unpin. */
struct pin_args {
    unsigned int ref, party, domain;
    uint32_t generation;
    int writable;
    uint64_t mask;
};

static struct pin_args unpack(uint64_t who, uint64_t how)
{
    struct pin_args a = {
        .ref = (uint32_t)who,
        .party = (uint8_t)(who >> XPV_WHO_PARTY_SHIFT),
        .domain = (uint16_t)(who >> XPV_WHO_DOMAIN_SHIFT),
        .generation = (uint32_t)(how >> XPV_HOW_GENERATION_SHIFT),
        .writable = (how & XPV_HOW_WRITABLE) != 0,
        .mask = how & XPV_HOW_MASK,
    };

    return a;
}

/* The start of a pin or an unpin: `op` located on the counts of `counted` (the pinning party, or the
 * unpin's owner) and the entry taken by `a->party` for `op_bits`. XPV_PIN_OK, or the refusal with the
 * entry given back. */
static uint64_t begin(struct pin_op *op, const struct xpv_pins *p, uintptr_t table, uintptr_t entry,
                      const struct pin_args *a, unsigned int counted, uint64_t op_bits)
{
    uint64_t taken;

    locate(op, p, table, entry, a->ref, counted);
    taken = lock_entry(op, a->party, op_bits | (a->writable ? p->op_writable : 0));
    if (taken != XPV_PIN_OK)
        return taken;
    if (party_revoked(p, table, a->party, a->generation))
        return pin_undo(op, 0, XPV_PIN_REVOKED);
    return XPV_PIN_OK;
}

/* Pin `ref` for `party` of domain `mapper` (PinTable.pin): XPV_PIN_OK and the frame, a refusal with the
 * entry left as it was, or (XPV_HOW_CALLER_CHECKS_PAGE in `how`) XPV_PIN_PAGE_CHECK with the entry held. */
uint64_t xpv_pin(uintptr_t table, uintptr_t entry, const struct xpv_pins *p, uint64_t who, uint64_t how)
{
    struct pin_op op;
    struct pin_args a = unpack(who, how);
    uint64_t readers, writers, mine, status, gfn, set_bits, begun;

    begun = begin(&op, p, table, entry, &a, a.party, p->op_pin);
    if (begun != XPV_PIN_OK)
        return begun;
    readers = totals_r(p, op.before);
    writers = totals_w(p, op.before);
    mine = a.writable ? op.counts >> p->count_w_shift : op.counts & p->count_mask;
    if (mine >= p->max_party_pins || readers + writers >= p->total_mask)
        return pin_undo(&op, 0, XPV_PIN_NO_SPACE);
    set_bits = pin_set_bits(p, op.before, a.writable);
    if (readers + writers == 0) {
        status = set_status(&op, a.domain, !a.writable, a.mask, 1);
        if (status != XPV_PIN_OK)
            return pin_undo(&op, 0, status);
        gfn = xpv_load(entry + p->frame, (int)p->frame_width);
    } else {
        uint64_t holder_dom = xpv_load(op.pinned + p->domid, (int)p->domid_width);

        if (holder_dom != a.domain)
            return pin_undo(&op, 0, result(XPV_PIN_IN_USE, holder_dom));
        /* Once pinned, the entry cannot have been revoked, so only the read-only bit is re-checked. */
        if (set_bits) {
            status = set_status(&op, a.domain, 0, a.mask, 0);
            if (status != XPV_PIN_OK)
                return pin_undo(&op, 0, status);
        }
        gfn = xpv_load(op.pinned + p->gfn, (int)p->gfn_width);
    }
    if (how & XPV_HOW_CALLER_CHECKS_PAGE)
        return result(XPV_PIN_PAGE_CHECK, gfn | (uint64_t)(readers + writers == 0) << 32);
    if (gfn >= xpv_load(table + p->ram_pages, (int)p->ram_pages_width) || overlaid(p, table, gfn))
        return pin_undo(&op, set_bits, result(XPV_PIN_NOT_LOCAL, gfn));
    return pin_commit(&op, a.writable, a.domain, gfn);
}

/* The end of a pin that returned XPV_PIN_PAGE_CHECK (`who` and `how` as it had them): with `page_ok`,
 * count it (XPV_PIN_OK and the frame); without, undo it (XPV_PIN_OK too). */
uint64_t xpv_pin_finish(uintptr_t table, uintptr_t entry, const struct xpv_pins *p, uint64_t who, uint64_t how,
                        uint32_t gfn, int page_ok)
{
    struct pin_op op;
    struct pin_args a = unpack(who, how);
    uint64_t word;

    locate(&op, p, table, entry, a.ref, a.party);
    word = xpv_load(op.word, (int)p->word_width);
    if ((word & p->holder_mask) != a.party || (word & (p->op_pin | p->op_unpin)) != p->op_pin)
        return result(XPV_PIN_LOST, word & p->holder_mask);
    op.before = word & ~(((uint64_t)1 << p->total_r_shift) - 1);
    op.counts = (word >> p->old_r_shift & p->count_mask) | (word >> p->old_w_shift & p->count_mask) << p->count_w_shift;
    if (!page_ok)
        return pin_undo(&op, pin_set_bits(p, op.before, a.writable), XPV_PIN_OK);
    return pin_commit(&op, a.writable, a.domain, gfn);
}

/* Drop one of `owner`'s pins on `ref` (PinTable.unpin), `party` holding the entry: the last writer clears
 * GTF_writing, the last pin GTF_reading. */
uint64_t xpv_unpin(uintptr_t table, uintptr_t entry, const struct xpv_pins *p, uint64_t who, uint64_t how)
{
    struct pin_op op;
    struct pin_args a = unpack(who, how);
    uint64_t readers, writers, counts, begun, one = a.writable ? (uint64_t)1 << p->count_w_shift : 1;

    begun = begin(&op, p, table, entry, &a, a.domain, p->op_unpin);
    if (begun != XPV_PIN_OK)
        return begun;
    counts = op.counts;
    if ((a.writable ? counts >> p->count_w_shift : counts & p->count_mask) == 0)
        return pin_undo(&op, 0, XPV_PIN_NO_PIN);
    readers = totals_r(p, op.before) - !a.writable;
    writers = totals_w(p, op.before) - !!a.writable;
    settle_flags(&op, readers, writers);
    xpv_store(op.count, (int)p->count_width, counts - one);
    at(XPV_AT_COUNTED, op.ref);
    unlock_entry(&op, totals(p, readers, writers));
    return XPV_PIN_OK;
}
