#!/usr/bin/env bash
# Every CUDA check and GPU number in one prepared run, each step time-boxed, results written as it goes.
#
#   bash benchmarks/gpu_run.sh [--wheels DIR] [--budget SECONDS] [--dry-run] [OUT_DIR]
#
# --wheels DIR  install the wheels in DIR (no index, no deps, into /tmp/site) first: for a machine that
#               cannot reach PyPI but has torch (see README, "GPU run"); its torch is never touched.
# --budget S    wall-clock budget for the whole run (default 420 s); a step gets at most what is left.
# --skip A,B    leave out these steps (names as printed, e.g. bench-lora,bench-memory)
# --dry-run     every step on the CPU at tiny size, to rehearse the script's structure.
# OUT_DIR       where each step's log goes (default gpu-results/); a killed run keeps what it wrote.
# Uses .venv/bin/python when it exists, else python3. Never downloads.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
wheels="" budget=420 dry=0 out=gpu-results skip=""
while [ $# -gt 0 ]; do
    case $1 in
        --wheels) wheels=$2; shift 2 ;;
        --budget) budget=$2; shift 2 ;;
        --dry-run) dry=1; shift ;;
        --skip) skip=",$2,"; shift 2 ;;
        *) out=$1; shift ;;
    esac
done
mkdir -p "$out"
start=$(date +%s)
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$wheels"/*.whl >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# PyAV (av) is a 36 MB wheel that may not fit what travels to the machine: WAV/FLAC go through libsndfile, so
# a stub lets everything else import; a format that needs ffmpeg then fails with an error naming av.
if ! python3 -c "import av" 2>/dev/null && ! { [ -x .venv/bin/python ] && .venv/bin/python -c "import av" 2>/dev/null; }; then
    mkdir -p /tmp/avstub/av
    echo 'raise_msg = "PyAV (av) is not installed on this machine (gpu_run.sh stub)"' >/tmp/avstub/av/__init__.py
    touch /tmp/avstub/av/container.py
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/avstub"
    echo "note: av not installed, stubbed (formats beyond libsndfile's are not exercised)" | tee -a "$out/summary.txt"
fi
export PYTHONUNBUFFERED=1
# The reference fixtures live in ../shared; a carried copy in .shared/ stands in where that is absent.
[ ! -e ../shared ] && [ -d .shared/fixtures ] && ln -s "$PWD/.shared" ../shared

step() {  # step NAME MAX_SECONDS CMD...: run time-boxed, keep the output; one failure does not stop the rest
    local name=$1 max=$2
    shift 2
    case $skip in *",$name,"*) echo "== $name: skipped (--skip)" | tee -a "$out/summary.txt"; return ;; esac
    local left=$((budget - ($(date +%s) - start) - 20))
    [ "$left" -lt "$max" ] && max=$left
    if [ "$max" -lt 10 ]; then echo "== $name: skipped (budget spent)" | tee -a "$out/summary.txt"; return; fi
    echo "== $name (<= ${max}s): $*"
    local t0
    t0=$(date +%s)
    timeout -k 5 "$max" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $(($(date +%s) - t0))s" | tee -a "$out/summary.txt"
    tail -n 30 "$out/$name.log"
}

if [ $dry -eq 1 ]; then
    dev=cpu assets=demo-assets
    step assets 300 $py -c "from rvc_lora.demo import ensure_demo_assets; ensure_demo_assets('$assets')"
    step bench-lora 120 $py benchmarks/bench_lora.py --device cpu --swaps 20 --reloads 2 --infer-repeats 1
    step bench-batch 120 $py benchmarks/bench_batch.py --device cpu --models tiny --batches 1,2 --chunks 0.25 --repeats 1
    step gpu-checks 300 $py benchmarks/gpu_checks.py --assets $assets --device cpu --only precision,compile --swaps 6 --seconds 1
    step bench-pipeline 300 $py benchmarks/bench_pipeline.py --assets $assets --device cpu --seconds 2 \
        --f0-methods pm --repeats 1
    step bench-stream 180 $py benchmarks/bench_stream.py --assets $assets --device cpu --models tiny --budget 30 \
        --rounds 4 --max-streams 4 --modes serial,batched
    echo "dry run done in $(($(date +%s) - start))s"
    exit 0
fi

dev=cuda assets=demo-assets
$py -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
    | tee "$out/device.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$out/device.txt" 2>&1
step assets 120 $py -c "from rvc_lora.demo import ensure_demo_assets; ensure_demo_assets('$assets')"
step tests-gpu 90 $py -m pytest -m gpu -p no:cacheprovider -q
step bench-lora 45 $py benchmarks/bench_lora.py --device $dev --swaps 300 --reloads 10 --infer-repeats 5
step bench-batch 90 $py benchmarks/bench_batch.py --device $dev --models full,tiny --full-batches 1,2,4,8,16 --repeats 3
step gpu-checks 120 $py benchmarks/gpu_checks.py --assets $assets --device $dev
step bench-pipeline 60 $py benchmarks/bench_pipeline.py --assets $assets --device $dev --f0-methods pm,harvest \
    --repeats 3
step bench-stream 240 $py benchmarks/bench_stream.py --assets $assets --device $dev --models full,tiny --budget 40 \
    --rounds 8 --max-streams 256 --modes serial,batched

# The service against a reload-per-voice-change server, real HTTP on loopback, server on the GPU.
port=8765
RVC_LORA_DEVICE=$dev $py -m rvc_lora.cli serve --demo --port $port >"$out/server.log" 2>&1 &
server=$!
for _ in $(seq 1 60); do
    $py -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$port/readyz').status_code != 200)" 2>/dev/null && break
    sleep 1
done
step load 120 $py benchmarks/load.py --url "http://127.0.0.1:$port" --clients 8 --adapters 8 --requests 200 \
    --seconds 20 --audio-s 1 --baseline-model $assets/demo-base-v2-40k.pth \
    --hubert $assets/demo-hubert_base.pt --fill --device $dev
kill -TERM $server
wait $server
echo "== server exit $? (uvicorn re-raises SIGTERM after a clean shutdown: 143 expected)" | tee -a "$out/summary.txt"
step bench-memory 45 $py benchmarks/bench_memory.py --assets $assets --device $dev --seconds 10,65,120
echo "total $(($(date +%s) - start))s" | tee -a "$out/summary.txt"
