/* The SIGBUS guard of native calls: see guard.h.
 *
 * The handler is async-signal-safe: it reads the thread's current guard (a
 * thread-local pointer the guarded call set before touching anything, so the
 * thread's TLS block exists by then), compares the faulting address with the
 * guard's ranges and either jumps back or hands the signal on.  Only a fault the
 * kernel raised (si_code > 0: BUS_ADRERR, the access past the end of a file) is
 * caught; a SIGBUS someone sent is never ours.
 */
#define _GNU_SOURCE
#include "guard.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>

static struct sigaction previous;
static int installed;
static _Thread_local fp_guard *current;
static _Thread_local int chaining; /* the handler passed a SIGBUS on and was entered again */

static int in_regions(const fp_region *r, size_t n, uintptr_t a)
{
    for (size_t i = 0; i < n; i++) {
        uintptr_t base = (uintptr_t)r[i].host;
        if (a >= base && a - base < r[i].size)
            return 1;
    }
    return 0;
}

static int covered(const fp_guard *g, uintptr_t a)
{
    for (int s = 0; s < g->nsets; s++)
        if (in_regions(g->sets[s], g->counts[s], a))
            return 1;
    return g->covers != NULL && g->covers(g->ctx, a);
}

static void on_sigbus(int sig, siginfo_t *info, void *uctx)
{
    fp_guard *g = current;
    if (g != NULL && info != NULL && info->si_code > 0 && covered(g, (uintptr_t)info->si_addr)) {
        g->faulted = 1;
        g->fault_addr = (uintptr_t)info->si_addr;
        current = NULL; /* a second fault before fp_guard_leave is not caught */
        siglongjmp(g->env, 1);
    }
    /* Not a guarded access: the handler before ours decides (faulthandler prints
     * the traceback and re-raises with its own predecessor, the default: death).
     * Entered again while passing it on (a predecessor that re-raised into us, when
     * ours was installed again on top of it): the default action. */
    if (!chaining && (previous.sa_flags & SA_SIGINFO)) {
        chaining = 1;
        previous.sa_sigaction(sig, info, uctx);
        chaining = 0;
    } else if (!chaining && previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        chaining = 1;
        previous.sa_handler(sig);
        chaining = 0;
    } else {
        /* the default action: a fault re-executes the access and dies of it; a
         * SIGBUS that was sent is sent again */
        signal(SIGBUS, SIG_DFL);
        if (info == NULL || info->si_code <= 0)
            raise(sig);
    }
}

int fp_guard_install(void)
{
    if (fp_guard_ready())
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &previous) != 0)
        return -1;
    installed = 1;
    return 0;
}

void fp_guard_uninstall(void)
{
    if (installed && fp_guard_ready())
        sigaction(SIGBUS, &previous, NULL);
    installed = 0;
}

int fp_guard_ready(void)
{
    struct sigaction now;
    if (!installed || sigaction(SIGBUS, NULL, &now) != 0)
        return 0;
    return (now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_sigbus;
}

void fp_guard_cover(fp_guard *g, const fp_region *regions, size_t n)
{
    if (g->nsets < FP_GUARD_SETS) {
        g->sets[g->nsets] = regions;
        g->counts[g->nsets++] = n;
    }
}

void fp_guard_enter(fp_guard *g)
{
    current = g;
}

void fp_guard_leave(fp_guard *g)
{
    current = NULL;
    for (int i = 0; i < FP_GUARD_OWNED; i++) {
        if (g->faulted)
            free(g->owned[i]);
        g->owned[i] = NULL;
    }
}

void fp_guard_own(void *p)
{
    fp_guard *g = current;
    if (g == NULL || p == NULL)
        return;
    for (int i = 0; i < FP_GUARD_OWNED; i++) {
        if (g->owned[i] == NULL) {
            g->owned[i] = p;
            return;
        }
    }
}

void fp_guard_disown(void *p)
{
    fp_guard *g = current;
    if (g == NULL || p == NULL)
        return;
    for (int i = 0; i < FP_GUARD_OWNED; i++)
        if (g->owned[i] == p)
            g->owned[i] = NULL;
}
