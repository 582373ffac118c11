#!/usr/bin/env bash
# Nsight Systems timelines of blsgpu: CUDA kernels and copies, the NCCL groups on the comm streams,
# and the blsgpu NVTX ranges (blsgpu.post / receive / wait / release [channel:iteration], and lookup
# where the lookup code marks it). NVTX needs the `nvtx` package (in the cuda extras); BLSGPU_NVTX=0
# turns the ranges off.
#
#   bash perf/nsys_profile.sh dlrm [ARGS...]     the DLRM run: python -m blsgpu run --device cuda ARGS,
#                                                under torchrun with NPROC ranks (one GPU each; default 1)
#   bash perf/nsys_profile.sh exchange           perf/bench_exchange.py (gloo ranks: NVTX + OS runtime)
#   bash perf/nsys_profile.sh gpu-exchange       perf/bench_gpu_exchange.py --quick (NCCL, W=1 and local W=4)
#   PRINT=1 bash perf/nsys_profile.sh ...        print the command line instead of running it
#
# Reports go to $OUT if set, else perf/results/ (<name>.nsys-rep; open with nsys-ui, or
# `nsys stats <file>` for tables). --trace-fork-before-exec follows the ranks that run_world forks
# from its forkserver; the default sampling is off to keep the overhead on the timed loops small.
set -euo pipefail
cd "$(dirname "$0")/.."
NSYS=${NSYS:-nsys}
PY=${PYTHON:-python3}
OUTDIR=${OUT:-perf/results}
mkdir -p "$OUTDIR"
what=${1:-}
shift || true

common=(profile --trace=cuda,nvtx,osrt --sample=none --cpuctxsw=none --trace-fork-before-exec=true
        --force-overwrite=true)

case "$what" in
  dlrm)
    # `blsgpu run --device cuda` runs one GPU per rank under torchrun (NPROC ranks, default 1).
    cmd=("$NSYS" "${common[@]}" -o "$OUTDIR/nsys_dlrm" "$PY" -m torch.distributed.run --standalone
         --nproc-per-node="${NPROC:-1}" -m blsgpu run --device cuda "$@")
    ;;
  exchange)
    cmd=("$NSYS" profile --trace=nvtx,osrt --sample=none --cpuctxsw=none --trace-fork-before-exec=true
         --force-overwrite=true -o "$OUTDIR/nsys_bench_exchange"
         "$PY" perf/bench_exchange.py --iters 50 --repeats 1 --bounds 0,4 --delays none,exp:5
         --no-plot --out "$OUTDIR" "$@")
    ;;
  gpu-exchange)
    cmd=("$NSYS" "${common[@]}" -o "$OUTDIR/nsys_bench_gpu_exchange"
         "$PY" perf/bench_gpu_exchange.py --quick --repeats 1 --out "$OUTDIR" --tag nsys "$@")
    ;;
  *)
    sed -n '2,17p' "$0"
    exit 2
    ;;
esac

if [ -n "${PRINT:-}" ]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  "${cmd[@]}"
fi
