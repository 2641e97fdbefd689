/*
 * protocol._seqlock: the memory ordering the ring's seqlock relies on.
 *
 * NOTE [ring memory ordering ]
 * A seqlock writer makes a slot's sequence odd, writes the payload, then makes it even.
 * A reader loads the sequence, copies, then loads it again: equal and even means the copy
 * is whole. That only holds if (a) the odd store becomes visible before any payload
 * store, (b) every payload store becomes visible before the even store, and (c) the
 * reader's payload loads are not satisfied before its first sequence load or after its
 * second. x86-64 (TSO) keeps stores in order and loads in order, so there only the
 * compiler must not reorder; Arm64 and POWER reorder both, so fences are required.
 * Pure Python cannot emit a fence, which is why this file exists: C11 atomics give
 * release/acquire on the sequence word plus explicit fences around the payload copy,
 * correct on every architecture (on x86 they compile to plain moves plus a compiler
 * barrier; the seq_cst fence used by the wake-up handshake is an mfence).
 *
 * The payload copies release the GIL, so a reader thread in the trainer can copy a slot
 * into a pinned batch buffer while the training step runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sched.h>
#include <time.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define CPU_RELAX() ((void)0)
#endif

typedef _Atomic uint64_t au64;

/*
 * NOTE [truncated segments]
 * A shared-memory segment can be shrunk (ftruncate) by any process allowed to write it, and
 * every later access to a mapped page beyond the new end raises SIGBUS, whose default action
 * kills the process: one mistaken `truncate` would kill the producer and every reader. No
 * size check in Python can prevent that (the shrink can land between the check and the
 * access, and numpy copies from zero-copy views run where no check is possible). So the
 * ring registers each mapping here ("guard"), and a SIGBUS handler turns a fault inside a
 * registered range into a recorded loss: it maps anonymous zero pages over the range from
 * the faulting page to the end (MAP_FIXED; the truncated file pages are gone anyway) and
 * returns, so the faulting access completes on zeros. The mapping is then "lost": every
 * function of this module refuses a buffer that overlaps a lost range, raising the error
 * class the ring registered (RingDamaged), and read()/read2() check again after their copy,
 * so zeros are never returned as a sample. A healthy process pays one relaxed load of
 * `g_lost` per call. Faults outside registered ranges go to the handler that was installed
 * before (faulthandler, or the default action) exactly as if this one did not exist.
 * mmap() in a signal handler: not on POSIX's async-signal-safe list, but on Linux it is a
 * bare system call (glibc's wrapper takes no lock), which is what makes this technique work.
 */
#define GUARD_MAX 256
typedef struct {
    _Atomic uintptr_t base;
    _Atomic size_t len;         /* 0: free entry */
    _Atomic uint64_t faults;    /* faults turned into zero pages in this range */
    _Atomic size_t first_off;   /* offset of the first lost page (SIZE_MAX: none) */
    char label[192];            /* what the range is, for the error (written at guard()) */
    char path[224];             /* file behind it, lstat()ed for the error; "" = none */
} guard_entry;

static guard_entry g_guard[GUARD_MAX];
static _Atomic uint64_t g_lost;          /* sum of every entry's faults: 0 when healthy */
static struct sigaction g_prev;          /* the SIGBUS action before ours */
static PyObject *g_lost_error;           /* exception class for a lost range */
static uintptr_t g_page = 4096;

static void chain_sigbus(int sig, siginfo_t *info, void *ctx) {
    if (g_prev.sa_flags & SA_SIGINFO) {
        if (g_prev.sa_sigaction) { g_prev.sa_sigaction(sig, info, ctx); return; }
    } else if (g_prev.sa_handler != SIG_DFL && g_prev.sa_handler != SIG_IGN) {
        g_prev.sa_handler(sig);
        return;
    }
    /* The default action: restore it; a fault re-executes and dies, a kill() is re-raised. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGBUS, &dfl, NULL);
    if (info == NULL || info->si_code <= 0) raise(SIGBUS);
}

static void on_sigbus(int sig, siginfo_t *info, void *ctx) {
    if (info != NULL && info->si_code > 0) {   /* a fault, not a kill() */
        uintptr_t a = (uintptr_t)info->si_addr;
        for (int i = 0; i < GUARD_MAX; i++) {
            size_t len = atomic_load(&g_guard[i].len);
            uintptr_t base = atomic_load(&g_guard[i].base);
            if (!len || a < base || a >= base + len) continue;
            uintptr_t page = a & ~(g_page - 1);
            void *p = mmap((void *)page, base + len - page, PROT_READ | PROT_WRITE,
                           MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) break;
            size_t none = SIZE_MAX;
            atomic_compare_exchange_strong(&g_guard[i].first_off, &none, (size_t)(page - base));
            atomic_fetch_add(&g_guard[i].faults, 1);
            atomic_fetch_add(&g_lost, 1);
            return;   /* the access is retried and now reads (or writes) zero pages */
        }
    }
    chain_sigbus(sig, info, ctx);
}

static void install_sigbus(void) {
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) &&
        cur.sa_sigaction == on_sigbus)
        return;
    /* First time, or someone (faulthandler.enable()) installed theirs after ours: theirs
     * becomes the one faults outside our ranges go to. */
    g_prev = cur;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, NULL);
}

/* -1 with the lost-range error set when [buf, buf+len) overlaps a lost range, else 0. */
static int lost_check(const void *buf, Py_ssize_t n) {
    uintptr_t a = (uintptr_t)buf, b = a + (uintptr_t)(n > 0 ? n : 1);
    for (int i = 0; i < GUARD_MAX; i++) {
        guard_entry *e = &g_guard[i];
        size_t len = atomic_load(&e->len);
        uintptr_t base = atomic_load(&e->base);
        if (!len || !atomic_load(&e->faults) || b <= base || a >= base + len) continue;
        char now[288] = "";
        struct stat st;
        if (e->path[0]) {
            if (lstat(e->path, &st) == 0)
                snprintf(now, sizeof now, " %s now has %lld bytes;", e->path, (long long)st.st_size);
            else
                snprintf(now, sizeof now, " %s was removed;", e->path);
        }
        PyErr_Format(g_lost_error ? g_lost_error : PyExc_OSError,
                     "%s: its shared memory shrank under this process:%s %zu bytes were "
                     "mapped and the page at offset %zu is gone (another process truncated "
                     "the segment); this mapping is no longer used",
                     e->label, now, len, (size_t)atomic_load(&e->first_off));
        return -1;
    }
    return 0;
}

#define LOST_CHECK(v) (atomic_load_explicit(&g_lost, memory_order_relaxed) && \
                       lost_check((v)->buf, (v)->len) < 0)

/* guard(buf, label, path) -> id: register a mapping (see NOTE [truncated segments]). */
static PyObject *py_guard(PyObject *self, PyObject *args) {
    PyObject *o; const char *label, *path; Py_buffer v;
    if (!PyArg_ParseTuple(args, "Oss", &o, &label, &path)) return NULL;
    if (PyObject_GetBuffer(o, &v, PyBUF_SIMPLE) < 0) return NULL;
    uintptr_t base = (uintptr_t)v.buf;
    size_t len = (size_t)v.len;
    PyBuffer_Release(&v);
    if (!len) return PyLong_FromLong(-1);
    install_sigbus();
    for (int i = 0; i < GUARD_MAX; i++) {
        guard_entry *e = &g_guard[i];
        if (atomic_load(&e->len) || atomic_load(&e->base)) continue;
        uintptr_t zero = 0;
        if (!atomic_compare_exchange_strong(&e->base, &zero, base)) continue;
        snprintf(e->label, sizeof e->label, "%s", label);
        snprintf(e->path, sizeof e->path, "%s", path);
        atomic_store(&e->faults, 0);
        atomic_store(&e->first_off, SIZE_MAX);
        atomic_store(&e->len, len);   /* last: the handler only looks at entries with a len */
        return PyLong_FromLong(i);
    }
    PyErr_Format(PyExc_RuntimeError, "guard: all %d guarded mappings are in use", GUARD_MAX);
    return NULL;
}

/* unguard(id): forget a mapping (call after it is unmapped). Its faults leave the total. */
static PyObject *py_unguard(PyObject *self, PyObject *args) {
    int i;
    if (!PyArg_ParseTuple(args, "i", &i)) return NULL;
    if (i < 0 || i >= GUARD_MAX) Py_RETURN_NONE;
    guard_entry *e = &g_guard[i];
    atomic_store(&e->len, 0);
    atomic_fetch_sub(&g_lost, atomic_exchange(&e->faults, 0));
    atomic_store(&e->base, 0);
    Py_RETURN_NONE;
}

/* guard_faults(id) -> faults recorded in that mapping (0: healthy). */
static PyObject *py_guard_faults(PyObject *self, PyObject *args) {
    int i;
    if (!PyArg_ParseTuple(args, "i", &i)) return NULL;
    if (i < 0 || i >= GUARD_MAX) return PyLong_FromLong(0);
    return PyLong_FromUnsignedLongLong(atomic_load(&g_guard[i].faults));
}

/* set_lost_error(cls): the exception raised for a buffer in a lost range. */
static PyObject *py_set_lost_error(PyObject *self, PyObject *cls) {
    if (!PyExceptionClass_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "set_lost_error: expected an exception class");
        return NULL;
    }
    Py_INCREF(cls);
    Py_XSETREF(g_lost_error, cls);
    Py_RETURN_NONE;
}

static int get_buf(PyObject *obj, Py_buffer *view, int writable) {
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) return -1;
    if (LOST_CHECK(view)) { PyBuffer_Release(view); return -1; }
    return 0;
}

static int check_range(Py_buffer *v, Py_ssize_t off, Py_ssize_t n, const char *what) {
    if (off < 0 || n < 0 || off + n > v->len) {
        PyErr_Format(PyExc_IndexError, "%s: range [%zd, %zd) outside buffer of %zd bytes",
                     what, off, off + n, v->len);
        return -1;
    }
    if (n == 8 && (((uintptr_t)v->buf + off) % 8) != 0) {
        PyErr_Format(PyExc_ValueError, "%s: offset %zd is not 8-byte aligned", what, off);
        return -1;
    }
    return 0;
}

#define WORD(view, off) ((au64 *)((char *)(view).buf + (off)))

/* load_acquire(buf, off) -> int */
static PyObject *py_load_acquire(PyObject *self, PyObject *args) {
    PyObject *o; Py_ssize_t off; Py_buffer v;
    if (!PyArg_ParseTuple(args, "On", &o, &off)) return NULL;
    if (get_buf(o, &v, 0) < 0) return NULL;
    if (check_range(&v, off, 8, "load_acquire") < 0) { PyBuffer_Release(&v); return NULL; }
    uint64_t x = atomic_load_explicit(WORD(v, off), memory_order_acquire);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(x);
}

/* store_release(buf, off, value) */
static PyObject *py_store_release(PyObject *self, PyObject *args) {
    PyObject *o; Py_ssize_t off; unsigned long long x; Py_buffer v;
    if (!PyArg_ParseTuple(args, "OnK", &o, &off, &x)) return NULL;
    if (get_buf(o, &v, 1) < 0) return NULL;
    if (check_range(&v, off, 8, "store_release") < 0) { PyBuffer_Release(&v); return NULL; }
    atomic_store_explicit(WORD(v, off), (uint64_t)x, memory_order_release);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

/* store_seq_cst(buf, off, value): a store that is also a full fence (wake-up handshake). */
static PyObject *py_store_seq_cst(PyObject *self, PyObject *args) {
    PyObject *o; Py_ssize_t off; unsigned long long x; Py_buffer v;
    if (!PyArg_ParseTuple(args, "OnK", &o, &off, &x)) return NULL;
    if (get_buf(o, &v, 1) < 0) return NULL;
    if (check_range(&v, off, 8, "store_seq_cst") < 0) { PyBuffer_Release(&v); return NULL; }
    atomic_store_explicit(WORD(v, off), (uint64_t)x, memory_order_seq_cst);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

/* load_seq_cst(buf, off) -> int */
static PyObject *py_load_seq_cst(PyObject *self, PyObject *args) {
    PyObject *o; Py_ssize_t off; Py_buffer v;
    if (!PyArg_ParseTuple(args, "On", &o, &off)) return NULL;
    if (get_buf(o, &v, 0) < 0) return NULL;
    if (check_range(&v, off, 8, "load_seq_cst") < 0) { PyBuffer_Release(&v); return NULL; }
    uint64_t x = atomic_load_explicit(WORD(v, off), memory_order_seq_cst);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(x);
}

/* fetch_add(buf, off, delta) -> previous value (seq_cst) */
static PyObject *py_fetch_add(PyObject *self, PyObject *args) {
    PyObject *o; Py_ssize_t off; long long d; Py_buffer v;
    if (!PyArg_ParseTuple(args, "OnL", &o, &off, &d)) return NULL;
    if (get_buf(o, &v, 1) < 0) return NULL;
    if (check_range(&v, off, 8, "fetch_add") < 0) { PyBuffer_Release(&v); return NULL; }
    uint64_t x = atomic_fetch_add_explicit(WORD(v, off), (uint64_t)d, memory_order_seq_cst);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(x);
}

/* compare_exchange(buf, off, expected, desired) -> bool */
static PyObject *py_cas(PyObject *self, PyObject *args) {
    PyObject *o; Py_ssize_t off; unsigned long long e, d; Py_buffer v;
    if (!PyArg_ParseTuple(args, "OnKK", &o, &off, &e, &d)) return NULL;
    if (get_buf(o, &v, 1) < 0) return NULL;
    if (check_range(&v, off, 8, "compare_exchange") < 0) { PyBuffer_Release(&v); return NULL; }
    uint64_t exp = e;
    int ok = atomic_compare_exchange_strong_explicit(WORD(v, off), &exp, (uint64_t)d,
                                                     memory_order_seq_cst, memory_order_seq_cst);
    PyBuffer_Release(&v);
    return PyBool_FromLong(ok);
}

/* fence(): a full (seq_cst) memory fence. */
static PyObject *py_fence(PyObject *self, PyObject *noargs) {
    atomic_thread_fence(memory_order_seq_cst);
    Py_RETURN_NONE;
}

/*
 * write_begin(buf, seq_off) -> the odd sequence now in the slot.
 * The release fence after the odd store keeps every later payload store behind it.
 */
static PyObject *py_write_begin(PyObject *self, PyObject *args) {
    PyObject *o; Py_ssize_t off; Py_buffer v; unsigned long long odd = 0;
    if (!PyArg_ParseTuple(args, "On|K", &o, &off, &odd)) return NULL;
    if (odd && !(odd & 1)) {
        PyErr_Format(PyExc_ValueError, "write_begin: sequence %llu is not odd", odd);
        return NULL;
    }
    if (get_buf(o, &v, 1) < 0) return NULL;
    if (check_range(&v, off, 8, "write_begin") < 0) { PyBuffer_Release(&v); return NULL; }
    au64 *w = WORD(v, off);
    uint64_t s;
    if (odd) {
        /* The ring passes 2n+1 for sample n, so the word also says WHICH sample it holds. */
        s = (uint64_t)odd - 1;
    } else {
        s = atomic_load_explicit(w, memory_order_relaxed);
        if (s & 1) s += 1; /* a writer died mid-write: start from the next even value */
    }
    atomic_store_explicit(w, s + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(s + 1);
}

/* fetch_or(buf, off, bits) / fetch_and(buf, off, bits) -> previous value (seq_cst). */
static PyObject *py_fetch_or(PyObject *self, PyObject *args) {
    PyObject *o; Py_ssize_t off; unsigned long long x; Py_buffer v;
    if (!PyArg_ParseTuple(args, "OnK", &o, &off, &x)) return NULL;
    if (get_buf(o, &v, 1) < 0) return NULL;
    if (check_range(&v, off, 8, "fetch_or") < 0) { PyBuffer_Release(&v); return NULL; }
    uint64_t r = atomic_fetch_or_explicit(WORD(v, off), (uint64_t)x, memory_order_seq_cst);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(r);
}

static PyObject *py_fetch_and(PyObject *self, PyObject *args) {
    PyObject *o; Py_ssize_t off; unsigned long long x; Py_buffer v;
    if (!PyArg_ParseTuple(args, "OnK", &o, &off, &x)) return NULL;
    if (get_buf(o, &v, 1) < 0) return NULL;
    if (check_range(&v, off, 8, "fetch_and") < 0) { PyBuffer_Release(&v); return NULL; }
    uint64_t r = atomic_fetch_and_explicit(WORD(v, off), (uint64_t)x, memory_order_seq_cst);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(r);
}

/*
 * validate(buf, seq_off) -> the sequence now in the word, loaded AFTER an acquire fence, so
 * every load the caller made from the slot before this call (a zero-copy view) is ordered
 * before it. Equal to the sequence seen before reading means the view was whole.
 */
static PyObject *py_validate(PyObject *self, PyObject *args) {
    PyObject *o; Py_ssize_t off; Py_buffer v;
    if (!PyArg_ParseTuple(args, "On", &o, &off)) return NULL;
    if (get_buf(o, &v, 0) < 0) return NULL;
    if (check_range(&v, off, 8, "validate") < 0) { PyBuffer_Release(&v); return NULL; }
    atomic_thread_fence(memory_order_acquire);
    uint64_t x = atomic_load_explicit(WORD(v, off), memory_order_relaxed);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(x);
}

/* write_end(buf, seq_off, odd_seq): publish; every payload store is visible before it. */
static PyObject *py_write_end(PyObject *self, PyObject *args) {
    PyObject *o; Py_ssize_t off; unsigned long long s; Py_buffer v;
    if (!PyArg_ParseTuple(args, "OnK", &o, &off, &s)) return NULL;
    if (get_buf(o, &v, 1) < 0) return NULL;
    if (check_range(&v, off, 8, "write_end") < 0) { PyBuffer_Release(&v); return NULL; }
    atomic_store_explicit(WORD(v, off), (uint64_t)s + 1, memory_order_release);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

/* copy(dst, dst_off, src, src_off, n): memcpy with the GIL released. */
static PyObject *py_copy(PyObject *self, PyObject *args) {
    PyObject *d, *s; Py_ssize_t doff, soff, n; Py_buffer dv, sv;
    if (!PyArg_ParseTuple(args, "OnOnn", &d, &doff, &s, &soff, &n)) return NULL;
    if (get_buf(d, &dv, 1) < 0) return NULL;
    if (get_buf(s, &sv, 0) < 0) { PyBuffer_Release(&dv); return NULL; }
    if (check_range(&dv, doff, n, "copy dst") < 0 || check_range(&sv, soff, n, "copy src") < 0) {
        PyBuffer_Release(&dv); PyBuffer_Release(&sv); return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    memcpy((char *)dv.buf + doff, (char *)sv.buf + soff, (size_t)n);
    Py_END_ALLOW_THREADS
    if (LOST_CHECK(&sv) || LOST_CHECK(&dv)) {
        PyBuffer_Release(&dv); PyBuffer_Release(&sv); return NULL;
    }
    PyBuffer_Release(&dv); PyBuffer_Release(&sv);
    Py_RETURN_NONE;
}

/*
 * read(src, seq_off, data_off, dst, dst_off, n) -> the even sequence copied, or 0 when the
 * slot was being written (odd) or changed during the copy (torn). The copy runs without
 * the GIL; the acquire fence after it keeps the payload loads before the second seq load.
 */
static PyObject *py_read(PyObject *self, PyObject *args) {
    PyObject *s, *d; Py_ssize_t seq_off, data_off, doff, n; Py_buffer sv, dv;
    if (!PyArg_ParseTuple(args, "OnnOnn", &s, &seq_off, &data_off, &d, &doff, &n)) return NULL;
    if (get_buf(s, &sv, 0) < 0) return NULL;
    if (get_buf(d, &dv, 1) < 0) { PyBuffer_Release(&sv); return NULL; }
    if (check_range(&sv, seq_off, 8, "read seq") < 0 || check_range(&sv, data_off, n, "read src") < 0 ||
        check_range(&dv, doff, n, "read dst") < 0) {
        PyBuffer_Release(&sv); PyBuffer_Release(&dv); return NULL;
    }
    au64 *w = WORD(sv, seq_off);
    uint64_t s1, s2;
    Py_BEGIN_ALLOW_THREADS
    s1 = atomic_load_explicit(w, memory_order_acquire);
    if (!(s1 & 1)) {
        memcpy((char *)dv.buf + doff, (char *)sv.buf + data_off, (size_t)n);
        atomic_thread_fence(memory_order_acquire);
        s2 = atomic_load_explicit(w, memory_order_relaxed);
    } else {
        s2 = s1 + 1;
    }
    Py_END_ALLOW_THREADS
    if (LOST_CHECK(&sv)) { PyBuffer_Release(&sv); PyBuffer_Release(&dv); return NULL; }
    PyBuffer_Release(&sv); PyBuffer_Release(&dv);
    return PyLong_FromUnsignedLongLong((s1 == s2 && !(s1 & 1)) ? s1 : 0);
}

/*
 * read2(src, seq_off, a_off, a_dst, a_n, b_off, b_dst, b_doff, b_n) -> even seq or 0.
 * Like read(), but copies two ranges of one slot (its small header into a scratch buffer,
 * its payload into the caller's buffer) between the same pair of sequence loads, so the
 * metadata and the payload are proven to come from the same write, with one GIL release.
 */
static PyObject *py_read2(PyObject *self, PyObject *args) {
    PyObject *s, *ad, *bd; Py_ssize_t seq_off, a_off, a_n, b_off, b_doff, b_n;
    Py_buffer sv, av, bv;
    if (!PyArg_ParseTuple(args, "OnnOnnOnn", &s, &seq_off, &a_off, &ad, &a_n, &b_off, &bd,
                          &b_doff, &b_n)) return NULL;
    if (get_buf(s, &sv, 0) < 0) return NULL;
    if (get_buf(ad, &av, 1) < 0) { PyBuffer_Release(&sv); return NULL; }
    if (get_buf(bd, &bv, 1) < 0) { PyBuffer_Release(&sv); PyBuffer_Release(&av); return NULL; }
    if (check_range(&sv, seq_off, 8, "read2 seq") < 0 || check_range(&sv, a_off, a_n, "read2 a src") < 0 ||
        check_range(&av, 0, a_n, "read2 a dst") < 0 || check_range(&sv, b_off, b_n, "read2 b src") < 0 ||
        check_range(&bv, b_doff, b_n, "read2 b dst") < 0) {
        PyBuffer_Release(&sv); PyBuffer_Release(&av); PyBuffer_Release(&bv); return NULL;
    }
    au64 *w = WORD(sv, seq_off);
    uint64_t s1, s2;
    Py_BEGIN_ALLOW_THREADS
    s1 = atomic_load_explicit(w, memory_order_acquire);
    if (!(s1 & 1)) {
        memcpy(av.buf, (char *)sv.buf + a_off, (size_t)a_n);
        memcpy((char *)bv.buf + b_doff, (char *)sv.buf + b_off, (size_t)b_n);
        atomic_thread_fence(memory_order_acquire);
        s2 = atomic_load_explicit(w, memory_order_relaxed);
    } else {
        s2 = s1 + 1;
    }
    Py_END_ALLOW_THREADS
    if (LOST_CHECK(&sv)) {
        PyBuffer_Release(&sv); PyBuffer_Release(&av); PyBuffer_Release(&bv); return NULL;
    }
    PyBuffer_Release(&sv); PyBuffer_Release(&av); PyBuffer_Release(&bv);
    return PyLong_FromUnsignedLongLong((s1 == s2 && !(s1 & 1)) ? s1 : 0);
}


static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/*
 * spin_until(buf, off, target, max_ns[, yield_every]) -> the word's value, loaded with acquire:
 * returns as soon as it is >= target, else after about max_ns of spinning (GIL released, a
 * pause instruction per probe; with yield_every, a sched_yield() every that many probes, so
 * a spinner on an oversubscribed CPU lets the runnable peer it waits for have the core). WHY: on a multi-core machine the peer usually publishes (or frees
 * a slot) within microseconds; a semaphore sleep costs a futex wake-up on the other side
 * (tens of us under KVM) and lets the scheduler put the woken process on the waker's core,
 * which serialises the two copies that should overlap. A bounded spin removes both; the
 * caller falls back to its lost-wake-up-safe sleep when the spin runs out.
 */
static PyObject *py_spin_until(PyObject *self, PyObject *args) {
    PyObject *o; Py_ssize_t off; unsigned long long target, max_ns; Py_buffer v;
    unsigned int yield_every = 0;
    if (!PyArg_ParseTuple(args, "OnKK|I", &o, &off, &target, &max_ns, &yield_every)) return NULL;
    if (yield_every & (yield_every - 1) || (yield_every && yield_every < 64)) {
        PyErr_Format(PyExc_ValueError, "spin_until: yield_every %u is not 0 or a power of two >= 64",
                     yield_every);
        return NULL;
    }
    if (get_buf(o, &v, 0) < 0) return NULL;
    if (check_range(&v, off, 8, "spin_until") < 0) { PyBuffer_Release(&v); return NULL; }
    au64 *w = WORD(v, off);
    uint64_t x = atomic_load_explicit(w, memory_order_acquire);
    if (x < target && max_ns) {
        Py_BEGIN_ALLOW_THREADS
        uint64_t end = now_ns() + max_ns;
        for (unsigned i = 1;; i++) {
            CPU_RELAX();
            x = atomic_load_explicit(w, memory_order_acquire);
            if (x >= target) break;
            if ((i & 63) == 0) {
                if (now_ns() >= end) break;
                if (yield_every && (i & (yield_every - 1)) == 0) sched_yield();
            }
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(x);
}

static PyMethodDef methods[] = {
    {"load_acquire", py_load_acquire, METH_VARARGS, "load_acquire(buf, off) -> int"},
    {"store_release", py_store_release, METH_VARARGS, "store_release(buf, off, value)"},
    {"load_seq_cst", py_load_seq_cst, METH_VARARGS, "load_seq_cst(buf, off) -> int"},
    {"store_seq_cst", py_store_seq_cst, METH_VARARGS, "store_seq_cst(buf, off, value)"},
    {"fetch_add", py_fetch_add, METH_VARARGS, "fetch_add(buf, off, delta) -> previous"},
    {"compare_exchange", py_cas, METH_VARARGS, "compare_exchange(buf, off, expected, desired) -> bool"},
    {"fence", py_fence, METH_NOARGS, "fence(): full memory fence"},
    {"write_begin", py_write_begin, METH_VARARGS,
     "write_begin(buf, seq_off[, odd]) -> odd seq (stores `odd` when given)"},
    {"fetch_or", py_fetch_or, METH_VARARGS, "fetch_or(buf, off, bits) -> previous"},
    {"fetch_and", py_fetch_and, METH_VARARGS, "fetch_and(buf, off, bits) -> previous"},
    {"validate", py_validate, METH_VARARGS, "validate(buf, seq_off) -> seq after an acquire fence"},
    {"read2", py_read2, METH_VARARGS,
     "read2(src, seq_off, a_off, a_dst, a_n, b_off, b_dst, b_doff, b_n) -> even seq or 0"},
    {"write_end", py_write_end, METH_VARARGS, "write_end(buf, seq_off, odd_seq)"},
    {"copy", py_copy, METH_VARARGS, "copy(dst, dst_off, src, src_off, n), GIL released"},
    {"spin_until", py_spin_until, METH_VARARGS,
     "spin_until(buf, off, target, max_ns[, yield_every]) -> value (acquire) once >= target "
     "or after max_ns"},
    {"guard", py_guard, METH_VARARGS,
     "guard(buf, label, path) -> id: turn SIGBUS in this mapping into an error (NOTE [truncated segments])"},
    {"unguard", py_unguard, METH_VARARGS, "unguard(id): forget a guarded mapping (after unmapping it)"},
    {"guard_faults", py_guard_faults, METH_VARARGS, "guard_faults(id) -> lost-page faults seen"},
    {"set_lost_error", py_set_lost_error, METH_O, "set_lost_error(cls): error raised for a lost mapping"},
    {"read", py_read, METH_VARARGS,
     "read(src, seq_off, data_off, dst, dst_off, n) -> even seq, or 0 if busy/torn"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_seqlock",
                                    "Seqlock memory ordering for the mmfeed ring.", -1, methods};

PyMODINIT_FUNC PyInit__seqlock(void) {
    long page = sysconf(_SC_PAGESIZE);
    if (page > 0) g_page = (uintptr_t)page;
    return PyModule_Create(&moddef);
}
