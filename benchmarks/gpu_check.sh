#!/usr/bin/env bash
# The prepared GPU check, for a bare CUDA machine with torch already installed (no internet):
# build and install mamlfast, run the GPU tests, benchmark meta-iterations of every backend
# (and auto with and without CUDA graphs) and the kernels, run compute-sanitizer on the CUDA
# extension's tests while time is left, and print a short table last. Everything lands in
# OUTDIR; OUTDIR/gpu.json gathers the figures. Budget: 8 minutes.
#
#   benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
deadline=$((SECONDS + 470))
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16} MAMLFAST_EXPECT_CUDA_EXTENSION=1
status=0
step() {  # step NAME COMMAND...: run, log to OUTDIR/NAME.txt, remember failures
  local name=$1; shift
  echo "== $name" >&2
  local start=$SECONDS
  "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - start)) s" >&2
  [ $rc -eq 0 ] || { status=1; tail -n 20 "$out/$name.txt" >&2; }
  return $rc
}

step install python -m pip install --no-build-isolation --no-deps -e . || { echo "build failed" >&2; exit 1; }
step info python -m mamlfast info
step tests python -m pytest -q -p no:cacheprovider tests/test_cuda_extension.py tests/test_fused_backends.py \
  tests/test_step.py
for preset in omniglot-20w1s omniglot-5w1s mini-imagenet-5w1s; do
  step "meta_step-$preset" python benchmarks/meta_step.py --preset "$preset" --repeats 10 --warmup 3 \
    --backends loop,torch,triton,cuda,auto,auto+graphs --json "$out/meta_step-$preset.json"
done
step kernels python benchmarks/kernels.py --repeats 30 --json "$out/kernels.json"
left=$((deadline - SECONDS))
if [ $left -gt 30 ]; then
  step sanitizer timeout $left compute-sanitizer --tool memcheck --error-exitcode 1 \
    python -m pytest -q -p no:cacheprovider tests/test_cuda_extension.py tests/test_fused_backends.py -k cuda
else
  echo "no time left for compute-sanitizer" | tee "$out/sanitizer.txt" >&2
fi
python benchmarks/gpu_summary.py "$out" || status=1
exit $status
