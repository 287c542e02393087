/* The split virtqueue walker of the native fast path (no Python API here).
 *
 * It mirrors appliance/net/virtqueue.py (SplitQueue.pop, push, publish) and
 * appliance/net/descriptor_chain.py (walk_chain, _inside), which stay the
 * reference: the same bounds, the same order of checks, the same messages.
 * Guest memory is a sorted array of mapped regions (guest address, size, host
 * bytes); nothing outside them is touched.
 */
#ifndef APPLIANCE_FASTPATH_VRING_H
#define APPLIANCE_FASTPATH_VRING_H

#include <stddef.h>
#include <stdint.h>

#define FP_WHY 200 /* room for every reason below (the longest is about 150 bytes) */
#define FP_MSG 256 /* "chain N: " and a reason */

typedef struct {
    uint64_t start;             /* guest address */
    uint64_t size;              /* bytes; start + size <= 2^64 */
    unsigned char *host;        /* the mapping of [start, start + size) */
    int readable, writable;
} fp_region;

typedef struct {
    uint64_t addr;
    uint32_t len;
    int write;
} fp_seg;

/* One ring as the walk sees it: the caller fills the inputs, reads back the outputs. */
typedef struct {
    /* inputs: ring areas (checked by the caller to hold a queue of `size`) */
    const unsigned char *desc;   /* 16 * size bytes */
    const unsigned char *avail;  /* flags, idx, ring[size], used_event */
    unsigned char *used;         /* flags, idx, ring[size] of (id, len), avail_event */
    uint32_t size;               /* a power of two, 1..32768 */
    int indirect;                /* VIRTIO_F_INDIRECT_DESC negotiated */
    uint64_t max_readable, max_writable;
    const fp_region *regions;    /* sorted by start, not overlapping */
    size_t nregions;
    /* scratch of the caller: 2 * size segments, 16 * size bytes of indirect table */
    fp_seg *segs;
    unsigned char *table;
    /* state, in and out */
    uint16_t last_avail_idx, used_idx;
    /* outputs */
    uint64_t malformed;          /* chains refused (and ring breaks) */
    int has_error;
    char last_error[FP_MSG];     /* "chain N: why", the last refused chain */
    char broken[FP_MSG];         /* non-empty: the ring cannot be followed */
} fp_ring;

/* One well-formed chain (its segments are ring->segs[0 .. n)). */
typedef struct {
    uint16_t head;
    size_t n;
    uint64_t readable, writable;
} fp_chain;

enum { FP_EMPTY = 0, FP_CHAIN = 1, FP_BROKEN = 2 };

/* The next well-formed available chain: FP_CHAIN (in *chain), FP_EMPTY, or
 * FP_BROKEN (ring->broken says why).  Malformed chains met on the way are
 * counted, given back used with length 0 when their head is inside the queue,
 * and skipped (SplitQueue.pop). */
int fp_next(fp_ring *ring, fp_chain *chain);

/* Write one used element (SplitQueue.push). */
void fp_push(fp_ring *ring, uint32_t head, uint32_t len);

/* Copy every segment's bytes, in order, to dst (chain->readable + chain->writable
 * bytes, as ClientMemory.read of each).  Returns 0, or -1 when a piece lies in a
 * region that is not readable (nothing else can fail: the walk checked the rest). */
int fp_gather(const fp_ring *ring, const fp_chain *chain, unsigned char *dst);

/* Store len bytes of src at guest address addr (ClientMemory.write without the
 * dirty log): 0, or -1 when a piece is unmapped or not writable (nothing written). */
int fp_write(const fp_ring *ring, uint64_t addr, const unsigned char *src, uint64_t len);

/* Make used entries up to ring->used_idx visible; 1 when the driver wants an
 * interrupt (SplitQueue.publish; the caller skips it when nothing is new). */
int fp_publish(fp_ring *ring, uint16_t published, int event_idx);

#endif
