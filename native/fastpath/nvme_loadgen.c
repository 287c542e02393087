/* appliance._fastpath.nvme_loadgen: a benchmark's NVMe host in C (benchmarks/nvme.py).
 *
 *   nvme_loadgen(memory, memory_base, queue, doorbells, sock_fd, msg_id, irq_fd, io, limits)
 *       -> {"done", "errors", "seconds", "sq_tail", "cq_head", "phase", "msg_id",
 *           "lat_min", "lat_mean", "lat_p50", "lat_p99", "lat_max"}   (latencies in ns)
 *
 * It drives one I/O queue pair the Python NvmeDriver already created: it keeps
 * `qd` single-page Reads or Writes at random LBAs in flight, polls the CQ by
 * its phase tag (between polls it waits on the CQ's interrupt eventfd
 * `irq_fd`, as an interrupt-driven driver does, or with irq_fd -1 polls on),
 * and rings the CQ head and SQ tail doorbells once per poll
 * round that reaped something -- as stores into the mmap'd doorbell page
 * (`doorbells`, a writable buffer of the page from 1000h), or as posted
 * vfio-user REGION_WRITE messages (No_reply) on `sock_fd`.  No Python object
 * is made per I/O and the GIL is released while it runs.
 *
 * memory: the driver's guest memory (a writable buffer starting on a page) at
 *   guest address memory_base (page aligned: guest alignment is host alignment,
 *   the CQ's phase tags are loaded as aligned 2-byte words);
 * queue: (qid, depth, sq_addr, cq_addr, sq_tail, cq_head, phase) as the driver
 *   tracks them, with nothing outstanding; doorbells: the page
 *   buffer or None (then sock_fd >= 0 and msg_id is the last id the client used);
 * io: (opcode 1 or 2, nsid, blocks per I/O, blocks of the namespace, buffers'
 *   guest address (qd pages, page aligned), transfer bytes (<= 4096), qd, seed);
 * limits: (count, seconds): stop submitting after `count` I/Os (0: no limit) or
 *   `seconds` (finite; 0: no limit); what is in flight then completes and counts.
 *
 * Memory safety: every address it touches -- SQ entries, CQ entries, data
 * pages, doorbell slots -- is checked against the buffer it lies in before the
 * run; a completion naming a CID not in flight stops the run (ValueError).
 * No completion for 10 s is TimeoutError; a socket or eventfd error is OSError.
 */
#include "held.h"

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum {
    SQE_SIZE = 64, CQE_SIZE = 16, PAGE = 4096,
    REGION_WRITE = 10, MSG_NO_REPLY = 0x10, DOORBELL_BASE = 0x1000,
    HIST = 1024,          /* latency buckets: 16 per power of two */
};

#define STALL_NS 10000000000ULL  /* no completion this long: the controller is gone */

typedef struct {
    /* inputs */
    uint8_t *mem;
    uint64_t mem_base, mem_len;
    uint32_t qid, depth, sq_tail, cq_head;
    int phase;
    uint64_t sq_addr, cq_addr;
    uint32_t *doorbells;      /* NULL: messages on sock */
    int sock, irq;
    uint16_t msg_id;
    uint8_t opcode;
    uint32_t nsid, nlb;
    uint64_t lba_slots;       /* LBAs to choose from, in units of nlb */
    uint64_t buffers;
    uint32_t qd;
    uint64_t seed, count;
    double seconds;
    /* outputs */
    uint64_t done, errors, lat_sum, lat_min, lat_max, elapsed_ns;
    uint64_t hist[HIST];
    int failure;              /* 0, or what stopped it: 1 bad CID, 2 stall, 3 socket */
    int sock_errno;
} loadgen;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t next_random(uint64_t *state)  /* xorshift64* */
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static unsigned bucket_of(uint64_t ns)
{
    if (ns < 16)
        return (unsigned)ns;
    unsigned msb = 63u - (unsigned)__builtin_clzll(ns);
    return (msb - 3u) * 16u + (unsigned)((ns >> (msb - 4u)) & 15u);
}

static uint64_t bucket_floor(unsigned b)
{
    if (b < 16)
        return b;
    unsigned msb = b / 16u + 3u;
    return (uint64_t)(16u + b % 16u) << (msb - 4u);
}

/* The latency below which `fraction` of the I/Os completed: its bucket's floor,
 * but never outside the latencies measured (a bucket is 1/16 of a power of two
 * wide: its floor can be below the minimum). */
static uint64_t percentile(const loadgen *g, double fraction)
{
    uint64_t want = (uint64_t)((double)g->done * fraction), seen = 0;
    for (unsigned b = 0; b < HIST; b++) {
        seen += g->hist[b];
        if (seen > want) {
            uint64_t low = bucket_floor(b);
            return low < g->lat_min ? g->lat_min : low > g->lat_max ? g->lat_max : low;
        }
    }
    return g->lat_max;
}

/* One posted REGION_WRITE of a doorbell dword (the vfio-user header, the
 * region access head, the value; all little-endian as x86 stores them). */
static int send_doorbell(loadgen *g, uint32_t index, uint32_t value)
{
    uint8_t msg[36];
    uint16_t id = ++g->msg_id, command = REGION_WRITE;
    uint32_t size = sizeof msg, flags = MSG_NO_REPLY, zero = 0, region = 0, count = 4;
    uint64_t offset = DOORBELL_BASE + 4ull * index;
    memcpy(msg, &id, 2);
    memcpy(msg + 2, &command, 2);
    memcpy(msg + 4, &size, 4);
    memcpy(msg + 8, &flags, 4);
    memcpy(msg + 12, &zero, 4);
    memcpy(msg + 16, &offset, 8);
    memcpy(msg + 24, &region, 4);
    memcpy(msg + 28, &count, 4);
    memcpy(msg + 32, &value, 4);
    size_t sent = 0;
    while (sent < sizeof msg) {
        ssize_t n = send(g->sock, msg + sent, sizeof msg - sent, MSG_NOSIGNAL);
        if (n >= 0) {
            sent += (size_t)n;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            struct pollfd p = {g->sock, POLLOUT, 0};
            if (poll(&p, 1, 10000) <= 0) {
                g->sock_errno = ETIMEDOUT;
                return -1;
            }
        } else if (errno != EINTR) {
            g->sock_errno = errno;
            return -1;
        }
    }
    return 0;
}

static int ring(loadgen *g, uint32_t index, uint32_t value)
{
    if (g->doorbells != NULL) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);  /* queue entries before the doorbell */
        __atomic_store_n(&g->doorbells[index], value, __ATOMIC_RELEASE);
        return 0;
    }
    return send_doorbell(g, index, value);
}

static void place(loadgen *g, uint32_t slot, uint64_t *rng)
{
    uint8_t sqe[SQE_SIZE] = {0};
    uint32_t cdw0 = g->opcode | slot << 16, cdw12 = g->nlb - 1;
    uint64_t lba = next_random(rng) % g->lba_slots * g->nlb;
    uint64_t prp1 = g->buffers + (uint64_t)slot * PAGE;
    memcpy(sqe, &cdw0, 4);
    memcpy(sqe + 4, &g->nsid, 4);
    memcpy(sqe + 24, &prp1, 8);
    memcpy(sqe + 40, &lba, 8);
    memcpy(sqe + 48, &cdw12, 4);
    memcpy(g->mem + (g->sq_addr - g->mem_base) + (uint64_t)g->sq_tail * SQE_SIZE, sqe, SQE_SIZE);
    g->sq_tail = g->sq_tail + 1 == g->depth ? 0 : g->sq_tail + 1;
}

static void run(loadgen *g, uint64_t *started, uint8_t *busy, uint32_t *freed)
{
    uint64_t rng = g->seed | 1, submitted = 0, t0 = now_ns(), last = t0;
    double ns = g->seconds * 1e9; /* past 2^63 ns (292 years) it is no limit: */
    uint64_t deadline = g->seconds > 0 && ns < 0x1p63 ? t0 + (uint64_t)ns : UINT64_MAX;
    uint32_t inflight = 0;
    uint8_t *cq = g->mem + (g->cq_addr - g->mem_base);
    g->lat_min = UINT64_MAX;
    for (uint32_t slot = 0; slot < g->qd && (!g->count || submitted < g->count); slot++) {
        place(g, slot, &rng);
        started[slot] = now_ns();
        busy[slot] = 1;
        submitted++;
        inflight++;
    }
    if (inflight && ring(g, 2 * g->qid, g->sq_tail) < 0) {
        g->failure = 3;
        return;
    }
    while (inflight) {
        uint32_t nfreed = 0;
        uint64_t t = 0;
        for (;;) {
            uint8_t *cqe = cq + (uint64_t)g->cq_head * CQE_SIZE;
            uint16_t sw = __atomic_load_n((uint16_t *)(cqe + 14), __ATOMIC_ACQUIRE);
            if ((sw & 1) != g->phase)
                break;
            uint16_t cid;
            memcpy(&cid, cqe + 12, 2);
            t = now_ns();
            if (cid >= g->qd || !busy[cid]) {
                g->failure = 1;
                return;
            }
            uint64_t lat = t - started[cid];
            busy[cid] = 0;
            inflight--;
            g->done++;
            g->errors += ((sw >> 1) & 0x7FF) != 0;
            g->lat_sum += lat;
            g->lat_min = lat < g->lat_min ? lat : g->lat_min;
            g->lat_max = lat > g->lat_max ? lat : g->lat_max;
            g->hist[bucket_of(lat)]++;
            freed[nfreed++] = cid;
            if (++g->cq_head == g->depth) {
                g->cq_head = 0;
                g->phase ^= 1;
            }
        }
        if (!nfreed) {
            if (now_ns() - last > STALL_NS) {
                g->failure = 2;
                break;
            }
            if (g->irq >= 0) {  /* sleep until the interrupt; then reset its count */
                struct pollfd p = {g->irq, POLLIN, 0};
                uint64_t events;
                if (poll(&p, 1, 100) > 0 && read(g->irq, &events, sizeof events) < 0
                        && errno != EAGAIN) {
                    g->sock_errno = errno;
                    g->failure = 3;
                    break;
                }
            }
            continue;
        }
        last = t;
        if (ring(g, 2 * g->qid + 1, g->cq_head) < 0) {
            g->failure = 3;
            break;
        }
        uint32_t placed = 0;
        for (uint32_t i = 0; i < nfreed && t < deadline && (!g->count || submitted < g->count); i++) {
            place(g, freed[i], &rng);
            started[freed[i]] = now_ns();
            busy[freed[i]] = 1;
            submitted++;
            inflight++;
            placed++;
        }
        if (placed && ring(g, 2 * g->qid, g->sq_tail) < 0) {
            g->failure = 3;
            break;
        }
    }
    g->elapsed_ns = last - t0;
}

/* addr .. addr + len inside the buffer [base, base + buf_len) */
static int inside(uint64_t addr, uint64_t len, uint64_t base, uint64_t buf_len)
{
    return addr >= base && addr - base <= buf_len && len <= buf_len - (addr - base);
}

PyObject *fp_nvme_loadgen_py(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer mem = {0}, bells = {0};
    PyObject *doorbells, *result = NULL;
    unsigned long long base, sq_addr, cq_addr, ns_blocks, buffers, seed, count;
    unsigned int qid, depth, sq_tail, cq_head, msg_id, opcode, nsid, nlb, transfer, qd;
    int phase, sock, irq;
    double seconds;
    loadgen *g = NULL;
    uint64_t *started = NULL;
    uint8_t *busy = NULL;
    uint32_t *freed = NULL;
    if (!PyArg_ParseTuple(args, "w*K(IIKKIIi)OiIi(IIIKKIIK)(Kd)", &mem, &base, &qid, &depth,
                          &sq_addr, &cq_addr, &sq_tail, &cq_head, &phase, &doorbells, &sock,
                          &msg_id, &irq, &opcode, &nsid, &nlb, &ns_blocks, &buffers, &transfer, &qd,
                          &seed, &count, &seconds))
        return NULL;
    uint64_t len = (uint64_t)mem.len;
    if (qid < 1 || qid > 0xFFFF || depth < 2 || depth > 65536 || sq_tail >= depth
            || cq_head >= depth || (phase != 0 && phase != 1) || qd < 1 || qd >= depth
            || msg_id > 0xFFFF || (opcode != 1 && opcode != 2) || nlb < 1 || nlb > 0x10000
            || ns_blocks < nlb || transfer < 1 || transfer > PAGE || buffers % PAGE
            || sq_addr % SQE_SIZE || cq_addr % CQE_SIZE || (uintptr_t)mem.buf % PAGE || base % PAGE
            || !(seconds >= 0) || isinf(seconds) || (seconds == 0 && count == 0)
            || !inside(sq_addr, (uint64_t)depth * SQE_SIZE, base, len)
            || !inside(cq_addr, (uint64_t)depth * CQE_SIZE, base, len)
            || !inside(buffers, (uint64_t)qd * PAGE, base, len)) {
        PyErr_SetString(PyExc_ValueError, "nvme_loadgen: bad queue, I/O or limits");
        goto out;
    }
    if (doorbells != Py_None) {
        if (PyObject_GetBuffer(doorbells, &bells, PyBUF_WRITABLE) < 0)
            goto out;
        if ((uintptr_t)bells.buf % 4 || (uint64_t)bells.len < 8ull * (qid + 1)) {
            PyErr_SetString(PyExc_ValueError, "nvme_loadgen: the doorbell page is too short");
            goto out;
        }
    } else if (sock < 0) {
        PyErr_SetString(PyExc_ValueError, "nvme_loadgen: neither a doorbell page nor a socket");
        goto out;
    }
    g = PyMem_Calloc(1, sizeof *g);
    started = PyMem_Calloc(qd, sizeof *started);
    busy = PyMem_Calloc(qd, 1);
    freed = PyMem_Calloc(qd, sizeof *freed);
    if (g == NULL || started == NULL || busy == NULL || freed == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    *g = (loadgen){.mem = mem.buf, .mem_base = base, .mem_len = len, .qid = qid,
                   .depth = depth, .sq_tail = sq_tail, .cq_head = cq_head, .phase = phase,
                   .sq_addr = sq_addr, .cq_addr = cq_addr,
                   .doorbells = doorbells != Py_None ? bells.buf : NULL, .sock = sock, .irq = irq,
                   .msg_id = (uint16_t)msg_id, .opcode = (uint8_t)opcode, .nsid = nsid,
                   .nlb = nlb, .lba_slots = ns_blocks / nlb, .buffers = buffers, .qd = qd,
                   .seed = seed, .count = count, .seconds = seconds};
    Py_BEGIN_ALLOW_THREADS
    run(g, started, busy, freed);
    Py_END_ALLOW_THREADS
    if (g->failure == 1) {
        PyErr_SetString(PyExc_ValueError, "nvme_loadgen: a completion names a CID not in flight");
    } else if (g->failure == 2) {
        PyErr_SetString(PyExc_TimeoutError, "nvme_loadgen: no completion for 10 s");
    } else if (g->failure == 3) {
        errno = g->sock_errno;
        PyErr_SetFromErrno(PyExc_OSError);
    } else {
        result = Py_BuildValue(
            "{sKsKsdsIsIsisIsKsKsKsKsK}", "done", (unsigned long long)g->done,
            "errors", (unsigned long long)g->errors, "seconds", (double)g->elapsed_ns / 1e9,
            "sq_tail", g->sq_tail, "cq_head", g->cq_head, "phase", g->phase,
            "msg_id", (unsigned)g->msg_id,
            "lat_min", (unsigned long long)(g->done ? g->lat_min : 0),
            "lat_mean", (unsigned long long)(g->done ? g->lat_sum / g->done : 0),
            "lat_p50", (unsigned long long)percentile(g, 0.5),
            "lat_p99", (unsigned long long)percentile(g, 0.99),
            "lat_max", (unsigned long long)g->lat_max);
    }
out:
    PyMem_Free(freed);
    PyMem_Free(busy);
    PyMem_Free(started);
    PyMem_Free(g);
    if (bells.obj != NULL)
        PyBuffer_Release(&bells);
    PyBuffer_Release(&mem);
    return result;
}
