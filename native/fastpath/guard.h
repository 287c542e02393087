/* The SIGBUS guard of native calls that touch client memory a peer can shrink
 * (no Python API here).
 *
 * A vhost-user front-end's memory that cannot be sealed against shrinking (DPDK's
 * memfd) is mapped for the native calls only; a page past the end of its file,
 * once the peer ftruncates it, raises SIGBUS when touched.  A native call that may
 * touch such a mapping runs under a guard: fp_guard_enter, then FP_GUARD_SET (a
 * sigsetjmp in the caller's own frame), the work, fp_guard_leave.  The handler
 * this file installs (when the extension loads, and again on top of a handler
 * installed after it: fp_guard_install) jumps back to FP_GUARD_SET
 * when the faulting address lies in a range the current thread's guard covers;
 * the call then gives up (its results are discarded; its Python caller runs the
 * same work through the fd).  Any other SIGBUS goes to the handler that was
 * installed before ours (Python's faulthandler under pytest), or kills the process
 * as SIGBUS does by default.
 */
#ifndef APPLIANCE_FASTPATH_GUARD_H
#define APPLIANCE_FASTPATH_GUARD_H

#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>

#include "vring.h"

#define FP_GUARD_SETS 4  /* region arrays a guard covers directly (more: a callback) */
#define FP_GUARD_OWNED 8 /* heap blocks of the guarded work freed when it faults */

typedef struct fp_guard fp_guard;

struct fp_guard {
    sigjmp_buf env;
    /* what the guard covers: region arrays, and/or a callback for many */
    const fp_region *sets[FP_GUARD_SETS];
    size_t counts[FP_GUARD_SETS];
    int nsets;
    int (*covers)(const void *ctx, uintptr_t addr); /* 1 when addr is in a covered range */
    const void *ctx;
    /* scratch the guarded work allocated (freed by fp_guard_leave after a fault) */
    void *owned[FP_GUARD_OWNED];
    int faulted;          /* it jumped */
    uintptr_t fault_addr; /* the faulting address then */
};

/* Install the handler on top of the current one, which it passes other SIGBUS on
 * to (the extension's init, and again whenever a handler installed later, such as
 * faulthandler's, replaced ours): 0, or -1 with errno. */
int fp_guard_install(void);

/* Put back the handler that was there before ours, if ours is still installed. */
void fp_guard_uninstall(void);

/* Whether our handler is the one installed now (a handler installed after ours
 * would see guarded faults first: then nothing may be guarded). */
int fp_guard_ready(void);

/* Cover n regions (call before fp_guard_enter; at most FP_GUARD_SETS arrays). */
void fp_guard_cover(fp_guard *g, const fp_region *regions, size_t n);

/* Make g the current thread's guard (after FP_GUARD_SET returned 0). */
void fp_guard_enter(fp_guard *g);

/* The current thread leaves its guard.  After a fault it frees what g still owns;
 * otherwise what g owns is the work's again (it frees it as usual). */
void fp_guard_leave(fp_guard *g);

/* The guard of the current thread keeps p (heap) until fp_guard_disown: freed if
 * the work faults.  No-op outside a guard or when p is NULL. */
void fp_guard_own(void *p);
void fp_guard_disown(void *p);

/* sigsetjmp without the signal mask (the handler runs with SA_NODEFER, so jumping
 * out of it leaves the mask as it was): 0 first, 1 after a guarded fault.  Must be
 * expanded in the frame that stays alive for the whole guarded work. */
#define FP_GUARD_SET(g) sigsetjmp((g)->env, 0)

#endif
