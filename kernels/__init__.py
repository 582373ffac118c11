"""Device code: Triton kernels (Python) and CUDA sources of the lag counters. Installed as blsgpu.kernels."""
