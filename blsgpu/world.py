"""run_world: a local world of CPU processes with torch.distributed set up, for tests and the CLI.

Also the control collectives that blsgpu runs outside its channels (barrier, gather, all_gather of
small Python objects): they go through the rendezvous store with a deadline, so a rank that died or
fell silent is named in a PeerError, as a silent peer of an exchange is, instead of hanging in a
collective of the process group.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from blsgpu.errors import PeerError, RankError


class _PrefixWriter(io.TextIOBase):
    """Prefixes every line a rank prints with [rankN], so interleaved logs stay readable."""

    def __init__(self, stream, prefix: str):
        self._stream = stream
        self._prefix = prefix
        self._at_line_start = True

    def write(self, s: str) -> int:
        out = []
        for piece in s.splitlines(keepends=True):
            if self._at_line_start:
                out.append(self._prefix)
            out.append(piece)
            self._at_line_start = piece.endswith("\n")
        self._stream.write("".join(out))
        return len(s)

    def flush(self) -> None:
        self._stream.flush()


# ------------------------------------------------------------------------ control collectives

_control_store: dist.Store | None = None
_control_seq = 0
_control_rank: tuple[int, int] | None = None


def set_control_store(
    store: dist.Store | None, rank: int | None = None, world_size: int | None = None
) -> None:
    """The store that barrier / gather_object / all_gather_object use in this process.

    run_world's ranks and the CLI under torchrun set it to their rendezvous store (whose server
    lives in the launcher, so it answers while a rank is stopped). Without one, the default process
    group's store is used. rank and world_size default to the default group's (give them to use
    the control collectives before init_process_group).
    """
    global _control_store, _control_seq, _control_rank
    _control_store = None if store is None else dist.PrefixStore("blsgpu", store)
    _control_rank = None if rank is None else (rank, world_size)
    _control_seq = 0


def _store() -> dist.Store:
    global _control_store
    if _control_store is None:
        getter = getattr(dist.distributed_c10d, "_get_default_store", None)
        if getter is None or not dist.is_initialized():
            raise RuntimeError("blsgpu control collectives need torch.distributed initialised")
        _control_store = dist.PrefixStore("blsgpu", getter())
    return _control_store


def _post(name: str, payload: bytes) -> tuple[dist.Store, str, int, int]:
    """Sets this rank's key of the next control collective; (store, key prefix, rank, world size)."""
    global _control_seq
    store = _store()
    _control_seq += 1
    prefix = f"{_control_seq}:{name}"
    if _control_rank is not None:
        rank, world_size = _control_rank
    else:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    store.set(f"{prefix}/{rank}", payload)
    return store, prefix, rank, world_size


def _await(store: dist.Store, prefix: str, rank: int, world_size: int, what: str, timeout_s: float) -> None:
    """Waits until every rank set its key; names the ranks that did not within timeout_s."""
    keys = [f"{prefix}/{r}" for r in range(world_size)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
        return
    except Exception as e:  # DistStoreError on the deadline; anything else: the store went away
        try:
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
        except Exception:
            missing = []
        if not missing:
            raise RuntimeError(f"rank {rank}: {what}: the rendezvous store failed: {e}") from e
    names = ", ".join(map(str, missing))
    raise PeerError(
        f"rank {rank}: rank{'s' if len(missing) > 1 else ''} {names} did not reach {what} within "
        f"{timeout_s:g} s (dead or silent)",
        peer=missing[0],
        channel=what,
        iteration=-1,
    )


def barrier(name: str, timeout_s: float) -> None:
    """Every rank of the default group calls it; returns once all did. A rank that has not after
    timeout_s seconds is named: PeerError(peer=that rank, channel="barrier <name>",
    iteration=-1) on every rank that waited."""
    store, prefix, rank, w = _post(name, b"")
    _await(store, prefix, rank, w, f"barrier {name!r}", timeout_s)


def all_gather_object(name: str, obj: Any, timeout_s: float) -> list[Any]:
    """Every rank's obj (picklable), in rank order, on every rank; missing ranks named as in barrier."""
    store, prefix, rank, w = _post(name, pickle.dumps(obj))
    _await(store, prefix, rank, w, f"all_gather {name!r}", timeout_s)
    return [pickle.loads(store.get(f"{prefix}/{r}")) for r in range(w)]


def gather_object(name: str, obj: Any, timeout_s: float, dst: int = 0) -> list[Any] | None:
    """Every rank's obj on rank dst (None elsewhere, at once); missing ranks named as in barrier."""
    store, prefix, rank, w = _post(name, pickle.dumps(obj))
    if rank != dst:
        return None
    _await(store, prefix, rank, w, f"gather {name!r}", timeout_s)
    return [pickle.loads(store.get(f"{prefix}/{r}")) for r in range(w)]


# ------------------------------------------------------------------------------------ run_world


def _child(rank, world_size, port, backend, timeout_s, fn, args, results, release, linger):
    import torch

    sys.stdout = _PrefixWriter(sys.stdout, f"[rank{rank}] ")
    sys.stderr = _PrefixWriter(sys.stderr, f"[rank{rank}] ")
    torch.set_num_threads(1)
    failed = False
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size + 1, False, timedelta(seconds=timeout_s))
        set_control_store(store, rank, world_size)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
        value = fn(rank, world_size, *args)
        try:
            results.put((rank, "ok", pickle.dumps(value)))
        except Exception as e:  # an unpicklable result is the caller's bug; say so
            failed = True
            results.put(
                (rank, "err", ("TypeError", f"result of rank {rank} cannot be pickled: {e}", "", None))
            )
    except BaseException as e:  # report everything, SystemExit included
        failed = True
        try:
            blob = pickle.dumps(e)
        except Exception:
            blob = None
        results.put((rank, "err", (type(e).__name__, str(e), traceback.format_exc(), blob)))
    sys.stdout.flush()
    sys.stderr.flush()
    if failed and not linger:
        # Leave at once: the peers see a closed connection and fail now, naming this rank,
        # instead of waiting out their timeouts for a rank that will never answer.
        results.close()
        results.join_thread()
        os._exit(1)
    # Stay alive, connections open, until every rank reported: a rank that leaves early would
    # look like a dead peer to the others.
    release.wait(timeout_s)
    os._exit(0)


_ctx = None


def _context():
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        # Each rank forks from a server that has torch imported: ~10x faster than spawn.
        _ctx.set_forkserver_preload(["torch", "torch.distributed", "blsgpu"])
    return _ctx


_GRACE_MARGIN_S = 10.0


def _default_grace_s() -> float:
    from blsgpu._env import default_timeout

    return default_timeout().total_seconds() + _GRACE_MARGIN_S


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def run_world(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 300.0,
    return_exceptions: bool = False,
    grace_s: float | None = None,
) -> list[Any]:
    """Run fn(rank, world_size, *args) on world_size local processes; return each rank's result.

    Ranks fork from a forkserver, so fn must be importable (defined at module level in a file, not
    in `python -c` or stdin) and args and results picklable.

    Each rank has torch.distributed initialised with `backend` over a loopback TCPStore, runs with
    torch.set_num_threads(1), and prefixes its output with [rankN].

    A rank that raises makes run_world raise RankError for the FIRST failure: the first rank that
    raised its own exception or died (a PeerError only counts as first when no rank did either,
    e.g. when a rank fell silent). Its message has that rank, its exception and traceback text;
    the original exception is chained as __cause__ (with `.rank` set), and what the other ranks
    raised meanwhile (typically PeerErrors naming it) follows in the message as context and in
    `.others` ({rank: exception}). A failing rank leaves at once, so its peers fail promptly.

    With return_exceptions=True, every rank's own exception is returned in its place instead
    (failing ranks then stay connected until every rank reported, so each rank's own error, not
    a closed connection, is what it returns). A rank that dies without reporting yields RankError
    with its exit code. Once a rank failed, the others get grace_s more to finish (default: the
    default channel timeout, BLSGPU_TIMEOUT_S or 300 s, plus 10 s: long enough for a channel
    timeout to name a silent peer), then are killed and reported; any rank still running after
    timeout_s is too. No process outlives the call.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if grace_s is None:
        grace_s = _default_grace_s()
    ctx = _context()
    store = dist.TCPStore(
        "127.0.0.1", 0, world_size + 1, True, timedelta(seconds=timeout_s), wait_for_workers=False
    )
    results = ctx.Queue()
    release = ctx.Event()
    procs = [
        ctx.Process(
            target=_child,
            args=(
                r,
                world_size,
                store.port,
                backend,
                timeout_s,
                fn,
                args,
                results,
                release,
                return_exceptions,
            ),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[str, Any]] = {}
    order: list[int] = []  # ranks in the order their outcome was seen

    def record(rank: int, status: str, payload: Any) -> None:
        if rank not in outcome:
            outcome[rank] = (status, payload)
            order.append(rank)

    deadline = time.monotonic() + timeout_s
    grace_deadline: float | None = None
    try:
        while len(outcome) < world_size:
            try:
                record(*results.get(timeout=0.2))
                continue
            except Exception:  # queue.Empty
                pass
            for r, p in enumerate(procs):
                if r not in outcome and not p.is_alive():
                    # Drain a report that may have raced with the exit.
                    try:
                        while True:
                            record(*results.get(timeout=0.2))
                    except Exception:
                        pass
                    if r not in outcome:
                        record(r, "died", p.exitcode)
            failed = any(status != "ok" for status, _ in outcome.values())
            if failed and grace_deadline is None:
                grace_deadline = time.monotonic() + grace_s
            now = time.monotonic()
            if now > deadline or (grace_deadline is not None and now > grace_deadline):
                status = "grace" if grace_deadline is not None and now > grace_deadline else ("timeout")
                for r in range(world_size):
                    record(r, status, timeout_s)
    finally:
        release.set()
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        del store

    values: list[Any] = []
    errors: dict[int, BaseException] = {}
    remote: dict[int, str] = {}  # rank -> type name of what it raised
    for r in range(world_size):
        status, payload = outcome[r]
        if status == "ok":
            values.append(pickle.loads(payload))
            continue
        if status == "err":
            type_name, message, tb, blob = payload
            remote[r] = type_name
            err = RankError(f"rank {r} raised {type_name}: {message}\n{tb}", r, type_name)
            if blob is not None:
                try:
                    original = pickle.loads(blob)
                    original.rank = r
                    err.__cause__ = original
                    if return_exceptions:
                        err = original
                except Exception:
                    pass
        elif status == "died":
            err = RankError(f"rank {r} died with exit code {payload} before reporting", r)
        elif status == "grace":
            err = RankError(
                f"rank {r} was still running {grace_s:g} s after another rank failed and was killed", r
            )
        else:
            err = RankError(f"rank {r} did not finish within {payload:g} s and was killed", r)
        values.append(err)
        errors[r] = err
    if not errors or return_exceptions:
        return values
    # The first failure: a rank's own exception or death, in the order they were seen; a peer's
    # verdict (PeerError) only when no rank failed on its own (then it names a silent rank).
    seen = [r for r in order if r in errors]
    own = [
        r
        for r in seen
        if outcome[r][0] == "died" or (outcome[r][0] == "err" and remote.get(r) != "PeerError")
    ]
    peer = [r for r in seen if remote.get(r) == "PeerError"]
    if not own and not peer:  # nobody failed: the world ran out of time (or of grace)
        late = ", ".join(map(str, sorted(errors)))
        status, _ = outcome[seen[0]]
        many = len(errors) > 1
        why = (
            f"did not finish within {timeout_s:g} s"
            if status == "timeout"
            else f"{'were' if many else 'was'} still running {grace_s:g} s after another rank failed"
        )
        err = RankError(
            f"rank{'s' if many else ''} {late} {why} and {'were' if many else 'was'} killed", seen[0]
        )
        err.others = {r: e for r, e in errors.items() if r != seen[0]}
        raise err
    first = (own or peer)[0]
    err = errors[first]
    others = {r: e for r, e in errors.items() if r != first}
    if others:
        lines = []
        for r in seen:
            if r == first:
                continue
            e = others[r]
            text = _first_line(str(e.__cause__)) if e.__cause__ is not None else _first_line(str(e))
            kind = remote.get(r)
            lines.append(f"  rank {r}: {kind + ': ' if kind else ''}{text}")
        err.args = (f"{err.args[0].rstrip()}\nmeanwhile on the other ranks:\n" + "\n".join(lines),)
    err.others = others
    raise err
