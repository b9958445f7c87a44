#!/usr/bin/env bash
# Build variants of the CUDA kernels side by side and probe each (tests/gpu/probe_int4.py): for
# tuning the int4 kernel on a GPU machine. Variants are "name=flags" words in $VARIANTS.
#   VARIANTS="base=-DCIUIC_ZFOLD=0 zf=" bash tests/gpu/probe.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$PWD CIUIC_CUDA_ARCHS=${CIUIC_CUDA_ARCHS:-90}
VARIANTS=${VARIANTS:-"base=-DCIUIC_ZFOLD=0 zf="}
PY=${PY:-python3}
for v in $VARIANTS; do  # builds in parallel
  name=${v%%=*}; flags=${v#*=}; flags=${flags//,/ }
  CIUIC_CUDA_CACHE=/tmp/probe-$name CIUIC_NVCC_FLAGS="$flags" $PY -c "from ciuic_lab.kernels.cuda import build; build()" \
    > "$OUT/probe-build-$name.log" 2>&1 &
done
wait
for v in $VARIANTS; do
  name=${v%%=*}; flags=${v#*=}; flags=${flags//,/ }
  CIUIC_CUDA_CACHE=/tmp/probe-$name CIUIC_NVCC_FLAGS="$flags" timeout 300 $PY tests/gpu/probe_int4.py "$name" \
    > "$OUT/probe-$name.log" 2>&1 || { echo "$name: failed"; tail -5 "$OUT/probe-$name.log"; }
done
$PY - "$OUT" <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/probe-*.log")):
    for line in open(f):
        if line.startswith("PROBE "):
            d = json.loads(line[6:])
            print(f"{d['variant']:>8} copy {d['copy_GBps']:.0f} GB/s err {d.get('worst_rel_err', '-')} fail {len(d.get('failures', []))}")
            for r in d["rows"]:
                print(f"   {r['shape']:>12} b{r['batch']:<3} {r['best_us']:7.1f} us {r['pct_copy']:5.1f}% (s={r['best_splits']}) {r['by_splits']}")
PY
