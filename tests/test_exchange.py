"""The BLS exchange contract (docs/design.md) on gloo: exact, bounded, loud, live, not spinning."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _contract import assert_bounded, bounded_body, drive, send_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blsgpu
from blsgpu import BoundedLagAllToAll, PeerError, run_world
from blsgpu.errors import BoundError
from blsgpu.transport.base import blame_through_store
from blsgpu.world import RankError


def _exact_body(rank, w, bound, iters, seed, inline_bytes=None):
    width = 64
    # 1. The synchronous reference: gloo's all_to_all_single, iteration by iteration.
    reference = []
    for k in range(iters):
        send, send_splits, recv_splits = send_of(seed, k, rank, w, width)
        out = send.new_empty((sum(recv_splits), *send.shape[1:]))
        dist.all_to_all_single(out, send, recv_splits, send_splits)
        reference.append(out)
    # 2. The BLS channel under seeded per-rank delays, against it.
    with BoundedLagAllToAll(bound=bound, timeout=60, inline_bytes=inline_bytes) as a2a:
        bad = drive(a2a, rank, w, iters, seed, width, reference.__getitem__, mean_delay_s=0.001)
        stats = a2a.stats()
    return bad, stats


@pytest.mark.parametrize("inline_bytes", [0, 64])
@pytest.mark.parametrize("bound", [0, 2])
def test_exact_through_the_data_alltoall(bound, inline_bytes):
    # 0: every payload takes the data alltoall; 64: some iterations inline everything, others
    # need the data alltoall because one rank's payload does not fit (all ranks must agree).
    iters = 120
    results = run_world(3, _exact_body, bound, iters, 91 + bound, inline_bytes, timeout_s=240)
    for rank, (bad, stats) in enumerate(results):
        assert bad == [], f"rank {rank}: iterations differ from all_to_all_single: {bad[:10]}"
        assert stats["posted"] == stats["released"] == iters
        assert 0 <= stats["max_lag"] <= bound + 1


@pytest.mark.parametrize("w", [2, 3, 4])
@pytest.mark.parametrize("bound", [0, 1, 4])
def test_exact_against_synchronous_reference(w, bound):
    iters = 200
    results = run_world(w, _exact_body, bound, iters, 17 + w * 10 + bound, timeout_s=240)
    for rank, (bad, stats) in enumerate(results):
        assert bad == [], f"rank {rank}: iterations differ from all_to_all_single: {bad[:10]}"
        assert stats["posted"] == stats["released"] == iters
        assert 0 <= stats["max_lag"] <= bound + 1


def _property_body(rank, w, bound, matrices, trailing):
    out = []
    with BoundedLagAllToAll(bound=bound, timeout=30) as a2a:
        handles = []
        for k, m in enumerate(matrices):
            m = np.asarray(m)
            n = int(m[rank].sum())
            send = (torch.arange(n * int(np.prod(trailing)), dtype=torch.int64) + 10**6 * rank
                    + 10**9 * k).view(n, *trailing)
            handles.append(a2a.exchange(send, m[rank].tolist()))
            if len(handles) == bound + 1:
                out.append(handles.pop(0).wait())
        out.extend(h.wait() for h in handles)
    return [(r.tolist(), s) for r, s in out]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    w=st.integers(2, 3),
    bound=st.integers(0, 3),
    data=st.data(),
)
def test_property_random_splits(w, bound, data):
    iters = data.draw(st.integers(1, 8))
    cell = st.integers(0, 4)
    matrices = [
        data.draw(st.lists(st.lists(cell, min_size=w, max_size=w), min_size=w, max_size=w))
        for _ in range(iters)
    ]
    trailing = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2)))
    results = run_world(w, _property_body, bound, matrices, trailing, timeout_s=60)
    width = int(np.prod(trailing))
    for rank, per_iter in enumerate(results):
        for k, (recv, splits) in enumerate(per_iter):
            m = np.asarray(matrices[k])
            assert splits == m[:, rank].tolist()
            expected = []
            for src in range(w):
                base = 10**6 * src + 10**9 * k
                lo = int(m[src, :rank].sum()) * width
                hi = lo + int(m[src, rank]) * width
                expected.extend(base + i for i in range(lo, hi))
            got = torch.tensor(recv, dtype=torch.int64).reshape(-1).tolist()
            assert got == expected


@pytest.mark.parametrize("bound", [0, 2, 4])
def test_bounded_lag(bound):
    w, iters, slow = 3, 14, 1
    results = run_world(w, bounded_body, bound, iters, slow, 0.03, timeout_s=120)
    assert_bounded([r[0] for r in results], bound, slow)
    for r in range(w):
        if r != slow:
            assert results[r][1]["max_lag"] == bound + 1
            assert results[r][1]["waiting_for_data_s"] > 0.2  # it waited on the slow rank


def _outstanding_body(rank, w, bound):
    a2a = BoundedLagAllToAll(bound=bound, timeout=30)
    x = torch.ones(w)
    handles = [a2a.exchange(x, [1] * w) for _ in range(bound + 1)]
    t0 = time.monotonic()
    with pytest.raises(BoundError, match="outstanding"):
        a2a.exchange(x, [1] * w)
    with pytest.raises(BoundError):
        a2a.send_buffer((w,), torch.float32)
    elapsed = time.monotonic() - t0
    # The refused call sent nothing: the channel stays in step.
    results = [h.wait()[0].tolist() for h in handles]
    last = a2a.exchange(x * 2, [1] * w).wait()[0].tolist()
    a2a.close()
    return elapsed, results, last


def test_more_than_b_plus_one_outstanding_raises_at_once():
    for elapsed, results, last in run_world(2, _outstanding_body, 2):
        assert elapsed < 1.0
        assert results == [[1.0, 1.0]] * 3
        assert last == [2.0, 2.0]


def _death_body(rank, w, die_rank, die_at, pid_dir):
    with open(os.path.join(pid_dir, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    a2a = BoundedLagAllToAll(bound=2, timeout=8, name="deathwatch")
    handles = []
    t_fail = None
    try:
        for k in range(50):
            if rank == die_rank and k == die_at:
                os._exit(3)
            handles.append(a2a.exchange(torch.ones(w, 4), [1] * w))
            if len(handles) == 3:
                handles.pop(0).wait()
            time.sleep(0.01)
    except PeerError:
        t_fail = time.monotonic()
        raise
    return t_fail


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_dead_peer_raises_on_every_survivor(tmp_path):
    w, die = 3, 2
    t0 = time.monotonic()
    results = run_world(w, _death_body, die, 6, str(tmp_path), return_exceptions=True,
                        timeout_s=60)
    elapsed = time.monotonic() - t0
    assert elapsed < 8 + 5, "survivors must fail within the channel timeout"
    assert isinstance(results[die], RankError) and "died" in str(results[die])
    for r in range(w):
        if r == die:
            continue
        err = results[r]
        assert isinstance(err, PeerError), f"rank {r}: {err!r}"
        assert err.peer == die and err.channel == "deathwatch"
        assert f"peer {die}" in str(err) and "deathwatch" in str(err)
        assert f"iteration {err.iteration}" in str(err) and 4 <= err.iteration <= 8
    time.sleep(0.5)
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == w
    assert not [p for p in pids if _alive(p)], "run_world left processes behind"


def _silent_body(rank, w, silent_rank):
    a2a = BoundedLagAllToAll(bound=1, timeout=2.0, name="quiet")
    if rank == silent_rank:
        time.sleep(5)  # never posts: a hung peer, not a dead one
        return "slept"
    t0 = time.monotonic()
    try:
        a2a.exchange(torch.ones(w), [1] * w).wait()
    except PeerError as e:
        return ("raised", e.peer, e.iteration, time.monotonic() - t0, str(e))
    return "no error"


def test_silent_peer_times_out_naming_it():
    results = run_world(3, _silent_body, 0, timeout_s=30)
    assert results[0] == "slept"
    for r in (1, 2):
        kind, peer, iteration, elapsed, msg = results[r]
        assert (kind, peer, iteration) == ("raised", 0, 0)
        assert 1.5 < elapsed < 4.0
        assert "timed out" in msg and "quiet" in msg


def _chained_silent_body(rank, w):
    # Rank 2 is silent. Rank 1 waits on channel "a" for it; rank 0 waits on channel "b" for rank 1,
    # which only posts there once "a" moved. Each survivor sees two peers missing from its own
    # channel, and only the other survivor's report on the other channel tells them apart.
    a = BoundedLagAllToAll(bound=0, timeout=2.0, name="a")
    b = BoundedLagAllToAll(bound=0, timeout=2.0, name="b")
    if rank == 2:
        time.sleep(6)
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
    return ([o.tolist() for o in outs], t.item(), b.item(), [x.item() for x in gathered],
            blocking.tolist(), dist.get_backend())


def test_bls_backend_matches_gloo():
    bls = run_world(3, _backend_body, backend="bls")
    gloo = run_world(3, _backend_body, backend="gloo")
    for r in range(3):
        assert bls[r][:-1] == gloo[r][:-1]
        assert bls[r][-1] == "bls" and gloo[r][-1] == "gloo"
    assert bls[0][1] == 6.0 and bls[0][2] == 1.0 and bls[0][3] == [0.0, 1.0, 2.0]


def _edge_shapes_body(rank, w):
    """[n, 0] rows (no bytes) and a recv_splits entry far too large, on one channel."""
    out = []
    with BoundedLagAllToAll(bound=1, timeout=30) as a2a:
        for known in (None, [2] * w):
            recv, splits = a2a.exchange(torch.empty(2 * w, 0), [2] * w, known).wait()
            out.append((tuple(recv.shape), splits))
        # A wrong recv_splits must not size a buffer: ValueError on both sides, channel intact.
        huge = [2**40] * w
        huge[rank] = 1
        try:
            a2a.exchange(torch.ones(w, 4), [1] * w, huge).wait()
            out.append("no error")
        except ValueError as e:
            out.append("recv_splits" in str(e) or str(e))
        recv, _ = a2a.exchange(torch.full((w, 4), float(rank)), [1] * w).wait()
        out.append(recv[:, 0].tolist())
    return out


def test_zero_width_rows_and_absurd_recv_splits():
    for got in run_world(2, _edge_shapes_body):
        assert got[0] == ((4, 0), [2, 2]) and got[1] == ((4, 0), [2, 2])
        assert got[2] is True, got[2]
        assert got[3] == [0.0, 1.0]


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
    from blsgpu.backend import _device_of  # noqa: PLC0415

    pg = dist.distributed_c10d._get_default_group()
    errors = {}
    with pytest.raises(ValueError) as e:
        pg.channel_for(torch.device("meta"))
    errors["meta"] = str(e.value)
    with pytest.raises(ValueError) as e:
        pg.all_to_all_single(torch.empty(2), torch.empty(2, device="meta"), [], [],
                             dist.AllToAllOptions())
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


def test_run_world_names_failing_rank():
    with pytest.raises(RankError, match="rank 1 raised ZeroDivisionError"):
        run_world(2, _fail_on_rank_one)


def _fail_on_rank_one(rank, w):
    if rank == 1:
        return 1 / 0
    return rank


def test_import_registers_the_bls_backend():
    # (That importing blsgpu loads no GPU stack is checked in a fresh process in
    # test_gpu_path_cpu.py; this process has imported Triton for other tests.)
    assert "bls" in dist.Backend.backend_list
    assert blsgpu.BoundedLagAllToAll is BoundedLagAllToAll


def _one_fails_others_block(rank, w):
    if rank == 1:
        raise RuntimeError("boom")
    dist.barrier()  # never completes: rank 1 is gone
    return rank


def test_run_world_fails_fast_after_grace():
    t0 = time.monotonic()
    results = run_world(2, _one_fails_others_block, grace_s=2.0, timeout_s=120,
                        return_exceptions=True)
    assert time.monotonic() - t0 < 20
    assert isinstance(results[1], RuntimeError) and str(results[1]) == "boom"
    assert isinstance(results[0], RankError) and "after another rank failed" in str(results[0])
