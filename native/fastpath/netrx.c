/* One frame into a virtio-net receive ring: see netrx.h.
 *
 * The chains are walked first until they hold the header and the frame (the
 * walk copies each chain's segments, since the next walk reuses the ring's
 * scratch); only then is anything written, chain after chain, each given back
 * used with the bytes written into it before the next one is written (a
 * buffer may overlap the used ring: the order is the Python one).
 */
#define _POSIX_C_SOURCE 200809L /* sigjmp_buf (guard.h) */
#include "netrx.h"

#include "guard.h"

#include <stdlib.h>
#include <string.h>

#define LOG_SHIFT 12 /* VHOST_LOG_PAGE: 4 KiB */
#define HDR_MAX 12

typedef struct {
    uint64_t addr, len;
} piece_t;

typedef struct {
    uint16_t head;
    uint64_t used;       /* bytes written into it */
    size_t first, count; /* its pieces */
} taken_t;

/* VhostLog.mark */
static void mark(fp_log *log, uint64_t addr, uint64_t len)
{
    if (log->bits == NULL || len == 0)
        return;
    uint64_t first = addr >> LOG_SHIFT, last = (addr + len - 1) >> LOG_SHIFT;
    if (last >= log->pages) {
        log->beyond++;
        if (log->pages == 0)
            return;
        last = log->pages - 1;
    }
    for (uint64_t page = first; page <= last; page++) {
        unsigned char bit = (unsigned char)(1u << (page & 7));
        unsigned char *byte = &log->bits[page >> 3];
        if (!(*byte & bit))
            *byte = (unsigned char)(*byte | bit);
    }
}

/* Room for need elements in *array, which starts as the caller's `small` array of
 * *cap elements (a frame usually takes one chain of one or two buffers: no malloc). */
static int grow(void **array, size_t *cap, size_t need, size_t elem, void *small)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap;
    while (n < need)
        n *= 2;
    if (*array != small)
        fp_guard_disown(*array);
    void *p = *array == small ? malloc(n * elem) : realloc(*array, n * elem);
    if (p == NULL) {
        fp_guard_own(*array == small ? NULL : *array);
        return -1;
    }
    fp_guard_own(p); /* freed by the guard when a write faults (guard.h) */
    if (*array == small)
        memcpy(p, small, *cap * elem);
    *array = p;
    *cap = n;
    return 0;
}

int fp_receive(fp_ring *q, const unsigned char *frame, size_t frame_len, unsigned hdr_len,
               int mrg, fp_log *log)
{
    uint64_t need = (uint64_t)hdr_len + frame_len;
    uint16_t save_avail = q->last_avail_idx, save_used = q->used_idx;
    uint64_t save_malformed = q->malformed;
    taken_t taken_small[4];
    piece_t piece_small[8];
    taken_t *taken = taken_small;
    piece_t *piece = piece_small;
    size_t ntaken = 0, cap_taken = 4, npieces = 0, cap_pieces = 8;
    uint64_t room = 0, off = 0;
    int outcome = FP_RX_DELIVERED;
    while (room < need) {
        fp_chain c;
        if (fp_next(q, &c) != FP_CHAIN) { /* no buffer: as SplitQueue.rollback */
            q->last_avail_idx = save_avail;
            q->used_idx = save_used;
            q->malformed = save_malformed;
            outcome = FP_RX_NO_BUFFER;
            goto out;
        }
        if (grow((void **)&taken, &cap_taken, ntaken + 1, sizeof *taken, taken_small) < 0)
            goto nomem;
        taken_t *t = &taken[ntaken++];
        t->head = c.head;
        t->first = npieces;
        uint64_t start = off;
        for (size_t i = 0; i < c.n && off < need; i++) {
            uint64_t k = q->segs[i].len < need - off ? q->segs[i].len : need - off;
            if (k == 0)
                continue; /* an empty write: nothing stored, nothing marked */
            if (grow((void **)&piece, &cap_pieces, npieces + 1, sizeof *piece, piece_small) < 0)
                goto nomem;
            piece[npieces++] = (piece_t){q->segs[i].addr, k};
            off += k;
        }
        t->count = npieces - t->first;
        t->used = off - start;
        room += c.writable; /* the walker refused readable buffers */
        if (!mrg && room < need) {
            fp_push(q, c.head, 0);
            outcome = FP_RX_TOO_SMALL; /* without MRG_RXBUF one buffer must hold it all */
            goto out;
        }
    }
    unsigned char hdr[HDR_MAX] = {0};
    if (hdr_len == HDR_MAX) { /* num_buffers, the last field; the rest is zero (GSO_NONE) */
        hdr[10] = (unsigned char)(ntaken & 0xFF);
        hdr[11] = (unsigned char)(ntaken >> 8);
    }
    unsigned char small[2048];
    unsigned char *data = need <= sizeof small ? small : malloc((size_t)need);
    if (data == NULL)
        goto nomem;
    if (data != small)
        fp_guard_own(data);
    memcpy(data, hdr, hdr_len);
    if (frame_len)
        memcpy(data + hdr_len, frame, frame_len);
    off = 0;
    size_t done = 0;
    for (; done < ntaken; done++) {
        const taken_t *t = &taken[done];
        int failed = 0;
        for (size_t i = t->first; i < t->first + t->count; i++) {
            if (fp_write(q, piece[i].addr, data + off, piece[i].len) != 0) {
                failed = 1;
                break;
            }
            mark(log, piece[i].addr, piece[i].len);
            off += piece[i].len;
        }
        if (failed)
            break;
        fp_push(q, t->head, (uint32_t)t->used);
    }
    if (done < ntaken) { /* hand the buffers back unused */
        for (size_t i = done; i < ntaken; i++)
            fp_push(q, taken[i].head, 0);
        outcome = FP_RX_FAULT;
    }
    if (data != small) {
        fp_guard_disown(data);
        free(data);
    }
out:
    if (taken != taken_small) {
        fp_guard_disown(taken);
        free(taken);
    }
    if (piece != piece_small) {
        fp_guard_disown(piece);
        free(piece);
    }
    return outcome;
nomem:
    q->last_avail_idx = save_avail;
    q->used_idx = save_used;
    q->malformed = save_malformed;
    outcome = FP_RX_NOMEM;
    goto out;
}
