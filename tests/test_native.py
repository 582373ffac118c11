"""The engine's byte work in C (blsgpu/exchange/_native.c) against its numpy path, byte for byte,
and its bounds: a size that does not fit is a ValueError, never a write out of bounds.

The exchange and contract tests run the channel on whichever path is active (C where it was
built); test_numpy_path_is_exact runs the contract's exactness check on the numpy path too.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from _contract import WORLDS, exact_body
from hypothesis import given, settings
from hypothesis import strategies as st

from blsgpu.exchange import message
from blsgpu.exchange.message import HEADER_BYTES, Rows, fill_message, gather, read_headers

native = message.native()
needs_native = pytest.mark.skipif(
    native is None, reason="the C module was not built (no C compiler at install) or BLSGPU_NATIVE=0"
)

H = HEADER_BYTES


def test_the_c_module_is_built_where_a_compiler_is():
    # CI installs with a C compiler: there the engine must run its C path, not silently fall back.
    if os.environ.get("CI") and os.environ.get("BLSGPU_NATIVE", "1") != "0":
        assert native is not None, "blsgpu.exchange._native was not built"


@st.composite
def _iterations(draw):
    w = draw(st.integers(1, 6))
    me = draw(st.integers(0, w - 1))
    rb = draw(st.sampled_from([0, 1, 3, 8, 20]))
    splits = draw(st.lists(st.integers(0, 9), min_size=w, max_size=w))
    recv = draw(st.none() | st.lists(st.integers(0, 9), min_size=w, max_size=w))
    spill = draw(st.booleans())
    keep = draw(st.booleans())
    return w, me, rb, splits, recv, spill, keep


def _src(splits, rb):
    return np.random.default_rng(len(splits) * 7 + rb).integers(0, 256, sum(splits) * rb, dtype=np.uint8)


@needs_native
@settings(max_examples=300, deadline=None)
@given(_iterations(), st.integers(0, 10**6), st.integers(0, 10**6))
def test_fill_message_writes_what_the_numpy_path_writes(case, k, released):
    w, me, rb, splits, recv, spill, keep = case
    fixed = Rows(5, torch.float32, (2, 3)).fixed
    src = _src(splits, rb)
    cap = H * w + len(src) + 64
    want = np.full(cap, 0xAB, dtype=np.uint8)
    got = want.copy()
    args = (splits, me, rb, fixed, k, released, spill, recv, keep)
    total = fill_message(want, src, *args)
    src_t = torch.from_numpy(src)
    got_t = torch.from_numpy(got)
    assert native.fill_message(got_t.data_ptr(), cap, src_t.data_ptr(), len(src), *args) == total
    assert np.array_equal(got, want)  # every byte, the untouched tail too


@needs_native
@settings(max_examples=300, deadline=None)
@given(_iterations(), st.integers(0, 1000), st.data())
def test_read_headers_and_gather_agree_with_the_numpy_path(case, k, data):
    w, me, rb, splits, recv, _, _ = case
    kind = Rows(2, torch.float16, (4,))
    stride = H + 9 * max(rb, 1) + 8
    # Peers' messages as fill_message lays them out, one per region of the receive table; now and
    # then a header of another iteration (corrupt) or of another dtype (off, not corrupt).
    table = np.zeros((w - 1, stride), dtype=np.uint8)
    for q in range(w - 1):
        rows_q = data.draw(st.integers(0, 9))
        hdr = kind.head.copy()
        late = data.draw(st.integers(0, 9)) == 0
        hdr[10:15] = [k + late, rows_q, 3 * q, data.draw(st.sampled_from([-1, 0, 4])), q % 2]
        if data.draw(st.integers(0, 9)) == 0:
            hdr[2] = 7
        table[q, :H] = hdr.view(np.uint8)
        table[q, H : H + rows_q * rb] = np.arange(rows_q * rb) % 251
    own = (splits[me], 11, splits[me])
    want = read_headers(table, me, kind.fixed, k, *own)
    flat = torch.from_numpy(table.reshape(-1)) if table.size else torch.zeros(1, dtype=torch.uint8)
    got = native.read_headers(flat.data_ptr(), table.size, w, me, stride, kind.fixed, k, *own)
    flags = (0, 1, 5, 6)  # off, corrupt, said, spill: ints from C, bools from numpy
    assert [bool(x) if i in flags else x for i, x in enumerate(got)] == [
        bool(x) if i in flags else x for i, x in enumerate(want)
    ]
    rows = want[2]
    own_bytes = _src([splits[me]], rb)
    total = sum(rows) * rb
    out_want = np.full(total + 16, 7, dtype=np.uint8)
    out_got = out_want.copy()
    if total:
        gather(out_want[:total], table, rows, me, own_bytes, rb)
        own_t, out_t = torch.from_numpy(own_bytes), torch.from_numpy(out_got)
        native.gather(
            out_t.data_ptr(),
            total,
            flat.data_ptr(),
            table.size,
            stride,
            rows,
            me,
            own_t.data_ptr(),
            len(own_bytes),
            rb,
        )
    assert np.array_equal(out_got, out_want)  # and nothing past the result written


@needs_native
def test_sizes_that_do_not_fit_are_refused_before_a_byte_is_written():
    fixed = Rows(1, torch.float32, (4,)).fixed
    src = torch.arange(64, dtype=torch.uint8)
    msg = torch.full((H + 31,), 9, dtype=torch.uint8)  # one byte short for a header + 32 bytes
    args = ([32, 32], 0, 1, fixed, 0, 0, False, None, False)
    with pytest.raises(ValueError, match="does not fit"):
        native.fill_message(msg.data_ptr(), msg.numel(), src.data_ptr(), 64, *args)
    with pytest.raises(ValueError, match="does not fit"):  # the source is shorter than the splits
        native.fill_message(msg.data_ptr(), 10**6, src.data_ptr(), 63, *args)
    assert bool((msg == 9).all())
    with pytest.raises(ValueError, match="no source bytes"):
        native.fill_message(msg.data_ptr(), 10**6, 0, 10**6, *args)
    with pytest.raises(ValueError, match="out of range"):
        native.fill_message(
            msg.data_ptr(), 10**6, src.data_ptr(), 64, [2**62, 1], 0, 8, fixed, 0, 0, False, None, 0
        )
    table = torch.zeros(2 * 200, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bad header table"):  # 3 peers' regions do not fit 400 bytes
        native.read_headers(table.data_ptr(), table.numel(), 4, 0, 200, fixed, 0, 0, 0, 0)
    out = torch.zeros(100, dtype=torch.uint8)
    with pytest.raises(ValueError, match="longer than where it lies"):  # 80 bytes in a 72-byte region
        native.gather(out.data_ptr(), 100, table.data_ptr(), 400, 200, [0, 80, 0], 0, 0, 0, 1)
    with pytest.raises(ValueError, match="do not fit the result"):
        native.gather(out.data_ptr(), 100, table.data_ptr(), 400, 200, [30, 40, 40], 0, src.data_ptr(), 64, 1)
    with pytest.raises(ValueError, match="longer than where it lies"):  # own rows beyond `own`
        native.gather(out.data_ptr(), 100, table.data_ptr(), 400, 200, [65, 0, 0], 0, src.data_ptr(), 64, 1)


def _numpy_exact_body(rank, w, bound, iters, seed, channel_kwargs):
    os.environ["BLSGPU_NATIVE"] = "0"  # read when a channel is created
    bad, stats = exact_body(rank, w, bound, iters, seed, channel_kwargs)
    return bad, stats["native"]


@pytest.mark.parametrize("inline_bytes", [None, 64])
def test_numpy_path_is_exact(inline_bytes):
    # What an install without a C compiler runs: the same contract, the same bytes (64: some
    # iterations need the data alltoall, with a send slot rebuilt from a direct post's message).
    w, bound, iters = 3, 2, 60
    kwargs = {} if inline_bytes is None else {"inline_bytes": inline_bytes}
    results = WORLDS["gloo"].run(w, _numpy_exact_body, bound, iters, 77, kwargs, timeout_s=240)
    for rank, (bad, used_native) in enumerate(results):
        assert bad == [], f"rank {rank}: iterations differ from the synchronous reference: {bad[:10]}"
        assert used_native is False


# ------------------------------------------------------------------------------------------------
# The fast path's calls (post_inline, place_own, receive_inline) against the general path's.


def _ptr(a: np.ndarray) -> tuple[torch.Tensor, int]:
    """A tensor over `a` (kept alive by the caller) and its address (a 1-byte tensor when empty)."""
    t = torch.from_numpy(a) if a.size else torch.zeros(1, dtype=torch.uint8)
    return t, t.data_ptr()


@needs_native
@settings(max_examples=300, deadline=None)
@given(
    _iterations(),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.sampled_from([8, 24, 64, 10**6]),
    st.booleans(),
    st.booleans(),
)
def test_post_inline_and_place_own_write_what_fill_message_writes(case, k, released, cap, into_out, as_tuple):
    w, me, rb, splits, recv, _, _ = case
    fixed = Rows(5, torch.float32, (2, 3)).fixed
    src = _src(splits, rb)
    src_t, src_at = _ptr(src)
    into_out = into_out and recv is not None
    r_bytes = sum(recv) * rb if recv is not None else 0
    out = np.full(r_bytes + 16, 0xCD, dtype=np.uint8)
    out_t, out_at = _ptr(out)
    at, out_cap = (out_at, r_bytes) if into_out else (0, 0)
    msg = np.full(H * w + len(src) + 64, 0xAB, dtype=np.uint8)
    msg_t, msg_at = _ptr(msg)
    ss = tuple(splits) if as_tuple else list(splits)
    args = (src_at, sum(splits), ss, recv, w, me, rb, cap, fixed, k, released, at, out_cap)
    general = any(splits[p] * rb > cap for p in range(w) if p != me) or (
        recv is not None and recv[me] != splits[me]
    )
    untouched = msg.copy()
    need = H * (w - 1) + (sum(splits) - splits[me]) * rb + (0 if into_out else splits[me] * rb)
    if general or need:  # a buffer too small: the bytes it needs, nothing written
        assert native.post_inline(msg_at, need - 1 if need else 0, *args) == (None if general else need)
        assert np.array_equal(msg, untouched)
    got = native.post_inline(msg_at, len(msg), *args)
    if general:  # a payload too large to inline, or a split that disagrees: the general path's
        assert got is None and np.array_equal(msg, untouched)
        return
    total, s_list, r_list, sizes = got
    assert s_list == list(splits) and r_list == recv and type(s_list) is list
    assert sizes == [0 if p == me else H + splits[p] * rb for p in range(w)]
    want = np.full_like(msg, 0xAB)
    assert fill_message(want, src, splits, me, rb, fixed, k, released, False, recv, False) == total
    assert np.array_equal(msg[:total], want[:total]) and np.array_equal(msg[total:], untouched[total:])
    native.place_own(src_at, sum(splits), s_list, r_list, me, rb, msg_at, len(msg), total, at, out_cap)
    lo, n_me = sum(splits[:me]) * rb, splits[me] * rb
    if into_out:
        out_lo = sum(recv[:me]) * rb
        expect = np.full_like(out, 0xCD)
        expect[out_lo : out_lo + n_me] = src[lo : lo + n_me]
        assert np.array_equal(out, expect) and np.array_equal(msg[total:], untouched[total:])
    else:
        assert np.array_equal(msg[total : total + n_me], src[lo : lo + n_me])
        assert np.array_equal(out, np.full_like(out, 0xCD))


@needs_native
def test_post_inline_leaves_every_other_argument_to_the_general_path():
    fixed = Rows(1, torch.float32, (4,)).fixed
    src = torch.arange(64, dtype=torch.uint8)
    msg = torch.full((4096,), 9, dtype=torch.uint8)

    def post(send_splits, recv_splits=None, rows=4, me=0, out=(0, 0)):
        return native.post_inline(
            msg.data_ptr(), 4096, src.data_ptr(), rows, send_splits, recv_splits, 2, me, 16, 1 << 20,
            fixed, 0, 0, *out,
        )  # fmt: skip

    assert post([2, 2]) is not None
    msg.fill_(9)
    for bad in ([2, 2, 0], [2], [-1, 5], [2.0, 2], [True, 3], [np.int64(2), 2], torch.tensor([2, 2]), "22"):
        assert post(bad) is None, bad  # not W plain ints: the general path converts or refuses
    assert post([2, 3]) is None  # splits that do not add up to the rows
    assert post([2, 2], [3, 1]) is None  # recv_splits[me] differs from send_splits[me]
    assert post([2, 2], [2, 2**63 - 1]) is None  # a sum an int64 does not hold
    res = torch.zeros(64, dtype=torch.uint8)
    assert post([2, 2], [2, 1], out=(res.data_ptr(), 64)) is None  # `out` of another size
    assert bool((msg == 9).all())
    with pytest.raises(ValueError, match="own rows do not fit"):
        native.place_own(src.data_ptr(), 4, [2, 2], [2, 1], 1, 16, msg.data_ptr(), 4096, 0, res.data_ptr(), 4)
    with pytest.raises(ValueError, match="do not add up"):
        native.place_own(src.data_ptr(), 5, [2, 2], None, 0, 16, msg.data_ptr(), 4096, 0, 0, 0)
    with pytest.raises(ValueError, match="needs recv_splits"):
        native.place_own(src.data_ptr(), 4, [2, 2], None, 0, 16, msg.data_ptr(), 4096, 0, res.data_ptr(), 64)


@needs_native
@settings(max_examples=300, deadline=None)
@given(_iterations(), st.integers(0, 1000), st.data())
def test_receive_inline_agrees_with_read_headers_and_gather(case, k, data):
    w, me, rb, splits, recv, _, _ = case
    if recv is not None:  # as posting left them: this rank's own rows are what it sends itself
        recv[me] = splits[me]
    kind = Rows(2, torch.float16, (4,))
    stride = H + 9 * max(rb, 1) + 8
    table = np.zeros((w - 1, stride), dtype=np.uint8)
    for q in range(w - 1):
        p = q + (q >= me)
        agree = recv is not None and data.draw(st.integers(0, 4)) > 0
        rows_q = recv[p] if agree else data.draw(st.integers(0, 9))
        hdr = kind.head.copy()
        late = data.draw(st.integers(0, 19)) == 0
        expect = data.draw(st.sampled_from([-1, -1, splits[p], 4]))
        hdr[10:15] = [k + late, rows_q, 3 * q, expect, data.draw(st.integers(0, 9)) == 0]
        if data.draw(st.integers(0, 19)) == 0:
            hdr[2] = 7
        table[q, :H] = hdr.view(np.uint8)
        table[q, H : H + rows_q * rb] = np.arange(rows_q * rb) % 251
    own_bytes = _src([splits[me]], rb)
    head = read_headers(table, me, kind.fixed, k, splits[me], 11, -1)
    off, corrupt, rows, released, expect, _, spill = head
    disagree = (recv is not None and rows != recv) or any(
        e not in (-1, splits[p]) for p, e in enumerate(expect) if p != me
    )
    flat, flat_at = _ptr(table.reshape(-1))
    own_t, own_at = _ptr(own_bytes)
    total = sum(rows) * rb
    out = np.full(total + 16, 7, dtype=np.uint8)
    out_t, out_at = _ptr(out)
    got = native.receive_inline(flat_at, table.size, w, me, stride, kind.fixed, k, splits, recv, 11, rb)
    if off or corrupt or spill or disagree:  # the general path reads again and says what is wrong
        assert got is None
        return
    assert got == (rows, released)
    # What the fast wait does next: every payload gathered into the result.
    if total:
        native.gather(out_at, total, flat_at, table.size, stride, rows, me, own_at, len(own_bytes), rb)
    want = np.full_like(out, 7)
    if total:
        gather(want[:total], table, rows, me, own_bytes, rb)
    assert np.array_equal(out, want)  # and nothing past the result written
    # Given the result, with this rank's own rows in place already (place_own), the same call
    # gathers the peers' payloads into it: the same bytes, nothing past it written.
    res = np.full(total + 16, 7, dtype=np.uint8)
    lo = sum(rows[:me]) * rb
    res[lo : lo + len(own_bytes)] = own_bytes
    res_t, res_at = _ptr(res)
    assert native.receive_inline(
        flat_at, table.size, w, me, stride, kind.fixed, k, splits, recv, 11, rb, res_at, total
    ) == (rows, released)
    assert np.array_equal(res, want)
    if total:  # a result too short for the rows: nothing written, the general path says why
        short = np.full(total, 7, dtype=np.uint8)
        short_t, short_at = _ptr(short)
        assert (
            native.receive_inline(
                flat_at, table.size, w, me, stride, kind.fixed, k, splits, recv, 11, rb, short_at, total - 1
            )
            is None
        )
        assert (short == 7).all()
