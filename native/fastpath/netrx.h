/* One frame into a virtio-net receive ring (no Python API here).
 *
 * It mirrors appliance/net/receive.py (write_frame), which stays the
 * reference: the chains taken, the virtio-net header (num_buffers with
 * MRG_RXBUF), the bytes written, the used entries, the dirty-log marks, in
 * the same order.
 */
#ifndef APPLIANCE_FASTPATH_NETRX_H
#define APPLIANCE_FASTPATH_NETRX_H

#include "vring.h"

/* The outcomes of receive.Outcome, same values. */
enum { FP_RX_DELIVERED = 0, FP_RX_NO_BUFFER = 1, FP_RX_TOO_SMALL = 2, FP_RX_FAULT = 3,
       FP_RX_NOMEM = -1 };

/* The vhost-user dirty log (dirty_log.VhostLog): bit n of bits is 4 KiB page n. */
typedef struct {
    unsigned char *bits;  /* NULL: no log */
    uint64_t pages;       /* bits in the bitmap */
    uint64_t beyond;      /* out: marks that reached past the bitmap */
} fp_log;

/* Write one Ethernet frame, behind a virtio-net header of hdr_len bytes (10 or
 * 12), into the chains of a receive ring (with mrg, as many as it needs).
 * Returns an FP_RX_ outcome; FP_RX_NO_BUFFER leaves the ring's indices and
 * malformed count as they were (the chains stay available); FP_RX_NOMEM
 * means nothing was written and the caller's indices stay. */
int fp_receive(fp_ring *ring, const unsigned char *frame, size_t frame_len, unsigned hdr_len,
               int mrg, fp_log *log);

#endif
