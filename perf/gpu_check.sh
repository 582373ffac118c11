#!/usr/bin/env bash
# The GPU checks of blsgpu as stages, in the order in which things can fail first, for one call on a
# machine with one GPU (perf/README.md, "GPU checks"):
#
#   setup        carried wheels (.whl/, if any) and blsgpu itself, no network
#   versions     python, driver, torch, CUDA, CuPy, both NCCL versions, the libnccl files mapped
#                before and after CuPy is imported (and blsgpu's verdict on them)
#   memops       the device attributes of stream memory operations, which stream ops blsgpu picks
#                (and why it fell back), the spin kernel compiling, CUDA_DEVICE_MAX_CONNECTIONS
#   nccl_raw     CuPy's NCCL at world size 1: a send/recv group to itself, 1 MiB, in us
#   torch_a2a    torch's all_to_all_single on NCCL at world size 1, 1 MiB: the baseline in us
#   counters     device counters and the event gate, comm streams, the GPU sleep (pytest)
#   engine_w1    the engine over NCCL at W=1: exact, stream-ordered hand-off, allocator safety,
#                the "bls" backend, the sharded collection (pytest)
#   host_cost    host microseconds per iteration: the engine over NCCL at W=1 (exchange, wait; with
#                and without headers) and perf/bench_host_cost.py (engine alone, no I/O)
#   local_mode   the single-GPU multi-rank mode (W ranks as stream sets), the most likely to hang:
#                last, and retried with CUDA_DEVICE_MAX_CONNECTIONS=32 if it fails
#   extras       only with GPU_CHECK_EXTRAS=1 and time left: Triton lookup tests, DLRM on the GPU,
#                perf/bench_gpu_exchange.py --quick (its JSON stays in a temporary folder)
#
#   bash perf/gpu_check.sh        # output to $OUT if set, else perf/results/
#
# Every stage has its own time limit (never more than what is left of GPU_CHECK_BUDGET_S, default
# 500 s, so the whole script stays under 9 minutes) and never stops the script. A stage that reaches
# its limit first gets SIGUSR1, on which every Python process of the stage dumps the stacks of all
# its threads into the log (faulthandler, installed through a sitecustomize), then SIGKILL 8 s later.
# Without a GPU the stages that need one say "skipped: no GPU". gpu_check_summary.json is written at
# the end and also when the script is interrupted (TERM, INT). Files written: gpu_check.log,
# gpu_check_summary.json and one JUnit XML per pytest stage (at most 6 files).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUTDIR=${OUT:-$ROOT/perf/results}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/gpu_check.log
SUMMARY=$OUTDIR/gpu_check_summary.json
PY=${PYTHON:-python3}
STAGES=$(mktemp)
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
T_START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-500}
HAVE_GPU=0
: >"$LOG"

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# Every Python process of a stage dumps all its threads' stacks on SIGUSR1 (and on a crash).
mkdir -p "$WORK/site"
cat >"$WORK/site/sitecustomize.py" <<'EOF'
import faulthandler, signal, sys
faulthandler.enable(file=sys.stderr, all_threads=True)
faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)
EOF
mkdir -p /tmp/blsgpu-site
export PYTHONPATH=$WORK/site:/tmp/blsgpu-site:$ROOT${PYTHONPATH:+:$PYTHONPATH}

# summary: gpu_check_summary.json from the stages so far; each stage's RESULT lines and, where it
# did not pass, the last lines it logged.
summary() {
"$PY" - "$STAGES" "$LOG" "$SUMMARY" "$T_START" "$BUDGET" <<'EOF'
import json, sys, time
stages_path, log_path, out_path, t_start, budget = sys.argv[1:6]
sections, cur = {}, None
for line in open(log_path, errors="replace"):
    if line.startswith("### STAGE "):
        cur = line.split()[2]
        sections.setdefault(cur, [])
    elif cur is not None:
        sections[cur].append(line.rstrip("\n"))
stages = []
for line in open(stages_path):
    name, status, rc, dt = line.rstrip("\n").split("\t")
    lines = sections.get(name, [])
    results = []
    for l in lines:
        if l.startswith("RESULT "):
            try:
                results.append(json.loads(l[7:]))
            except ValueError:
                results.append(l[7:])
    entry = {"stage": name, "status": status, "rc": int(rc), "seconds": int(dt),
             "results": results}
    entry["pytest"] = [l for l in lines if l.startswith("=") and (" passed" in l or " failed" in l
                                                                 or " skipped" in l)][-1:]
    if status not in ("ok",) and not status.startswith("skipped"):
        entry["log_tail"] = [l for l in lines if l.strip()][-25:]
    stages.append(entry)
doc = {"stages": stages, "total_s": int(time.time()) - int(t_start), "budget_s": int(budget),
       "ok": all(s["status"] == "ok" or s["status"].startswith("skipped") for s in stages),
       "first_failure": next((s["stage"] for s in stages if s["status"] not in ("ok",)
                              and not s["status"].startswith("skipped")), None)}
open(out_path, "w").write(json.dumps(doc, indent=1))
print(json.dumps({k: doc[k] for k in ("total_s", "ok", "first_failure")}))
for s in stages:
    print(f"  {s['stage']:<12} {s['status']:<22} {s['seconds']:>4}s  {json.dumps(s['results'])[:160]}")
EOF
}

finish() {
  summary | tee -a "$LOG"
  rm -rf "$STAGES" "$WORK"
  log "done in $(($(date +%s) - T_START))s: $LOG, $SUMMARY"
}

CHILD=
on_signal() {
  # timeout(1) passes USR1 (stacks) and then TERM on to the stage's processes.
  [ -n "$CHILD" ] && kill -USR1 "$CHILD" 2>/dev/null && sleep 2 && kill -TERM "$CHILD" 2>/dev/null
  printf '%s\t%s\t%s\t%s\n' "${CUR_STAGE:-none}" "interrupted" 130 "$(($(date +%s) - ${STAGE_T0:-$T_START}))" \
    >>"$STAGES"
  finish
  exit 130
}
trap on_signal INT TERM

# stage NAME LIMIT_S NEEDS_GPU CMD...: runs CMD under its limit, records status, rc and seconds.
stage() {
  local name=$1 limit=$2 gpu=$3
  shift 3
  LAST_RC=0
  local left=$((BUDGET - ($(date +%s) - T_START)))
  echo "### STAGE $name" >>"$LOG"
  if [ "$gpu" = 1 ] && [ "$HAVE_GPU" != 1 ]; then
    log "=== $name: skipped: no GPU"
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped: no GPU" 0 0 >>"$STAGES"
    return 0
  fi
  if [ "$left" -lt 15 ]; then
    log "=== $name: skipped: ${left}s of the ${BUDGET}s budget left"
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped: no time" 0 0 >>"$STAGES"
    return 0
  fi
  [ "$limit" -gt "$((left - 5))" ] && limit=$((left - 5))
  log "=== $name (limit ${limit}s): $*"
  local t0 rc status
  t0=$(date +%s)
  STAGE_T0=$t0
  CUR_STAGE=$name
  # In the background and waited for, so that a signal reaches the trap at once. At the limit:
  # SIGUSR1 to the stage's process group (every Python process dumps its threads), SIGKILL 8 s on.
  # stdin stays the stage's (the heredocs of the Python stages).
  timeout -s USR1 -k 8 "$limit" "$@" <&0 >>"$LOG" 2>&1 &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=
  CUR_STAGE=
  local dt=$(($(date +%s) - t0))
  case $rc in
    0) status=ok ;;
    124 | 137 | 138) status="timeout (stacks in log)"; log "!!! $name hit its ${limit}s limit" ;;
    5) status="ok: nothing collected" ;;  # pytest: every test deselected or skipped
    *) status=failed ;;
  esac
  log "=== $name: $status rc=$rc in ${dt}s (total $(($(date +%s) - T_START))s)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$dt" >>"$STAGES"
  LAST_RC=$rc
  return 0
}

pytest_stage() {  # pytest_stage NAME LIMIT PER_TEST_S -k EXPR [ENV=VALUE ...]
  local name=$1 limit=$2 per=$3 expr=$4
  shift 4
  stage "$name" "$limit" 1 env "$@" "$PY" -m pytest tests/test_gpu.py -m "gpu" -k "$expr" -v -rs \
    -p no:cacheprovider --timeout "$per" --junitxml="$OUTDIR/pytest_$name.xml"
}

# ---------------------------------------------------------------------------------------- setup
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
if [ -n "${GPU_CHECK_SKIP_SETUP:-}" ]; then  # a dry run where blsgpu is installed already
  echo "### STAGE setup" >>"$LOG"
  log "=== setup: skipped (GPU_CHECK_SKIP_SETUP)"
  printf '%s\t%s\t%s\t%s\n' setup "skipped: asked" 0 0 >>"$STAGES"
else
  stage setup 120 0 bash -c "$(declare -f setup); PY='$PY'; setup"
fi
HAVE_GPU=$(timeout 60 "$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
log "GPU visible to torch: $HAVE_GPU"

# ------------------------------------------------------------------------------------- versions
stage versions 60 0 "$PY" - <<'EOF'
import importlib.util, json, subprocess, sys
from blsgpu.transport import nccl_lib as _nccl
info = {"python": sys.version.split()[0]}
try:
    info["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e:
    info["nvidia_smi"] = f"not run: {type(e).__name__}"
import torch
info.update(torch=torch.__version__, cuda=torch.version.cuda, gpus=torch.cuda.device_count())
if torch.cuda.is_available():
    torch.cuda.init()
    info["device"] = torch.cuda.get_device_name(0)
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
info["nccl_torch"] = _nccl.nccl_version_str(_nccl.torch_nccl_version())
for mod in ("cupy", "cuda.bindings", "triton", "nvtx", "pytest_timeout"):
    try:
        info[mod] = importlib.util.find_spec(mod) is not None
    except Exception:
        info[mod] = False
info["libnccl_before_cupy"] = _nccl.loaded_libnccl()
try:
    info["libnccl_check"] = _nccl.check_libnccl() or "one libnccl"
    info["nccl_cupy"] = _nccl.nccl_version_str(_nccl.import_nccl().get_version())
    import cupy
    info["cupy"] = cupy.__version__
except Exception as e:
    info["libnccl_check"] = f"failed: {type(e).__name__}: {e}"
info["libnccl_after_cupy"] = _nccl.loaded_libnccl()
print("RESULT " + json.dumps(info))
EOF

# --------------------------------------------------------------------------------------- memops
stage memops 60 1 "$PY" - <<'EOF'
import json, os, time
import torch
from blsgpu.counters import device as dc
torch.cuda.init()
dev = torch.device("cuda", 0)
out = {"CUDA_DEVICE_MAX_CONNECTIONS": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "unset (8)")}
try:
    cu = dc._cuda_driver()
    cu.cuInit(0)
    err, d = cu.cuDeviceGet(0)
    attrs = {}
    for name in dir(cu.CUdevice_attribute):
        if any(t in name for t in ("STREAM_MEM_OPS", "WAIT_VALUE", "UNIFIED_ADDRESSING",
                                   "CAN_MAP_HOST_MEMORY", "HOST_NATIVE_ATOMIC")):
            err, v = cu.cuDeviceGetAttribute(getattr(cu.CUdevice_attribute, name), d)
            attrs[name.replace("CU_DEVICE_ATTRIBUTE_", "")] = int(v) if int(err) == 0 else f"err {int(err)}"
    out["attributes"] = attrs
except Exception as e:
    out["attributes"] = f"failed: {type(e).__name__}: {e}"
try:
    out["stream_ops"] = dc.stream_ops(dev).name
    out["fallback_reason"] = dc.fallback_reason(dev)
except Exception as e:
    out["stream_ops"] = f"failed: {type(e).__name__}: {e}"
try:
    out["spin_kernel"] = dc.stream_ops(dev, "kernel").name
except Exception as e:
    out["spin_kernel"] = f"failed: {type(e).__name__}: {e}"
# A memory-op wait released by a write from another stream (the pattern the gate no longer uses):
# whether this driver runs it, and how long the release takes to be seen.
try:
    ops = dc.stream_ops(dev, "mem_ops")
    cells = torch.zeros(4, dtype=torch.int64, pin_memory=True)
    a, b = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    ops.wait_geq(a, cells.data_ptr(), 1, 10**9, cells.data_ptr() + 24)
    mark = torch.cuda.Event(); mark.record(a)
    time.sleep(0.05)
    held = not mark.query()
    t0 = time.perf_counter()
    ops.write(b, cells.data_ptr(), 1)
    ok = dc.host_wait(mark, 5.0)
    out["memop_wait_then_write"] = {"held": held, "released": ok,
                                    "us": round((time.perf_counter() - t0) * 1e6, 1)}
except Exception as e:
    out["memop_wait_then_write"] = f"failed: {type(e).__name__}: {e}"
print("RESULT " + json.dumps(out))
EOF

# ------------------------------------------------------------------------------------- nccl_raw
stage nccl_raw 60 1 "$PY" - <<'EOF'
import json, time
import torch
from blsgpu.transport import nccl_lib as _nccl
nccl = _nccl.import_nccl()
torch.cuda.set_device(0)
comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
s = torch.cuda.Stream()
n = 1 << 20
x = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
y = torch.empty_like(x)
torch.cuda.synchronize()
def group():
    nccl.groupStart()
    comm.send(x.data_ptr(), n, nccl.NCCL_UINT8, 0, s.cuda_stream)
    comm.recv(y.data_ptr(), n, nccl.NCCL_UINT8, 0, s.cuda_stream)
    nccl.groupEnd()
t0 = time.perf_counter(); group(); s.synchronize(); first = time.perf_counter() - t0
iters = 200
t0 = time.perf_counter()
for _ in range(iters):
    group(); s.synchronize()
synced = (time.perf_counter() - t0) / iters
t0 = time.perf_counter()
for _ in range(iters):
    group()
issue = (time.perf_counter() - t0) / iters
s.synchronize()
piped = (time.perf_counter() - t0) / iters
ok = bool(torch.equal(x, y))
comm.destroy()
print("RESULT " + json.dumps({"bytes": n, "exact": ok, "first_group_ms": round(first * 1e3, 2),
      "us_per_group_synced": round(synced * 1e6, 1), "us_per_group_pipelined": round(piped * 1e6, 1),
      "host_us_to_issue": round(issue * 1e6, 1)}))
EOF

# ------------------------------------------------------------------------------------ torch_a2a
stage torch_a2a 60 1 "$PY" - <<EOF
import json, time, torch, torch.distributed as dist
torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method="file://$WORK/pg", rank=0, world_size=1)
n = (1 << 20) // 4
x = torch.randn(n, device="cuda"); y = torch.empty_like(x)
dist.all_to_all_single(y, x); torch.cuda.synchronize()
iters = 200
t0 = time.perf_counter()
for _ in range(iters):
    dist.all_to_all_single(y, x); torch.cuda.synchronize()
synced = (time.perf_counter() - t0) / iters
t0 = time.perf_counter()
for _ in range(iters):
    dist.all_to_all_single(y, x, async_op=True)
torch.cuda.synchronize()
piped = (time.perf_counter() - t0) / iters
print("RESULT " + json.dumps({"bytes": n * 4, "exact": bool(torch.equal(x, y)),
      "us_per_call_synced": round(synced * 1e6, 1), "us_per_call_pipelined": round(piped * 1e6, 1)}))
dist.destroy_process_group()
EOF

# ------------------------------------------------------------------------------ counters, engine
pytest_stage counters 60 30 "gate or spin_kernel or comm_streams or gpu_sleep"
pytest_stage engine_w1 150 60 \
  "world_size_one or hand_off or caching_allocator or bls_backend or gloo_channel or sharded_collection"
# The contract cases on real NCCL (tests/test_contract.py, world "nccl-gpu"): on one GPU the W=1
# cases run, the others skip (they need a GPU per rank).
stage contract_w1 60 1 "$PY" -m pytest tests/test_contract.py -m gpu -k "nccl-gpu" -v -rs \
  -p no:cacheprovider --timeout 30 --junitxml="$OUTDIR/pytest_contract_w1.xml"

# ------------------------------------------------------------------------------------ host_cost
stage host_cost 75 1 env GPU_CHECK_WORK="$WORK" "$PY" - <<'EOF'
import json, os, subprocess, sys, time
import torch, torch.distributed as dist
from blsgpu import BoundedLagAllToAll
torch.cuda.set_device(0)
dist.init_process_group("gloo", init_method=f"file://{os.environ['GPU_CHECK_WORK']}/hc", rank=0,
                        world_size=1)
rows, dim, bound, iters = 256, 64, 4, 300  # 64 KiB per iteration
x = torch.randn(rows, dim, device="cuda")
for name, kw, known in (("exchanged", {}, False), ("recv_splits", {}, True),
                        ("known_splits", {"known_splits": True}, True)):
    with BoundedLagAllToAll(bound=bound, device="cuda", transport="nccl", name=name, **kw) as a2a:
        pending, t_ex, t_wait = [], 0.0, 0.0
        for k in range(iters + 20):
            t0 = time.perf_counter()
            pending.append(a2a.exchange(x, [rows], [rows] if known else None))
            t1 = time.perf_counter()
            if len(pending) > bound:
                pending.pop(0).wait()
            t2 = time.perf_counter()
            if k >= 20:
                t_ex += t1 - t0
                t_wait += t2 - t1
        for h in pending:
            h.wait()
        t0 = time.perf_counter(); torch.cuda.synchronize(); drain = time.perf_counter() - t0
        st = a2a.stats()
    print("RESULT " + json.dumps({"channel": name, "W": 1, "B": bound, "bytes": rows * dim * 4,
          "exchange_us": round(t_ex / iters * 1e6, 1), "wait_us": round(t_wait / iters * 1e6, 1),
          "drain_ms": round(drain * 1e3, 2), "max_lag": st["max_lag"]}))
dist.destroy_process_group()
out = subprocess.run([sys.executable, "perf/bench_host_cost.py", "--worlds", "1,8", "--bounds", "4",
                      "--iters", "500", "--repeats", "3", "--no-plot", "--out",
                      os.environ["GPU_CHECK_WORK"] + "/hc_out"], capture_output=True, text=True,
                     timeout=50)
print(out.stdout[-3000:], out.stderr[-2000:])
print("RESULT " + json.dumps({"bench_host_cost_rc": out.returncode}))
EOF

# ----------------------------------------------------------------------------------- local_mode
pytest_stage local_mode 80 60 "local_mode"
if [ "${LAST_RC:-0}" != 0 ] && [ "$HAVE_GPU" = 1 ]; then
  log "local_mode failed (rc=$LAST_RC): once more with CUDA_DEVICE_MAX_CONNECTIONS=32"
  pytest_stage local_mode_32 80 60 "local_mode" CUDA_DEVICE_MAX_CONNECTIONS=32
fi

# --------------------------------------------------------------------------------------- extras
if [ -n "${GPU_CHECK_EXTRAS:-}" ]; then
  stage extras_lookup 90 1 "$PY" -m pytest tests/test_lookup.py -m gpu -q -rs -p no:cacheprovider \
    --timeout 60
  stage extras_dlrm 90 1 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
    -m blsgpu run --device cuda --iterations 30 --warmup 3 --delay exp:5 --no-progress
  stage extras_bench 150 1 "$PY" perf/bench_gpu_exchange.py --quick --out "$WORK/bench"
fi

trap - INT TERM
finish
