#!/usr/bin/env bash
# The prepared GPU check, for a bare CUDA machine with torch installed and no internet. Most valuable first:
# build mamlfast's extension for the card in hand (if that fails, install without it and go on), benchmark
# meta-iterations on omniglot-20w1s, run the GPU tests, profile one meta-iteration, benchmark the other
# presets and the hot ops, run the remaining GPU tests (fixed-order sums, argument checks, recompute), then
# compute-sanitizer's memcheck on the op tests with the time left.
#
# Each step has its own time limit, all within a budget of GPU_CHECK_BUDGET seconds (420: the check ends
# inside 8 minutes); each step's log (OUTDIR/STEP.txt) and JSON land as soon as the step ends, and
# OUTDIR/gpu.json gathers everything when the check exits, however it exits (done, failed, out of time,
# SIGTERM or Ctrl-C). The exit status is 0 only if every step passed.
#
#   benchmarks/gpu_check.sh OUTDIR
#   GPU_CHECK_DRY_RUN=1 benchmarks/gpu_check.sh OUTDIR    # no GPU needed: the same control flow and files,
#                                                         # with quick stand-ins for the GPU steps
#
# PYTHON names the interpreter that holds torch (python3); MAX_JOBS the build's parallel jobs (all cores).
# The CUDA toolkit is the one of the nvcc on PATH (also behind a wrapper script), else CUDA_HOME's.
# In a dry run, GPU_CHECK_FAIL=STEP,STEP... makes those steps fail, to exercise the paths after a failure.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
dry=${GPU_CHECK_DRY_RUN:-0}
end=$((SECONDS + ${GPU_CHECK_BUDGET:-420}))
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
status=0 current= child=
: >"$out/steps.tsv"  # step, exit status (or skipped, interrupted), seconds, limit

finish() {
  local rc=$?
  "$py" benchmarks/gpu_summary.py "$out" || rc=1
  exit $rc
}
stop() {  # SIGTERM or Ctrl-C: the step in flight stops like a timed-out one and writes what it measured
  trap - TERM INT
  if [ -n "$child" ]; then
    kill -TERM "$child" 2>/dev/null
    wait "$child"
    printf '%s\tinterrupted\t-\t-\n' "$current" >>"$out/steps.tsv"
  fi
  exit 143
}
trap finish EXIT
trap stop TERM INT

# step NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (fewer if the budget is nearly spent),
# its output in OUTDIR/NAME.txt, its exit status and time in OUTDIR/steps.tsv.
step() {
  local name=$1 limit=$2 rc start=$SECONDS
  shift 2
  ((limit > end - SECONDS)) && limit=$((end - SECONDS))
  if ((limit < 10)); then
    echo "== $name: skipped, the time budget is spent" | tee "$out/$name.txt" >&2
    printf '%s\tskipped\t0\t0\n' "$name" >>"$out/steps.tsv"
    status=1
    return 1
  fi
  if [ "$dry" = 1 ] && [[ ",${GPU_CHECK_FAIL:-}," == *",$name,"* ]]; then
    set -- sh -c 'echo "planted failure (GPU_CHECK_FAIL)"; exit 3'
  fi
  echo "== $name (at most $limit s)" >&2
  current=$name
  timeout -k 10 "$limit" "$@" >"$out/$name.txt" 2>&1 &
  child=$!
  wait "$child"
  rc=$?
  child=
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >>"$out/steps.tsv"
  echo "   exit $rc after $((SECONDS - start)) s" >&2
  if ((rc != 0)); then
    status=1
    tail -n 15 "$out/$name.txt" >&2
  fi
  return $rc
}

# The toolkit of the nvcc that is really there: nvcc reports its own location (TOP) in a dry run.
cuda_home=
if command -v nvcc >/dev/null; then
  top=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  [ -n "$top" ] && cuda_home=$(cd "$top" 2>/dev/null && pwd -P)
fi
for candidate in "$cuda_home" "${CUDA_HOME:-}" /usr/local/cuda; do  # without nvcc on PATH: the usual places
  [ -x "$candidate/bin/nvcc" ] && cuda_home=$(cd "$candidate" && pwd -P) && break
  cuda_home=
done
sanitizer=${cuda_home:+$cuda_home/bin/compute-sanitizer}
[ -x "$sanitizer" ] || sanitizer=$(command -v compute-sanitizer || true)

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "python: $(command -v "$py")"
  echo "cuda_home: ${cuda_home:-none}"
  echo "compute_sanitizer: ${sanitizer:-none}"
  echo "cores: $(nproc)"
  commit=$(git rev-parse --short HEAD 2>/dev/null) && { git diff --quiet HEAD || commit+=" (modified)"; }
  echo "commit: ${commit:-unknown}"
  [ -n "$cuda_home" ] && echo "nvcc: $("$cuda_home/bin/nvcc" --version | grep -o "release.*")"
  command -v nvidia-smi >/dev/null && echo "driver: $(timeout 20 nvidia-smi --query-gpu=driver_version --format=csv,noheader)"
  timeout 60 "$py" -c '
import sys, torch
print("python_version:", sys.version.split()[0])
print("torch:", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton:", triton.__version__)
except ImportError:
    print("triton: none")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("device:", props.name, f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
    print("capability: %d.%d" % torch.cuda.get_device_capability(0))
else:
    print("device: none")'
} >"$out/env.txt" 2>&1
cat "$out/env.txt" >&2
arch=$(sed -n 's/^capability: //p' "$out/env.txt")

if [ "$dry" = 1 ]; then
  export OMP_NUM_THREADS=1
  build=(echo "dry run: pip install -e . with CUDA_HOME=${cuda_home:-none} TORCH_CUDA_ARCH_LIST=${arch:-none}")
  build_without_extension=(echo "dry run: pip install -e . with MAMLFAST_NO_CUDA=1")
  configurations=func,torch,auto,torch+recompute
  small=(--tasks 2 --override image_size=16 --override num_filters=4 --repeats 2 --warmup 1 --no-memory)
  kernels=(--presets omniglot-5w1s --backends torch --repeats 1 --warmup 1)
  pytest_mode=(--collect-only)
  profiled=auto
else
  install=("$py" -m pip install --no-build-isolation --no-deps --no-index -e .)
  build=(env CUDA_HOME="$cuda_home" TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "${install[@]}")
  build_without_extension=(env MAMLFAST_NO_CUDA=1 "${install[@]}")
  configurations=func,torch,triton,cuda,auto,auto+graphs,auto+graphs+recompute
  small=(--repeats 10 --warmup 3)
  kernels=(--repeats 30)
  pytest_mode=()
  profiled=auto,auto+graphs
fi
if [ "$dry" != 1 ] && { [ -z "$cuda_home" ] || [ -z "$arch" ]; }; then
  build=(sh -c "echo 'no CUDA toolkit (nvcc) or no CUDA device: not building the extension'; exit 1")
fi
expect_extension=1
step install 240 "${build[@]}" || { step install-without-extension 90 "${build_without_extension[@]}"; expect_extension=0; }
export MAMLFAST_EXPECT_CUDA_EXTENSION=$expect_extension

meta_step() {  # meta_step PRESET LIMIT
  step "meta_step-$1" "$2" "$py" benchmarks/meta_step.py --preset "$1" --backends "$configurations" "${small[@]}" \
    --json "$out/meta_step-$1.json"
}
gpu_tests=(tests/test_extension.py tests/test_fused_backends.py tests/test_step.py)
more_gpu_tests=(tests/test_kernel_reductions.py tests/test_op_arguments.py tests/test_recompute.py
  tests/test_max_pool.py tests/test_conv.py tests/test_data.py::test_images_held_on_the_host_give_the_batches_of_images_held_on_the_gpu)

step info 30 "$py" -m mamlfast info
meta_step omniglot-20w1s 150
step tests 180 "$py" -m pytest -q -rfE -p no:cacheprovider "${pytest_mode[@]}" "${gpu_tests[@]}"
step profile-omniglot-20w1s 60 "$py" benchmarks/meta_step.py --preset omniglot-20w1s --backends "$profiled" --profile \
  "${small[@]}" --json "$out/profile-omniglot-20w1s.json"
meta_step omniglot-5w1s 90
meta_step mini-imagenet-5w1s 120
step kernels 120 "$py" benchmarks/kernels.py "${kernels[@]}" --json "$out/kernels.json"
step more-tests 120 "$py" -m pytest -q -rfE -p no:cacheprovider "${pytest_mode[@]}" "${more_gpu_tests[@]}"
# The caching allocator would hide out-of-bounds accesses inside its blocks from memcheck.
op_tests=("$py" -m pytest -q -rfE -p no:cacheprovider tests/test_extension.py tests/test_fused_backends.py
  tests/test_kernel_reductions.py tests/test_op_arguments.py
  -k "cuda and not learner")
if [ "$dry" = 1 ]; then
  step sanitizer 240 "${op_tests[@]}" --collect-only
elif [ -n "$sanitizer" ]; then
  step sanitizer 240 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 1 "${op_tests[@]}"
else
  step sanitizer 10 sh -c "echo 'compute-sanitizer not found (no CUDA toolkit)'; exit 1"
fi
exit $status
