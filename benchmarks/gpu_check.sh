#!/usr/bin/env bash
# The prepared GPU check: one call of at most 10 minutes on a bare CUDA machine with torch installed and no
# internet. What matters most runs first: the extension built for the card in hand; `mamlfast check --device cuda`
# (every fused backend against torch per op and dtype, then its speed); the headline figures
# (omniglot-20w1s, meta-batch 8, second order: loop, func, torch, cuda and triton, eager and with CUDA graphs)
# and the check that captured steps equal eager ones bit for bit; the GPU tests; the hot ops' timings, both
# batch-norm kernel variants side by side (the default stays until these decide); then the other GPU tests,
# a profile, the other presets, and compute-sanitizer's memcheck on the op tests with the time left.
#
# Each step has its own time limit, all within a budget of GPU_CHECK_BUDGET seconds (540: the check ends inside
# 9 minutes). A step out of time gets SIGINT, so that pytest still lists the failures so far (-rfE, and
# OUTDIR/STEP.xml in junit form) and the benchmarks write what they measured. Each step's log (OUTDIR/STEP.txt)
# and JSON land as soon as the step ends, and OUTDIR/gpu.json gathers everything when the check exits, however
# it exits (done, failed, out of time, SIGTERM or Ctrl-C). The exit status is 0 only if every step passed.
#
#   benchmarks/gpu_check.sh OUTDIR
#   GPU_CHECK_DRY_RUN=1 benchmarks/gpu_check.sh OUTDIR    # no GPU needed: the same control flow and files,
#                                                         # with quick stand-ins for the GPU steps
#
# PYTHON names the interpreter that holds torch (python3); MAX_JOBS the build's parallel jobs (all cores). The
# extension is built in place (setup.py build_ext --inplace), without pip, which a system Python may refuse
# (PEP 668), and used through PYTHONPATH. The CUDA toolkit is the first whose major version is torch's CUDA's,
# among the nvcc on PATH (also behind a wrapper script), CUDA_HOME, /usr/local/cuda and /usr/local/cuda-*.
# In a dry run, GPU_CHECK_FAIL=STEP,STEP... makes those steps fail, to exercise the paths after a failure.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
dry=${GPU_CHECK_DRY_RUN:-0}
end=$((SECONDS + ${GPU_CHECK_BUDGET:-540}))
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0 current= child=
: >"$out/steps.tsv"  # step, exit status (or skipped, interrupted), seconds, limit

finish() {
  local rc=$?
  "$py" benchmarks/gpu_summary.py "$out" || rc=1
  exit $rc
}
stop() {  # SIGTERM or Ctrl-C: the step in flight stops like a timed-out one and writes what it has
  trap - TERM INT
  if [ -n "$child" ]; then
    kill -INT "$child" 2>/dev/null
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
  # SIGINT first: Python's KeyboardInterrupt, which pytest and the benchmarks end on cleanly
  timeout -s INT -k 15 "$limit" "$@" >"$out/$name.txt" 2>&1 &
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

# pytest_step NAME LIMIT ARGUMENTS...: pytest, its failures listed as they are known, in the log and OUTDIR/NAME.xml
pytest_step() {
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" "$py" -m pytest -q -rfE -p no:cacheprovider --junitxml="$out/$name.xml" \
    "${pytest_mode[@]}" "$@"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "python: $(command -v "$py")"
  echo "cores: $(nproc)"
  commit=$(git rev-parse --short HEAD 2>/dev/null) && { git diff --quiet HEAD || commit+=" (modified)"; }
  echo "commit: ${commit:-unknown}"
  command -v nvidia-smi >/dev/null &&
    echo "driver: $(timeout 20 nvidia-smi --query-gpu=driver_version --format=csv,noheader)"
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
arch=$(sed -n 's/^capability: //p' "$out/env.txt")
torch_cuda=$(sed -n 's/^torch: .* cuda \([0-9.]*\)$/\1/p' "$out/env.txt")

# The toolkit to build with: a major version other than torch's CUDA's fails the build. nvcc reports its own
# folder (TOP) in a dry run, also where the nvcc on PATH is a wrapper script or a link.
candidates=()
if command -v nvcc >/dev/null; then
  candidates+=("$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)")
fi
candidates+=("${CUDA_HOME:-}" /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null | sort -rV))
cuda_home=
for candidate in "${candidates[@]}"; do
  [ -n "$candidate" ] && [ -x "$candidate/bin/nvcc" ] || continue
  release=$("$candidate/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
  if [ -z "$torch_cuda" ] || [ "${release%%.*}" = "${torch_cuda%%.*}" ]; then
    cuda_home=$(cd "$candidate" && pwd -P)
    break
  fi
  echo "not the CUDA toolkit at $candidate: release $release, torch's is $torch_cuda" >>"$out/env.txt"
done
sanitizer=${cuda_home:+$cuda_home/bin/compute-sanitizer}
[ -x "$sanitizer" ] || sanitizer=$(command -v compute-sanitizer || true)
{
  echo "cuda_home: ${cuda_home:-none}"
  [ -n "$cuda_home" ] && echo "nvcc: $("$cuda_home/bin/nvcc" --version | grep -o "release.*")"
  echo "compute_sanitizer: ${sanitizer:-none}"
} >>"$out/env.txt"
cat "$out/env.txt" >&2

if [ "$dry" = 1 ]; then
  export OMP_NUM_THREADS=1
  build=(echo "dry run: setup.py build_ext --inplace, CUDA_HOME=${cuda_home:-none} TORCH_CUDA_ARCH_LIST=${arch:-none}")
  check=("$py" -m mamlfast check --device cpu --backends torch --tasks 1 --repeats 1 --no-memory)
  headline=func,torch,auto,torch+recompute
  configurations=$headline
  small=(--tasks 2 --override image_size=16 --override num_filters=4 --repeats 2 --warmup 1 --no-memory)
  kernels=(--presets omniglot-5w1s --backends torch --repeats 1 --warmup 1)
  pytest_mode=(--collect-only)
  profiled=auto
else
  build=(env CUDA_HOME="$cuda_home" TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
         "$py" setup.py build_ext --inplace)
  check=("$py" -m mamlfast check --device cuda --repeats 5)
  headline=torch,cuda,triton,torch+graphs,cuda+graphs,triton+graphs
  configurations=func,torch,triton,cuda,auto,auto+graphs,auto+graphs+recompute
  small=(--repeats 10 --warmup 3)
  kernels=(--presets omniglot-20w1s,mini-imagenet-5w1s --backends torch,triton,cuda --repeats 30)
  pytest_mode=()
  profiled=auto,auto+graphs
fi
if [ "$dry" != 1 ] && { [ -z "$cuda_home" ] || [ -z "$arch" ]; }; then
  build=(sh -c "echo 'no CUDA toolkit of torch CUDA $torch_cuda, or no CUDA device: no extension built'; exit 1")
fi
# Without the build, the package runs from the source folder without its compiled kernels (torch and triton).
if step build 240 "${build[@]}"; then
  export MAMLFAST_EXPECT_CUDA_EXTENSION=1
else
  export MAMLFAST_EXPECT_CUDA_EXTENSION=0
fi

meta_step() {  # meta_step PRESET LIMIT CONFIGURATIONS: at the preset's meta-batch (omniglot-20w1s: 8), second order
  step "meta_step-$1" "$2" "$py" benchmarks/meta_step.py --preset "$1" --backends "$3" "${small[@]}" \
    --json "$out/meta_step-$1.json"
}
gpu_tests=(tests/test_extension.py tests/test_fused_backends.py tests/test_step.py tests/test_noncontiguous.py)
more_gpu_tests=(tests/test_kernel_reductions.py tests/test_op_arguments.py tests/test_recompute.py
  tests/test_max_pool.py tests/test_conv.py tests/test_triton_compiled.py
  tests/test_data.py::test_images_held_on_the_host_give_the_batches_of_images_held_on_the_gpu)

step check 150 "${check[@]}" --no-progress --json "$out/check.json"
step info 60 "$py" -m mamlfast info
meta_step omniglot-20w1s 150 "$headline"
pytest_step graphs-bitwise 60 tests/test_step.py -k captured_steps_equal_eager_steps
pytest_step tests 150 "${gpu_tests[@]}" --deselect tests/test_step.py::test_captured_steps_equal_eager_steps
step kernels 100 "$py" benchmarks/kernels.py "${kernels[@]}" --json "$out/kernels.json"
pytest_step more-tests 120 "${more_gpu_tests[@]}"
step profile-omniglot-20w1s 45 "$py" benchmarks/meta_step.py --preset omniglot-20w1s --backends "$profiled" --profile \
  "${small[@]}" --json "$out/profile-omniglot-20w1s.json"
meta_step omniglot-5w1s 60 "$configurations"
meta_step mini-imagenet-5w1s 90 "$configurations"
# The caching allocator would hide out-of-bounds accesses inside its blocks from memcheck.
op_tests=(tests/test_extension.py tests/test_fused_backends.py tests/test_kernel_reductions.py
  tests/test_op_arguments.py -k "cuda and not learner")
if [ "$dry" = 1 ]; then
  pytest_step sanitizer 240 "${op_tests[@]}"
elif [ -n "$sanitizer" ]; then
  step sanitizer 240 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 1 \
    "$py" -m pytest -q -rfE -p no:cacheprovider --junitxml="$out/sanitizer.xml" "${op_tests[@]}"
else
  step sanitizer 10 sh -c "echo 'compute-sanitizer not found (no CUDA toolkit)'; exit 1"
fi
exit $status
