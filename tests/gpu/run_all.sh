#!/usr/bin/env bash
# The CUDA kernels on a GPU machine, in one go: build, test against the reference, compute-sanitizer,
# kernel benchmarks and decode end to end. Logs and JSON go to $OUT (default ./out); the last lines
# printed are a summary.
#
#   bash tests/gpu/run_all.sh            # everything
#   STEPS="build test bench" bash tests/gpu/run_all.sh
#
# Needs: python3 with torch (CUDA), transformers, cffi; nvcc; compute-sanitizer for the sanitize step.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export CIUIC_CUDA_CACHE=${CIUIC_CUDA_CACHE:-/tmp/ciuic-cuda-cache}
export PYTHONPATH=${PYTHONPATH:-}:$PWD
STEPS=${STEPS:-"build test bench sanitize decode apply racecheck"}
T=${STEP_TIMEOUT:-420}  # seconds per step
PY=${PY:-python3}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 ))s; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  nvcc --version | tail -2
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
} > "$OUT/build.log" 2>&1
note "device: $(sed -n 2p "$OUT/build.log")"
ERR="$OUT/stderr.log"
: > "$ERR"

if has build; then
  if ( time $PY -c "from ciuic_lab.kernels.cuda import build, LIBRARY; p = build(); LIBRARY.get(); print(p)" ) \
      >> "$OUT/build.log" 2>&1; then
    note "build: ok ($(grep real "$OUT/build.log" | awk '{print $2}')) $(elapsed)"
  else
    note "build: FAILED (see build.log)"; tail -30 "$OUT/build.log"; exit 1
  fi
fi

if has test; then
  timeout $T $PY -m pytest -q -p no:cacheprovider tests/gpu --maxfail=25 -rfE > "$OUT/tests.log" 2>&1
  note "tests: $(tail -1 "$OUT/tests.log") $(grep -o 'CIUIC_SEED=[0-9]*' "$OUT/tests.log" | head -1) $(elapsed)"
fi

if has bench; then
  if [ -n "${BENCH_SWEEP:-}" ]; then
    timeout $T $PY -c "import json; from ciuic_lab.measure.bench_cuda import bench_kernels_cuda as b; print(json.dumps(b(sweep=True), indent=1))" \
      > "$OUT/bench_kernels.json" 2>> "$ERR"
  else
    timeout $T $PY -m ciuic_lab.cli bench kernels --device cuda --json > "$OUT/bench_kernels.json" 2>> "$ERR"
  fi
  note "bench kernels: rc=$? $(elapsed)"
  $PY - "$OUT/bench_kernels.json" <<'EOF' | tee -a "$SUMMARY"
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print("no bench json:", e); sys.exit(0)
print(f"copy bandwidth {d['copy_bandwidth_GBps']:.0f} GB/s on {d['device']}")
print(f"{'shape':>12} {'M':>3} {'kernel':>14} {'us':>8} {'GB/s':>7} {'%copy':>6} {'xcuBLAS':>7} {'xtiny':>6} {'err':>8}"
      f" | chained {'us':>6} {'%copy':>6} {'xcuBLAS':>7} {'xtiny':>6}")
for r in d["rows"]:
    e = r.get("rel_err")
    print(f"{r['shape']:>12} {r['batch']:>3} {r['kernel']:>14} {r['us']:8.1f} {r['GBps']:7.0f} {r['pct_copy_bw']:6.1f} "
          f"{r.get('speedup_vs_cublas', 0) or 0:7.2f} {r.get('speedup_vs_tinygemm', 0) or 0:6.2f} "
          f"{'' if e is None else format(e, '.1e'):>8} | {r.get('chained_us', 0):14.1f} {r.get('chained_pct_copy_bw', 0):6.1f} "
          f"{r.get('chained_speedup_vs_cublas', 0) or 0:7.2f} {r.get('chained_speedup_vs_tinygemm', 0) or 0:6.2f}")
for r in d.get("moe_rows", []):
    print(f"moe {r['experts']:>12} {r['step']:>7} {r['kernel']:>12} {r['us']:8.1f} us {r['GBps']:7.0f} GB/s "
          f"{r['pct_copy_bw']:5.1f}% x{r.get('speedup_vs_cublas') or 0:5.2f} | chained {r.get('chained_us', 0):7.1f} us "
          f"{r.get('chained_pct_copy_bw', 0):5.1f}% x{r.get('chained_speedup_vs_cublas') or 0:5.2f} {r.get('config', '')}")
for key, f in d.get("launch_fit", {}).get("fits", {}).items():
    print(f"fit {key:>24}: fixed {f['fixed_us']:5.2f} us, streaming {f['stream_GBps']:5.0f} GB/s = "
          f"{f['stream_pct_copy_bw']:5.1f}% of copy  {f['points_us']}")
if "empty_launch_us" in d:
    print("empty launch (every row's floor):", json.dumps(d["empty_launch_us"]))
print("figures:", json.dumps(d.get("figures", {})))
for s in d.get("splits_sweep", []):
    print("sweep", s["shape"], s["batch"], "auto", round(s["auto_us"], 1), {k: round(v, 1) for k, v in s["by_splits_us"].items()})
if d.get("tinygemm_error"):
    print("tinygemm:", d["tinygemm_error"])
EOF
fi

if has sanitize; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout $T compute-sanitizer --tool memcheck --leak-check no \
    --error-exitcode 9 $PY tests/gpu/sanitize_cases.py > "$OUT/sanitizer.log" 2>&1
  rc=$?
  note "memcheck: rc=$rc, $(grep -c '^=========     \|Invalid\|out of bounds' "$OUT/sanitizer.log") error lines; $(grep 'sanitize cases' "$OUT/sanitizer.log") $(grep 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1) $(elapsed)"
fi

if has decode; then
  # DECODE_RECIPE: a recipe name or JSON (default: the benchmark's, int4-g128 with every fusion)
  DECODE_RECIPE=${DECODE_RECIPE:-} timeout $T $PY -c "import json, os; from ciuic_lab.measure.bench_cuda import bench_decode_cuda as b; print(json.dumps(b(recipe=os.environ['DECODE_RECIPE'] or None, profile=bool('${DECODE_PROFILE:-}')), indent=1))" \
    > "$OUT/bench_decode.json" 2>> "$ERR"
  note "bench decode: rc=$? $(elapsed)"
  $PY -c "
import json,sys
d=json.load(open('$OUT/bench_decode.json'))
for r in d['rows']: print(f\"  {r['plan'][:60]:>10}: {r['tokens_per_s']:8.1f} tok/s  {r['ms_per_token']:7.3f} ms/token  ({r['mode']})\")
print('  speedup', round(d['speedup'], 2), 'params', d['params'], 'backends', d['backends'])
for r in d['rows']:
    for k in r.get('top_kernels', []): print('   ', r['plan'], k)
" 2>&1 | tee -a "$SUMMARY"
fi

if has apply; then
  timeout $T $PY -m ciuic_lab.cli apply --device cuda --dtype bf16 --recipe int4-g128 --evalset tiny --json \
    > "$OUT/apply.json" 2>> "$ERR"
  note "apply --device cuda: rc=$? $(grep -o '"cuda"' "$OUT/apply.json" | wc -l) mentions of the cuda backend $(elapsed)"
fi

if has racecheck; then
  timeout $T compute-sanitizer --tool racecheck --error-exitcode 9 $PY tests/gpu/sanitize_cases.py --quick \
    > "$OUT/racecheck.tmp" 2>&1
  rc=$?
  { echo "===== racecheck"; cat "$OUT/racecheck.tmp"; } >> "$OUT/sanitizer.log"
  note "racecheck: rc=$rc $(grep 'RACECHECK SUMMARY\|ERROR SUMMARY' "$OUT/racecheck.tmp" | tail -1) $(elapsed)"
  rm -f "$OUT/racecheck.tmp"
fi

note "total $(elapsed)"
