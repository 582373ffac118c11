"""What the gloo transport and the engine's checks add to the contract (tests/test_contract.py runs
the contract itself on every transport): the data alltoall beside inline payloads, blame across
channels through the store, argument checks, not spinning, close() before a process exits, the
'bls' backend against gloo, subgroups, the send ring."""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _contract import WORLDS, check_exact, exact_body, reference, same_bits, send_of

import blsgpu
from blsgpu import BoundedLagAllToAll, PeerError, run_world
from blsgpu.transport.base import blame_through_store


def _reference_body(rank, w, iters, seed):
    width = 64
    bad = []
    for k in range(iters):
        send, send_splits, recv_splits = send_of(seed, k, rank, w, width)
        out = send.new_empty((sum(recv_splits), *send.shape[1:]))
        dist.all_to_all_single(out, send, recv_splits, send_splits)
        if not same_bits(out, reference(seed, k, rank, w, width)):
            bad.append(k)
    return bad


def test_the_contract_reference_is_what_all_to_all_single_delivers():
    # tests/test_contract.py checks every transport against reference(); here, gloo's synchronous
    # all_to_all_single delivers exactly that (every dtype and shape variant, silent senders).
    w, iters = 4, 40
    assert run_world(w, _reference_body, iters, 57, timeout_s=120) == [[]] * w


@pytest.mark.parametrize("inline_bytes", [0, 64])
@pytest.mark.parametrize("bound", [0, 2])
def test_exact_through_the_data_alltoall(bound, inline_bytes):
    # 0: every payload takes the data alltoall; 64: some iterations inline everything, others
    # need the data alltoall because one rank's payload does not fit (all ranks must agree).
    check_exact(WORLDS["gloo"], 3, bound, iters=120, seed=91 + bound, inline_bytes=inline_bytes)


def _chained_silent_body(rank, w):
    # Rank 2 is silent. Rank 1 waits on channel "a" for it; rank 0 waits on channel "b" for rank 1,
    # which only posts there once "a" moved. Each survivor sees two peers missing from its own
    # channel, and only the other survivor's report on the other channel tells them apart.
    a = BoundedLagAllToAll(bound=0, timeout=4.0, name="a")
    b = BoundedLagAllToAll(bound=0, timeout=4.0, name="b")
    if rank == 2:
        time.sleep(10)  # past both timeouts and the blame grace (1 s)
        return "slept"
    try:
        ha = a.exchange(torch.ones(w), [1] * w)
        if rank == 1:
            ha.wait()
        b.exchange(torch.ones(w), [1] * w).wait()
    except PeerError as e:
        return (e.channel, e.peer, str(e))
    return "no error"


def test_a_silent_peer_is_named_by_ranks_blocked_on_different_channels():
    results = run_world(3, _chained_silent_body, timeout_s=60)
    assert results[2] == "slept"
    assert results[0][:2] == ("b", 2), results[0]
    assert results[1][:2] == ("a", 2), results[1]


def test_only_recent_group_wide_reports_count():
    store = dist.HashStore()
    a, b = dist.PrefixStore("a", store), dist.PrefixStore("b", store)
    # rank 1 reported a failure on channel "b" just now; rank 2 long ago (an earlier failure)
    blame_through_store(b, 1, 3, 0, 0.1, store, 5.0)
    store.set("blsgpu/failed/2", f"{time.time() - 60:.3f}")
    assert blame_through_store(a, 0, 3, 0, 0.1, store, 5.0) == ([2], True)
    assert blame_through_store(a, 0, 3, 0, 0.1) == ([1, 2], True)  # the channel alone


def test_patience_waits_for_a_live_rank_that_reports_late():
    # Rank 0 saw a connection close at once; rank 1, alive, reports 0.6 s later; rank 2 died.
    # After the 0.2 s grace both are silent: with patience the wait goes on until only one is.
    store = dist.HashStore()
    timer = threading.Timer(0.6, lambda: store.set("failed/1", "0"))
    timer.start()
    try:
        t0 = time.monotonic()
        assert blame_through_store(store, 0, 3, 0, 0.2, patience_s=5.0) == ([2], True)
        assert 0.5 < time.monotonic() - t0 < 2.0  # it stopped once rank 1 reported
    finally:
        timer.cancel()
    t0 = time.monotonic()
    assert blame_through_store(dist.HashStore(), 0, 3, 0, 0.2, patience_s=0.8) == ([1, 2], True)
    assert 0.7 < time.monotonic() - t0 < 2.0  # nobody reported: the patience bounds the wait


def _bad_local_args_body(rank, w):
    a2a = BoundedLagAllToAll(bound=1, timeout=30)
    x = torch.arange(6.0)
    cases = [
        (ValueError, "negative", lambda: a2a.exchange(x, [7, -1])),
        (ValueError, "sum to 5", lambda: a2a.exchange(x, [2, 3])),
        (ValueError, "one per rank", lambda: a2a.exchange(x, [2, 2, 2])),
        (ValueError, "one per rank", lambda: a2a.exchange(x, [3, 3], [3, 3, 0])),
        (ValueError, "to itself", lambda: a2a.exchange(x, [3, 3], [4, 4])),
        (TypeError, "torch.Tensor", lambda: a2a.exchange([1, 2], [1, 1])),
        (TypeError, "integers", lambda: a2a.exchange(x, [2.5, 3.5])),
        # Float-like values are refused, not truncated into splits that may still add up.
        (TypeError, "integers", lambda: a2a.exchange(x, np.array([3.7, 2.9], dtype=np.float32))),
        (TypeError, "integers", lambda: a2a.exchange(x, [3.0, 3.0])),
        (TypeError, "sequence of ints", lambda: a2a.exchange(x, "33")),
        (ValueError, "more rows than an int64", lambda: a2a.exchange(x, [2**62, 2**62])),
        (ValueError, "at least one dimension", lambda: a2a.exchange(torch.tensor(1.0), [1, 0])),
    ]
    seen = []
    for exc, text, call in cases:
        try:
            call()
            seen.append(f"no error for {text}")
        except exc as e:
            seen.append(text in str(e) or f"{text!r} not in {e}")
    # Nothing was sent: the next valid exchange is iteration 0 everywhere and correct.
    recv, splits = a2a.exchange(x + 10 * rank, [3, 3]).wait()
    a2a.close()
    closed = []
    try:
        a2a.exchange(x, [3, 3])
    except ValueError as e:
        closed.append("closed" in str(e))
    return seen, recv.tolist(), splits, closed


def test_bad_local_arguments_raise_before_sending():
    for rank, (seen, recv, splits, closed) in enumerate(run_world(2, _bad_local_args_body)):
        assert all(s is True for s in seen), seen
        lo = 3 * rank
        assert recv == [float(lo + i) for i in range(3)] + [float(10 + lo + i) for i in range(3)]
        assert splits == [3, 3]
        assert closed == [True]
    with pytest.raises(ValueError, match="bound must be >= 0"):
        BoundedLagAllToAll(bound=-1)
    with pytest.raises(TypeError, match="bound must be an int"):
        BoundedLagAllToAll(bound=1.5)
    for timeout in (0, -1.0, float("inf"), float("nan"), timedelta.max):
        with pytest.raises(ValueError, match="timeout must be positive and at most"):
            BoundedLagAllToAll(timeout=timeout)


def _peer_mismatch_body(rank, w, case, inline_bytes=None):
    # inline_bytes=0: every payload takes the data alltoall (mismatched bytes drained into scratch)
    a2a = BoundedLagAllToAll(bound=1, timeout=20, inline_bytes=inline_bytes)
    send = torch.ones(w, 4)
    recv_splits = None
    if case == "dtype" and rank == 1:
        send = send.half()
    if case == "trailing" and rank == 1:
        send = torch.ones(w, 5)
    if case == "recv_splits":
        recv_splits = [1] * w
        if rank == 0:
            recv_splits = [1, 3] + [1] * (w - 2)  # wrong expectation of what rank 1 sends
    h = a2a.exchange(send, [1] * w, recv_splits)
    try:
        h.wait()
        outcome = "ok"
    except ValueError as e:
        outcome = str(e)
    # The pair's bytes were drained: the channel goes on in step for a valid iteration.
    recv, _ = a2a.exchange(torch.full((w, 4), float(rank)), [1] * w).wait()
    a2a.close()
    return outcome, recv[:, 0].tolist()


@pytest.mark.parametrize("inline_bytes", [None, 0])
@pytest.mark.parametrize("case", ["dtype", "trailing", "recv_splits"])
def test_mismatch_only_peers_can_see_raises_on_both_sides(case, inline_bytes):
    w = 3
    results = run_world(w, _peer_mismatch_body, case, inline_bytes, timeout_s=60)
    outcomes = [r[0] for r in results]
    for r in range(w):
        assert results[r][1] == [0.0, 1.0, 2.0]  # the process survived and stays in step
    if case in ("dtype", "trailing"):
        assert all(o != "ok" and "disagree" in o for o in outcomes), outcomes
        assert "rank 1 sends" in outcomes[0]
    else:
        assert "recv_splits[1]=3" in outcomes[0]
        assert "rank 0 expects 3 rows from rank 1" in outcomes[1]
        assert outcomes[2] == "ok"


def _no_spin_body(rank, w):
    a2a = BoundedLagAllToAll(bound=0, timeout=30)
    if rank == 1:
        time.sleep(2.0)
    cpu0, t0 = time.process_time(), time.monotonic()
    a2a.exchange(torch.ones(w), [1] * w).wait()
    cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    a2a.close()
    return cpu, wall


def test_waiting_does_not_spin():
    cpu, wall = run_world(2, _no_spin_body)[0]
    assert wall > 1.8
    assert cpu < 0.1 * wall, f"rank 0 used {cpu:.3f} s of CPU while blocked {wall:.2f} s"


def _close_delivers_body(rank, w, iters, out_dir):
    a2a = BoundedLagAllToAll(bound=iters, timeout=30)
    if rank == 0:
        # Post everything and leave at once: close() must drain and deliver before returning,
        # because this process exits right after it.
        for k in range(iters):
            a2a.exchange(torch.full((w * 1000,), float(k)), [1000] * w)
        t0 = time.monotonic()
        a2a.close()
        with open(os.path.join(out_dir, "close_s"), "w") as f:
            f.write(str(time.monotonic() - t0))
        os._exit(0)
    time.sleep(1.0)  # the slow peer has not even posted yet
    handles = [a2a.exchange(torch.zeros(w * 1000), [1000] * w) for _ in range(iters)]
    got = [h.wait()[0][:1000].unique().tolist() for h in handles]
    a2a.close()
    return got


def test_close_returns_only_after_delivery(tmp_path):
    results = run_world(2, _close_delivers_body, 3, str(tmp_path), return_exceptions=True)
    assert "exit code 0" in str(results[0])  # rank 0 left right after close()
    assert results[1] == [[0.0], [1.0], [2.0]]  # ... and the slow peer still got everything
    assert float((tmp_path / "close_s").read_text()) > 0.8


def _backend_body(rank, w):
    """An unchanged inference-style loop: async a2a issued ahead, waited later, plus other colls."""
    g = torch.Generator().manual_seed(rank)
    outs, works = [], []
    for k in range(12):
        splits = [(rank + p + k) % 3 + 1 for p in range(w)]
        recv_splits = [(p + rank + k) % 3 + 1 for p in range(w)]
        inp = torch.randn(sum(splits), 8, generator=g)
        out = torch.empty(sum(recv_splits), 8)
        works.append((out, dist.all_to_all_single(out, inp, recv_splits, splits, async_op=True)))
        if len(works) == 2:
            o, wk = works.pop(0)
            wk.wait()
            outs.append(o.clone())
    for o, wk in works:
        wk.wait()
        outs.append(o.clone())
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    b = torch.tensor([float(rank)])
    dist.broadcast(b, src=1)
    gathered = [torch.zeros(1) for _ in range(w)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    dist.barrier()
    blocking = torch.empty(w)
    dist.all_to_all_single(blocking, torch.arange(w, dtype=torch.float32) + 10 * rank)
    return (
        [o.tolist() for o in outs],
        t.item(),
        b.item(),
        [x.item() for x in gathered],
        blocking.tolist(),
        dist.get_backend(),
    )


def test_bls_backend_matches_gloo():
    bls = run_world(3, _backend_body, backend="bls")
    gloo = run_world(3, _backend_body, backend="gloo")
    for r in range(3):
        assert bls[r][:-1] == gloo[r][:-1]
        assert bls[r][-1] == "bls" and gloo[r][-1] == "gloo"
    assert bls[0][1] == 6.0 and bls[0][2] == 1.0 and bls[0][3] == [0.0, 1.0, 2.0]


def _subgroup_body(rank, w):
    g = dist.new_group([0, 1])  # collective over the world; rank 2 is not in it
    try:
        with BoundedLagAllToAll(group=g, bound=1, timeout=30) as a2a:
            recv, _ = a2a.exchange(torch.full((2, 1), float(rank)), [1, 1]).wait()
            return recv.flatten().tolist(), a2a.rank, a2a.world_size
    except ValueError as e:
        return str(e)


def test_channel_on_a_subgroup_and_a_rank_outside_it():
    results = run_world(3, _subgroup_body)
    assert results[0] == ([0.0, 1.0], 0, 2) and results[1] == ([0.0, 1.0], 1, 2)
    assert "not a member of the group" in results[2]


def _backend_devices_body(rank, w):
    from blsgpu.backend import _device_of

    pg = dist.distributed_c10d._get_default_group()
    errors = {}
    with pytest.raises(ValueError) as e:
        pg.channel_for(torch.device("meta"))
    errors["meta"] = str(e.value)
    with pytest.raises(ValueError) as e:
        pg.all_to_all_single(torch.empty(2), torch.empty(2, device="meta"), [], [], dist.AllToAllOptions())
    errors["mixed"] = str(e.value)
    if not dist.is_nccl_available():  # a CPU build of torch: CUDA tensors get a clear error
        with pytest.raises(RuntimeError) as e:
            pg.inner_for(torch.device("cuda"))
        errors["cuda"] = str(e.value)
    dist.barrier()  # the CPU path still works after the refusals
    found = _device_of(([], [[torch.empty(1, device="meta")], torch.empty(1)]))
    return errors, found.type, pg.inner_for(torch.device("cpu")) is pg.gloo


def test_bls_backend_routes_by_device():
    # Registered for CPU and CUDA tensors: CUDA ones get an NCCL channel and torch's NCCL for
    # the rest (tests/test_gpu.py runs that); anything else is refused before a message.
    assert dist.Backend.backend_capability["bls"] == ["cpu", "cuda"]
    errors, found, gloo_for_cpu = run_world(2, _backend_devices_body, backend="bls")[0]
    assert "CPU or CUDA tensors, got a tensor on meta" in errors["meta"]
    assert "output is on cpu but input on meta" in errors["mixed"]
    if not dist.is_nccl_available():
        assert "has no NCCL" in errors["cuda"]
    assert found == "meta" and gloo_for_cpu


def _send_buffer_body(rank, w):
    with BoundedLagAllToAll(bound=1, timeout=30) as a2a:
        outs = []
        for k in range(4):
            buf = a2a.send_buffer((w, 3), torch.float32)
            buf.copy_(torch.full((w, 3), float(10 * k + rank)))  # e.g. a fused lookup writes here
            outs.append(a2a.exchange(buf, [1] * w).wait()[0][:, 0].tolist())
        return outs, a2a.stats()["bytes_sent"]


def _send_buffer_misuse_body(rank, w):
    with BoundedLagAllToAll(bound=1, timeout=30) as a2a:
        buf = a2a.send_buffer((w + 1, 3), torch.float32)
        buf.fill_(float(rank))
        with pytest.raises(ValueError, match="does not start at it"):
            a2a.exchange(buf[1:], [1] * w)  # offset into the ring: refused, nothing sent
        prefix, _ = a2a.exchange(buf[:w], [1] * w).wait()  # a prefix is posted in place
        return prefix[:, 0].tolist()


def test_send_buffer_offset_views_are_refused_prefixes_work():
    for got in run_world(2, _send_buffer_misuse_body):
        assert got == [0.0, 1.0]


def test_send_buffer_is_posted_without_copy():
    results = run_world(2, _send_buffer_body)
    for outs, sent in results:
        assert outs == [[10.0 * k, 10.0 * k + 1] for k in range(4)]
        assert sent == 4 * 3 * 4


def test_import_registers_the_bls_backend():
    # (That importing blsgpu loads no GPU stack is checked in a fresh process in
    # test_gpu_path_cpu.py; this process has imported Triton for other tests.)
    assert "bls" in dist.Backend.backend_list
    assert blsgpu.BoundedLagAllToAll is BoundedLagAllToAll


def _spy_direct_posts() -> list[bool]:
    """In this rank: whether each exchange() that could post from the caller's tensor did (a
    progress thread may rebuild the send slot of such a post at once, so the slot cannot tell)."""
    from blsgpu.exchange import posting

    seen: list[bool] = []
    real = posting.Posting._caller_bytes
    real_fast = posting.Posting._post_fast

    def spy(self, send):
        src = real(self, send)
        seen.append(src is not None)
        return src

    def spy_fast(self, *args):
        it = real_fast(self, *args)
        if it is not None:  # the fast path always posts from the caller's bytes
            seen.append(True)
        return it

    posting.Posting._caller_bytes = spy
    posting.Posting._post_fast = spy_fast
    return seen


def _send_kinds_body(rank, w, native):
    # Host tensors that are posted from their own bytes (no send slot) and those that are not
    # (non-contiguous, conjugate view): every one arrives exactly, and the caller may overwrite
    # its send tensor as soon as exchange() returns.
    # Rows of 4 float32, 2048 per peer: every case but "small" is large enough to skip the slot.
    base = torch.arange(8192 * w, dtype=torch.float32).reshape(2048 * w, 4) + 10**5 * rank
    cases = {
        "plain": base.clone(),
        "small": base[: 4 * w].clone(),
        "bfloat16": base.to(torch.bfloat16),
        "requires_grad": base.clone().requires_grad_(True),
        "non_contiguous": base.t().contiguous().t(),
        "conjugate": torch.complex(base, -base).conj(),
        "bool": base > 10**5 * rank + 5,
    }
    os.environ["BLSGPU_NATIVE"] = native  # read when a channel is created
    got = {}
    posted_direct = _spy_direct_posts()
    with BoundedLagAllToAll(bound=2, timeout=30) as a2a:
        for name, send in cases.items():
            expect = send.detach().resolve_conj().clone()
            before = len(posted_direct)
            handle = a2a.exchange(send, [send.shape[0] // w] * w)
            direct = posted_direct[before:] == [True]
            with torch.no_grad():
                send.zero_() if send.dtype != torch.bool else send.fill_(False)
            recv, _ = handle.wait()
            got[name] = (recv.clone(), expect, direct)
        native = a2a.stats()["native"]
    return got, native


@pytest.mark.parametrize("native", ["1", "0"])
def test_every_kind_of_host_send_tensor_arrives_exactly(native):
    results = run_world(2, _send_kinds_body, native)
    w = len(results)
    for rank, (got, native) in enumerate(results):
        for name, (recv, _, direct) in got.items():
            sent = [results[src][0][name][1] for src in range(w)]
            n = sent[0].shape[0] // w
            want = torch.cat([s[n * rank : n * rank + n] for s in sent])
            assert same_bits(recv, want), f"rank {rank}, {name}"
            # Plain contiguous host tensors skip the send slot (without the C module, large ones
            # only); the others are copied into it.
            slot = ("non_contiguous", "conjugate") if native else ("small", "non_contiguous", "conjugate")
            assert direct == (name not in slot), name


def _peer_spills_body(rank, w, known):
    # Rank 0's payload fits the inline capacity, rank 1's does not: every rank then sends in the
    # data alltoall, and rank 0, which posted straight from its tensor, rebuilds its send slot
    # from the message it posted (and, with recv_splits, from its own rows already in the result).
    rows = 1024 if rank == 0 else 4096  # of 16 bytes: 16 KiB per peer fits, 64 KiB does not
    posted_direct = _spy_direct_posts()
    with BoundedLagAllToAll(bound=1, timeout=30, inline_bytes=32 << 10) as a2a:
        outs = []
        for k in range(3):
            send = torch.arange(rows * w * 4, dtype=torch.float32).reshape(rows * w, 4) + 10**6 * rank + k
            handle = a2a.exchange(send, [rows] * w, [1024, 4096] if known else None)
            send.fill_(-1.0)  # the caller reuses its tensor at once
            outs.append(handle.wait()[0].clone())
        return outs, posted_direct


@pytest.mark.parametrize("known", [False, True])
def test_a_peer_spilling_makes_a_direct_post_rebuild_its_send_slot(known):
    (outs0, direct0), (outs1, direct1) = run_world(2, _peer_spills_body, known)
    # Rank 0 posted all three from its tensor; rank 1, which spills, never tried.
    assert direct0 == [True] * 3 and direct1 == []
    for k in range(3):
        sent0 = torch.arange(2048 * 4, dtype=torch.float32).reshape(2048, 4) + k
        sent1 = torch.arange(8192 * 4, dtype=torch.float32).reshape(8192, 4) + 10**6 + k
        assert torch.equal(outs0[k], torch.cat([sent0[:1024], sent1[:4096]]))
        assert torch.equal(outs1[k], torch.cat([sent0[1024:], sent1[4096:]]))


def _zero_width_body(rank, w, native):
    os.environ["BLSGPU_NATIVE"] = native
    got = []
    with BoundedLagAllToAll(bound=1, timeout=30) as a2a:
        for k in range(4):
            splits = [(rank + p + k) % 3 for p in range(w)]  # unequal, some zero
            recv, recv_splits = a2a.exchange(torch.empty(sum(splits), 0), splits).wait()
            got.append((tuple(recv.shape), recv_splits))
    return got


@pytest.mark.parametrize("native", ["1", "0"])
def test_rows_of_zero_bytes_with_unequal_splits(native):
    # Nothing but headers travels; each must still say how many rows its sender sends (the numpy
    # path once left the headers unwritten when rows differed and every payload was empty).
    w = 3
    for rank, got in enumerate(run_world(w, _zero_width_body, native)):
        for k, (shape, recv_splits) in enumerate(got):
            want = [(src + rank + k) % 3 for src in range(w)]
            assert recv_splits == want and shape == (sum(want), 0), (rank, k)


def _out_body(rank, w, native, inline_bytes):
    os.environ["BLSGPU_NATIVE"] = native  # read when a channel is created
    checks = []
    with BoundedLagAllToAll(bound=1, timeout=30, inline_bytes=inline_bytes) as a2a:
        for k in range(4):
            rows = 3 + k
            send = torch.arange(rows * w * 2, dtype=torch.float32).reshape(rows * w, 2) + 1000 * rank + k
            want = torch.cat(
                [
                    (torch.arange(rows * w * 2, dtype=torch.float32).reshape(rows * w, 2) + 1000 * p + k)[
                        rows * rank : rows * rank + rows
                    ]
                    for p in range(w)
                ]
            )
            # k even: a contiguous out (written in place); k odd: a transposed view (copied into).
            out = torch.full((rows * w, 2), -1.0) if k % 2 == 0 else torch.full((2, rows * w), -1.0).t()
            got, splits = a2a.exchange(send, [rows] * w, [rows] * w, out=out).wait()
            checks.append((got is out, torch.equal(out, want), splits == [rows] * w))
        with pytest.raises(ValueError, match="needs recv_splits"):
            a2a.exchange(send, [rows] * w, out=torch.empty(rows * w, 2))
        with pytest.raises(ValueError, match="receives torch.float32"):
            a2a.exchange(send, [rows] * w, [rows] * w, out=torch.empty(rows * w + 1, 2))
        with pytest.raises(ValueError, match="receives torch.float32"):
            a2a.exchange(send, [rows] * w, [rows] * w, out=torch.empty(rows * w, 2, dtype=torch.float64))
        with pytest.raises(TypeError, match="out must be a torch.Tensor"):
            a2a.exchange(send, [rows] * w, [rows] * w, out=[0.0])
        return checks, a2a.stats()["posted"]


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("inline_bytes", [None, 0])
def test_out_receives_the_rows_in_place(native, inline_bytes):
    # inline_bytes=0: the rows come by the data alltoall, received straight into `out`.
    for checks, posted in run_world(3, _out_body, native, inline_bytes):
        assert checks == [(True, True, True)] * 4
        assert posted == 4  # the refused calls sent nothing


def _fast_exact_body(rank, w, fast):
    os.environ["BLSGPU_FAST"] = fast  # read when a channel is created
    return exact_body(rank, w, 2, 60, 31, {})


@pytest.mark.parametrize("fast", ["1", "0"])
def test_the_fast_path_and_the_general_path_are_both_exact(fast):
    # The contract's exactness check (ten kinds of rows, splits with zeros, half of them known,
    # seeded delays and windows) with the host fast path on, where it carries every iteration of a
    # kind seen before, and off.
    for rank, (bad, stats) in enumerate(WORLDS["gloo"].run(3, _fast_exact_body, fast, timeout_s=240)):
        assert bad == [], f"rank {rank}: iterations differ from the synchronous reference: {bad[:10]}"
        assert stats["fast_path"] == (fast == "1" and stats["native"])
        if stats["fast_path"]:
            assert stats["fast_iterations"] == 60 - 10  # the first of each kind goes the general way
        else:
            assert stats["fast_iterations"] == 0


def _polled_body(rank, w):
    # Polling hands an iteration to the progress thread; for one posted on the fast path with
    # recv_splits, this rank's own rows already lie in the result, and the general path gathers
    # around them.
    got = []
    with BoundedLagAllToAll(bound=2, timeout=30) as a2a:
        for k in range(6):
            splits = [(rank + p + k) % 4 + 1 for p in range(w)]
            send = torch.arange(sum(splits) * 3, dtype=torch.float64).reshape(-1, 3) + 1000 * rank + 100 * k
            recv_splits = [(src + rank + k) % 4 + 1 for src in range(w)] if k % 2 else None
            handle = a2a.exchange(send, splits, recv_splits)
            send.zero_()
            deadline = time.monotonic() + 20
            while not handle.done() and time.monotonic() < deadline:
                time.sleep(0.001)
            got.append(handle.wait())
        stats = a2a.stats()
        return got, stats["fast_iterations"], stats["native"]


def test_polling_an_iteration_of_the_fast_path_still_delivers_it_exactly():
    w = 3
    results = run_world(w, _polled_body)
    for rank, (got, fast, native) in enumerate(results):
        assert fast == (5 if native else 0)  # all but the first
        for k, (recv, recv_splits) in enumerate(got):
            parts = []
            for src in range(w):
                splits = [(src + p + k) % 4 + 1 for p in range(w)]
                sent = torch.arange(sum(splits) * 3, dtype=torch.float64).reshape(-1, 3)
                sent += 1000 * src + 100 * k
                lo = sum(splits[:rank])
                parts.append(sent[lo : lo + splits[rank]])
            assert recv_splits == [(src + rank + k) % 4 + 1 for src in range(w)]
            assert torch.equal(recv, torch.cat(parts)), (rank, k)


def _no_memory_body(rank, w):
    # The result of a fast iteration cannot be allocated on rank 0: its wait() raises that error
    # (as the general path would), the channel is then broken there, and the peer is not held up.
    from types import SimpleNamespace

    from blsgpu.exchange import progress

    with BoundedLagAllToAll(bound=1, timeout=30) as a2a:
        send = torch.arange(4 * w, dtype=torch.float32).reshape(2 * w, 2)
        a2a.exchange(send, [2] * w).wait()  # a kind seen: the next one takes the fast path
        handle = a2a.exchange(send, [2] * w)
        if rank == 0:

            def empty(*args, **kwargs):
                raise RuntimeError("no memory for the result (test)")

            progress.torch = SimpleNamespace(empty=empty)
        try:
            recv, _ = handle.wait()
            got = ("ok", recv.tolist())
        except RuntimeError as e:
            got = ("raised", str(e))
        finally:
            progress.torch = torch
        later = None
        if rank == 0:
            try:
                a2a.exchange(send, [2] * w)
            except RuntimeError as e:
                later = str(e)
        return got, later, a2a.stats()["fast_iterations"]


def _no_memory_at_posting_body(rank, w):
    # The result of a fast iteration with recv_splits is allocated once its messages are posted.
    # Where that fails (rank 0, once), this rank's own rows wait behind the messages and wait()
    # allocates the result: the exchange still delivers every row.
    from blsgpu.exchange import posting

    class _Torch:  # torch, but the first empty() fails
        failed = 0

        def __getattr__(self, name):
            return getattr(torch, name)

        def empty(self, *args, **kwargs):
            if not self.failed:
                self.failed += 1
                raise RuntimeError("no memory for the result (test)")
            return torch.empty(*args, **kwargs)

    with BoundedLagAllToAll(bound=1, timeout=30) as a2a:
        rows = [[(src + p) % 3 + 1 for p in range(w)] for src in range(w)]  # rows[src][dst]
        send = torch.arange(sum(rows[rank]) * 2, dtype=torch.float32).reshape(-1, 2) + 100 * rank
        recv_splits = [rows[src][rank] for src in range(w)]
        a2a.exchange(send, rows[rank], recv_splits).wait()  # a kind seen: the next takes the fast path
        fake = _Torch()
        if rank == 0:
            posting.torch = fake
        try:
            handle = a2a.exchange(send, rows[rank], recv_splits)
        finally:
            posting.torch = torch
        send.zero_()  # the caller may reuse `send` at once
        recv, got_splits = handle.wait()
        return recv, got_splits, fake.failed, a2a.stats()["fast_iterations"]


def test_a_result_not_allocated_at_posting_is_allocated_by_wait():
    w = 2
    for rank, (recv, got_splits, failed, fast) in enumerate(run_world(w, _no_memory_at_posting_body)):
        rows = [[(src + p) % 3 + 1 for p in range(w)] for src in range(w)]
        parts = []
        for src in range(w):
            sent = torch.arange(sum(rows[src]) * 2, dtype=torch.float32).reshape(-1, 2) + 100 * src
            lo = sum(rows[src][:rank])
            parts.append(sent[lo : lo + rows[src][rank]])
        assert got_splits == [rows[src][rank] for src in range(w)]
        assert torch.equal(recv, torch.cat(parts)), rank
        if fast:  # the C module was built: the fast path carried the second iteration
            assert fast == 1
            assert failed == (1 if rank == 0 else 0)


def test_a_fast_iteration_whose_result_cannot_be_allocated_fails_on_that_rank_alone():
    (got0, later0, fast0), (got1, later1, fast1) = run_world(2, _no_memory_body)
    assert got0 == ("raised", "no memory for the result (test)")
    assert later0 == "no memory for the result (test)"  # the channel is broken on rank 0
    assert got1[0] == "ok" and later1 is None
    assert fast0 >= 1 and fast1 >= 1
