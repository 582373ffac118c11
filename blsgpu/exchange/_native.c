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

/* Rows from every rank in rank order into out (its bounds checked by the caller): a peer's from behind
 * its header in the table, this rank's own from `own` (NULL, or `out`'s own place: in place already). */
static void copy_rows(uint8_t *out, const uint8_t *table, Py_ssize_t stride, const int64_t *rows, Py_ssize_t W,
                      Py_ssize_t me, int64_t rb, const uint8_t *own) {
    for (Py_ssize_t p = 0; p < W; p++) {
        int64_t nb = rows[p] * rb;
        const uint8_t *from = p == me ? own : table + (p - (p > me)) * stride + H_BYTES;
        if (nb && from && from != out) memcpy(out, from, (size_t)nb);
        out += nb;
    }
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
    copy_rows((uint8_t *)(uintptr_t)out_addr, (const uint8_t *)(uintptr_t)table_addr, stride, rows, W, me, rb_in,
              (const uint8_t *)(uintptr_t)own_addr);
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(rows);
    return result;
}

/* Splits as a caller passed them, read for the fast path: a list or tuple of W Python ints, each
 * >= 0, whose sum fits an int64. Returns 1 and fills out[W] (and *sum), or 0 for anything else (the
 * caller then takes the general path, which says what is wrong). Never leaves an error set. */
static int fast_splits(PyObject *seq, Py_ssize_t W, int64_t *out, int64_t *sum) {
    PyObject **items;
    if (PyList_CheckExact(seq) && PyList_GET_SIZE(seq) == W)
        items = ((PyListObject *)seq)->ob_item;
    else if (PyTuple_CheckExact(seq) && PyTuple_GET_SIZE(seq) == W)
        items = ((PyTupleObject *)seq)->ob_item;
    else
        return 0;
    int64_t total = 0;
    for (Py_ssize_t p = 0; p < W; p++) {
        if (!PyLong_CheckExact(items[p])) return 0;
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(items[p], &overflow);
        if (overflow || v < 0 || __builtin_add_overflow(total, (int64_t)v, &total)) {
            PyErr_Clear();
            return 0;
        }
        out[p] = (int64_t)v;
    }
    *sum = total;
    return 1;
}

static PyObject *int_list(const int64_t *v, Py_ssize_t W) {
    PyObject *list = PyList_New(W);
    if (!list) return NULL;
    for (Py_ssize_t p = 0; p < W; p++) {
        PyObject *x = PyLong_FromLongLong(v[p]);
        if (!x) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, p, x);
    }
    return list;
}

/* post_inline(msg_addr, msg_cap, src_addr, src_rows, send_splits, recv_splits, W, me, row_bytes,
 *             inline_cap, fixed, k, released, out_addr, out_cap)
 *   -> None | need | (total, send_splits, recv_splits, in_sizes)
 *
 * exchange()'s checks and byte work in one call, for the common case: splits that are lists (or
 * tuples) of W non-negative ints adding up to src_rows (and recv_splits[me] == send_splits[me]),
 * every peer's payload no longer than inline_cap. None: not that case (nothing written; the general
 * path runs and says what is wrong). An int: msg holds fewer than that many bytes (nothing written;
 * grow it and call again). Else every peer's header and payload are in msg (as fill_message writes
 * them), and msg has room behind them for this rank's own rows; place_own() puts them there (out_addr
 * 0) or in place in `out`, the result sized by recv_splits (out_cap: exactly its bytes), once the
 * messages are posted. Returns the splits as new lists and the per-rank byte counts of the MESSAGE
 * alltoall's input (0 at me). */
static PyObject *post_inline(PyObject *self, PyObject *args) {
    unsigned long long msg_addr, src_addr, out_addr;
    long long msg_cap, src_rows, k, released, out_cap;
    Py_ssize_t W, me, rb_in, cap;
    PyObject *send_obj, *recv_obj;
    Py_buffer fixed;
    if (!PyArg_ParseTuple(args, "KLKLOOnnnny*LLKL", &msg_addr, &msg_cap, &src_addr, &src_rows, &send_obj,
                          &recv_obj, &W, &me, &rb_in, &cap, &fixed, &k, &released, &out_addr, &out_cap))
        return NULL;
    PyObject *result = NULL;
    int64_t *s = NULL, *r = NULL, *sizes = NULL;
    if (fixed.len != H_FIXED * 8 || W < 1 || me < 0 || me >= W || rb_in < 0 || cap < 0) {
        PyErr_SetString(PyExc_ValueError, "bad world size, rank, row bytes or inline capacity");
        goto done;
    }
    if (!(s = alloc_ints(W)) || !(r = alloc_ints(W)) || !(sizes = alloc_ints(W))) goto done;
    int64_t rb = rb_in, s_sum, r_sum = 0, nb;
    int known = recv_obj != Py_None;
    memset(r, 0, (size_t)W * sizeof(int64_t));
    if (!fast_splits(send_obj, W, s, &s_sum) || s_sum != src_rows ||
        (known && (!fast_splits(recv_obj, W, r, &r_sum) || r[me] != s[me])))
        goto general;
    /* Sizes first: nothing is written unless all of it fits. */
    int64_t total = 0, src_bytes, r_bytes;
    if (__builtin_mul_overflow(s_sum, rb, &src_bytes) || __builtin_mul_overflow(r_sum, rb, &r_bytes))
        goto general;
    for (Py_ssize_t p = 0; p < W; p++) {
        nb = s[p] * rb; /* <= src_bytes: no overflow */
        if (p == me) {
            sizes[p] = 0;
            continue;
        }
        if (nb > cap) goto general; /* too large to inline: the data alltoall carries it */
        sizes[p] = H_BYTES + nb;
        total += sizes[p];
    }
    int64_t n_me = s[me] * rb;
    if (out_addr && (!known || r_bytes != out_cap)) goto general;
    int64_t need = total + (out_addr ? 0 : n_me);
    if (need > msg_cap) {
        result = PyLong_FromLongLong(need);
        goto done;
    }
    if (src_bytes > 0 && src_addr == 0) {
        PyErr_SetString(PyExc_ValueError, "no source bytes for an inline payload");
        goto done;
    }
    uint8_t *msg = (uint8_t *)(uintptr_t)msg_addr;
    const uint8_t *src = (const uint8_t *)(uintptr_t)src_addr;
    int64_t at = 0, from = 0;
    for (Py_ssize_t p = 0; p < W; p++) {
        nb = s[p] * rb;
        if (p != me) {
            int64_t h[H_LEN - H_FIXED] = {k, s[p], released, known ? r[p] : -1, 0, 0};
            memcpy(msg + at, fixed.buf, H_FIXED * 8);
            memcpy(msg + at + H_FIXED * 8, h, sizeof h);
            at += H_BYTES;
            if (nb) memcpy(msg + at, src + from, (size_t)nb);
            at += nb;
        }
        from += nb;
    }
    PyObject *sl = int_list(s, W), *rl = known ? int_list(r, W) : (Py_INCREF(Py_None), Py_None),
             *zl = int_list(sizes, W);
    if (sl && rl && zl) result = Py_BuildValue("(LOOO)", (long long)total, sl, rl, zl);
    Py_XDECREF(sl);
    Py_XDECREF(rl);
    Py_XDECREF(zl);
    goto done;
general:
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(s);
    PyMem_Free(r);
    PyMem_Free(sizes);
    PyBuffer_Release(&fixed);
    return result;
}

/* receive_inline(table_addr, table_cap, W, me, stride, fixed, k, send_splits, recv_splits,
 *                own_released, row_bytes[, out_addr, out_cap]) -> None | (rows, released)
 *
 * wait()'s header work in one call, for the common case: every peer's header of iteration k has
 * this kind of rows, no peer spilled, each sends what recv_splits (when given) says and expects
 * what this rank sends (where it said). None: not that case (the general path reads the headers
 * again and says what disagreed, or posts the data alltoall). Else returns what each rank sends this
 * one and each one's release count (this rank's own at me); every payload, checked here to lie
 * within its peer's region, can then be gathered (gather()). With out_addr (the result, out_cap its
 * bytes, this rank's own rows in place already: place_own), the peers' payloads are gathered into
 * it here, in the same call. */
static PyObject *receive_inline(PyObject *self, PyObject *args) {
    unsigned long long table_addr;
    long long table_cap, k, own_released;
    Py_ssize_t W, me, stride, rb_in;
    unsigned long long out_addr = 0;
    long long out_cap = 0;
    PyObject *send_list, *recv_obj;
    Py_buffer fixed;
    if (!PyArg_ParseTuple(args, "KLnnny*LOOLn|KL", &table_addr, &table_cap, &W, &me, &stride, &fixed, &k,
                          &send_list, &recv_obj, &own_released, &rb_in, &out_addr, &out_cap))
        return NULL;
    PyObject *result = NULL;
    int64_t *s = NULL, *r = NULL, *rows = NULL, *rel = NULL;
    if (fixed.len != H_FIXED * 8 || W < 1 || me < 0 || me >= W || stride < H_BYTES || rb_in < 0 ||
        (W - 1) > table_cap / stride) {
        PyErr_SetString(PyExc_ValueError, "bad header table");
        goto done;
    }
    int known = recv_obj != Py_None;
    if (!(s = alloc_ints(W)) || !(r = alloc_ints(W)) || !(rows = alloc_ints(W)) || !(rel = alloc_ints(W)))
        goto done;
    if (read_ints(send_list, W, s, "send_splits") < 0 || (known && read_ints(recv_obj, W, r, "recv_splits") < 0))
        goto done;
    const uint8_t *table = (const uint8_t *)(uintptr_t)table_addr;
    int64_t rb = rb_in, total = 0, nb;
    for (Py_ssize_t p = 0; p < W; p++) {
        if (p == me) {
            rows[p] = s[me], rel[p] = own_released;
        } else {
            int64_t h[H_LEN];
            memcpy(h, table + (p - (p > me)) * stride, H_BYTES);
            if (memcmp(h, fixed.buf, H_FIXED * 8) || h[H_ITER] != k || h[H_SPILL] || h[H_ROWS] < 0 ||
                (known && h[H_ROWS] != r[p]) || (h[H_EXPECT] != -1 && h[H_EXPECT] != s[p]) ||
                __builtin_mul_overflow(h[H_ROWS], rb, &nb) || nb > stride - H_BYTES)
                goto general;
            rows[p] = h[H_ROWS], rel[p] = h[H_RELEASED];
        }
        if (checked_mul(rows[p], rb, &nb) < 0 || checked_add(total, nb, &total) < 0) goto done;
    }
    if (out_addr) {
        if (total > out_cap) goto general; /* the general path says why */
        copy_rows((uint8_t *)(uintptr_t)out_addr, table, stride, rows, W, me, rb, NULL); /* own rows in place */
    }
    PyObject *rl = int_list(rows, W), *el = int_list(rel, W);
    if (rl && el) result = PyTuple_Pack(2, rl, el);
    Py_XDECREF(rl);
    Py_XDECREF(el);
    goto done;
general:
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(s);
    PyMem_Free(r);
    PyMem_Free(rows);
    PyMem_Free(rel);
    PyBuffer_Release(&fixed);
    return result;
}

/* place_own(src_addr, src_rows, send_splits, recv_splits, me, row_bytes, msg_addr, msg_cap, total,
 *           out_addr, out_cap)
 *
 * This rank's own rows of an iteration post_inline() wrote (same splits, now lists), from the
 * caller's send bytes to where wait() takes them: in place in `out` (out_addr: the result, out_cap
 * its bytes) or behind the messages at msg + total. Called once the messages are posted: the copy
 * overlaps the transport's work instead of delaying it. Source and destination may overlap (an
 * `out` that is the send tensor). */
static PyObject *place_own(PyObject *self, PyObject *args) {
    unsigned long long src_addr, msg_addr, out_addr;
    long long src_rows, msg_cap, total, out_cap;
    Py_ssize_t me, rb_in;
    PyObject *send_list, *recv_obj;
    if (!PyArg_ParseTuple(args, "KLOOnnKLLKL", &src_addr, &src_rows, &send_list, &recv_obj, &me, &rb_in, &msg_addr,
                          &msg_cap, &total, &out_addr, &out_cap))
        return NULL;
    Py_ssize_t W = PyList_Check(send_list) ? PyList_GET_SIZE(send_list) : -1;
    if (W < 1 || me < 0 || me >= W || rb_in < 0 || total < 0) {
        PyErr_SetString(PyExc_ValueError, "bad world size, rank, row bytes or message size");
        return NULL;
    }
    int64_t *s = alloc_ints(W), *r = alloc_ints(W);
    PyObject *result = NULL;
    if (!s || !r || read_ints(send_list, W, s, "send_splits") < 0) goto done;
    if (out_addr && (recv_obj == Py_None || read_ints(recv_obj, W, r, "recv_splits") < 0)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "placing rows in the result needs recv_splits");
        goto done;
    }
    int64_t rb = rb_in, lo = 0, out_lo = 0, sum = 0, nb, n_me, src_bytes, end;
    for (Py_ssize_t p = 0; p < W; p++) {
        if (checked_mul(s[p], rb, &nb) < 0 || checked_add(sum, s[p], &sum) < 0) goto done;
        if (p < me && (checked_add(lo, nb, &lo) < 0 ||
                       (out_addr && (checked_mul(r[p], rb, &nb) < 0 || checked_add(out_lo, nb, &out_lo) < 0))))
            goto done;
    }
    n_me = s[me] * rb;
    if (sum != src_rows || checked_mul(sum, rb, &src_bytes) < 0 || checked_add(out_addr ? out_lo : total, n_me, &end) < 0)
        goto done;
    if (end > (out_addr ? out_cap : msg_cap) || lo + n_me > src_bytes) {
        PyErr_SetString(PyExc_ValueError, "own rows do not fit where they go");
        goto done;
    }
    if (n_me) {
        uint8_t *dst = out_addr ? (uint8_t *)(uintptr_t)out_addr + out_lo : (uint8_t *)(uintptr_t)msg_addr + total;
        memmove(dst, (const uint8_t *)(uintptr_t)src_addr + lo, (size_t)n_me);
    }
    result = Py_None;
    Py_INCREF(result);
done:
    if (!result && !PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "send_splits do not add up to the rows");
    PyMem_Free(s);
    PyMem_Free(r);
    return result;
}

static PyMethodDef methods[] = {
    {"fill_message", fill_message, METH_VARARGS, "Write every peer's header and inline payload."},
    {"read_headers", read_headers, METH_VARARGS, "Read and check every peer's header."},
    {"gather", gather, METH_VARARGS, "Gather inline payloads and own rows in rank order."},
    {"post_inline", post_inline, METH_VARARGS, "exchange()'s checks and byte work, the common case."},
    {"place_own", place_own, METH_VARARGS, "Own rows of a posted iteration to where wait() takes them."},
    {"receive_inline", receive_inline, METH_VARARGS, "wait()'s header work and gather, the common case."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
