/* A transmit batch through the switch into receive rings (no Python API here).
 *
 * It mirrors appliance/net/port.py (VirtioNetPort.process_tx's header checks
 * and counters, deliver's ring choice and counters) and appliance/net/switch.py
 * (Switch.forward), which stay the reference; the ring work is fp_receive
 * (netrx.c).  Python owns the MAC table: a call reads a sorted snapshot of it
 * and reports, in order, what Python must apply (a source MAC to learn, an
 * aged entry a lookup removed); within the call it sees its own reports (an
 * overlay), so every frame is switched as Python would switch it.  A frame one
 * of Python's destinations must see (a port that is not native, the responder's
 * MAC or broadcast) stops the call before anything is done for it.
 */
#ifndef APPLIANCE_FASTPATH_NETSWITCH_H
#define APPLIANCE_FASTPATH_NETSWITCH_H

#include "netrx.h"

/* What stands behind a switch port, as far as a frame is concerned. */
enum {
    SW_PYTHON = 0, /* every frame for it goes to Python (TAP, a port off the native path) */
    SW_FILTER = 1, /* ignores frames except for its MAC or broadcast (the responder) */
    SW_NATIVE = 2, /* a virtio-net port whose receive rings are written here */
};

/* Table snapshot record: MAC (6 bytes), port index, state: flags, either
 * without the other (the ageing time may be shorter than the refresh's). */
#define SW_RECORD 8
enum { SW_REFRESH = 1, SW_AGED = 2 };

/* One receive ring of a native port, and what the call did to it. */
typedef struct {
    fp_ring ring;
    int ready;           /* 0: nothing can be taken (SplitQueue.ready is false) */
    uint64_t packets, bytes, dropped, faults;
    int dirty;           /* something was pushed used (the port's flush publishes it) */
} sw_rxq;

typedef struct {
    int kind;
    unsigned char mac[6]; /* SW_FILTER */
    unsigned hdr_len;     /* SW_NATIVE: 10 or 12 */
    int mrg;
    fp_log log;
    sw_rxq *rxq;          /* its ready, enabled receive rings (VirtioNetPort._rx_active) */
    size_t nrxq;
    uint64_t no_queue;    /* frames while it had no receive ring (tx_no_queue) */
} sw_port;

typedef struct {
    unsigned char mac[6];
    int gone;             /* 1: removed as aged; 0: learned behind the source port */
} sw_overlay;

typedef struct {
    /* inputs */
    const unsigned char *table; /* SW_RECORD-byte records sorted by MAC */
    size_t entries;
    sw_port *ports;             /* Switch.ports, in order */
    size_t nports;
    size_t src;                 /* the index of the port the frames came from */
    /* this call's learning (what events says), the overlay of the table */
    sw_overlay *overlay;
    size_t noverlay, cap_overlay;
    /* outputs: Switch.counters increments, and the events: 7-byte records
     * ('L' or 'A', MAC): learn it behind the source / delete it (aged) */
    uint64_t frames, forwarded, flooded, filtered, runts;
    unsigned char *events;
    size_t nevents, cap_events;
} sw_switch;

enum { SW_DONE = 0, SW_TO_PYTHON = 1, SW_NOMEM = -1 };

/* Switch one Ethernet frame that entered through sw->src (Switch.forward, and
 * VirtioNetPort.deliver at each destination).  SW_TO_PYTHON: nothing was done
 * (no counter, no event): Python forwards it.  SW_NOMEM: the frame may have
 * reached some destinations; the counters say what was done. */
int sw_forward(sw_switch *sw, const unsigned char *frame, size_t len);

/* Free the overlay and the events. */
void sw_free(sw_switch *sw);

/* The CRC-32 (IEEE 802.3, zlib.crc32) of len bytes: the receive ring's choice. */
uint32_t sw_crc32(const unsigned char *p, size_t len);

#endif
