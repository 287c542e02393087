/* appliance._fastpath.switch_tx and switch_frames: the switch's Python surface.
 *
 *   switch_tx(desc, avail, used, regions, size, last_avail_idx, used_idx, indirect,
 *             max_readable, max_writable, budget, hdr_len, enabled, src, table, ports)
 *       Takes up to `budget` chains from a transmit ring, each given back used
 *       with length 0 (SplitQueue.drain), checks each one's virtio-net header
 *       and counts it (VirtioNetPort.process_tx), then switches the frames in
 *       order (Switch.forward, VirtioNetPort.deliver) until one Python must see.
 *   switch_frames(pending, offset, src, table, ports)
 *       Switches the frames of `pending` (the `rest` a call returned) from byte
 *       `offset` on (the `offset` it returned) the same way.
 *
 *   Both return (tx, counts, events, frame, rest, offset, ports_out, nomem):
 *     tx: (chains taken, last_avail_idx, used_idx, malformed, last_error, broken,
 *          packets, bytes, dropped) of the transmit ring (None for switch_frames);
 *     counts: (frames, forwarded, flooded, filtered, runts), Switch.counters' increments;
 *     events: 7-byte records, b'L' + MAC (learn it behind src) or b'A' + MAC
 *          (remove it: aged), in the order Switch.forward would have done them;
 *     frame: the frame Python must forward (header checked and counted; nothing
 *          else done for it), or None; rest, offset: the frames after it, to
 *          pass to switch_frames once Python forwarded it (rest None: none;
 *          switch_frames returns its own `pending` and the next offset, so a
 *          batch's frames are copied once however many are handed back);
 *     ports_out: per port, None or (no_queue, beyond, rings) with per ring
 *          (last_avail_idx, used_idx, malformed, last_error, broken, packets,
 *          bytes, dropped, dirty);
 *     nomem: an allocation failed: the batch stopped there (what was done is
 *          reported; the caller raises MemoryError).
 *
 * table: the MAC table's snapshot, 8-byte records (MAC, port index, state:
 * flags 1 due for a refresh, 2 aged) in ascending MAC order (checked, as the
 * binary search needs it); a port index past `ports` is Python's.
 * ports: Switch.ports in order, each None (Python sees every frame for it), a
 * 6-byte MAC (the responder: Python sees frames for it or broadcast, it ignores
 * the rest) or a native port (hdr_len, mrg, log, rings): log the vhost-user
 * log bitmap or None, rings its ready and enabled receive rings as (ready,
 * desc, avail, used, regions, size, last_avail_idx, used_idx, indirect,
 * max_readable, max_writable).  The buffers are held for the call only.  Bad
 * arguments are ValueError / TypeError; guest input never raises.
 */
#include "held.h"
#include "netswitch.h"

#include <stdlib.h>
#include <string.h>

#define HDR_FLAGS_NEEDS_CSUM 1u
#define GSO_NONE 0u
#define ETH_HEADER 14u

typedef struct {
    sw_switch sw;
    sw_port *ports;
    Py_ssize_t nports;
    held_t *held;        /* one per receive ring, all ports */
    size_t nheld;
    Py_buffer *logs;     /* one per port (have_log says which were taken) */
    int *have_log;
    Py_buffer table;
    int have_table;
} call_t;

static void call_free(call_t *c)
{
    size_t k = 0; /* held[k] belongs to the k-th ring, ports and rings in order */
    for (Py_ssize_t p = 0; c->ports != NULL && p < c->nports; p++)
        for (size_t r = 0; r < c->ports[p].nrxq && k < c->nheld; r++, k++)
            teardown(&c->ports[p].rxq[r].ring, &c->held[k]);
    for (Py_ssize_t p = 0; c->ports != NULL && p < c->nports; p++) {
        if (c->have_log[p])
            PyBuffer_Release(&c->logs[p]);
        PyMem_Free(c->ports[p].rxq);
    }
    if (c->have_table)
        PyBuffer_Release(&c->table);
    PyMem_Free(c->ports);
    PyMem_Free(c->held);
    PyMem_Free(c->logs);
    PyMem_Free(c->have_log);
    sw_free(&c->sw);
}

/* 0 for a virtio-net header length (10 or 12), else -1 with a ValueError. */
static int check_hdr_len(unsigned int hdr_len)
{
    if (hdr_len == 10 || hdr_len == 12)
        return 0;
    PyErr_Format(PyExc_ValueError, "a virtio-net header is 10 or 12 bytes, not %u", hdr_len);
    return -1;
}

/* One native port (hdr_len, mrg, log, rings) into c->ports[i]; its rings' held
 * buffers from c->held[*next]. */
static int get_native_port(call_t *c, Py_ssize_t i, PyObject *item, size_t *next)
{
    sw_port *p = &c->ports[i];
    unsigned int hdr_len;
    int mrg;
    PyObject *log, *rings;
    if (!PyArg_ParseTuple(item, "IpOO!;a native port is (hdr_len, mrg, log, rings)", &hdr_len,
                          &mrg, &log, &PyTuple_Type, &rings))
        return -1;
    if (check_hdr_len(hdr_len) < 0)
        return -1;
    p->kind = SW_NATIVE;
    p->hdr_len = hdr_len;
    p->mrg = mrg;
    if (log != Py_None) {
        if (PyObject_GetBuffer(log, &c->logs[i], PyBUF_WRITABLE) < 0)
            return -1;
        c->have_log[i] = 1;
        p->log.bits = c->logs[i].buf;
        p->log.pages = (uint64_t)c->logs[i].len * 8;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(rings);
    p->rxq = PyMem_Calloc(n ? (size_t)n : 1, sizeof *p->rxq);
    if (p->rxq == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t r = 0; r < n; r++) {
        sw_rxq *q = &p->rxq[r];
        walk_args w;
        held_t *h = &c->held[*next];
        (*next)++;
        p->nrxq = (size_t)r + 1; /* from here on call_free tears it down */
        c->nheld = *next;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(rings, r), "pOOOO!IIIpKK;a receive ring is "
                              "(ready, desc, avail, used, regions, size, last_avail_idx, "
                              "used_idx, indirect, max_readable, max_writable)", &q->ready,
                              &w.desc, &w.avail, &w.used, &PyTuple_Type, &w.regions, &w.size,
                              &w.last, &w.used_idx, &w.indirect, &w.max_readable,
                              &w.max_writable))
            return -1;
        if (setup_walk(&w, &q->ring, h) < 0)
            return -1;
        for (Py_ssize_t v = 0; v < h->nviews; v++) {
            if (h->regions[v].writable && h->views[v].readonly) {
                PyErr_SetString(PyExc_ValueError, "a writable region's view is read-only");
                return -1;
            }
        }
    }
    return 0;
}

/* src, table and ports into c. */
static int get_switch(call_t *c, Py_ssize_t src, PyObject *table, PyObject *ports)
{
    memset(c, 0, sizeof *c);
    if (PyObject_GetBuffer(table, &c->table, PyBUF_SIMPLE) < 0)
        return -1;
    c->have_table = 1;
    const unsigned char *rec = c->table.buf;
    int bad = c->table.len % SW_RECORD != 0;
    for (Py_ssize_t k = 0; !bad && k < c->table.len; k += SW_RECORD) /* the lookup's needs */
        bad = (rec[k + 7] & ~(SW_REFRESH | SW_AGED)) != 0
            || (k > 0 && memcmp(rec + k - SW_RECORD, rec + k, 6) >= 0);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "the MAC table is 8-byte records (MAC, port, state "
                        "flags) in ascending MAC order");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(ports);
    if (src < 0 || src >= n) {
        PyErr_SetString(PyExc_ValueError, "the source port is not one of the ports");
        return -1;
    }
    size_t rings = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(ports, i);
        if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 4
                && PyTuple_Check(PyTuple_GET_ITEM(item, 3)))
            rings += (size_t)PyTuple_GET_SIZE(PyTuple_GET_ITEM(item, 3));
    }
    c->ports = PyMem_Calloc(n ? (size_t)n : 1, sizeof *c->ports);
    c->logs = PyMem_Calloc(n ? (size_t)n : 1, sizeof *c->logs);
    c->have_log = PyMem_Calloc(n ? (size_t)n : 1, sizeof *c->have_log);
    c->held = PyMem_Calloc(rings ? rings : 1, sizeof *c->held);
    if (c->ports == NULL || c->logs == NULL || c->have_log == NULL || c->held == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    c->nports = n;
    size_t next = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(ports, i);
        sw_port *p = &c->ports[i];
        if (item == Py_None) {
            p->kind = SW_PYTHON;
        } else if (PyBytes_Check(item) && PyBytes_GET_SIZE(item) == 6) {
            p->kind = SW_FILTER;
            memcpy(p->mac, PyBytes_AS_STRING(item), 6);
        } else if (PyTuple_Check(item)) {
            if (get_native_port(c, i, item, &next) < 0)
                return -1;
        } else {
            PyErr_SetString(PyExc_TypeError, "a port is None, a 6-byte MAC or a native port");
            return -1;
        }
    }
    c->sw.table = c->table.buf;
    c->sw.entries = (size_t)c->table.len / SW_RECORD;
    c->sw.ports = c->ports;
    c->sw.nports = (size_t)n;
    c->sw.src = (size_t)src;
    return 0;
}
/* Whether a is in a receive ring's memory (the guard's callback, in a signal handler). */
static int covers_rings(const void *ctx, uintptr_t a)
{
    const call_t *c = ctx;
    for (size_t k = 0; k < c->nheld; k++) {
        const held_t *h = &c->held[k];
        for (Py_ssize_t i = 0; i < h->nviews && h->regions != NULL; i++) {
            uintptr_t base = (uintptr_t)h->regions[i].host;
            if (a >= base && a - base < h->regions[i].size)
                return 1;
        }
    }
    return 0;
}

/* A frame to switch: its offset and length in the batch's buffer. */
typedef struct {
    size_t off, len;
} span_t;

static int grow_bytes(unsigned char **buf, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : 4096;
    while (n < need) {
        if (n > SIZE_MAX / 2)
            return -1;
        n *= 2;
    }
    fp_guard_disown(*buf);
    unsigned char *p = realloc(*buf, n);
    if (p == NULL) {
        fp_guard_own(*buf);
        return -1;
    }
    fp_guard_own(p); /* freed by the guard when the call faults (guard.h) */
    *buf = p;
    *cap = n;
    return 0;
}

static int grow_spans(span_t **spans, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? 2 * *cap : 64;
    fp_guard_disown(*spans);
    span_t *p = realloc(*spans, n * sizeof *p);
    if (p == NULL) {
        fp_guard_own(*spans);
        return -1;
    }
    fp_guard_own(p);
    *spans = p;
    *cap = n;
    return 0;
}

/* The frames after index `from` as switch_frames takes them: u32 length, bytes. */
static PyObject *rest_of(const unsigned char *buf, const span_t *frames, size_t from, size_t n)
{
    if (from >= n)
        Py_RETURN_NONE;
    size_t total = 0;
    for (size_t i = from; i < n; i++)
        total += 4 + frames[i].len;
    PyObject *rest = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (rest == NULL)
        return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(rest);
    for (size_t i = from; i < n; i++) {
        uint32_t len = (uint32_t)frames[i].len;
        memcpy(out, &len, 4);
        memcpy(out + 4, buf + frames[i].off, frames[i].len);
        out += 4 + frames[i].len;
    }
    return rest;
}

static PyObject *ring_out(const sw_rxq *q)
{
    const fp_ring *r = &q->ring;
    return Py_BuildValue("(IIKzzKKKO)", (unsigned)r->last_avail_idx, (unsigned)r->used_idx,
                         (unsigned long long)(r->malformed + q->faults),
                         r->has_error ? r->last_error : NULL, r->broken[0] ? r->broken : NULL,
                         (unsigned long long)q->packets, (unsigned long long)q->bytes,
                         (unsigned long long)q->dropped, q->dirty ? Py_True : Py_False);
}

static PyObject *ports_out(const call_t *c)
{
    PyObject *out = PyTuple_New(c->nports);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < c->nports; i++) {
        const sw_port *p = &c->ports[i];
        PyObject *item;
        if (p->kind != SW_NATIVE) {
            item = Py_NewRef(Py_None);
        } else {
            PyObject *rings = PyTuple_New((Py_ssize_t)p->nrxq);
            if (rings == NULL) {
                Py_DECREF(out);
                return NULL;
            }
            for (size_t r = 0; r < p->nrxq; r++) {
                PyObject *one = ring_out(&p->rxq[r]);
                if (one == NULL) {
                    Py_DECREF(rings);
                    Py_DECREF(out);
                    return NULL;
                }
                PyTuple_SET_ITEM(rings, (Py_ssize_t)r, one);
            }
            item = Py_BuildValue("(KKN)", (unsigned long long)p->no_queue,
                                 (unsigned long long)p->log.beyond, rings);
        }
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, item);
    }
    return out;
}

/* Switch frames[0..n) of buf; build the result (tx: the transmit ring's part, or None).
 * pending: the object buf is (switch_frames), NULL when the frames are the call's own. */
static PyObject *switch_all(call_t *c, const unsigned char *buf, const span_t *frames, size_t n,
                            PyObject *tx, int nomem, PyObject *pending)
{
    size_t i = 0;
    int state = SW_DONE;
    for (; i < n && !nomem; i++) {
        state = sw_forward(&c->sw, buf + frames[i].off, frames[i].len);
        if (state == SW_NOMEM)
            nomem = 1;
        else if (state == SW_TO_PYTHON)
            break;
    }
    PyObject *frame = NULL, *rest = NULL, *out = NULL;
    size_t offset = 0;
    if (state == SW_TO_PYTHON) {
        frame = PyBytes_FromStringAndSize((const char *)buf + frames[i].off,
                                          (Py_ssize_t)frames[i].len);
        if (frame != NULL && pending != NULL && i + 1 < n) {
            rest = Py_NewRef(pending);
            offset = frames[i + 1].off - 4; /* its record's length field */
        } else if (frame != NULL) {
            rest = rest_of(buf, frames, i + 1, n);
        }
    } else {
        frame = Py_NewRef(Py_None);
        rest = Py_NewRef(Py_None);
    }
    PyObject *ports = frame == NULL || rest == NULL ? NULL : ports_out(c);
    if (ports != NULL) {
        const sw_switch *s = &c->sw;
        out = Py_BuildValue("(O(KKKKK)y#OOnNO)", tx, (unsigned long long)s->frames,
                            (unsigned long long)s->forwarded, (unsigned long long)s->flooded,
                            (unsigned long long)s->filtered, (unsigned long long)s->runts,
                            s->events ? (const char *)s->events : "",
                            (Py_ssize_t)(7 * s->nevents), frame, rest, (Py_ssize_t)offset, ports,
                            nomem ? Py_True : Py_False);
    }
    Py_XDECREF(frame);
    Py_XDECREF(rest);
    return out;
}

/* After a guarded fault this function reads none of the locals it changed since
 * FP_GUARD_SET but tx (volatile): buf, frames and result are set again first, the
 * counters are not read (GCC cannot see that). */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wclobbered"
PyObject *fp_switch_tx_py(PyObject *self, PyObject *args)
{
    (void)self;
    fp_ring ring;
    held_t h = {0};
    walk_args w;
    Py_ssize_t budget, src;
    unsigned int hdr_len;
    int enabled;
    PyObject *table, *ports, *result = NULL;
    PyObject *volatile tx = NULL; /* read after a fault's jump */
    call_t c;
    unsigned char *buf = NULL;
    span_t *frames = NULL;
    size_t cap_buf = 0, used_buf = 0, nframes = 0, cap_frames = 0;
    memset(&ring, 0, sizeof ring);
    memset(&c, 0, sizeof c);
    if (!PyArg_ParseTuple(args, "OOOO!IIIpKKnIpnOO!", &w.desc, &w.avail, &w.used, &PyTuple_Type,
                          &w.regions, &w.size, &w.last, &w.used_idx, &w.indirect,
                          &w.max_readable, &w.max_writable, &budget, &hdr_len, &enabled, &src,
                          &table, &PyTuple_Type, &ports))
        return NULL;
    if (check_hdr_len(hdr_len) < 0 || setup_walk(&w, &ring, &h) < 0
            || get_switch(&c, src, table, ports) < 0)
        goto out;
    fp_guard g = {0};
    fp_guard_cover(&g, ring.regions, ring.nregions);
    g.covers = covers_rings;
    g.ctx = &c;
    if (FP_GUARD_SET(&g)) { /* buf and frames were the guard's: it freed them */
        fp_guard_leave(&g);
        buf = NULL;
        frames = NULL;
        result = NULL;
        vanished(&g);
        goto out;
    }
    fp_guard_enter(&g);
    uint64_t packets = 0, bytes = 0, dropped = 0, short_hdr = 0;
    Py_ssize_t taken = 0;
    int nomem = 0, state = FP_EMPTY;
    for (; taken < budget; taken++) { /* SplitQueue.drain, then the header checks */
        fp_chain ch;
        state = fp_next(&ring, &ch);
        if (state != FP_CHAIN)
            break;
        fp_push(&ring, ch.head, 0);
        uint64_t len = ch.readable + ch.writable;
        if (len > SIZE_MAX - used_buf || grow_bytes(&buf, &cap_buf, used_buf + (size_t)len) < 0
                || grow_spans(&frames, &cap_frames, nframes + 1) < 0) {
            nomem = 1;
            taken++;
            break;
        }
        if (fp_gather(&ring, &ch, buf + used_buf) != 0) {
            ring.malformed++; /* as SplitQueue.drain: a read that fails counts */
            continue;
        }
        if (len < hdr_len) {
            short_hdr++;
            continue;
        }
        const unsigned char *data = buf + used_buf;
        uint64_t size = len - hdr_len;
        packets++;
        bytes += size;
        if (!enabled || data[1] != GSO_NONE || (data[0] & HDR_FLAGS_NEEDS_CSUM)
                || size < ETH_HEADER) {
            dropped++;
            continue;
        }
        frames[nframes++] = (span_t){used_buf + hdr_len, (size_t)size};
        used_buf += (size_t)len;
    }
    tx = Py_BuildValue("(nIIKzzKKK)", taken, (unsigned)ring.last_avail_idx, (unsigned)ring.used_idx,
                       (unsigned long long)(ring.malformed + short_hdr),
                       ring.has_error ? ring.last_error : NULL,
                       state == FP_BROKEN ? ring.broken : NULL, (unsigned long long)packets,
                       (unsigned long long)bytes, (unsigned long long)dropped);
    if (tx != NULL)
        result = switch_all(&c, buf, frames, nframes, tx, nomem, NULL);
    fp_guard_leave(&g);
out:
    Py_XDECREF(tx);
    free(buf);
    free(frames);
    call_free(&c);
    teardown(&ring, &h);
    return result;
}

#pragma GCC diagnostic pop

PyObject *fp_switch_frames_py(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *pending, *table, *ports, *result = NULL;
    Py_ssize_t offset, src;
    call_t c;
    span_t *frames = NULL;
    size_t nframes = 0, cap_frames = 0;
    memset(&c, 0, sizeof c);
    if (!PyArg_ParseTuple(args, "O!nnOO!", &PyBytes_Type, &pending, &offset, &src, &table,
                          &PyTuple_Type, &ports))
        return NULL;
    if (get_switch(&c, src, table, ports) < 0)
        goto out;
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(pending);
    size_t total = (size_t)PyBytes_GET_SIZE(pending);
    if (offset < 0 || (size_t)offset > total) {
        PyErr_SetString(PyExc_ValueError, "the offset is outside the pending frames");
        goto out;
    }
    for (size_t off = (size_t)offset; off < total;) {
        uint32_t len;
        if (total - off < 4 || (memcpy(&len, buf + off, 4), total - off - 4 < len)) {
            PyErr_SetString(PyExc_ValueError, "pending frames are (u32 length, bytes) records");
            goto out;
        }
        if (grow_spans(&frames, &cap_frames, nframes + 1) < 0) {
            PyErr_NoMemory();
            goto out;
        }
        frames[nframes++] = (span_t){off + 4, len};
        off += 4 + (size_t)len;
    }
    fp_guard g = {0};
    g.covers = covers_rings;
    g.ctx = &c;
    if (FP_GUARD_SET(&g)) {
        fp_guard_leave(&g);
        result = NULL;
        vanished(&g);
        goto out;
    }
    fp_guard_enter(&g);
    result = switch_all(&c, buf, frames, nframes, Py_None, 0, pending);
    fp_guard_leave(&g);
out:
    free(frames);
    call_free(&c);
    return result;
}
