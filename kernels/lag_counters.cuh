// Device lag counters: 64-bit iteration counters in GPU (or mapped host) memory that one stream
// bumps and another waits on, so the comm stream can wait for "release counter >= k - B" on device
// instead of on the host (design.md, "The GPU path in one paragraph").
//
// Self-contained (no includes) so that the same text compiles with nvcc (cmake/, kernels/*.cu) and
// with NVRTC (CuPy RawModule, include path = this folder). Needs sm_70+ (scoped acquire/release
// PTX, __nanosleep); built for sm_80 and sm_90.
//
// Memory order: a writer publishes everything it wrote before the counter with a release store
// (or release add); a waiter that reads the counter with an acquire load sees those writes.
// Scope is .sys by default so that the host (mapped pinned memory) and peer GPUs can observe the
// counter too; define BLSGPU_COUNTER_SCOPE_GPU for device-local counters (cheaper fences).
#pragma once

typedef unsigned long long blsgpu_u64;
typedef unsigned int blsgpu_u32;

#if defined(BLSGPU_COUNTER_SCOPE_GPU)
#define BLSGPU_SCOPE "gpu"
#else
#define BLSGPU_SCOPE "sys"
#endif

// Waits end with one of these codes, written to the caller's status word.
#define BLSGPU_WAIT_OK 0u
#define BLSGPU_WAIT_TIMEOUT 1u

// Backoff bounds of the spin-wait, in ns: short first sleeps keep the wake-up latency low when the
// counter is about to move; the cap keeps a long wait from hammering the memory system.
#define BLSGPU_BACKOFF_MIN_NS 32u
#define BLSGPU_BACKOFF_MAX_NS 2048u

__device__ __forceinline__ blsgpu_u64 blsgpu_load_acquire(const blsgpu_u64* counter) {
    blsgpu_u64 value;
    asm volatile("ld.acquire." BLSGPU_SCOPE ".global.u64 %0, [%1];"
                 : "=l"(value)
                 : "l"(counter)
                 : "memory");
    return value;
}

__device__ __forceinline__ void blsgpu_store_release(blsgpu_u64* counter, blsgpu_u64 value) {
    asm volatile("st.release." BLSGPU_SCOPE ".global.u64 [%0], %1;" ::"l"(counter), "l"(value)
                 : "memory");
}

// Returns the value before the add.
__device__ __forceinline__ blsgpu_u64 blsgpu_add_release(blsgpu_u64* counter, blsgpu_u64 delta) {
    blsgpu_u64 old;
    asm volatile("atom.release." BLSGPU_SCOPE ".global.add.u64 %0, [%1], %2;"
                 : "=l"(old)
                 : "l"(counter), "l"(delta)
                 : "memory");
    return old;
}

__device__ __forceinline__ blsgpu_u64 blsgpu_globaltimer_ns() {
    blsgpu_u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Spins (with exponential __nanosleep backoff) until *counter >= target, acquiring what the writer
// released. timeout_ns == 0 waits forever; otherwise gives up after timeout_ns and returns
// BLSGPU_WAIT_TIMEOUT, so a dead peer becomes an error the host can raise instead of a hung stream.
__device__ __forceinline__ blsgpu_u32 blsgpu_wait_geq(const blsgpu_u64* counter, blsgpu_u64 target,
                                                      blsgpu_u64 timeout_ns) {
    if (blsgpu_load_acquire(counter) >= target) return BLSGPU_WAIT_OK;
    const blsgpu_u64 start = blsgpu_globaltimer_ns();
    blsgpu_u32 sleep_ns = BLSGPU_BACKOFF_MIN_NS;
    while (blsgpu_load_acquire(counter) < target) {
        if (timeout_ns != 0ull && blsgpu_globaltimer_ns() - start >= timeout_ns) {
            return BLSGPU_WAIT_TIMEOUT;
        }
        __nanosleep(sleep_ns);
        sleep_ns = sleep_ns < BLSGPU_BACKOFF_MAX_NS ? sleep_ns * 2u : BLSGPU_BACKOFF_MAX_NS;
    }
    return BLSGPU_WAIT_OK;
}
