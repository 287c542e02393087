/* The NVMe I/O queue path of the native fast path (no Python API here).
 *
 * It runs the successful Read and Write commands of one I/O submission queue
 * in a batch, as appliance/storage (controller._drain, io.read / io.write,
 * prp.prp_segments, CompletionQueue.push) would: the entry at the head is
 * fetched, its PRPs walked into iovecs of mmap'd guest memory, the image read
 * or written with preadv / pwritev, and a success completion posted with the
 * phase tag stored last.  Anything the Python path would do otherwise -- an
 * error status, another opcode, an SGL, a namespace the caller marks not
 * native, a read the page cache cannot serve at once, memory that is not
 * mapped -- stops the batch at that entry, untouched (FP_NVME_HANDBACK): the
 * Python path runs it, so every refusal keeps Python's status and log entry.
 */
#ifndef APPLIANCE_FASTPATH_NVMEQ_H
#define APPLIANCE_FASTPATH_NVMEQ_H

#include <stddef.h>
#include <stdint.h>

#include "vring.h"

/* One namespace as the batch sees it (index nsid - 1). */
typedef struct {
    int fd;                /* the image */
    uint64_t nlbas;        /* blocks */
    unsigned lba_shift;    /* 9 or 12 */
    int native;            /* 0: every command of it goes to Python */
    int writable;          /* 0: writes go to Python (they fail there) */
} fp_ns;

/* A guest range (read data, a completion entry) or an image range (a write). */
typedef struct {
    uint32_t nsid;         /* 0 for guest memory */
    uint64_t offset;
    uint64_t length;
} fp_mark;

typedef struct {
    /* inputs */
    const fp_region *regions;
    size_t nregions;
    uint64_t sq_base, cq_base;
    uint32_t sq_size, cq_size, sq_tail, cq_head;
    uint16_t sqid;
    const fp_ns *ns;
    size_t nns;
    uint64_t mdts;         /* bytes one command may move */
    int nowait;            /* reads may not block (RWF_NOWAIT; a miss goes to Python) */
    int write_cache;       /* 0: writes sync: they go to Python */
    /* state, in and out */
    uint32_t sq_head, cq_tail;
    int phase;
    /* outputs */
    uint64_t reads, writes, bytes_read, bytes_written;
    fp_mark *marks;        /* caller's array of max_marks */
    size_t nmarks, max_marks;
} fp_nvmeq;

enum { FP_NVME_DONE = 0, FP_NVME_HANDBACK = 1 };

/* Run up to `budget` commands from the head.  Returns how many ran; *stop is
 * FP_NVME_HANDBACK when the batch stopped at an entry Python must run, else
 * FP_NVME_DONE (the SQ is empty, the budget spent or the CQ full). */
uint32_t fp_nvme_run(fp_nvmeq *q, uint32_t budget, int *stop);

/* A little-endian dword of guest memory (a shadow doorbell, an EventIdx): 0, or -1
 * when it is not inside readable (writable) mapped memory.  Aligned: one access. */
int fp_nvme_load32(const fp_nvmeq *q, uint64_t addr, uint32_t *value);
int fp_nvme_store32(const fp_nvmeq *q, uint64_t addr, uint32_t value);

/* nvme_run's namespaces argument, a tuple of (fd, blocks, lba_shift, writable) or
 * None per NSID from 1, into *out (PyMem_Malloc'd) and *n: 0, or -1 with a Python
 * error (nvme_module.c; needs Python.h before this header). */
#ifdef Py_PYTHON_H
int fp_get_namespaces(PyObject *seq, fp_ns **out, size_t *n);
#endif

/* Marks one command may need at most (data segments plus its completion). */
size_t fp_nvme_marks_per_command(uint64_t mdts);

#endif
