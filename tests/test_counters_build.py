"""The CUDA sources of the device lag counters (kernels/lag_counters.*) build with cmake/ and nvcc.

Where nvcc and cmake exist (this machine, CI) the CMake project is configured and built as shipped:
SASS for sm_80 and sm_90 plus compute_90 PTX. Elsewhere these tests skip and say why. Running the
kernels needs a GPU (marked `gpu`).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
KERNEL_NAMES = (
    "blsgpu_wait_geq_kernel",
    "blsgpu_store_release_kernel",
    "blsgpu_add_release_kernel",
    "blsgpu_sleep_ns_kernel",
)


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


NVCC = _nvcc()
CMAKE = shutil.which("cmake")
pytestmark = pytest.mark.skipif(
    NVCC is None or CMAKE is None,
    reason=f"needs nvcc and cmake (nvcc: {NVCC or 'not found'}, cmake: {CMAKE or 'not found'})",
)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Configure and build cmake/ with its default architectures; returns (build dir, log)."""
    build_dir = tmp_path_factory.mktemp("kernels-build")
    configure = [
        CMAKE, "-S", str(ROOT / "cmake"), "-B", str(build_dir),
        "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CUDA_COMPILER={NVCC}",
    ]  # fmt: skip
    log = []
    for cmd in (configure, [CMAKE, "--build", str(build_dir), "--verbose"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        log.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{log[-1][-6000:]}"
    return build_dir, "\n".join(log)


def _library(build_dir: Path) -> Path:
    libs = list(build_dir.glob("libblsgpu_kernels.so*")) + list(build_dir.glob("*blsgpu_kernels*.dll"))
    assert libs, f"no library in {build_dir}: {sorted(p.name for p in build_dir.iterdir())}"
    return libs[0]


def test_builds_sm80_sm90_and_ptx(build):
    build_dir, log = build
    # The compile line itself: SASS for both architectures and PTX for compute_90.
    assert re.search(r"arch=compute_80,code=\[?sm_80", log), log[-3000:]
    assert re.search(r"arch=compute_90,code=\[?sm_90", log), log[-3000:]
    assert re.search(r"arch=compute_90,code=\[?compute_90", log), log[-3000:]
    assert _library(build_dir).stat().st_size > 0


def test_library_exports_c_launchers(build):
    lib = ctypes.CDLL(str(_library(build[0])))
    assert lib.blsgpu_lag_counters_abi_version() == 1
    for name in (
        "blsgpu_launch_wait_geq",
        "blsgpu_launch_store_release",
        "blsgpu_launch_add_release",
        "blsgpu_launch_sleep_ns",
    ):
        assert hasattr(lib, name), name
    if not Path("/dev/nvidiactl").exists():
        # No driver: a launch reports a CUDA error code instead of crashing the process.
        launch = lib.blsgpu_launch_store_release
        launch.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p]
        assert launch(None, 1, None) != 0


# ids avoid the bare word "gpu": conftest skips items whose keywords contain it.
@pytest.mark.parametrize("scope", ["sys", "gpu"], ids=["sys_scope", "device_scope"])
def test_ptx_orders_memory_and_backs_off(tmp_path, scope):
    """Acquire loads, release stores/adds at the chosen scope; sleep-based backoff; a deadline."""
    ptx_path = tmp_path / "lag_counters.ptx"
    defines = ["-DBLSGPU_COUNTER_SCOPE_GPU"] if scope == "gpu" else []
    cmd = [NVCC, "-ptx", "-arch=compute_80", f"-I{KERNELS}", *defines,
           str(KERNELS / "lag_counters.cu"), "-o", str(ptx_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ptx = ptx_path.read_text()
    for instruction in (
        f"ld.acquire.{scope}.global.u64",
        f"st.release.{scope}.global.u64",
        f"atom.release.{scope}.global.add.u64",
        "nanosleep.u32",
        "%globaltimer",
    ):
        assert instruction in ptx, instruction
    for kernel in KERNEL_NAMES:
        assert re.search(rf"\.entry {kernel}\(", ptx), f'{kernel} is not an extern "C" entry'


def test_device_part_needs_no_headers():
    """NVRTC (CuPy RawModule) has no host headers: only the host launchers may include any."""
    header = (KERNELS / "lag_counters.cuh").read_text()
    assert "#include" not in header
    source = (KERNELS / "lag_counters.cu").read_text()
    device_part = source.split("#ifndef __CUDACC_RTC__")[0]
    assert re.findall(r"#include\s+(\S+)", device_part) == ['"lag_counters.cuh"']


@pytest.mark.gpu
def test_wait_blocks_until_release_and_times_out(build):
    lib = ctypes.CDLL(str(_library(build[0])))
    u64, vp = ctypes.c_uint64, ctypes.c_void_p
    lib.blsgpu_launch_wait_geq.argtypes = [vp, ctypes.c_int, u64, u64, vp, vp]
    lib.blsgpu_launch_store_release.argtypes = [vp, u64, vp]
    lib.blsgpu_launch_add_release.argtypes = [vp, u64, vp]

    counter = torch.zeros(1, dtype=torch.int64, device="cuda")
    status = torch.zeros(1, dtype=torch.int32, device="cuda")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    waiter, writer = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()

    # The waiter's stream holds back the fill until the writer releases 3.
    rc = lib.blsgpu_launch_wait_geq(
        counter.data_ptr(), 1, 3, 10_000_000_000, status.data_ptr(), waiter.cuda_stream
    )
    assert rc == 0
    with torch.cuda.stream(waiter):
        flag.fill_(1)
    time.sleep(0.2)
    assert not waiter.query(), "the wait kernel returned before the counter reached its target"
    assert lib.blsgpu_launch_store_release(counter.data_ptr(), 3, writer.cuda_stream) == 0
    waiter.synchronize()
    assert int(flag.item()) == 1 and int(status.item()) == 0

    assert lib.blsgpu_launch_add_release(counter.data_ptr(), 2, writer.cuda_stream) == 0
    writer.synchronize()
    assert int(counter.item()) == 5

    # A target never reached: the wait gives up after its deadline and flags it.
    rc = lib.blsgpu_launch_wait_geq(
        counter.data_ptr(), 1, 100, 5_000_000, status.data_ptr(), waiter.cuda_stream
    )
    assert rc == 0
    waiter.synchronize()
    assert int(status.item()) == 1


@pytest.mark.gpu
def test_kernels_compile_with_nvrtc_via_cupy():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    module = cupy.RawModule(
        code=(KERNELS / "lag_counters.cu").read_text(), options=(f"-I{KERNELS}", "-std=c++17")
    )
    for kernel in KERNEL_NAMES:
        assert module.get_function(kernel) is not None
