// Kernels of the device lag counters (see lag_counters.cuh), with extern "C" names so that CuPy's
// RawModule finds them by name (NVRTC; the host part below is skipped there) and so that the shared
// library built by cmake/ exposes plain C launchers for ctypes.
//
// All kernels are tiny and meant to be enqueued on a stream: a wait kernel on the comm stream holds
// back the work enqueued after it until the counter reaches the target; a release kernel on the
// compute stream publishes "iteration k consumed" once everything before it on that stream is done.
#include "lag_counters.cuh"

// Each thread waits for one counter: every counters[i] (i < n) must reach target. On timeout the
// kernel ORs BLSGPU_WAIT_TIMEOUT into *status; it never clears it, so the flag is sticky and the host
// zeroes it once when it allocates it.
extern "C" __global__ void blsgpu_wait_geq_kernel(const blsgpu_u64* counters, int n, blsgpu_u64 target,
                                                  blsgpu_u64 timeout_ns, blsgpu_u32* status) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (blsgpu_wait_geq(counters + i, target, timeout_ns) != BLSGPU_WAIT_OK) {
        atomicOr(status, BLSGPU_WAIT_TIMEOUT);
    }
}

// counter = value, with release semantics (everything this stream did before is visible first).
extern "C" __global__ void blsgpu_store_release_kernel(blsgpu_u64* counter, blsgpu_u64 value) {
    if (blockIdx.x == 0 && threadIdx.x == 0) blsgpu_store_release(counter, value);
}

// counter += delta, with release semantics.
extern "C" __global__ void blsgpu_add_release_kernel(blsgpu_u64* counter, blsgpu_u64 delta) {
    if (blockIdx.x == 0 && threadIdx.x == 0) blsgpu_add_release(counter, delta);
}

// Keeps its stream busy for `ns` nanoseconds of wall-clock time (%globaltimer), whatever the SM clock
// does: the injected GPU-side delays of tests and benchmarks (a cycle-count sleep runs 5x longer
// on an idle-clocked GPU than on a boosted one).
extern "C" __global__ void blsgpu_sleep_ns_kernel(blsgpu_u64 ns) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const blsgpu_u64 start = blsgpu_globaltimer_ns();
    while (blsgpu_globaltimer_ns() - start < ns) __nanosleep(1000u);
}

#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>

// Host launchers of the shared library built by cmake/. Each returns the cudaError_t of the launch
// (0 = cudaSuccess) instead of aborting, so the Python side can raise a clear error.
#define BLSGPU_LAG_COUNTERS_ABI 1
#define BLSGPU_WAIT_BLOCK 32

extern "C" int blsgpu_lag_counters_abi_version(void) { return BLSGPU_LAG_COUNTERS_ABI; }

extern "C" int blsgpu_launch_wait_geq(const blsgpu_u64* counters, int n, blsgpu_u64 target,
                                      blsgpu_u64 timeout_ns, blsgpu_u32* status,
                                      cudaStream_t stream) {
    if (n <= 0) return static_cast<int>(cudaErrorInvalidValue);
    const int blocks = (n + BLSGPU_WAIT_BLOCK - 1) / BLSGPU_WAIT_BLOCK;
    blsgpu_wait_geq_kernel<<<blocks, BLSGPU_WAIT_BLOCK, 0, stream>>>(counters, n, target, timeout_ns,
                                                                      status);
    return static_cast<int>(cudaGetLastError());
}

extern "C" int blsgpu_launch_store_release(blsgpu_u64* counter, blsgpu_u64 value,
                                           cudaStream_t stream) {
    blsgpu_store_release_kernel<<<1, 1, 0, stream>>>(counter, value);
    return static_cast<int>(cudaGetLastError());
}

extern "C" int blsgpu_launch_sleep_ns(blsgpu_u64 ns, cudaStream_t stream) {
    blsgpu_sleep_ns_kernel<<<1, 1, 0, stream>>>(ns);
    return static_cast<int>(cudaGetLastError());
}

extern "C" int blsgpu_launch_add_release(blsgpu_u64* counter, blsgpu_u64 delta, cudaStream_t stream) {
    blsgpu_add_release_kernel<<<1, 1, 0, stream>>>(counter, delta);
    return static_cast<int>(cudaGetLastError());
}
#endif  // __CUDACC_RTC__
