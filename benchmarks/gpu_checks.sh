#!/usr/bin/env bash
# Everything a lent CUDA machine is for, in one go: the test suite run natively on the GPU (Triton kernels
# compiled, CUDA-graph capture), the kernel benchmark, the end-to-end generation benchmark, `gpt2 bench
# --device cuda`, and the generation benchmark at batch 1 beside transformers + torch.compile. Each stage has
# its own time limit and log; a failing stage does not stop the next. With ARCHIVE set, OUT_DIR is packed into
# that .tgz after every stage, so a run cut short still returns what it finished. The limits add up to 545 s,
# inside one 600 s device call; STAGES picks some of them (names as below) for a shorter call. Run from the
# repository root:
#     [ARCHIVE=path.tgz] [STAGES="tests generation"] bash benchmarks/gpu_checks.sh OUT_DIR
set -uo pipefail
out=${1:?usage: [ARCHIVE=path.tgz] [STAGES="..."] bash benchmarks/gpu_checks.sh OUT_DIR}
# A lent machine can come back with an earlier lease's files: results must not mix with another run's.
if [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
    echo "gpu_checks.sh: $out is not empty (an earlier run's results?); give a new or empty directory" >&2
    exit 2
fi
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"

stage() {  # stage NAME LIMIT_S COMMAND...: run it, log to OUT/NAME.log, report its status and time
    local name=$1 limit=$2 start=$SECONDS pid watchdog rc
    shift 2
    case " ${STAGES:-tests kernels generation gpt2-bench compiled} " in *" $name "*) ;; *) return 0 ;; esac
    # Its own process group, ended whole at the limit: pytest's xdist workers outlived a plain `timeout` once
    # and slowed the stages after it.
    setsid "$@" >"$out/$name.log" 2>&1 &
    pid=$!
    (sleep "$limit"; kill -TERM -- "-$pid"; sleep 5; kill -KILL -- "-$pid") 2>/dev/null &
    watchdog=$!
    wait "$pid"
    rc=$?
    pkill -P "$watchdog" sleep 2>/dev/null
    kill "$watchdog" 2>/dev/null
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/gpu.txt"
    if [ -n "${ARCHIVE:-}" ]; then tar czf "$ARCHIVE" -C "$out" .; fi
}

# -v: each test's outcome is logged as it finishes, so a stage cut at its limit still names its failures.
stage tests 190 env OMP_NUM_THREADS=2 python3 -m pytest -v -n 8 -p no:cacheprovider --timeout 160 -rfs
if [ -f "$out/tests.log" ]; then grep -E "FAILED|ERROR" "$out/tests.log" | head -n 20; tail -n 3 "$out/tests.log"; fi
stage kernels 80 sh -c 'python3 -m benchmarks.bench_kernels --save && cp benchmarks/results/kernels-* "$0"' "$out"
stage generation 120 python3 -m benchmarks.bench_generation_cuda --out "$out"
stage gpt2-bench 45 python3 -m gpt2.cli bench --device cuda --sizes small --no-progress
stage compiled 110 python3 -m benchmarks.bench_generation_cuda --sizes small medium --batch 1 --compile \
    --out "$out/compiled"
# Not among the default stages (their limits fill one call): STAGES=fused runs the fused decode step's tests natively
# (its kernels compiled, the step captured in a CUDA graph), its kernels against the unfused step's ops
# (kernels-fused-*), and the unfused and fused steps against the weight-streaming bound (generation-cuda-fused-*:
# small, medium and large, fp16, batch 1 and 8). A failing test stage does not stop the benchmarks.
stage fused 300 sh -c 'python3 -m pytest -v -p no:cacheprovider -rfs tests/test_kernels_fused_decode.py \
        tests/test_fused_decode.py tests/test_decode_graph.py
    python3 -m benchmarks.bench_kernels --fused --dtype fp16 --save && cp benchmarks/results/kernels-fused-* "$0"
    python3 -m benchmarks.bench_generation_cuda --fused --sizes small medium large --batch 1 8 --repeats 3 \
        --out "$0"' "$out"
# STAGES=serve runs gpt2 serve on the GPU, its tests (the CUDA-graph slots against generate) and its benchmark at
# 1-64 clients.
stage serve 300 sh -c 'python3 -m pytest -q -p no:cacheprovider tests/test_serve_http.py -k cuda -rfs &&
    python3 -m benchmarks.bench_serve --device cuda --sizes small --window 8 --out "$0"' "$out"
cat "$out/gpu.txt"
