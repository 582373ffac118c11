#!/usr/bin/env bash
# Every GPU check of blsgpu in one go, for a machine with a GPU (issue 4): the GPU tests, the CPU tests
# of the GPU path in that environment, and the GPU benchmarks. Under 8 minutes on one H200.
#
#   bash perf/gpu_check.sh            # logs and JSON to $OUT if set, else perf/results/
#
# Each step logs to gpu_check.log, has its own time limit and never stops the script. All steps
# share one budget (GPU_CHECK_BUDGET_S, default 480 s): a step gets what is left of it at most, and
# is skipped when under 20 s are left, so the script ends inside one device call (600 s at most)
# and always writes gpu_check_summary.json (every step's exit code and seconds, the environment
# probe), also when interrupted. At most 8 files land in the output folder (the device tool returns
# no more).
#
# Python packages: wheels carried in .whl/ (see /work/.library/device/README.md, "Notes") are
# installed first with --no-index into /tmp/blsgpu-site; then blsgpu itself, editable, without
# dependencies or network. Nothing is downloaded.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUTDIR=${OUT:-$ROOT/perf/results}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/gpu_check.log
SUMMARY=$OUTDIR/gpu_check_summary.json
PY=${PYTHON:-python3}
STEPS=$(mktemp)
export PYTHONUNBUFFERED=1
T_START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-480}
: >"$LOG"

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
# Interrupted: record it and write the summary of the steps so far.
CHILD=
trap '[ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null
      echo "interrupted 130 $(($(date +%s) - T_START))" >>"$STEPS"; summary; exit 130' INT TERM

# step NAME LIMIT_S CMD...: runs CMD with a time limit (its own, or what is left of the budget),
# logs it, records rc and seconds.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - T_START)))
  if [ "$left" -lt 20 ]; then
    log "=== $name: skipped, ${left}s of the ${BUDGET}s budget left"
    echo "$name no_time 0" >>"$STEPS"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "=== $name (limit ${limit}s): $*"
  local t0 rc
  t0=$(date +%s)
  # In the background and waited for, so that an interrupt reaches the trap at once (bash runs
  # traps only between foreground commands); stdin stays the step's (the probe's heredoc).
  timeout -k 10 "$limit" "$@" <&0 >>"$LOG" 2>&1 &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=
  local dt=$(($(date +%s) - t0))
  [ "$rc" = 124 ] && log "!!! $name hit its ${limit}s limit"
  log "=== $name: rc=$rc in ${dt}s (total $(($(date +%s) - T_START))s)"
  echo "$name $rc $dt" >>"$STEPS"
  return 0
}

# summary: gpu_check_summary.json from the steps so far (the last step, or on an interrupt).
summary() {
"$PY" - "$STEPS" "$LOG" "$SUMMARY" "$T_START" <<'EOF'
import json, sys, time
steps_path, log_path, out_path, t_start = sys.argv[1:5]
steps = []
for line in open(steps_path):
    name, rc, dt = line.split()
    steps.append({"step": name, "rc": int(rc) if rc.lstrip("-").isdigit() else rc,
                  "seconds": int(dt)})
probe = None
for line in open(log_path, errors="replace"):
    if line.startswith("PROBE "):
        probe = json.loads(line[6:])
tail = [l.rstrip() for l in open(log_path, errors="replace") if " passed" in l or " failed" in l]
doc = {"steps": steps, "probe": probe, "pytest_lines": tail[-6:],
       "total_s": int(time.time()) - int(t_start),
       "ok": all(s["rc"] in (0, "skipped") for s in steps)}
open(out_path, "w").write(json.dumps(doc, indent=1))
print(json.dumps(doc, indent=1))
EOF
rm -f "$STEPS"
log "done in $(($(date +%s) - T_START))s: $LOG, $SUMMARY"
}

# 1. Packages: carried wheels, then blsgpu (editable: blsgpu.kernels maps to kernels/).
setup() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/blsgpu-site .whl/*.whl || echo "carried wheels did not install"
  else
    echo "no .whl/ folder: using the image's packages"
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . && return 0
  echo "editable install failed: falling back to PYTHONPATH with a blsgpu/kernels link"
  [ -e blsgpu/kernels ] || ln -s ../kernels blsgpu/kernels
}
mkdir -p /tmp/blsgpu-site
export PYTHONPATH=/tmp/blsgpu-site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${GPU_CHECK_SKIP_SETUP:-}" ]; then  # a dry run of this script where blsgpu is installed
  log "=== setup skipped (GPU_CHECK_SKIP_SETUP)"
else
  step setup 150 bash -c "$(declare -f setup); PY='$PY'; setup"
fi

# 2. What is there: GPU, driver, torch, CuPy, NCCL builds, stream memory operations, nvtx, nsys.
step probe 90 "$PY" - <<'EOF'
import importlib.util, json, shutil, subprocess, sys
info = {"python": sys.version.split()[0]}
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=30).stdout.strip()
except Exception as e:
    info["nvidia_smi"] = f"failed: {e}"
import torch
info.update(torch=torch.__version__, cuda=torch.version.cuda, gpus=torch.cuda.device_count())
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name(0)
    try:
        info["nccl_torch"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:
        info["nccl_torch"] = f"failed: {e}"
for mod in ("cupy", "nvtx", "cuda.bindings", "triton", "pytest", "hypothesis", "matplotlib"):
    try:
        info[mod] = importlib.util.find_spec(mod) is not None
    except Exception:
        info[mod] = False
info["nsys"] = shutil.which("nsys")
import blsgpu
from blsgpu import _nccl
info["libnccl_before_cupy"] = _nccl.loaded_libnccl()
try:
    info["libnccl_check"] = _nccl.check_libnccl() or "one libnccl"
    info["nccl_cupy"] = _nccl.nccl_version_str(_nccl._import_nccl().get_version())
    info["libnccl_after_cupy"] = _nccl.loaded_libnccl()
except Exception as e:
    info["libnccl_check"] = f"failed: {type(e).__name__}: {e}"
try:
    from blsgpu import _device_counters as dc
    dev = torch.device("cuda", 0)
    info["stream_ops"] = dc.stream_ops(dev).name
    info["stream_ops_fallback"] = dc.fallback_reason(dev)
    info["spin_kernel_compiles"] = dc.stream_ops(dev, "kernel").name
except Exception as e:
    info["stream_ops"] = f"failed: {type(e).__name__}: {e}"
print("PROBE " + json.dumps(info))
EOF

# 3. The GPU tests (one GPU here; multigpu ones say why they skip): the GPU path and the lookup
#    kernels on CUDA.
step pytest_gpu 260 "$PY" -m pytest tests/test_gpu.py tests/test_lookup.py tests/test_counters_build.py \
  -m "gpu or multigpu" -v -rs \
  -p no:cacheprovider --timeout 90 --junitxml="$OUTDIR/pytest_gpu.xml"

# 3b. The main job on the GPU: DLRM inference under torchrun, one rank (NCCL to itself), sync and
#     BLS on the same batches; it fails unless predictions are identical and the channels ran NCCL.
step dlrm_cuda 120 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m blsgpu run --device cuda --iterations 30 --warmup 3 --delay exp:5 --no-progress

# 4. The exchange benchmark on the GPU (W=1 NCCL vs BLS; local W=4 masking).
step bench_gpu_exchange 170 "$PY" perf/bench_gpu_exchange.py --quick --out "$OUTDIR"

# 5. The lookup benchmark on the GPU (perf/bench_lookup.py, written with the lookup kernels).
if [ -f perf/bench_lookup.py ]; then
  step bench_lookup 90 "$PY" perf/bench_lookup.py --device cuda --reps 10 --warmup 3 --out "$OUTDIR"
else
  log "=== bench_lookup: perf/bench_lookup.py not present, skipped"
  echo "bench_lookup skipped 0" >>"$STEPS"
fi

# 6. The CPU tests of the GPU path and of the local mode, in this environment (torch, CuPy present).
step pytest_cpu_side 120 "$PY" -m pytest tests/test_gpu_path_cpu.py tests/test_local_world.py -q -rs \
  -p no:cacheprovider --timeout 100

# 7. nsys, only where it is on the PATH (it was not on the H200 image as last seen).
if command -v nsys >/dev/null 2>&1; then
  step nsys 90 env OUT="$OUTDIR" bash perf/nsys_profile.sh gpu-exchange
else
  log "=== nsys: not on the PATH, skipped (perf/nsys_profile.sh has the command lines)"
  echo "nsys skipped 0" >>"$STEPS"
fi

# 8. Summary.
trap - INT TERM
summary
