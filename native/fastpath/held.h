/* The Python buffers one native call holds (module.c), shared by its entry points. */
#ifndef APPLIANCE_FASTPATH_HELD_H
#define APPLIANCE_FASTPATH_HELD_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "guard.h"
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

/* A walk's arguments as parsed. */
typedef struct {
    PyObject *desc, *avail, *used, *regions;
    unsigned int size, last, used_idx;
    int indirect;
    unsigned long long max_readable, max_writable;
} walk_args;

/* The walk's arguments into ring (with its scratch) and h: 0, or -1 with a
 * Python error (a bad size or index, a short ring area, bad regions). */
int setup_walk(const walk_args *w, fp_ring *ring, held_t *h);

/* Free ring's scratch and release what h holds. */
void teardown(fp_ring *ring, held_t *h);

/* A guarded call faulted (guard.h): set OSError(EFAULT, ...) naming the address. */
void vanished(const fp_guard *g);

/* appliance._fastpath.switch_tx and switch_frames (switch_module.c). */
PyObject *fp_switch_tx_py(PyObject *self, PyObject *args);
PyObject *fp_switch_frames_py(PyObject *self, PyObject *args);

/* appliance._fastpath.nvme_run (nvme_module.c). */
PyObject *fp_nvme_run_py(PyObject *self, PyObject *args);

/* appliance._fastpath.nvme_poll, the doorbell-page poller (nvme_poll.c). */
PyObject *fp_nvme_poll_py(PyObject *self, PyObject *args);

/* appliance._fastpath.nvme_loadgen, a benchmark's NVMe host (nvme_loadgen.c). */
PyObject *fp_nvme_loadgen_py(PyObject *self, PyObject *args);

#endif
