/* A transmit batch through the switch into receive rings: see netswitch.h.
 *
 * Every decision is the one of Switch.forward in the same order: count the
 * frame, learn a unicast source MAC (unless it is already behind the source
 * port and fresh), look the destination up (an aged entry is removed and the
 * frame flooded), then filter, forward or flood in the order of Switch.ports.
 * Before any of it the frame's destinations are worked out without side
 * effects; when one of them is Python's, the frame is handed back untouched.
 */
#include "netswitch.h"

#include <stdlib.h>
#include <string.h>

static const unsigned char BROADCAST[6] = {0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF};

uint32_t sw_crc32(const unsigned char *p, size_t len)
{
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < len; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

static int grow(void **array, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : 8;
    while (n < need)
        n *= 2;
    void *p = realloc(*array, n * elem);
    if (p == NULL)
        return -1;
    *array = p;
    *cap = n;
    return 0;
}

/* The entry for mac as Python's table holds it now: 1 with its port and state
 * (SW_ flags), or 0 (not there).  This call's own learning and removals come first. */
static int lookup(const sw_switch *sw, const unsigned char *mac, size_t *port, int *state)
{
    for (size_t i = 0; i < sw->noverlay; i++) {
        if (memcmp(sw->overlay[i].mac, mac, 6) == 0) {
            if (sw->overlay[i].gone)
                return 0;
            *port = sw->src;
            *state = 0;
            return 1;
        }
    }
    size_t lo = 0, hi = sw->entries;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const unsigned char *rec = sw->table + SW_RECORD * mid;
        int c = memcmp(rec, mac, 6);
        if (c == 0) {
            *port = rec[6];
            *state = rec[7];
            return 1;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

/* Record an event and its effect on the overlay. */
static int report(sw_switch *sw, char kind, const unsigned char *mac)
{
    size_t i;
    for (i = 0; i < sw->noverlay; i++)
        if (memcmp(sw->overlay[i].mac, mac, 6) == 0)
            break;
    if (i == sw->noverlay) {
        if (grow((void **)&sw->overlay, &sw->cap_overlay, i + 1, sizeof *sw->overlay) < 0)
            return -1;
        memcpy(sw->overlay[i].mac, mac, 6);
        sw->noverlay++;
    }
    sw->overlay[i].gone = kind == 'A';
    if (grow((void **)&sw->events, &sw->cap_events, 7 * (sw->nevents + 1), 1) < 0)
        return -1;
    sw->events[7 * sw->nevents] = (unsigned char)kind;
    memcpy(sw->events + 7 * sw->nevents + 1, mac, 6);
    sw->nevents++;
    return 0;
}

/* VirtioNetPort.deliver: one frame into one of the port's receive rings. */
static int deliver(sw_port *p, const unsigned char *frame, size_t len)
{
    if (p->nrxq == 0) {
        p->no_queue++;
        return 0;
    }
    sw_rxq *q = &p->rxq[p->nrxq == 1 ? 0 : sw_crc32(frame, 12) % p->nrxq];
    int outcome = FP_RX_NO_BUFFER;
    if (q->ready && !q->ring.broken[0]) /* else SplitQueue.pop gives nothing */
        outcome = fp_receive(&q->ring, frame, len, p->hdr_len, p->mrg, &p->log);
    switch (outcome) {
    case FP_RX_NOMEM:
        return -1;
    case FP_RX_NO_BUFFER:
        q->dropped++;
        return 0;
    case FP_RX_TOO_SMALL:
        q->dirty = 1;
        q->dropped++;
        return 0;
    case FP_RX_FAULT:
        q->dirty = 1;
        q->faults++;
        return 0;
    default:
        q->dirty = 1;
        q->packets++;
        q->bytes += len;
        return 0;
    }
}

/* Whether the port at index i must see the frame in Python (flooded to it). */
static int python_sees(const sw_port *p, const unsigned char *dmac)
{
    if (p->kind == SW_PYTHON)
        return 1;
    if (p->kind == SW_FILTER)
        return memcmp(dmac, p->mac, 6) == 0 || memcmp(dmac, BROADCAST, 6) == 0;
    return 0;
}

int sw_forward(sw_switch *sw, const unsigned char *frame, size_t len)
{
    if (len < 14) { /* the port drops runts first: kept for Switch.forward's sake */
        sw->frames++;
        sw->runts++;
        return SW_DONE;
    }
    const unsigned char *dmac = frame, *smac = frame + 6;
    size_t port;
    int state;
    int learn = 0;
    if (!(smac[0] & 1))
        learn = !lookup(sw, smac, &port, &state) || port != sw->src || (state & SW_REFRESH);
    int filtered = 0, aged = 0, known = 0;
    size_t dest = 0;
    if (!(dmac[0] & 1)) {
        if (learn && memcmp(dmac, smac, 6) == 0) { /* just learned behind the source */
            known = 1;
            dest = sw->src;
        } else if (lookup(sw, dmac, &dest, &state)) {
            known = !(state & SW_AGED);
            aged = !known;
        }
        filtered = known && dest == sw->src;
    }
    if (!filtered) { /* the destinations: is one of them Python's? */
        if (known) {
            if (dest >= sw->nports || sw->ports[dest].kind != SW_NATIVE)
                return SW_TO_PYTHON;
        } else {
            for (size_t i = 0; i < sw->nports; i++)
                if (i != sw->src && python_sees(&sw->ports[i], dmac))
                    return SW_TO_PYTHON;
        }
    }
    sw->frames++;
    if (learn && report(sw, 'L', smac) < 0)
        return SW_NOMEM;
    if (aged && report(sw, 'A', dmac) < 0)
        return SW_NOMEM;
    if (filtered) {
        sw->filtered++;
        return SW_DONE;
    }
    if (known) {
        sw->forwarded++;
        return deliver(&sw->ports[dest], frame, len) < 0 ? SW_NOMEM : SW_DONE;
    }
    sw->flooded++;
    for (size_t i = 0; i < sw->nports; i++) {
        if (i == sw->src || sw->ports[i].kind != SW_NATIVE)
            continue; /* the responder ignores it (python_sees said so) */
        if (deliver(&sw->ports[i], frame, len) < 0)
            return SW_NOMEM;
    }
    return SW_DONE;
}

void sw_free(sw_switch *sw)
{
    free(sw->overlay);
    free(sw->events);
    sw->overlay = NULL;
    sw->events = NULL;
    sw->noverlay = sw->cap_overlay = sw->nevents = sw->cap_events = 0;
}
