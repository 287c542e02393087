/* appliance._fastpath.nvme_run: the NVMe I/O queue path's Python surface.
 *
 *   nvme_run(regions, sq, cq, sqid, budget, namespaces, mdts, nowait, write_cache,
 *            guest_marks)
 *       -> (done, handback, sq_head, cq_tail, phase, reads, writes, bytes_read,
 *           bytes_written, guest, image)
 *
 * regions: ClientMemory's regions as for the ring walker (all mmap'd);
 * sq: (base, size, head, tail); cq: (base, size, head, tail, phase);
 * namespaces: one item per NSID from 1, (fd, blocks, lba_shift, writable) or
 * None for a namespace whose commands all go to Python; mdts: bytes;
 * nowait: reads use RWF_NOWAIT (a miss hands the entry back);
 * write_cache: Volatile Write Cache on (off: writes sync, so Python runs them);
 * guest_marks: return the guest ranges written (for the dirty log).
 * done entries ran; handback: the entry at sq_head is Python's to run.
 * guest: [(address, length)] (empty unless guest_marks); image: [(nsid,
 * byte offset, length)] per write.  Bad arguments are ValueError / TypeError.
 */
#include "held.h"
#include "nvmeq.h"

int fp_get_namespaces(PyObject *seq, fp_ns **out, size_t *n)
{
    if (!PyTuple_Check(seq)) {
        PyErr_SetString(PyExc_TypeError, "namespaces must be a tuple");
        return -1;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(seq);
    fp_ns *ns = PyMem_Calloc(count ? (size_t)count : 1, sizeof *ns);
    if (ns == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyTuple_GET_ITEM(seq, i);
        if (item == Py_None)
            continue;
        int fd, writable;
        unsigned long long nlbas;
        unsigned int shift;
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "iKIp;a namespace is (fd, blocks, "
                                                      "lba_shift, writable)",
                                                      &fd, &nlbas, &shift, &writable)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "a namespace is (fd, blocks, lba_shift, writable)");
            PyMem_Free(ns);
            return -1;
        }
        if (fd < 0 || shift < 9 || shift > 16 || nlbas > (UINT64_MAX >> shift)) {
            PyErr_SetString(PyExc_ValueError, "bad namespace");
            PyMem_Free(ns);
            return -1;
        }
        ns[i] = (fp_ns){fd, nlbas, shift, 1, writable};
    }
    *out = ns;
    *n = (size_t)count;
    return 0;
}

static PyObject *marks_lists(const fp_nvmeq *q)
{
    PyObject *guest = PyList_New(0), *image = PyList_New(0);
    if (guest == NULL || image == NULL)
        goto fail;
    for (size_t i = 0; i < q->nmarks; i++) {
        const fp_mark *m = &q->marks[i];
        PyObject *item = m->nsid
            ? Py_BuildValue("(IKK)", (unsigned)m->nsid, (unsigned long long)m->offset,
                            (unsigned long long)m->length)
            : Py_BuildValue("(KK)", (unsigned long long)m->offset, (unsigned long long)m->length);
        if (item == NULL)
            goto fail;
        int failed = PyList_Append(m->nsid ? image : guest, item) < 0;
        Py_DECREF(item);
        if (failed)
            goto fail;
    }
    return Py_BuildValue("(NN)", guest, image);
fail:
    Py_XDECREF(guest);
    Py_XDECREF(image);
    return NULL;
}

PyObject *fp_nvme_run_py(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *regions, *namespaces, *result = NULL, *marks = NULL;
    unsigned long long sq_base, cq_base, mdts;
    unsigned int sq_size, sq_head, sq_tail, cq_size, cq_head, cq_tail, sqid, budget;
    int phase, nowait, write_cache, guest_marks;
    held_t h = {0};
    fp_nvmeq q;
    memset(&q, 0, sizeof q);
    fp_ns *ns = NULL;
    if (!PyArg_ParseTuple(args, "O!(KIII)(KIIIi)IIO!Kppp", &PyTuple_Type, &regions, &sq_base,
                          &sq_size, &sq_head, &sq_tail, &cq_base, &cq_size, &cq_head, &cq_tail,
                          &phase, &sqid, &budget, &PyTuple_Type, &namespaces, &mdts, &nowait,
                          &write_cache, &guest_marks))
        return NULL;
    if (sq_size < 2 || sq_size > 65536 || cq_size < 2 || cq_size > 65536 || sq_head >= sq_size
            || sq_tail >= sq_size || cq_head >= cq_size || cq_tail >= cq_size || sqid > 0xFFFF
            || (phase != 0 && phase != 1) || mdts > (1u << 24)) {
        PyErr_SetString(PyExc_ValueError, "bad queue state");
        return NULL;
    }
    if (get_regions(regions, &h) < 0 || fp_get_namespaces(namespaces, &ns, &q.nns) < 0)
        goto out;
    q.max_marks = fp_nvme_marks_per_command(mdts) * (budget < sq_size ? budget : sq_size);
    q.marks = PyMem_Malloc((q.max_marks ? q.max_marks : 1) * sizeof(fp_mark));
    if (q.marks == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    q.regions = h.regions;
    q.nregions = (size_t)h.nviews;
    q.sq_base = sq_base;
    q.sq_size = sq_size;
    q.sq_head = sq_head;
    q.sq_tail = sq_tail;
    q.cq_base = cq_base;
    q.cq_size = cq_size;
    q.cq_head = cq_head;
    q.cq_tail = cq_tail;
    q.phase = phase;
    q.sqid = (uint16_t)sqid;
    q.ns = ns;
    q.mdts = mdts;
    q.nowait = nowait;
    q.write_cache = write_cache;
    int stop;
    uint32_t done;
    Py_BEGIN_ALLOW_THREADS
    done = fp_nvme_run(&q, budget, &stop);
    Py_END_ALLOW_THREADS
    if (!guest_marks) { /* keep the image marks only */
        size_t kept = 0;
        for (size_t i = 0; i < q.nmarks; i++)
            if (q.marks[i].nsid)
                q.marks[kept++] = q.marks[i];
        q.nmarks = kept;
    }
    marks = marks_lists(&q);
    if (marks == NULL)
        goto out;
    result = Py_BuildValue("(IOIIiKKKKOO)", done, stop == FP_NVME_HANDBACK ? Py_True : Py_False,
                           q.sq_head, q.cq_tail, q.phase, (unsigned long long)q.reads,
                           (unsigned long long)q.writes, (unsigned long long)q.bytes_read,
                           (unsigned long long)q.bytes_written, PyTuple_GET_ITEM(marks, 0),
                           PyTuple_GET_ITEM(marks, 1));
out:
    Py_XDECREF(marks);
    PyMem_Free(q.marks);
    PyMem_Free(ns);
    release(&h);
    return result;
}
