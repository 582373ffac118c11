/* The engine's per-iteration byte work on host memory, in C: writing the MESSAGE alltoall's
 * headers and inline payloads, reading the peers' headers, gathering inline payloads.
 *
 * Optional: the package builds it where a C compiler is present, and blsgpu/exchange/message.py
 * falls back to numpy where it is not (or with BLSGPU_NATIVE=0). Both do the same thing, byte for
 * byte; tests run both.
 *
 * Memory is passed as (address, capacity) pairs taken by the caller from tensors it owns (the
 * channel's buffers, the caller's contiguous send tensor, the result tensor). Every copy is checked
 * against the capacity it writes into or reads from, so a wrong size is a ValueError here, never a
 * write out of bounds. The GIL is held throughout: these calls are short and touch no Python
 * object after parsing.
 *
 * Header layout (int64, 16 per header; blsgpu/exchange/message.py has the names):
 *   0..9   fixed per kind of rows: magic, channel, dtype, ndim, 6 trailing dims
 *   10     iteration   11 rows   12 released   13 expected rows (-1: not said)   14 spill   15 zero
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { H_LEN = 16, H_BYTES = 128, H_FIXED = 10, H_ITER = 10, H_ROWS = 11, H_RELEASED = 12, H_EXPECT = 13,
       H_SPILL = 14 };

/* `seq` (a list of Python ints, checked by the caller to be W non-negative ints) into out[W]. */
static int read_ints(PyObject *seq, Py_ssize_t W, int64_t *out, const char *what) {
    if (!PyList_Check(seq) || PyList_GET_SIZE(seq) != W) {
        PyErr_Format(PyExc_ValueError, "%s must be a list of %zd ints", what, W);
        return -1;
    }
    for (Py_ssize_t p = 0; p < W; p++) {
        long long v = PyLong_AsLongLong(PyList_GET_ITEM(seq, p));
        if (v == -1 && PyErr_Occurred()) return -1;
        out[p] = (int64_t)v;
    }
    return 0;
}

/* a * b into *out, or ValueError on overflow or a negative value. */
static int checked_mul(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, out)) {
        PyErr_SetString(PyExc_ValueError, "byte count out of range");
        return -1;
    }
    return 0;
}

static int checked_add(int64_t a, int64_t b, int64_t *out) {
    if (__builtin_add_overflow(a, b, out)) {
        PyErr_SetString(PyExc_ValueError, "byte count out of range");
        return -1;
    }
    return 0;
}

static int64_t *alloc_ints(Py_ssize_t n) {
    int64_t *p = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    if (p == NULL) PyErr_NoMemory();
    return p;
}

/* fill_message(msg_addr, msg_cap, src_addr, src_cap, send_splits, me, row_bytes, fixed, k, released,
 *              spill, recv_splits, keep) -> total
 *
 * Writes every peer's message (header, then its payload unless spill) in rank order, this rank
 * left out, into msg; returns the bytes written. With keep, this rank's own rows follow the
 * messages at msg + total. `fixed` holds the H_FIXED fixed fields (bytes); recv_splits may be
 * None (expected rows -1). */
static PyObject *fill_message(PyObject *self, PyObject *args) {
    unsigned long long msg_addr, src_addr;
    long long msg_cap, src_cap, k, released;
    Py_ssize_t me, rb_in;
    PyObject *send_splits, *recv_splits;
    Py_buffer fixed;
    int spill, keep;
    if (!PyArg_ParseTuple(args, "KLKLOnny*LLpOp", &msg_addr, &msg_cap, &src_addr, &src_cap, &send_splits, &me,
                          &rb_in, &fixed, &k, &released, &spill, &recv_splits, &keep))
        return NULL;
    PyObject *result = NULL;
    int64_t *s = NULL, *r = NULL;
    if (fixed.len != H_FIXED * 8) {
        PyErr_SetString(PyExc_ValueError, "fixed header fields must be 80 bytes");
        goto done;
    }
    Py_ssize_t W = PyList_Check(send_splits) ? PyList_GET_SIZE(send_splits) : -1;
    if (W < 1 || me < 0 || me >= W || rb_in < 0) {
        PyErr_SetString(PyExc_ValueError, "bad world size, rank or row bytes");
        goto done;
    }
    int64_t rb = rb_in;
    if (!(s = alloc_ints(W)) || read_ints(send_splits, W, s, "send_splits") < 0) goto done;
    if (recv_splits != Py_None) {
        if (!(r = alloc_ints(W)) || read_ints(recv_splits, W, r, "recv_splits") < 0) goto done;
    }
    /* Sizes first: nothing is written unless all of it fits. */
    int64_t total = 0, src_need = 0, nb, lo = 0;
    for (Py_ssize_t p = 0; p < W; p++) {
        if (checked_mul(s[p], rb, &nb) < 0 || checked_add(src_need, nb, &src_need) < 0) goto done;
        if (p < me) lo += nb;
        if (p != me && checked_add(total, H_BYTES + (spill ? 0 : nb), &total) < 0) goto done;
    }
    int64_t n_me = spill ? 0 : s[me] * rb;
    int64_t need = total + (keep ? n_me : 0);
    if (need > msg_cap || (!spill && src_need > src_cap)) {
        PyErr_Format(PyExc_ValueError, "message of %lld bytes (source %lld) does not fit %lld (source %lld)",
                     (long long)need, (long long)src_need, msg_cap, src_cap);
        goto done;
    }
    if (!spill && src_need > 0 && src_addr == 0) {
        PyErr_SetString(PyExc_ValueError, "no source bytes for an inline payload");
        goto done;
    }
    uint8_t *msg = (uint8_t *)(uintptr_t)msg_addr;
    const uint8_t *src = (const uint8_t *)(uintptr_t)src_addr;
    int64_t at = 0, from = 0;
    for (Py_ssize_t p = 0; p < W; p++) {
        nb = s[p] * rb;
        if (p != me) {
            int64_t h[H_LEN - H_FIXED] = {k, s[p], released, r ? r[p] : -1, spill ? 1 : 0, 0};
            memcpy(msg + at, fixed.buf, H_FIXED * 8);
            memcpy(msg + at + H_FIXED * 8, h, sizeof h);
            at += H_BYTES;
            if (!spill && nb) {
                memcpy(msg + at, src + from, (size_t)nb);
                at += nb;
            }
        }
        from += nb;
    }
    if (keep && n_me) memcpy(msg + total, src + lo, (size_t)n_me);
    result = PyLong_FromLongLong(total);
done:
    PyMem_Free(s);
    PyMem_Free(r);
    PyBuffer_Release(&fixed);
    return result;
}

/* read_headers(table_addr, table_cap, W, me, stride, fixed, k, own_rows, own_released, own_expect)
 *   -> (off, corrupt, rows, released, expect, said, spill)
 *
 * The peers' headers at table + q * stride (q: peers in rank order, this rank left out). off: some
 * peer's fixed fields differ from `fixed`; corrupt: a peer's magic, channel or iteration differ (the
 * caller then looks closely). rows, released, expect: per rank, this rank's own values at `me`;
 * said: some peer gave its expected rows; spill: some peer spilled. */
static PyObject *read_headers(PyObject *self, PyObject *args) {
    unsigned long long table_addr;
    long long table_cap, k, own_rows, own_released, own_expect;
    Py_ssize_t W, me, stride;
    Py_buffer fixed;
    if (!PyArg_ParseTuple(args, "KLnnny*LLLL", &table_addr, &table_cap, &W, &me, &stride, &fixed, &k, &own_rows,
                          &own_released, &own_expect))
        return NULL;
    PyObject *rows = NULL, *released = NULL, *expect = NULL, *result = NULL;
    if (fixed.len != H_FIXED * 8 || W < 1 || me < 0 || me >= W || stride < H_BYTES ||
        (W - 1) > table_cap / stride) {
        PyErr_SetString(PyExc_ValueError, "bad header table");
        goto done;
    }
    rows = PyList_New(W);
    released = PyList_New(W);
    expect = PyList_New(W);
    if (!rows || !released || !expect) goto done;
    const uint8_t *table = (const uint8_t *)(uintptr_t)table_addr;
    const int64_t *want = (const int64_t *)fixed.buf;
    int off = 0, corrupt = 0, said = 0, spill = 0;
    for (Py_ssize_t p = 0; p < W; p++) {
        int64_t nr, rel, exp;
        if (p == me) {
            nr = own_rows, rel = own_released, exp = own_expect;
        } else {
            int64_t h[H_LEN];
            memcpy(h, table + (p - (p > me)) * stride, H_BYTES);
            if (memcmp(h, want, H_FIXED * 8)) {
                off = 1;
                if (h[0] != want[0] || h[1] != want[1]) corrupt = 1;
            }
            if (h[H_ITER] != k) corrupt = 1;
            nr = h[H_ROWS], rel = h[H_RELEASED], exp = h[H_EXPECT];
            if (exp != -1) said = 1;
            if (h[H_SPILL]) spill = 1;
        }
        PyObject *a = PyLong_FromLongLong(nr), *b = PyLong_FromLongLong(rel), *c = PyLong_FromLongLong(exp);
        if (!a || !b || !c) {
            Py_XDECREF(a), Py_XDECREF(b), Py_XDECREF(c);
            goto done;
        }
        PyList_SET_ITEM(rows, p, a);
        PyList_SET_ITEM(released, p, b);
        PyList_SET_ITEM(expect, p, c);
    }
    result = Py_BuildValue("(iiOOOii)", off, corrupt, rows, released, expect, said, spill);
done:
    Py_XDECREF(rows);
    Py_XDECREF(released);
    Py_XDECREF(expect);
    PyBuffer_Release(&fixed);
    return result;
}

/* gather(out_addr, out_cap, table_addr, table_cap, stride, rows, me, own_addr, own_cap, row_bytes)
 *
 * Rows from every rank in rank order into out: a peer's from behind its header in the table, this
 * rank's own from `own`. */
static PyObject *gather(PyObject *self, PyObject *args) {
    unsigned long long out_addr, table_addr, own_addr;
    long long out_cap, table_cap, own_cap;
    Py_ssize_t stride, me, rb_in;
    PyObject *rows_list;
    if (!PyArg_ParseTuple(args, "KLKLnOnKLn", &out_addr, &out_cap, &table_addr, &table_cap, &stride, &rows_list,
                          &me, &own_addr, &own_cap, &rb_in))
        return NULL;
    Py_ssize_t W = PyList_Check(rows_list) ? PyList_GET_SIZE(rows_list) : -1;
    if (W < 1 || me < 0 || me >= W || stride < H_BYTES || rb_in < 0 || (W - 1) > table_cap / stride) {
        PyErr_SetString(PyExc_ValueError, "bad gather arguments");
        return NULL;
    }
    int64_t *rows = alloc_ints(W);
    if (!rows) return NULL;
    PyObject *result = NULL;
    if (read_ints(rows_list, W, rows, "rows") < 0) goto done;
    int64_t total = 0, nb;
    for (Py_ssize_t p = 0; p < W; p++) {
        if (checked_mul(rows[p], rb_in, &nb) < 0 || checked_add(total, nb, &total) < 0) goto done;
        if (p == me ? nb > own_cap : nb > stride - H_BYTES) {
            PyErr_SetString(PyExc_ValueError, "a payload is longer than where it lies");
            goto done;
        }
    }
    if (total > out_cap) {
        PyErr_SetString(PyExc_ValueError, "the rows do not fit the result");
        goto done;
    }
    uint8_t *out = (uint8_t *)(uintptr_t)out_addr;
    const uint8_t *table = (const uint8_t *)(uintptr_t)table_addr;
    for (Py_ssize_t p = 0; p < W; p++) {
        nb = rows[p] * rb_in;
        if (!nb) continue;
        const uint8_t *from = p == me ? (const uint8_t *)(uintptr_t)own_addr
                                      : table + (p - (p > me)) * stride + H_BYTES;
        memcpy(out, from, (size_t)nb);
        out += nb;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(rows);
    return result;
}

static PyMethodDef methods[] = {
    {"fill_message", fill_message, METH_VARARGS, "Write every peer's header and inline payload."},
    {"read_headers", read_headers, METH_VARARGS, "Read and check every peer's header."},
    {"gather", gather, METH_VARARGS, "Gather inline payloads and own rows in rank order."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
