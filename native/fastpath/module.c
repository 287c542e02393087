/* appliance._fastpath: the native fast path's Python surface.
 *
 *   pop_chains(desc, avail, used, regions, size, last_avail_idx, used_idx, indirect,
 *              max_readable, max_writable, budget)
 *       -> (chains, last_avail_idx, used_idx, malformed, last_error, broken)
 *       up to `budget` well-formed chains as (head, [(addr, len, writable)...],
 *       readable, writable): SplitQueue.pop, `budget` times.
 *   drain(... the same arguments ...)
 *       -> (frames, last_avail_idx, used_idx, malformed, last_error, broken)
 *       up to `budget` chains, each given back used with length 0 and returned as
 *       the bytes of its buffers: SplitQueue.drain.
 *   publish(avail, used, size, published, used_idx, event_idx) -> bool
 *       SplitQueue.publish once something was pushed.
 *   receive(desc, avail, used, regions, size, last_avail_idx, used_idx, indirect,
 *           max_readable, max_writable, frame, hdr_len, mrg, log)
 *       -> (outcome, last_avail_idx, used_idx, malformed, last_error, broken, beyond)
 *       one frame into a receive ring (receive.write_frame): outcome is a
 *       receive.Outcome value, log the vhost-user log bitmap (writable) or None,
 *       beyond the marks that reached past it.  Writable regions must be
 *       writable buffers.
 *
 * desc, avail and used are the ring areas (bytes-like, used writable); regions
 * is ClientMemory's regions in address order as (guest address, bytes-like
 * view, readable, writable).  The buffers are held for the call only.
 * last_error / broken are None when nothing was refused / the ring is fine.
 * A bad argument (a short ring area, a size that is not a power of two) is a
 * ValueError or TypeError: the caller's mistake, not the guest's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "guard.h"
#include "held.h"
#include "netrx.h"
#include "vring.h"

#define MAX_QUEUE_SIZE 32768u

void release(held_t *h)
{
    for (Py_ssize_t i = 0; i < h->nviews; i++)
        PyBuffer_Release(&h->views[i]);
    if (h->have_desc)
        PyBuffer_Release(&h->desc);
    if (h->have_avail)
        PyBuffer_Release(&h->avail);
    if (h->have_used)
        PyBuffer_Release(&h->used);
    PyMem_Free(h->views);
    PyMem_Free(h->regions);
}

static int get_area(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t need,
                    const char *name, int *have)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    *have = 1;
    if (view->len < need) {
        PyErr_Format(PyExc_ValueError, "%s area of %zd bytes is too small for the queue (%zd)",
                     name, view->len, need);
        return -1;
    }
    return 0;
}

/* The regions tuple into h->regions (sorted and disjoint, as ClientMemory keeps them). */
int get_regions(PyObject *seq, held_t *h)
{
    if (!PyTuple_Check(seq)) {
        PyErr_SetString(PyExc_TypeError, "regions must be a tuple");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    h->views = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
    h->regions = PyMem_Calloc(n ? (size_t)n : 1, sizeof(fp_region));
    if (h->views == NULL || h->regions == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long start;
        int readable, writable;
        PyObject *item = PyTuple_GET_ITEM(seq, i);
        if (!PyTuple_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "a region is (address, view, readable, writable)");
            return -1;
        }
        if (!PyArg_ParseTuple(item, "Ky*pp;a region is (address, view, readable, writable)",
                              &start, &h->views[i], &readable, &writable))
            return -1;
        h->nviews = i + 1;
        uint64_t size = (uint64_t)h->views[i].len;
        const fp_region *prev = i ? &h->regions[i - 1] : NULL;
        if (size == 0 || (start != 0 && size - 1 > UINT64_MAX - start)
                || (prev != NULL && (start < prev->start || start - prev->start < prev->size))) {
            PyErr_SetString(PyExc_ValueError, "regions must be non-empty, in address order, "
                            "disjoint and below 2^64");
            return -1;
        }
        h->regions[i] = (fp_region){start, size, h->views[i].buf, readable, writable};
    }
    return 0;
}

int setup_walk(const walk_args *w, fp_ring *ring, held_t *h)
{
    unsigned int size = w->size;
    if (size == 0 || size > MAX_QUEUE_SIZE || (size & (size - 1))) {
        PyErr_Format(PyExc_ValueError, "queue size %u is not a power of two in 1..%u", size,
                     MAX_QUEUE_SIZE);
        return -1;
    }
    if (w->last > 0xFFFF || w->used_idx > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "ring indices are 16 bits");
        return -1;
    }
    if (get_area(w->desc, &h->desc, 0, 16 * (Py_ssize_t)size, "descriptor", &h->have_desc) < 0
            || get_area(w->avail, &h->avail, 0, 6 + 2 * (Py_ssize_t)size, "avail",
                        &h->have_avail) < 0
            || get_area(w->used, &h->used, 1, 6 + 8 * (Py_ssize_t)size, "used", &h->have_used) < 0
            || get_regions(w->regions, h) < 0)
        return -1;
    ring->desc = h->desc.buf;
    ring->avail = h->avail.buf;
    ring->used = h->used.buf;
    ring->size = size;
    ring->indirect = w->indirect;
    ring->max_readable = w->max_readable;
    ring->max_writable = w->max_writable;
    ring->regions = h->regions;
    ring->nregions = (size_t)h->nviews;
    ring->last_avail_idx = (uint16_t)w->last;
    ring->used_idx = (uint16_t)w->used_idx;
    /* at most size - 1 descriptors before an indirect one, then at most size in its table */
    ring->segs = PyMem_Malloc(2 * (size_t)size * sizeof(fp_seg));
    ring->table = PyMem_Malloc(16 * (size_t)size);
    if (ring->segs == NULL || ring->table == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Parse the walk's arguments (and the budget) into ring and h. */
static int setup(PyObject *args, fp_ring *ring, held_t *h, Py_ssize_t *budget)
{
    walk_args w;
    memset(ring, 0, sizeof *ring);
    if (!PyArg_ParseTuple(args, "OOOO!IIIpKKn", &w.desc, &w.avail, &w.used, &PyTuple_Type,
                          &w.regions, &w.size, &w.last, &w.used_idx, &w.indirect,
                          &w.max_readable, &w.max_writable, budget))
        return -1;
    return setup_walk(&w, ring, h);
}

void teardown(fp_ring *ring, held_t *h)
{
    PyMem_Free(ring->segs);
    PyMem_Free(ring->table);
    release(h);
}

/* A guarded call faulted: OSError(EFAULT); the caller discards what it did. */
void vanished(const fp_guard *g)
{
    char msg[96];
    snprintf(msg, sizeof msg, "client memory vanished under a native call (SIGBUS at %p)",
             (void *)g->fault_addr);
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", EFAULT, msg);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
}

static PyObject *chain_tuple(const fp_ring *ring, const fp_chain *c)
{
    PyObject *segs = PyList_New((Py_ssize_t)c->n);
    if (segs == NULL)
        return NULL;
    for (size_t i = 0; i < c->n; i++) {
        const fp_seg *s = &ring->segs[i];
        PyObject *seg = Py_BuildValue("(KkO)", (unsigned long long)s->addr, (unsigned long)s->len,
                                      s->write ? Py_True : Py_False);
        if (seg == NULL) {
            Py_DECREF(segs);
            return NULL;
        }
        PyList_SET_ITEM(segs, (Py_ssize_t)i, seg);
    }
    return Py_BuildValue("(INKK)", (unsigned)c->head, segs, (unsigned long long)c->readable,
                         (unsigned long long)c->writable);
}

/* The bytes of chain c (*pending holds them while guest memory is read). */
static PyObject *gathered(fp_ring *ring, const fp_chain *c, PyObject *volatile *pending)
{
    PyObject *data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(c->readable + c->writable));
    if (data == NULL)
        return NULL;
    *pending = data;
    int failed = fp_gather(ring, c, (unsigned char *)PyBytes_AS_STRING(data)) != 0;
    *pending = NULL;
    if (failed) {
        Py_DECREF(data);
        ring->malformed++; /* as SplitQueue.drain: a read that fails counts, no message */
        Py_RETURN_NONE;
    }
    return data;
}

/* The common loop of pop_chains (gather 0) and drain (gather 1).  On an error
 * nothing is returned: the caller's indices stay, so the chains are walked again
 * (the used elements written meanwhile were not published). */
static PyObject *run(PyObject *args, int gather)
{
    fp_ring ring;
    held_t h = {0};
    Py_ssize_t budget;
    PyObject *items = NULL;
    PyObject *volatile result = NULL, *volatile pending = NULL; /* volatile: read after a fault's jump */
    if (setup(args, &ring, &h, &budget) < 0)
        goto out;
    items = PyList_New(0);
    if (items == NULL)
        goto out;
    fp_guard g = {0};
    fp_guard_cover(&g, ring.regions, ring.nregions);
    if (FP_GUARD_SET(&g)) {
        fp_guard_leave(&g);
        Py_XDECREF(pending); /* the bytes a faulting gather was filling */
        vanished(&g);
        goto out;
    }
    fp_guard_enter(&g);
    int state = FP_EMPTY;
    for (Py_ssize_t i = 0; i < budget; i++) {
        fp_chain c;
        state = fp_next(&ring, &c);
        if (state != FP_CHAIN)
            break;
        PyObject *item;
        if (gather) {
            fp_push(&ring, c.head, 0);
            item = gathered(&ring, &c, &pending);
        } else {
            item = chain_tuple(&ring, &c);
        }
        if (item == NULL) {
            fp_guard_leave(&g);
            goto out;
        }
        int failed = item != Py_None && PyList_Append(items, item) < 0;
        Py_DECREF(item);
        if (failed) {
            fp_guard_leave(&g);
            goto out;
        }
    }
    fp_guard_leave(&g);
    result = Py_BuildValue("(OIIKzz)", items, (unsigned)ring.last_avail_idx,
                           (unsigned)ring.used_idx, (unsigned long long)ring.malformed,
                           ring.has_error ? ring.last_error : NULL,
                           state == FP_BROKEN ? ring.broken : NULL);
out:
    Py_XDECREF(items);
    teardown(&ring, &h);
    return result;
}

static PyObject *pop_chains(PyObject *self, PyObject *args)
{
    (void)self;
    return run(args, 0);
}

static PyObject *drain(PyObject *self, PyObject *args)
{
    (void)self;
    return run(args, 1);
}

static PyObject *publish(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *avail, *used;
    unsigned int size, published, used_idx;
    int event_idx;
    held_t h = {0};
    fp_ring ring;
    memset(&ring, 0, sizeof ring);
    if (!PyArg_ParseTuple(args, "OOIIIp", &avail, &used, &size, &published, &used_idx, &event_idx))
        return NULL;
    if (size == 0 || size > MAX_QUEUE_SIZE || (size & (size - 1)) || published > 0xFFFF
            || used_idx > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "bad queue size or index");
        return NULL;
    }
    if (get_area(avail, &h.avail, 0, 6 + 2 * (Py_ssize_t)size, "avail", &h.have_avail) < 0
            || get_area(used, &h.used, 1, 6 + 8 * (Py_ssize_t)size, "used", &h.have_used) < 0) {
        release(&h);
        return NULL;
    }
    ring.avail = h.avail.buf;
    ring.used = h.used.buf;
    ring.size = size;
    ring.used_idx = (uint16_t)used_idx;
    fp_region areas[2] = {{0, (uint64_t)h.avail.len, h.avail.buf, 1, 0},
                          {0, (uint64_t)h.used.len, h.used.buf, 1, 1}};
    fp_guard g = {0};
    fp_guard_cover(&g, areas, 2);
    if (FP_GUARD_SET(&g)) {
        fp_guard_leave(&g);
        release(&h);
        vanished(&g);
        return NULL;
    }
    fp_guard_enter(&g);
    int wants = fp_publish(&ring, (uint16_t)published, event_idx);
    fp_guard_leave(&g);
    release(&h);
    return PyBool_FromLong(wants);
}

static PyObject *receive(PyObject *self, PyObject *args)
{
    (void)self;
    fp_ring ring;
    held_t h = {0};
    walk_args w;
    Py_buffer frame, bits;
    unsigned int hdr_len;
    int mrg;
    PyObject *log_obj;
    PyObject *volatile result = NULL; /* volatile: read after a fault's jump */
    fp_log log = {NULL, 0, 0};
    memset(&ring, 0, sizeof ring);
    memset(&bits, 0, sizeof bits);
    if (!PyArg_ParseTuple(args, "OOOO!IIIpKKy*IpO", &w.desc, &w.avail, &w.used, &PyTuple_Type,
                          &w.regions, &w.size, &w.last, &w.used_idx, &w.indirect, &w.max_readable,
                          &w.max_writable, &frame, &hdr_len, &mrg, &log_obj))
        return NULL;
    int have_bits = 0;
    if (hdr_len != 10 && hdr_len != 12) {
        PyErr_Format(PyExc_ValueError, "a virtio-net header is 10 or 12 bytes, not %u", hdr_len);
        goto out;
    }
    if (log_obj != Py_None) {
        if (PyObject_GetBuffer(log_obj, &bits, PyBUF_WRITABLE) < 0)
            goto out;
        have_bits = 1;
        log.bits = bits.buf;
        log.pages = (uint64_t)bits.len * 8;
    }
    if (setup_walk(&w, &ring, &h) < 0)
        goto out;
    for (Py_ssize_t i = 0; i < h.nviews; i++) {
        if (h.regions[i].writable && h.views[i].readonly) {
            PyErr_SetString(PyExc_ValueError, "a writable region's view is read-only");
            goto out;
        }
    }
    fp_guard g = {0};
    fp_guard_cover(&g, ring.regions, ring.nregions);
    if (FP_GUARD_SET(&g)) {
        fp_guard_leave(&g);
        vanished(&g);
        goto out;
    }
    fp_guard_enter(&g);
    int outcome = fp_receive(&ring, frame.buf, (size_t)frame.len, hdr_len, mrg, &log);
    fp_guard_leave(&g);
    if (outcome == FP_RX_NOMEM) {
        PyErr_NoMemory();
        goto out;
    }
    result = Py_BuildValue("(iIIKzzK)", outcome, (unsigned)ring.last_avail_idx,
                           (unsigned)ring.used_idx, (unsigned long long)ring.malformed,
                           ring.has_error ? ring.last_error : NULL,
                           ring.broken[0] ? ring.broken : NULL,
                           (unsigned long long)log.beyond);
out:
    PyBuffer_Release(&frame);
    if (have_bits)
        PyBuffer_Release(&bits);
    teardown(&ring, &h);
    return result;
}

static PyObject *guard_sigbus(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(fp_guard_install() == 0 && fp_guard_ready());
}

static PyMethodDef methods[] = {
    {"guard_sigbus", guard_sigbus, METH_NOARGS, "Put the SIGBUS guard on top of the current "
     "handler unless it is there; True when it is: only then may the calls be given memory a "
     "peer can shrink (guard.h)."},
    {"pop_chains", pop_chains, METH_VARARGS, "Up to budget well-formed chains (SplitQueue.pop)."},
    {"drain", drain, METH_VARARGS, "Up to budget chains used with length 0, as their bytes."},
    {"receive", receive, METH_VARARGS, "One frame into a receive ring (receive.write_frame)."},
    {"publish", publish, METH_VARARGS, "Publish the used index; True when the driver wants an "
     "interrupt."},
    {"switch_tx", fp_switch_tx_py, METH_VARARGS, "A transmit batch through the switch into "
     "receive rings (see switch_module.c)."},
    {"switch_frames", fp_switch_frames_py, METH_VARARGS, "The rest of a batch switch_tx handed "
     "back (see switch_module.c)."},
    {"nvme_run", fp_nvme_run_py, METH_VARARGS, "Run the Read and Write commands of one I/O "
     "submission queue until one Python must run (see nvme_module.c)."},
    {"nvme_poll", fp_nvme_poll_py, METH_VARARGS, "One pass of the doorbell-page poller: the "
     "I/O queues whose doorbells moved, run and signalled (see nvme_poll.c)."},
    {"nvme_loadgen", fp_nvme_loadgen_py, METH_VARARGS, "Benchmarks only: keep reads or writes "
     "in flight on a queue pair the Python driver created (see nvme_loadgen.c)."},
    {NULL, NULL, 0, NULL},
};

static void unload(void *mod)
{
    (void)mod;
    fp_guard_uninstall(); /* the SIGBUS handler before ours, when ours is still installed */
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "appliance._fastpath",
    "The native fast path: the split virtqueue walker, a receive ring's frame writes "
    "and the NVMe I/O queue path (appliance/fastpath.py decides whether they run).",
    -1, methods, NULL, NULL, NULL, unload,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (fp_guard_install() != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyModule_Create(&module);
}
