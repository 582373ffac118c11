"""Lag counters in device-visible memory for the GPU path (docs/design.md, "The GPU path").

posted / arrived / released of one channel live in one small pinned host-mapped int64 array, which
streams write through its device address (pinned memory is mapped under unified addressing): the
comm stream writes posted when iteration k's data is launched and arrived after it, the consumer's
stream writes released when wait() hands iteration k over. stats() and the watchdog read the counts
straight from host memory, without synchronizing the device. The counters are only written on
device, never waited on.

The bound itself is a CUDA-visible dependency: release(k) records an event on the consumer's stream
(after the stream waited for k's data and wrote `released`), and gate(k, B) makes the comm stream
wait on the event of release k-B-1 before the data of k. CUDA then knows every edge of the schedule
(no stream spins on a value another stream has yet to write), so it cannot deadlock however many
streams share the hardware queues (CUDA_DEVICE_MAX_CONNECTIONS).

Stream writes, in order of preference:
- cuStreamWriteValue64 through cuda-bindings, where the driver runs it (probed once per device);
- else the release-store kernel of kernels/lag_counters.cu, compiled at first use by CuPy (NVRTC).
The wait operations (cuStreamWaitValue64, the spin kernel with its timeout flag) stay available as
`ops.wait_geq` for diagnostics; the engine no longer uses them.

Imported only on the GPU path; CuPy and cuda-bindings load inside the functions that need them.
"""

from __future__ import annotations

import ctypes
import threading
import time
from pathlib import Path
from typing import Any

import torch

from blsgpu.counters.host import HostCounters
from blsgpu.errors import BLSError

_POSTED, _ARRIVED, _RELEASED, _STATUS = 0, 1, 2, 3
_GEQ = 0  # CU_STREAM_WAIT_VALUE_GEQ: (int64)(*addr - value) >= 0
_WRITE_DEFAULT = 0  # CU_STREAM_WRITE_VALUE_DEFAULT: a system-scope fence precedes the write
_KERNEL_SOURCE = "lag_counters.cu"


_SPIN_S = 50e-6  # poll without sleeping this long first: a sleep costs 50-100 us of latency


def host_wait(event: Any, timeout_s: float) -> bool:
    """Wait on the host until a CUDA event completed; False on timeout.

    Polls without sleeping for the first 50 us (most header groups complete within that), then
    with a growing sleep (20 us .. 1 ms), which keeps a long wait far below a core's worth of
    CPU, where event.synchronize() would either spin or block without a timeout.
    """
    if event.query():
        return True
    now = time.monotonic()
    deadline = now + max(timeout_s, 0.0)
    spin_until = min(now + _SPIN_S, deadline)
    while time.monotonic() < spin_until:
        if event.query():
            return True
    nap = 20e-6
    while not event.query():
        if time.monotonic() >= deadline:
            return False
        time.sleep(nap)
        nap = min(nap * 2, 1e-3)
    return True


class DeviceCounters(HostCounters):
    """HostCounters plus posted / arrived / released that streams write, and the device gate.

    The host counts stay what the engine uses (headers carry the host's release count); the device
    counts say how far the streams really are (stats, watchdog messages).

    Args:
        comm_stream: the channel's comm stream; gate() and arrive() enqueue there.
        ops: stream writes (default: the best that `stream_ops` finds for the device).
        events: record(stream) -> event, wait_event(stream, event), current_stream(): the CUDA
            events of the gate (default on a GPU: torch's). None on CPU emulation, where the host
            order (release k-B-1 before exchange k) is all there is.
    """

    def __init__(
        self,
        world_size: int,
        rank: int,
        device: torch.device,
        comm_stream: Any,
        timeout_s: float,
        ops: Any = None,
        events: Any = None,
    ):
        super().__init__(world_size, rank)
        self.device = device
        self.comm_stream = comm_stream
        self.timeout_ns = int(timeout_s * 1e9)
        gpu = device.type == "cuda"
        # posted, arrived, released, wait status (the spin kernel ORs a timeout flag in here).
        self.mem = _counter_block(pinned=gpu)
        self._addr = self.mem.data_ptr()  # unified addressing: the device sees the same address
        self.ops = ops if ops is not None else stream_ops(device)
        if events is None and gpu:
            events = TorchEvents(device)
        self.events = events
        self._consumer = events.current_stream if events is not None else (lambda: None)
        # k -> event recorded on the consumer's stream after release(k); gate(k+B+1) takes it.
        # Written by the caller's thread, taken by the progress thread (dict ops are atomic).
        self.release_events: dict[int, Any] = {}
        self._pruned = 0  # every key below this one was taken or dropped
        self.gated_on = -1  # the release the latest gate waited for (-1: none yet)

    def _ptr(self, i: int) -> int:
        return self._addr + 8 * i

    def gate(self, k: int, bound: int) -> None:
        """The comm stream waits for the consumer's release of k-B-1 (an event), then marks k
        posted. Called on the progress thread, always after the caller's release(k-B-1)."""
        j = k - bound - 1
        if j >= 0 and self.events is not None:
            events = self.release_events
            while self._pruned < j:  # releases whose iterations moved no data: not needed
                events.pop(self._pruned, None)
                self._pruned += 1
            ev = events.pop(j, None)
            if ev is None:
                raise BLSError(
                    f"device gate of iteration {k}: release {j} recorded no event "
                    f"(releases must precede the gate)"
                )
            self._pruned = j + 1
            self.events.wait_event(self.comm_stream, ev)
            self.gated_on = j
        self.ops.write(self.comm_stream, self._ptr(_POSTED), k + 1)

    def arrive(self, k: int) -> None:
        super().arrive(k)
        self.ops.write(self.comm_stream, self._ptr(_ARRIVED), k + 1)

    def release(self, k: int) -> None:
        super().release(k)
        # On the consumer's stream, after wait() made it wait for iteration k's data.
        stream = self._consumer()
        self.ops.write(stream, self._ptr(_RELEASED), k + 1)
        if self.events is not None:
            self.release_events[k] = self.events.record(stream)

    def device_counts(self) -> dict[str, Any]:
        """The counts as the streams have written them so far (no device synchronization)."""
        posted, arrived, released, status = self.mem.tolist()
        return {"posted": posted, "arrived": arrived, "released": released, "wait_timed_out": bool(status)}

    def extra_stats(self) -> dict:
        return {"device": {**self.device_counts(), "stream_ops": self.ops.name}}

    def check(self) -> None:
        """Raise if a spin-kernel wait on the release counter gave up (diagnostics only)."""
        if int(self.mem[_STATUS]) != 0:
            raise BLSError(
                f"a device wait for the release counter timed out after {self.timeout_ns / 1e9:.0f} s "
                f"(device counts {self.device_counts()}): the consumer stream stopped releasing"
            )


class TorchEvents:
    """The CUDA events of the gate, through torch."""

    def __init__(self, device: torch.device):
        self.device = device

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    @staticmethod
    def record(stream: Any) -> Any:
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    @staticmethod
    def wait_event(stream: Any, event: Any) -> None:
        stream.wait_event(event)


# Comm streams: CUDA streams of their own, kept as long as the process.
_own_streams: list[Any] = []
_stream_lock = threading.Lock()


def own_stream(device: torch.device) -> torch.cuda.Stream:
    """A CUDA stream that no one else uses, for a comm stream (or a rank's stream in local mode).

    torch.cuda.Stream() hands out streams round-robin from a pool of 32 per device and priority,
    so it may return the very stream user code or another channel runs on; an NCCL kernel queued
    there behind unrelated work can then deadlock the ranks. CuPy creates a real one (non-blocking,
    like torch's); without CuPy, a pooled stream of high priority. The streams are never destroyed:
    the caching allocator records events on every stream a buffer was used on when it frees the
    buffer, which may come after the channel is gone.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        import cupy  # GPU path only
    except ImportError:
        return torch.cuda.Stream(torch.device("cuda", index), priority=-1)
    with cupy.cuda.Device(index):
        owned = cupy.cuda.Stream(non_blocking=True)
    with _stream_lock:
        _own_streams.append(owned)
    return torch.cuda.ExternalStream(owned.ptr, device=torch.device("cuda", index))


# Counter blocks are never freed: a stream write still queued when a channel goes away (its last
# release on the consumer's stream, an arrive after an abort) must not land in memory that was
# handed out again, e.g. as a new channel's counters. 32 bytes per channel, from slabs.
_SLAB_BLOCKS = 256
_slabs: dict[bool, tuple[torch.Tensor, int]] = {}  # pinned? -> (slab, blocks used)
_slabs_kept: list[torch.Tensor] = []
_slab_lock = threading.Lock()


def _counter_block(pinned: bool) -> torch.Tensor:
    """Four zeroed int64 counters that live as long as the process."""
    with _slab_lock:
        slab, used = _slabs.get(pinned, (None, _SLAB_BLOCKS))
        if used == _SLAB_BLOCKS:
            slab = torch.zeros((_SLAB_BLOCKS, 4), dtype=torch.int64, pin_memory=pinned)
            _slabs_kept.append(slab)
            used = 0
        _slabs[pinned] = (slab, used + 1)
        return slab[used]


# ------------------------------------------------------------------------------------------------
# stream operations


class MemOps:
    """cuStreamWaitValue64 / cuStreamWriteValue64 through cuda-bindings (no kernel, no SM used)."""

    name = "stream_mem_ops"

    def __init__(self, driver: Any, index: int):
        self.cu = driver
        err, dev = driver.cuDeviceGet(index)
        if int(err) == 0:
            err, self._ctx = driver.cuDevicePrimaryCtxRetain(dev)
        if int(err) != 0:
            raise RuntimeError(f"no primary context on cuda:{index}: {_cu_error(driver, err)}")

    def _call(self, fn: Any, *args: Any) -> None:
        # Driver calls need the device's context current in this thread (the progress thread may
        # have made no runtime call yet). Push it only for the call, so that the thread's current
        # device, which torch's runtime calls follow, stays what it was.
        cu = self.cu
        err, current = cu.cuCtxGetCurrent()
        push = int(err) != 0 or int(current) != int(self._ctx)
        if push:
            cu.cuCtxPushCurrent(self._ctx)
        try:
            result = fn(*args)
        finally:
            if push:
                cu.cuCtxPopCurrent()
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            raise RuntimeError(f"{fn.__name__} failed: CUresult {int(err)} ({_cu_error(self.cu, err)})")

    def wait_geq(self, stream: Any, addr: int, value: int, timeout_ns: int, status_addr: int) -> None:
        # Diagnostics only (perf/gpu_check.sh): no timeout on device, and a wait on a value that
        # another stream writes is invisible to CUDA's scheduling (the gate uses events instead).
        cu = self.cu
        self._call(
            cu.cuStreamWaitValue64,
            cu.CUstream(stream.cuda_stream),
            cu.CUdeviceptr(addr),
            cu.cuuint64_t(value),
            _GEQ,
        )

    def write(self, stream: Any, addr: int, value: int) -> None:
        cu = self.cu
        self._call(
            cu.cuStreamWriteValue64,
            cu.CUstream(stream.cuda_stream),
            cu.CUdeviceptr(addr),
            cu.cuuint64_t(value),
            _WRITE_DEFAULT,
        )


class KernelOps:
    """The spin-wait and release-store kernels of kernels/lag_counters.cu, compiled by CuPy."""

    name = "spin_kernel"

    def __init__(self, device: torch.device):
        import cupy  # GPU path only
        import numpy as np

        self._cupy, self._np = cupy, np
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        with cupy.cuda.Device(self.index):
            module = cupy.RawModule(code=kernel_source(), options=(f"-I{kernels_dir()}",))
            self._wait = module.get_function("blsgpu_wait_geq_kernel")
            self._store = module.get_function("blsgpu_store_release_kernel")
            self._sleep = module.get_function("blsgpu_sleep_ns_kernel")
        self._streams: dict[int, Any] = {}

    def _stream(self, stream: Any) -> Any:
        handle = stream.cuda_stream
        ext = self._streams.get(handle)
        if ext is None:
            ext = self._cupy.cuda.ExternalStream(handle, self.index)
            self._streams[handle] = ext
        return ext

    def _launch(self, kernel: Any, threads: int, args: tuple, stream: Any) -> None:
        # On this device, restoring the thread's current device afterwards.
        with self._cupy.cuda.Device(self.index):
            kernel((1,), (threads,), args, stream=self._stream(stream))

    def wait_geq(self, stream: Any, addr: int, value: int, timeout_ns: int, status_addr: int) -> None:
        np = self._np
        args = (np.uint64(addr), np.int32(1), np.uint64(value), np.uint64(timeout_ns), np.uint64(status_addr))
        self._launch(self._wait, 32, args, stream)

    def write(self, stream: Any, addr: int, value: int) -> None:
        np = self._np
        self._launch(self._store, 1, (np.uint64(addr), np.uint64(value)), stream)

    def sleep(self, stream: Any, seconds: float) -> None:
        """Keep `stream` busy for `seconds` of wall-clock time (not SM cycles)."""
        self._launch(self._sleep, 1, (self._np.uint64(int(seconds * 1e9)),), stream)


class HostOps:
    """A CPU stand-in for the stream operations, for tests without a GPU.

    The calling thread plays the stream: wait_geq blocks it (no spinning) until the counter reaches
    the value or the timeout passes (then it sets the status word, as the spin kernel does).
    """

    name = "host_emulation"

    def __init__(self) -> None:
        self.cond = threading.Condition()

    def wait_geq(self, stream: Any, addr: int, value: int, timeout_ns: int, status_addr: int) -> None:
        cell = ctypes.c_int64.from_address(addr)
        deadline = time.monotonic() + timeout_ns / 1e9
        with self.cond:
            while cell.value < value:
                left = deadline - time.monotonic()
                if left <= 0:
                    ctypes.c_uint32.from_address(status_addr).value |= 1
                    return
                self.cond.wait(left)

    def write(self, stream: Any, addr: int, value: int) -> None:
        with self.cond:
            ctypes.c_int64.from_address(addr).value = value
            self.cond.notify_all()


def kernels_dir() -> Path:
    import blsgpu.kernels  # folder kernels/, installed as blsgpu.kernels

    return Path(blsgpu.kernels.__file__).resolve().parent


def kernel_source() -> str:
    return (kernels_dir() / _KERNEL_SOURCE).read_text()


def _cuda_driver() -> Any:
    try:
        from cuda.bindings import driver  # cuda-bindings >= 12.6
    except ImportError:
        from cuda import cuda as driver  # older cuda-python layout
    return driver


def _cu_error(cu: Any, err: Any) -> str:
    try:
        res, text = cu.cuGetErrorString(err)
        return text.decode() if isinstance(text, bytes) else str(text)
    except Exception:
        return "unknown error"


def _probe(ops: Any, device: torch.device) -> None:
    """Run a satisfied wait and a write on a scratch stream; raises if the driver refuses them."""
    scratch = torch.zeros(2, dtype=torch.int64, pin_memory=True)
    stream = torch.cuda.Stream(device)
    ops.wait_geq(stream, scratch.data_ptr(), 0, 10**9, scratch.data_ptr() + 8)
    ops.write(stream, scratch.data_ptr(), 7)
    stream.synchronize()
    if int(scratch[0]) != 7:
        raise RuntimeError(f"stream write did not land (read {int(scratch[0])})")


_ops_cache: dict[tuple[int, str], Any] = {}
_ops_lock = threading.Lock()
_ops_notes: dict[int, str] = {}


def stream_ops(device: torch.device, prefer: str = "auto") -> Any:
    """The stream operations for `device`: "mem_ops", "kernel", or "auto" (mem_ops if they work).

    The reason a fallback happened is kept in `fallback_reason(device)`.
    """
    if prefer not in ("auto", "mem_ops", "kernel"):
        raise ValueError(f"prefer must be 'auto', 'mem_ops' or 'kernel', got {prefer!r}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _ops_lock:
        hit = _ops_cache.get((index, prefer))
        if hit is not None:
            return hit
        ops = None
        if prefer in ("auto", "mem_ops"):
            try:
                # The probe decides, not a device attribute: the attribute's name and meaning
                # changed across CUDA versions; an unsupported driver fails the probe's calls.
                candidate = MemOps(_cuda_driver(), index)
                _probe(candidate, torch.device("cuda", index))
                ops = candidate
            except Exception as e:
                if prefer == "mem_ops":
                    raise
                _ops_notes[index] = f"{type(e).__name__}: {e}"
        if ops is None:
            ops = KernelOps(torch.device("cuda", index))
            try:
                _probe(ops, torch.device("cuda", index))
            except Exception as e:
                why = _ops_notes.get(index, "not tried")
                raise RuntimeError(
                    f"no working device counters on cuda:{index}: stream memory operations: {why}; "
                    f"spin kernel on pinned host-mapped memory: {type(e).__name__}: {e}"
                ) from e
        _ops_cache[(index, prefer)] = ops
        return ops


def fallback_reason(device: torch.device) -> str | None:
    """Why stream_ops(device) fell back to the spin kernel, if it did."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _ops_notes.get(index)
