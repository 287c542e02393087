/* appliance._fastpath.nvme_poll: one loop pass of the doorbell-page poller
 * (appliance/storage/native_poll.py builds its plan and is its reference).
 *
 *   nvme_poll(page, seen, plan) -> None | False | (python, reads, writes,
 *                                   bytes_read, bytes_written, interrupts, image)
 *
 * page: the mmap'd doorbell page; seen: the bytearray of what was latched
 * (DoorbellPage.seen); plan: (shadowed, guards, queues, sqs, cqs, regions, namespaces,
 * mdts, nowait, write_cache, budget) with guards (ctrl, memory, generation)
 * and queues a tuple of (qid, sq, cq, irqfd) for the I/O
 * SQs it may run (irqfd: the CQ's MSI-X eventfd, -1: Python signals, -2: no
 * interrupt, IEN off); shadowed: every queue has shadow doorbells (Doorbell Buffer
 * Config): its SQ tail comes from the shadow buffer, read at every call, the
 * EventIdx is published as _drain does, and a ring in the page only wakes us
 * (its value is ignored, as Python ignores it).  Python's SubmissionQueue /
 * CompletionQueue (and Shadow) objects stay
 * the owners of the queue state: it is read from their attributes at each call
 * and written back before the call returns; nothing of it is kept here.
 *
 * None: nothing to do (the page as seen: one memcmp, nothing else looked at;
 * what Python has pending it runs itself, see NvmeController.poll).  False: the
 * plan no longer holds (a guard failed, a buffer gone): nothing was changed.
 * A tuple: what ran here (image: [(nsid, byte offset, length)] per write, for
 * the namespaces' change hooks); python True when a Python pass must follow (a
 * doorbell C does not take or whose value Python refuses -- nothing of the
 * page consumed then --, an entry handed back, work left, an interrupt owed).
 */
#include "held.h"
#include "nvmeq.h"

#include <string.h>
#include <unistd.h>

static PyObject *attr(PyObject *obj, const char *name)
{
    return PyObject_GetAttrString(obj, name); /* new reference or NULL */
}

/* obj.name as an unsigned value below limit; -1 (with an error) otherwise. */
static long long uattr(PyObject *obj, const char *name, unsigned long long limit)
{
    PyObject *v = attr(obj, name);
    if (v == NULL)
        return -1;
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (PyErr_Occurred())
        return -1;
    if (x >= limit) {
        PyErr_SetString(PyExc_ValueError, "queue state out of range");
        return -1;
    }
    return (long long)x;
}

static int set_uattr(PyObject *obj, const char *name, unsigned long long x)
{
    PyObject *v = PyLong_FromUnsignedLongLong(x);
    if (v == NULL)
        return -1;
    int r = PyObject_SetAttrString(obj, name, v);
    Py_DECREF(v);
    return r;
}

/* 1 when obj.name is None, 0 when not, -1 on error. */
static int attr_is_none(PyObject *obj, const char *name)
{
    PyObject *v = attr(obj, name);
    if (v == NULL)
        return -1;
    int none = v == Py_None;
    Py_DECREF(v);
    return none;
}

/* 1 when len(obj.name) == 0 (or it is None), 0 when not, -1 on error. */
static int attr_empty(PyObject *obj, const char *name)
{
    PyObject *v = attr(obj, name);
    if (v == NULL)
        return -1;
    Py_ssize_t n = v == Py_None ? 0 : PyObject_Size(v);
    Py_DECREF(v);
    return n < 0 ? -1 : n == 0;
}

/* The guards: 1 the plan holds, 0 it does not, -1 error. */
static int guards_hold(PyObject *guards)
{
    PyObject *ctrl, *memory, *generation;
    if (!PyArg_ParseTuple(guards, "OOO;guards", &ctrl, &memory, &generation))
        return -1;
    PyObject *v = attr(ctrl, "paused");
    if (v == NULL)
        return -1;
    int ok = v == Py_False;
    Py_DECREF(v);
    if (!ok)
        return 0;
    if ((ok = attr_empty(ctrl, "held")) <= 0 || (ok = attr_empty(ctrl, "waiting")) <= 0)
        return ok;
    if ((v = attr(ctrl, "memory")) == NULL)
        return -1;
    ok = v == memory;
    Py_DECREF(v);
    if (!ok || (ok = attr_is_none(memory, "dirty_log")) <= 0)
        return ok;
    if ((v = attr(memory, "writes_in_flight")) == NULL) /* (their interrupts wait) */
        return -1;
    ok = PyObject_Not(v);
    Py_DECREF(v);
    if (ok <= 0)
        return ok;
    if ((v = attr(memory, "generation")) == NULL)
        return -1;
    ok = PyObject_RichCompareBool(v, generation, Py_EQ);
    Py_DECREF(v);
    if (ok <= 0)
        return ok;
    if ((v = attr(ctrl, "faults")) == NULL)
        return -1;
    if (v != Py_None) {
        ok = attr_empty(v, "rules");
        Py_DECREF(v);
        if (ok <= 0)
            return ok;
    } else {
        Py_DECREF(v);
    }
    return 1;
}

#define POLL_SLOTS 1024u /* the doorbell page's dwords */
#define NO_QUEUE 0xFFFFu

typedef struct {
    PyObject *sq, *cq;     /* borrowed from the plan */
    int irqfd;
    uint32_t cq_slot;
} poll_queue;

/* The doorbells that moved: each into its queue's Python state (checked as
 * set_tail / set_head check them).  1 all taken (seen updated), 0 one C does
 * not take or Python refuses (nothing taken), -1 error. */
static int take_doorbells(const uint32_t *page, unsigned char *seen, const uint16_t *owner,
                          const poll_queue *qs, int shadowed, int *moved)
{
    uint32_t slots[2 * 256 + 2], values[2 * 256 + 2];
    size_t n = 0;
    *moved = 0;
    for (uint32_t s = 0; s < POLL_SLOTS; s++) {
        uint32_t old;
        memcpy(&old, seen + 4 * s, 4);
        uint32_t now = __atomic_load_n(&page[s], __ATOMIC_ACQUIRE);
        if (now == old)
            continue;
        if (owner[s] == NO_QUEUE || n == sizeof slots / sizeof slots[0])
            return 0; /* the admin queue, a queue C does not run, an invalid register */
        const poll_queue *q = &qs[owner[s]];
        if (shadowed) { /* the values come from the shadow buffer: a ring only wakes us */
        } else if (s % 2 == 0) { /* SQ tail */
            long long size = uattr(q->sq, "size", 65537);
            if (size < 0)
                return -1;
            if (now >= (uint64_t)size)
                return 0;
        } else { /* CQ head: not past the tail */
            long long size = uattr(q->cq, "size", 65537), head, tail;
            if (size < 0 || (head = uattr(q->cq, "head", 65536)) < 0
                    || (tail = uattr(q->cq, "tail", 65536)) < 0)
                return -1;
            if (now >= (uint64_t)size
                    || ((uint64_t)now + (uint64_t)(size - head)) % (uint64_t)size
                       > (uint64_t)((tail + size - head) % size))
                return 0;
        }
        slots[n] = s;
        values[n++] = now;
    }
    for (size_t i = 0; i < n; i++) {
        const poll_queue *q = &qs[owner[slots[i]]];
        if (!shadowed && set_uattr(slots[i] % 2 ? q->cq : q->sq, slots[i] % 2 ? "head" : "tail",
                                   values[i]) < 0)
            return -1;
        memcpy(seen + 4 * slots[i], &values[i], 4);
    }
    *moved = n > 0;
    return 1;
}

/* The image ranges the last batch wrote, for the change hooks: 0, or -1 error. */
static int image_marks(const fp_nvmeq *t, PyObject *image)
{
    for (size_t i = 0; i < t->nmarks; i++) {
        const fp_mark *m = &t->marks[i];
        if (m->nsid == 0)
            continue;
        PyObject *item = Py_BuildValue("(IKK)", (unsigned)m->nsid, (unsigned long long)m->offset,
                                       (unsigned long long)m->length);
        if (item == NULL || PyList_Append(image, item) < 0) {
            Py_XDECREF(item);
            return -1;
        }
        Py_DECREF(item);
    }
    return 0;
}

/* A shadowed SQ's tail from its shadow doorbell (SubmissionQueue.sync): 1 taken
 * or unchanged (*tail updated), 0 Python's (unreachable, or a value Python
 * refuses and has not reported yet), -1 error. */
static int shadow_tail(const fp_nvmeq *t, PyObject *sq, PyObject *shadow, long long size,
                       long long *tail, int *moved)
{
    long long at = uattr(shadow, "doorbell", UINT64_MAX);
    uint32_t value;
    if (at < 0)
        return PyErr_Occurred() ? -1 : 0;
    if (fp_nvme_load32(t, (uint64_t)at, &value) < 0)
        return 0; /* Python: the controller's fatal status */
    if (value == *tail)
        return 1;
    if (value >= (uint64_t)size) {
        PyObject *rejected = attr(shadow, "rejected");
        if (rejected == NULL)
            return -1;
        int known = rejected != Py_None && PyLong_AsUnsignedLongLong(rejected) == value;
        Py_DECREF(rejected);
        return PyErr_Occurred() ? -1 : known;
    }
    if (set_uattr(sq, "tail", value) < 0)
        return -1;
    *tail = value;
    *moved = 1;
    return 1;
}

/* Run one SQ as NvmeController._drain does (with a shadow doorbell: its tail
 * synced, and the EventIdx published once the SQ is empty, then synced again),
 * through nvme_run's path; the outcome into q's Python objects and the totals.
 * 1 all done here, 0 Python must follow, -1 error.  *moved: a tail taken or an
 * entry run. */
static int run_queue(fp_nvmeq *t, const poll_queue *q, uint32_t budget, int *posted,
                     PyObject *image, int *moved)
{
    long long sq_size, sq_head, sq_tail, cq_size, cq_head, cq_tail, phase, qid;
    unsigned long long sq_base, cq_base;
    PyObject *v;
    if ((sq_size = uattr(q->sq, "size", 65537)) < 2 || (cq_size = uattr(q->cq, "size", 65537)) < 2
            || (sq_head = uattr(q->sq, "head", (unsigned long long)sq_size)) < 0
            || (sq_tail = uattr(q->sq, "tail", (unsigned long long)sq_size)) < 0
            || (cq_head = uattr(q->cq, "head", (unsigned long long)cq_size)) < 0
            || (cq_tail = uattr(q->cq, "tail", (unsigned long long)cq_size)) < 0
            || (phase = uattr(q->cq, "phase", 2)) < 0 || (qid = uattr(q->sq, "qid", 65536)) < 0)
        return PyErr_Occurred() ? -1 : 0;
    int fresh = attr_empty(q->cq, "backlog");
    if (fresh < 0)
        return -1;
    if ((v = attr(q->cq, "unsignalled")) == NULL)
        return -1;
    int owed = PyObject_IsTrue(v);
    Py_DECREF(v);
    if (owed < 0)
        return -1;
    if (!fresh || owed)
        return 0; /* a backlog or an interrupt Python owes: its pass */
    if ((v = attr(q->sq, "base")) == NULL)
        return -1;
    sq_base = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if ((v = attr(q->cq, "base")) == NULL)
        return -1;
    cq_base = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (PyErr_Occurred())
        return -1;
    PyObject *shadow = attr(q->sq, "shadow");
    if (shadow == NULL)
        return -1;
    int result = 1;
    uint32_t total = 0, limit = budget < (uint32_t)sq_size ? budget : (uint32_t)sq_size;
    for (;;) {
        if (shadow != Py_None) {
            int taken = shadow_tail(t, q->sq, shadow, sq_size, &sq_tail, moved);
            if (taken <= 0) {
                result = taken;
                break;
            }
        }
        if (sq_head != sq_tail && total < limit) {
            t->sq_base = sq_base;
            t->sq_size = (uint32_t)sq_size;
            t->sq_head = (uint32_t)sq_head;
            t->sq_tail = (uint32_t)sq_tail;
            t->cq_base = cq_base;
            t->cq_size = (uint32_t)cq_size;
            t->cq_head = (uint32_t)cq_head;
            t->cq_tail = (uint32_t)cq_tail;
            t->phase = (int)phase;
            t->sqid = (uint16_t)qid;
            t->nmarks = 0;
            int stop;
            uint32_t done;
            Py_BEGIN_ALLOW_THREADS
            done = fp_nvme_run(t, limit - total, &stop);
            Py_END_ALLOW_THREADS
            if (image_marks(t, image) < 0) {
                result = -1;
                break;
            }
            if (done) {
                total += done;
                *posted = *moved = 1;
                sq_head = t->sq_head;
                cq_tail = t->cq_tail;
                phase = t->phase;
                if (set_uattr(q->sq, "head", t->sq_head) < 0
                        || set_uattr(q->cq, "tail", t->cq_tail) < 0
                        || set_uattr(q->cq, "phase", (unsigned)t->phase) < 0) {
                    result = -1;
                    break;
                }
            }
            if (stop == FP_NVME_HANDBACK || sq_head != sq_tail) {
                result = 0; /* an entry handed back, the budget spent or the CQ full */
                break;
            }
        }
        if (sq_head != sq_tail) {
            result = 0; /* the budget spent */
            break;
        }
        if (shadow == Py_None || total >= limit)
            break;
        /* EventIdx = the tail consumed, so the host's next update rings; then the
         * shadow again: the host may have moved before it saw the EventIdx. */
        PyObject *published = attr(shadow, "published");
        if (published == NULL) {
            result = -1;
            break;
        }
        int same = published != Py_None && PyLong_AsLongLong(published) == sq_tail;
        Py_DECREF(published);
        if (PyErr_Occurred()) {
            result = -1;
            break;
        }
        if (!same) {
            long long at = uattr(shadow, "event_idx", UINT64_MAX);
            if (at < 0) {
                result = PyErr_Occurred() ? -1 : 0;
                break;
            }
            if (fp_nvme_store32(t, (uint64_t)at, (uint32_t)sq_tail) < 0) {
                result = 0; /* Python: the controller's fatal status */
                break;
            }
            if (set_uattr(shadow, "published", (unsigned long long)sq_tail) < 0) {
                result = -1;
                break;
            }
        }
        long long before = sq_tail;
        int taken = shadow_tail(t, q->sq, shadow, sq_size, &sq_tail, moved);
        if (taken <= 0) {
            result = taken;
            break;
        }
        if (sq_tail == before)
            break;
    }
    Py_DECREF(shadow);
    return result;
}

/* The interrupt of a CQ that got entries, once per call as Python's pass raises
 * it (_interrupts): the eventfd written here, else owed to Python.  1 done, 0
 * Python must signal, -1 error. */
static int signal_cq(const poll_queue *q, uint64_t *irqs)
{
    if (q->irqfd == -2)
        return 1;
    uint64_t one = 1;
    if (q->irqfd >= 0 && write(q->irqfd, &one, sizeof one) == (ssize_t)sizeof one) {
        (*irqs)++;
        return 1;
    }
    return PyObject_SetAttrString(q->cq, "unsignalled", Py_True) < 0 ? -1 : 0;
}

PyObject *fp_nvme_poll_py(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *page_obj, *seen_obj, *plan, *result = NULL;
    if (!PyArg_ParseTuple(args, "OOO!", &page_obj, &seen_obj, &PyTuple_Type, &plan))
        return NULL;
    Py_buffer page, seen;
    if (PyObject_GetBuffer(page_obj, &page, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(seen_obj, &seen, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&page);
        return NULL;
    }
    if (page.len < (Py_ssize_t)(4 * POLL_SLOTS) || seen.len != (Py_ssize_t)(4 * POLL_SLOTS)
            || ((uintptr_t)page.buf & 3u)) {
        PyErr_SetString(PyExc_ValueError, "the doorbell page and its snapshot are one page");
        goto done;
    }
    if (PyTuple_GET_SIZE(plan) > 0 && PyTuple_GET_ITEM(plan, 0) == Py_False
            && memcmp(page.buf, seen.buf, 4 * POLL_SLOTS) == 0) { /* the spin's idle pass */
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *guards, *queues, *sqs, *cqs, *regions, *namespaces;
    unsigned long long mdts;
    int shadowed, nowait, write_cache;
    unsigned int budget;
    if (!PyArg_ParseTuple(plan, "pO!O!O!O!O!O!KppI;plan", &shadowed, &PyTuple_Type, &guards,
                          &PyTuple_Type, &queues, &PyDict_Type, &sqs, &PyDict_Type, &cqs,
                          &PyTuple_Type, &regions, &PyTuple_Type, &namespaces, &mdts, &nowait,
                          &write_cache, &budget))
        goto done;
    if (mdts > (1u << 24)) {
        PyErr_SetString(PyExc_ValueError, "bad mdts");
        goto done;
    }
    int ok = guards_hold(guards);
    if (ok < 0)
        goto done;
    if (!ok) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    Py_ssize_t nq = PyTuple_GET_SIZE(queues);
    if (nq > 255) {
        PyErr_SetString(PyExc_ValueError, "too many queues");
        goto done;
    }
    poll_queue qs[256];
    uint16_t owner[POLL_SLOTS];
    for (uint32_t s = 0; s < POLL_SLOTS; s++)
        owner[s] = NO_QUEUE;
    for (Py_ssize_t i = 0; i < nq; i++) {
        PyObject *qid;
        poll_queue *q = &qs[i];
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(queues, i), "O!OOi;a queue is (qid, sq, cq, irqfd)",
                              &PyLong_Type, &qid, &q->sq, &q->cq, &q->irqfd))
            goto done;
        long id = PyLong_AsLong(qid);
        if (id < 1 || id > 255) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "bad queue id");
            goto done;
        }
        long long cqid = uattr(q->sq, "cqid", 256);
        if (cqid < 1)
            goto done_or_invalid;
        PyObject *cqkey = PyLong_FromLongLong(cqid);
        if (cqkey == NULL)
            goto done;
        PyObject *live_sq = PyDict_GetItemWithError(sqs, qid);
        PyObject *live_cq = live_sq == NULL ? NULL : PyDict_GetItemWithError(cqs, cqkey);
        Py_DECREF(cqkey);
        if (PyErr_Occurred())
            goto done;
        if (live_sq != q->sq || live_cq != q->cq)
            goto done_or_invalid; /* a queue deleted or created again */
        owner[2 * id] = (uint16_t)i;
        q->cq_slot = (uint32_t)(2 * cqid + 1);
    }
    for (Py_ssize_t i = 0; i < nq; i++) { /* a CQ's head is its own, whichever SQ feeds it */
        uint32_t slot = qs[i].cq_slot;
        if (owner[slot] == NO_QUEUE)
            owner[slot] = (uint16_t)i;
    }
    int moved = 0;
    int taken = take_doorbells(page.buf, seen.buf, owner, qs, shadowed, &moved);
    if (taken < 0)
        goto done;
    if (taken == 0) {
        result = Py_BuildValue("(OKKKKK[])", Py_True, 0ULL, 0ULL, 0ULL, 0ULL, 0ULL);
        goto done;
    }
    if (!moved && !shadowed) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    held_t h = {0};
    fp_ns *ns = NULL;
    fp_nvmeq t;
    memset(&t, 0, sizeof t);
    t.max_marks = fp_nvme_marks_per_command(mdts) * (budget < 65536 ? budget : 65536);
    t.marks = PyMem_Malloc((t.max_marks ? t.max_marks : 1) * sizeof(fp_mark));
    PyObject *image = PyList_New(0);
    if (t.marks == NULL || image == NULL) {
        PyMem_Free(t.marks);
        Py_XDECREF(image);
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    uint64_t irqs = 0;
    int python = 0;
    if (get_regions(regions, &h) < 0 || fp_get_namespaces(namespaces, &ns, &t.nns) < 0) {
        release(&h);
        PyMem_Free(ns);
        PyMem_Free(t.marks);
        Py_DECREF(image);
        if (PyErr_ExceptionMatches(PyExc_ValueError)) { /* a view released: the memory moved */
            PyErr_Clear();
            result = Py_NewRef(Py_False);
        }
        goto done;
    }
    t.regions = h.regions;
    t.nregions = (size_t)h.nviews;
    t.ns = ns;
    t.mdts = mdts;
    t.nowait = nowait;
    t.write_cache = write_cache;
    int posted[256] = {0};
    /* In the pass's SQ order; once one is Python's, so are the SQs after it (its
     * pass runs them after that one, as a Python pass alone would). */
    for (Py_ssize_t i = 0; i < nq && !python && !PyErr_Occurred(); i++)
        python = run_queue(&t, &qs[i], budget, &posted[i], image, &moved) == 0;
    /* A Python pass follows: it raises every CQ's interrupt once, as its own
     * pass would have; else each CQ that got entries is signalled here, once. */
    for (Py_ssize_t i = 0; i < nq && !PyErr_Occurred(); i++) {
        int first = posted[i];
        for (Py_ssize_t j = 0; j < i && first; j++)
            first = !(posted[j] && qs[j].cq == qs[i].cq);
        if (!first)
            continue;
        if (python)
            PyObject_SetAttrString(qs[i].cq, "unsignalled", Py_True);
        else
            python |= signal_cq(&qs[i], &irqs) == 0;
    }
    release(&h);
    PyMem_Free(ns);
    PyMem_Free(t.marks);
    if (!PyErr_Occurred() && !moved && !python)
        result = Py_NewRef(Py_None); /* (shadows: their values as taken) */
    else if (!PyErr_Occurred())
        result = Py_BuildValue("(OKKKKKO)", python ? Py_True : Py_False,
                               (unsigned long long)t.reads, (unsigned long long)t.writes,
                               (unsigned long long)t.bytes_read,
                               (unsigned long long)t.bytes_written, (unsigned long long)irqs,
                               image);
    Py_DECREF(image);
    goto done;
done_or_invalid:
    if (!PyErr_Occurred())
        result = Py_NewRef(Py_False);
done:
    PyBuffer_Release(&seen);
    PyBuffer_Release(&page);
    return result;
}
