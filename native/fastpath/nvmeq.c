/* The NVMe I/O queue path of the native fast path: see nvmeq.h.
 *
 * The Python code it mirrors (appliance/storage/processing_pass.py _drain,
 * io.py read / write, prp.py, queues.py push) stays the reference.  The rule
 * that keeps the two identical: before an entry changes anything (the image,
 * guest memory, the queues) every check Python makes has passed here too;
 * any check that fails, and any I/O that does not complete at once, hands the
 * entry back unconsumed and Python runs it from the start.  A read handed back
 * after a partial RWF_NOWAIT preadv is read again whole by Python (the same
 * bytes land in the same place); a write handed back after a failed pwritev is
 * written again by Python, which reports the failure.
 */
#define _GNU_SOURCE
#include "nvmeq.h"

#include <errno.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/uio.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "NVMe queues need a little-endian host"
#endif

#define PAGE 4096u
#define SQE_SIZE 64u
#define CQE_SIZE 16u
#define CQE_STATUS_OFFSET 14u
#define OP_WRITE 0x01u
#define OP_READ 0x02u
#define RW_RESERVED 0x03FF0000u /* io.RW_RESERVED */
#define RW_FUA (1u << 30)
#define MAX_IOV 256u            /* more pieces than this: Python */
#define MAX_PRP_PAGES 1024u     /* a PRP list longer than this: Python (MDTS keeps it far below) */

/* The region holding guest address a, or NULL (ClientMemory._find). */
static const fp_region *find(const fp_nvmeq *q, uint64_t a)
{
    size_t lo = 0, hi = q->nregions;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const fp_region *r = &q->regions[mid];
        if (a < r->start)
            hi = mid;
        else if (a - r->start >= r->size)
            lo = mid + 1;
        else
            return r;
    }
    return NULL;
}

/* [addr, addr + len) as iovecs appended at iov[*n] (ClientMemory._pieces: the
 * range may run across adjacent regions, each with the access).  -1 when part
 * of it is unmapped, lacks the access, passes 2^64 or needs more than max. */
static int pieces(const fp_nvmeq *q, uint64_t addr, uint64_t len, int write, struct iovec *iov,
                  size_t *n, size_t max)
{
    if (addr != 0 && len > UINT64_MAX - addr + 1)
        return -1;
    uint64_t done = 0;
    while (done < len) {
        const fp_region *r = find(q, addr + done);
        if (r == NULL || !(write ? r->writable : r->readable) || *n >= max)
            return -1;
        uint64_t off = addr + done - r->start;
        uint64_t take = len - done < r->size - off ? len - done : r->size - off;
        iov[*n].iov_base = (void *)(uintptr_t)(r->host + off);
        iov[*n].iov_len = (size_t)take;
        (*n)++;
        done += take;
    }
    return 0;
}

/* Copy guest [addr, addr + len) to dst (ClientMemory.read); -1 if unreachable. */
static int copy_in(const fp_nvmeq *q, uint64_t addr, size_t len, unsigned char *dst)
{
    struct iovec iov[8];
    size_t n = 0;
    if (pieces(q, addr, len, 0, iov, &n, 8) < 0)
        return -1;
    for (size_t i = 0; i < n; i++) {
        memcpy(dst, iov[i].iov_base, iov[i].iov_len);
        dst += iov[i].iov_len;
    }
    return 0;
}

static uint64_t le64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static uint32_t le32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

typedef struct {
    uint64_t addr, len;
} seg_t;

/* prp.prp_segments for a transfer of len bytes (0 < len <= mdts): the segments,
 * adjacent ones merged, in segs (room for len / PAGE + 2); their count, or -1
 * wherever Python would refuse (an offset, an unreachable list). */
static long prp_segments(const fp_nvmeq *q, uint64_t prp1, uint64_t prp2, uint64_t len,
                         seg_t *segs)
{
    if (prp1 % 4)
        return -1;
    uint64_t first = PAGE - prp1 % PAGE;
    if (first > len)
        first = len;
    uint64_t rest = len - first;
    long n = 1;
    segs[0] = (seg_t){prp1, first};
    if (rest == 0)
        return n;
    uint64_t pages[MAX_PRP_PAGES];
    uint64_t count = (rest + PAGE - 1) / PAGE;
    if (count > MAX_PRP_PAGES)
        return -1;
    if (rest <= PAGE) {
        pages[0] = prp2;
    } else { /* prp._list_entries */
        uint64_t address = prp2, got = 0;
        if (address % 8)
            return -1;
        for (;;) {
            uint64_t slots = (PAGE - address % PAGE) / 8, need = count - got;
            if (need <= slots) {
                if (copy_in(q, address, (size_t)need * 8, (unsigned char *)&pages[got]) < 0)
                    return -1;
                break;
            }
            uint64_t page[PAGE / 8];
            if (copy_in(q, address, (size_t)slots * 8, (unsigned char *)page) < 0)
                return -1;
            memcpy(&pages[got], page, (size_t)(slots - 1) * 8);
            got += slots - 1;
            address = page[slots - 1];
            if (address % PAGE)
                return -1;
        }
    }
    for (uint64_t i = 0; i < count; i++) {
        if (pages[i] % PAGE)
            return -1;
        uint64_t take = rest < PAGE ? rest : PAGE;
        rest -= take;
        seg_t *last = &segs[n - 1];
        if (last->addr + last->len == pages[i] && pages[i] != 0) /* (no merge across 2^64) */
            last->len += take;
        else
            segs[n++] = (seg_t){pages[i], take};
    }
    return n;
}

static void mark(fp_nvmeq *q, uint32_t nsid, uint64_t offset, uint64_t length)
{
    if (q->nmarks < q->max_marks)
        q->marks[q->nmarks++] = (fp_mark){nsid, offset, length};
}

/* preadv / pwritev of the whole iovec list at off: 0; -1 when it failed before a
 * byte moved, -2 after some did. */
static int move(int fd, struct iovec *iov, size_t n, uint64_t off, int write, int nowait)
{
    int moved = 0;
    while (n) {
        ssize_t done = write ? pwritev(fd, iov, (int)n, (off_t)off)
                             : preadv2(fd, iov, (int)n, (off_t)off, nowait ? RWF_NOWAIT : 0);
        if (done < 0 && errno == EINTR)
            continue;
        if (done <= 0)
            return moved ? -2 : -1; /* an error, a miss (EAGAIN), the end of a short image */
        moved = 1;
        off += (uint64_t)done;
        size_t left = (size_t)done;
        while (n && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            n--;
        }
        if (n) {
            iov->iov_base = (char *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

/* The entry at the head, run whole or not at all: 1 ran, 0 hand back. */
static int one(fp_nvmeq *q)
{
    unsigned char sqe[SQE_SIZE];
    atomic_thread_fence(memory_order_acquire); /* the tail was seen before the entry */
    if (copy_in(q, q->sq_base + (uint64_t)q->sq_head * SQE_SIZE, SQE_SIZE, sqe) < 0)
        return 0; /* Python: the controller's fatal status */
    struct iovec slot[1];
    size_t nslot = 0;
    uint64_t cqe_at = q->cq_base + (uint64_t)q->cq_tail * CQE_SIZE;
    if (pieces(q, cqe_at, CQE_SIZE, 1, slot, &nslot, 1) < 0)
        return 0;
    unsigned opcode = sqe[0], flags = sqe[1];
    uint16_t cid;
    memcpy(&cid, sqe + 2, 2);
    uint32_t nsid = le32(sqe + 4), cdw12 = le32(sqe + 48);
    uint64_t prp1 = le64(sqe + 24), prp2 = le64(sqe + 32);
    uint64_t slba = (uint64_t)le32(sqe + 40) | (uint64_t)le32(sqe + 44) << 32;
    int write = opcode == OP_WRITE;
    if ((opcode != OP_READ && !write) || flags != 0) /* FUSE, reserved bits, PSDT */
        return 0;
    if (nsid == 0 || nsid > q->nns || !q->ns[nsid - 1].native)
        return 0;
    const fp_ns *ns = &q->ns[nsid - 1];
    if (cdw12 & RW_RESERVED)
        return 0;
    uint64_t nlb = (cdw12 & 0xFFFFu) + 1;
    if (slba > ns->nlbas || nlb > ns->nlbas - slba)
        return 0; /* LBA Out of Range */
    if (write && (!ns->writable || (cdw12 & RW_FUA) || !q->write_cache))
        return 0; /* write protected, or a sync that runs off the loop */
    uint64_t nbytes = nlb << ns->lba_shift;
    if (nbytes > q->mdts)
        return 0;
    seg_t segs[MAX_PRP_PAGES + 2];
    long nsegs = prp_segments(q, prp1, prp2, nbytes, segs);
    if (nsegs < 0)
        return 0;
    struct iovec iov[MAX_IOV];
    size_t niov = 0;
    for (long i = 0; i < nsegs; i++)
        if (pieces(q, segs[i].addr, segs[i].len, !write, iov, &niov, MAX_IOV) < 0)
            return 0;
    int moved = move(ns->fd, iov, niov, slba << ns->lba_shift, write, q->nowait && !write);
    if (moved == -2) { /* what a partial transfer changed stays marked, whatever Python does next */
        if (write)
            mark(q, nsid, slba << ns->lba_shift, nbytes);
        else
            for (long i = 0; i < nsegs; i++)
                mark(q, 0, segs[i].addr, segs[i].len);
    }
    if (moved < 0)
        return 0;
    if (write) {
        q->writes++;
        q->bytes_written += nbytes;
        mark(q, nsid, slba << ns->lba_shift, nbytes);
    } else {
        q->reads++;
        q->bytes_read += nbytes;
        for (long i = 0; i < nsegs; i++)
            mark(q, 0, segs[i].addr, segs[i].len);
    }
    /* Fetched: the head moves; then the completion (queues.CompletionQueue.push). */
    q->sq_head = (q->sq_head + 1) % q->sq_size;
    unsigned char *cqe = slot[0].iov_base;
    unsigned char head[CQE_STATUS_OFFSET] = {0};
    uint16_t sq_head = (uint16_t)q->sq_head, status = (uint16_t)(q->phase & 1);
    memcpy(head + 8, &sq_head, 2);
    memcpy(head + 10, &q->sqid, 2);
    memcpy(head + 12, &cid, 2);
    memcpy(cqe, head, sizeof head);
    atomic_thread_fence(memory_order_release); /* the entry before its phase tag */
    if (((uintptr_t)(cqe + CQE_STATUS_OFFSET) & 1u) == 0)
        __atomic_store_n((uint16_t *)(void *)(cqe + CQE_STATUS_OFFSET), status, __ATOMIC_RELEASE);
    else
        memcpy(cqe + CQE_STATUS_OFFSET, &status, 2);
    mark(q, 0, cqe_at, CQE_SIZE);
    if (++q->cq_tail == q->cq_size) {
        q->cq_tail = 0;
        q->phase ^= 1;
    }
    return 1;
}

uint32_t fp_nvme_run(fp_nvmeq *q, uint32_t budget, int *stop)
{
    uint32_t done = 0;
    *stop = FP_NVME_DONE;
    while (done < budget && q->sq_head != q->sq_tail
            && (q->cq_tail + q->cq_size - q->cq_head) % q->cq_size < q->cq_size - 1) {
        if (!one(q)) {
            *stop = FP_NVME_HANDBACK;
            break;
        }
        done++;
    }
    return done;
}

size_t fp_nvme_marks_per_command(uint64_t mdts)
{
    return (size_t)(mdts / PAGE) + 3;
}

int fp_nvme_load32(const fp_nvmeq *q, uint64_t addr, uint32_t *value)
{
    struct iovec iov[4];
    size_t n = 0;
    if (pieces(q, addr, 4, 0, iov, &n, 4) < 0)
        return -1;
    if (n == 1 && ((uintptr_t)iov[0].iov_base & 3u) == 0) { /* one load, as Python's view */
        *value = __atomic_load_n((const uint32_t *)iov[0].iov_base, __ATOMIC_ACQUIRE);
        return 0;
    }
    unsigned char b[4], *p = b;
    for (size_t i = 0; i < n; i++) {
        memcpy(p, iov[i].iov_base, iov[i].iov_len);
        p += iov[i].iov_len;
    }
    memcpy(value, b, 4);
    return 0;
}

int fp_nvme_store32(const fp_nvmeq *q, uint64_t addr, uint32_t value)
{
    struct iovec iov[4];
    size_t n = 0;
    if (pieces(q, addr, 4, 1, iov, &n, 4) < 0)
        return -1;
    if (n == 1 && ((uintptr_t)iov[0].iov_base & 3u) == 0) { /* one store: the host reads it racily */
        __atomic_store_n((uint32_t *)iov[0].iov_base, value, __ATOMIC_SEQ_CST);
        return 0;
    }
    const unsigned char *p = (const unsigned char *)&value;
    for (size_t i = 0; i < n; i++) {
        memcpy(iov[i].iov_base, p, iov[i].iov_len);
        p += iov[i].iov_len;
    }
    return 0;
}
