#!/usr/bin/env bash
# Build variants of the CUDA kernels side by side and probe each (tests/gpu/probe_int4.py): for
# tuning the int4 kernels on a GPU machine. Variants are "name=flags" words in $VARIANTS (commas in
# the flags stand for spaces); each variant's SASS of the GEMV goes to $OUT/sass-<name>.txt.
#   VARIANTS="base= d2=-DCIUIC_GEMV_DEPTH=2" bash tests/gpu/probe.sh
# PROBE_SCRIPT runs another probe per variant (default tests/gpu/probe_int4.py).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$PWD CIUIC_CUDA_ARCHS=${CIUIC_CUDA_ARCHS:-90}
VARIANTS=${VARIANTS:-"base="}
PY=${PY:-python3}
for v in $VARIANTS; do  # builds in parallel
  name=${v%%=*}; flags=${v#*=}; flags=${flags//,/ }
  CIUIC_CUDA_CACHE=/tmp/probe-$name CIUIC_NVCC_FLAGS="$flags" $PY -c "from ciuic_lab.kernels.cuda import build; build()" \
    > "$OUT/probe-build-$name.log" 2>&1 &
done
wait
for v in $VARIANTS; do
  name=${v%%=*}; flags=${v#*=}; flags=${flags//,/ }
  CIUIC_CUDA_CACHE=/tmp/probe-$name CIUIC_NVCC_FLAGS="$flags" timeout 300 $PY ${PROBE_SCRIPT:-tests/gpu/probe_int4.py} "$name" \
    > "$OUT/probe-$name.log" 2>&1 || { echo "$name: failed"; tail -5 "$OUT/probe-$name.log"; }
  lib=$(ls /tmp/probe-$name/libciuic_kernels-*.so 2>/dev/null | head -1)
  if [ -n "$lib" ] && command -v cuobjdump > /dev/null; then
    cuobjdump -sass "$lib" | awk '/Function : .*gemv_kernelILi0ELb1ELi2E/{on=1} /Function : / && !/gemv_kernelILi0ELb1ELi2E/{on=0} on' \
      > "$OUT/sass-$name.txt" 2>&1
  fi
done
$PY - "$OUT" <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/probe-*.log")):
    for line in open(f):
        if line.startswith("PROBE "):
            d = json.loads(line[6:])
            print(f"{d['variant']:>8} copy {d['copy_GBps']:.0f} GB/s err {d.get('worst_rel_err', '-')} "
                  f"fail {len(d.get('failures', []))} {d.get('failures', [])[:3]}")
            for r in d["rows"]:
                print(f"   {r['shape']:>12} b{r['batch']:<3} cuBLAS {r['cublas_us']:6.1f} tiny {r['tinygemm_us']:6.1f}")
                for k, v in r.items():
                    if k.startswith("s") and isinstance(v, dict):
                        print(f"      staging {k[1:]}: {v['best_us']:6.1f} us {v['pct_copy']:5.1f}% x{v['x_cublas']:.2f} cuBLAS "
                              f"x{v['x_tinygemm']:.2f} tiny (s={v['best_splits']}) {v['by_splits']}")
PY
