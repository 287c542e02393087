/* The Python buffers one native call holds (module.c), shared by its entry points. */
#ifndef APPLIANCE_FASTPATH_HELD_H
#define APPLIANCE_FASTPATH_HELD_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "vring.h"

typedef struct {
    Py_buffer desc, avail, used;
    Py_buffer *views;
    fp_region *regions;
    Py_ssize_t nviews;
    int have_desc, have_avail, have_used;
} held_t;

/* Release every buffer h holds and its arrays. */
void release(held_t *h);

/* ClientMemory's regions, a tuple of (guest address, view, readable, writable)
 * in address order, into h->regions; -1 with a Python error for a bad tuple. */
int get_regions(PyObject *seq, held_t *h);

/* appliance._fastpath.nvme_run (nvme_module.c). */
PyObject *fp_nvme_run_py(PyObject *self, PyObject *args);

/* appliance._fastpath.nvme_loadgen, a benchmark's NVMe host (nvme_loadgen.c). */
PyObject *fp_nvme_loadgen_py(PyObject *self, PyObject *args);

#endif
