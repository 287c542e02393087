/* The split virtqueue walker of the native fast path: see vring.h.
 *
 * Every rule below is the one of appliance/net/virtqueue.py and
 * appliance/net/descriptor_chain.py, in the same
 * order, with the same message (the differential tests compare them).
 *
 * Ring fields the driver changes concurrently (indices, flags, ring entries)
 * are loaded and stored one field at a time: a volatile access of its width
 * when it is aligned (one load or store), else a memcpy of that width.  The
 * avail index is followed by an acquire fence (the ring entries are read after
 * it), used elements by a release fence before the used index, and the used
 * index by a full fence before used_event / the avail flags are read (virtio
 * 1.2 §2.7.7.2).  Descriptors are copied to the stack before they are decoded,
 * an indirect table to scratch memory before it is walked: each is read once.
 */
#include "vring.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "split virtqueues need a little-endian host"
#endif

#define F_NEXT 1u
#define F_WRITE 2u
#define F_INDIRECT 4u
#define AVAIL_F_NO_INTERRUPT 1u

static uint16_t load16(const unsigned char *p)
{
    uint16_t v;
    if (((uintptr_t)p & 1u) == 0)
        v = *(const volatile uint16_t *)(const void *)p;
    else
        memcpy(&v, p, sizeof v);
    return v;
}

static void store16(unsigned char *p, uint16_t v)
{
    if (((uintptr_t)p & 1u) == 0)
        *(volatile uint16_t *)(void *)p = v;
    else
        memcpy(p, &v, sizeof v);
}

static void store32(unsigned char *p, uint32_t v)
{
    if (((uintptr_t)p & 3u) == 0)
        *(volatile uint32_t *)(void *)p = v;
    else
        memcpy(p, &v, sizeof v);
}

typedef struct {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
} desc_t;

static desc_t read_desc(const unsigned char *table, uint32_t i)
{
    unsigned char raw[16];
    desc_t d;
    memcpy(raw, table + 16u * (size_t)i, sizeof raw);
    atomic_signal_fence(memory_order_seq_cst); /* the copy is the one read */
    memcpy(&d.addr, raw, 8);
    memcpy(&d.len, raw + 8, 4);
    memcpy(&d.flags, raw + 12, 2);
    memcpy(&d.next, raw + 14, 2);
    return d;
}

/* address + length would pass 2^64 (memory.checked_end) */
static int overflows(uint64_t addr, uint64_t len)
{
    return addr != 0 && len > UINT64_MAX - addr + 1;
}

/* The region holding guest address a, or NULL (ClientMemory._find). */
static const fp_region *find(const fp_ring *q, uint64_t a)
{
    size_t lo = 0, hi = q->nregions;
    while (lo < hi) { /* the first region starting after a */
        size_t mid = lo + (hi - lo) / 2;
        if (q->regions[mid].start <= a)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return NULL;
    const fp_region *r = &q->regions[lo - 1];
    return a - r->start < r->size ? r : NULL;
}

/* Walk [addr, addr + len) piece by piece as ClientMemory._pieces does: 0 when every
 * piece is mapped with the access, else -1 with *done the bytes reachable before
 * the failure and *why its reason.  With dst, copies the bytes (a read); with src,
 * stores them once every piece is known to be reachable (a write: nothing is
 * written when one is not, as ClientMemory.write). */
static int pieces(const fp_ring *q, uint64_t addr, uint64_t len, int write,
                  unsigned char *dst, const unsigned char *src, uint64_t *done_out,
                  const char **why)
{
    uint64_t done = 0;
    *done_out = 0;
    if (overflows(addr, len)) {
        *why = "address overflow";
        return -1;
    }
    while (done < len) {
        const fp_region *r = find(q, addr + done);
        if (r == NULL) {
            *why = "unmapped";
            *done_out = done;
            return -1;
        }
        if (!(write ? r->writable : r->readable)) {
            *why = write ? "not writable" : "not readable";
            *done_out = done;
            return -1;
        }
        uint64_t off = addr + done - r->start;
        uint64_t n = len - done < r->size - off ? len - done : r->size - off;
        if (dst != NULL)
            memcpy(dst + done, r->host + off, (size_t)n);
        done += n;
    }
    if (src != NULL) { /* every piece is writable: store them */
        for (done = 0; done < len;) {
            const fp_region *r = find(q, addr + done);
            uint64_t off = addr + done - r->start;
            uint64_t n = len - done < r->size - off ? len - done : r->size - off;
            memcpy(r->host + off, src + done, (size_t)n);
            done += n;
        }
    }
    return 0;
}

/* descriptor_chain._inside: one region holding the range decides; else the pieces. */
static int inside(const fp_ring *q, uint64_t addr, uint32_t len, int write)
{
    const fp_region *r = find(q, addr);
    if (r != NULL && len <= r->size - (addr - r->start))
        return r->writable || !write;
    uint64_t done;
    const char *why;
    return pieces(q, addr, len, write, NULL, NULL, &done, &why) == 0;
}

#define REFUSE(...) do { snprintf(why, FP_WHY, __VA_ARGS__); return -1; } while (0)

static int too_long(const fp_ring *q, int write, char *why)
{
    if (write)
        REFUSE("writable buffers exceed %llu bytes", (unsigned long long)q->max_writable);
    REFUSE("readable buffers exceed %llu bytes", (unsigned long long)q->max_readable);
}

/* descriptor_chain.walk_chain: 0 with the chain in *c, or -1 with the reason in why. */
static int walk(fp_ring *q, uint16_t head, fp_chain *c, char *why)
{
    uint32_t size = q->size;
    c->head = head;
    c->n = 0;
    c->readable = c->writable = 0;
    if (head >= size)
        REFUSE("head %u outside a queue of %u", (unsigned)head, (unsigned)size);
    desc_t d = read_desc(q->desc, head);
    if (!(d.flags & (F_NEXT | F_INDIRECT))) { /* the common case: one buffer */
        int write = (d.flags & F_WRITE) != 0;
        if (d.len > (write ? q->max_writable : q->max_readable))
            return too_long(q, write, why);
        if (d.len && !inside(q, d.addr, d.len, write))
            REFUSE("buffer 0x%llx+0x%llx outside memory", (unsigned long long)d.addr,
                   (unsigned long long)d.len);
        q->segs[0] = (fp_seg){d.addr, d.len, write};
        c->n = 1;
        if (write)
            c->writable = d.len;
        else
            c->readable = d.len;
        return 0;
    }
    const unsigned char *table = q->desc;
    uint32_t table_len = size, ttl = size, idx = head;
    int nested = 0;
    for (;;) {
        if (ttl == 0)
            REFUSE("chain longer than its table (a loop?)");
        ttl--;
        d = read_desc(table, idx);
        if (d.flags & F_INDIRECT) {
            if (nested)
                REFUSE("indirect descriptor inside an indirect table");
            if (!q->indirect)
                REFUSE("indirect descriptor without VIRTIO_F_INDIRECT_DESC");
            if (d.flags & F_NEXT)
                REFUSE("descriptor has both INDIRECT and NEXT");
            if (d.len == 0 || d.len % 16 || d.len / 16 > size)
                REFUSE("indirect table of %u bytes", (unsigned)d.len);
            uint64_t done;
            const char *bad;
            if (pieces(q, d.addr, d.len, 0, q->table, NULL, &done, &bad) != 0)
                REFUSE("indirect table outside memory: client memory %s at 0x%llx "
                       "(access 0x%llx+0x%llx, %llu bytes completed)", bad,
                       (unsigned long long)(d.addr + done), (unsigned long long)d.addr,
                       (unsigned long long)d.len, (unsigned long long)done);
            table = q->table;
            table_len = ttl = d.len / 16;
            idx = 0;
            nested = 1;
            continue;
        }
        if (d.flags & F_WRITE) {
            c->writable += d.len;
            if (c->writable > q->max_writable)
                return too_long(q, 1, why);
            if (d.len && !inside(q, d.addr, d.len, 1))
                REFUSE("writable buffer 0x%llx+0x%llx outside memory",
                       (unsigned long long)d.addr, (unsigned long long)d.len);
            q->segs[c->n++] = (fp_seg){d.addr, d.len, 1};
        } else {
            if (c->n && q->segs[c->n - 1].write) /* a zero-length writable one counts too */
                REFUSE("readable descriptor after a writable one");
            c->readable += d.len;
            if (c->readable > q->max_readable)
                return too_long(q, 0, why);
            if (d.len && !inside(q, d.addr, d.len, 0))
                REFUSE("buffer 0x%llx+0x%llx outside memory", (unsigned long long)d.addr,
                       (unsigned long long)d.len);
            q->segs[c->n++] = (fp_seg){d.addr, d.len, 0};
        }
        if (!(d.flags & F_NEXT))
            return 0;
        if (d.next >= table_len)
            REFUSE("next %u outside a table of %u", (unsigned)d.next, (unsigned)table_len);
        idx = d.next;
    }
}

void fp_push(fp_ring *q, uint32_t head, uint32_t len)
{
    unsigned char *elem = q->used + 4 + 8u * (size_t)(q->used_idx % q->size);
    store32(elem, head);
    store32(elem + 4, len);
    q->used_idx = (uint16_t)(q->used_idx + 1);
}

int fp_next(fp_ring *q, fp_chain *c)
{
    uint32_t size = q->size;
    char why[FP_WHY];
    for (;;) {
        uint16_t idx = load16(q->avail + 2);
        atomic_thread_fence(memory_order_acquire); /* ring entries after the index */
        uint16_t last = q->last_avail_idx;
        if (idx == last)
            return FP_EMPTY;
        if ((uint16_t)(idx - last) > size) {
            snprintf(q->broken, FP_MSG, "avail index %u is more than %u ahead of %u",
                     (unsigned)idx, (unsigned)size, (unsigned)last);
            q->malformed++;
            return FP_BROKEN;
        }
        uint16_t head = load16(q->avail + 4 + 2u * (last % size));
        q->last_avail_idx = (uint16_t)(last + 1);
        if (walk(q, head, c, why) == 0)
            return FP_CHAIN;
        q->malformed++;
        q->has_error = 1;
        snprintf(q->last_error, FP_MSG, "chain %u: %s", (unsigned)head, why);
        if (head < size)
            fp_push(q, head, 0);
    }
}

int fp_gather(const fp_ring *q, const fp_chain *c, unsigned char *dst)
{
    uint64_t off = 0, done;
    const char *why;
    for (size_t i = 0; i < c->n; i++) {
        const fp_seg *s = &q->segs[i];
        if (pieces(q, s->addr, s->len, 0, dst + off, NULL, &done, &why) != 0)
            return -1;
        off += s->len;
    }
    return 0;
}

int fp_publish(fp_ring *q, uint16_t published, int event_idx)
{
    uint16_t now = q->used_idx;
    atomic_thread_fence(memory_order_release); /* the elements before the index */
    store16(q->used + 2, now);
    atomic_thread_fence(memory_order_seq_cst); /* the index before used_event / flags */
    if (event_idx) {
        uint16_t used_event = load16(q->avail + 4 + 2u * q->size);
        /* vring_need_event(): did the index pass used_event since `published`? */
        return (uint16_t)(now - used_event - 1) < (uint16_t)(now - published);
    }
    return !(load16(q->avail) & AVAIL_F_NO_INTERRUPT);
}

int fp_write(const fp_ring *q, uint64_t addr, const unsigned char *src, uint64_t len)
{
    uint64_t done;
    const char *why;
    return pieces(q, addr, len, 1, NULL, src, &done, &why);
}
