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
