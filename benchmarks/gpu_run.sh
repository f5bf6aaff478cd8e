#!/usr/bin/env bash
# Every CUDA check and GPU number in one prepared run, each step time-boxed, results written as it goes.
#
#   bash benchmarks/gpu_run.sh [--wheels DIR] [--budget SECONDS] [--skip A,B] [--only A,B] [--dry-run] [OUT_DIR]
#
# --wheels DIR  install the wheels in DIR first (benchmarks/gpu_wheels.sh makes it), with no index and no
#               dependencies, into /tmp/site, for a machine that reaches no package index; its torch is never
#               touched (no torch wheel is there and nothing is resolved). DIR/crepe-tiny joins the path too.
# --budget S    wall-clock budget for the whole run (default 510 s; dry run 2000 s); a step gets at most its
#               cap (below; x5 in a dry run: a shared 2-core CPU) and never more than what is left.
# --skip A,B    leave out these steps (names as printed, e.g. bench-lora,bench-memory); --only: run just these.
# --dry-run     every step on the CPU at tiny size, to rehearse the script (same steps, same scripts).
# OUT_DIR       where the results go (default gpu-results/), three files written as the run goes, so a killed run
#               keeps what it measured (and few enough for the device tool's 8 returned files): device.txt,
#               summary.txt (one line per step: exit code or time-out, seconds), steps.log (every step's output
#               in full, each after a "=== STEP" line).
# Uses $PYTHON, else .venv/bin/python when it exists, else python3. Never downloads.
#
# Steps in order, with their caps in seconds on the GPU (500 s together; the most wanted numbers first, so that
# a cut drops the least): install 20, assets 30, tests-gpu 25, precision 40, compile 50, bench-batch 45,
# bench-stream 60, load 80, service-oom 50, oom 25, f0 25, bench-lora 25, bench-memory 25.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
wheels="" budget="" dry=0 out=gpu-results skip="" only=""
while [ $# -gt 0 ]; do
    case $1 in
        --wheels) wheels=$2; shift 2 ;;
        --budget) budget=$2; shift 2 ;;
        --dry-run) dry=1; shift ;;
        --skip) skip=",$2,"; shift 2 ;;
        --only) only=",$2,"; shift 2 ;;
        *) out=$1; shift ;;
    esac
done
mkdir -p "$out"
start=$(date +%s) scale=1
[ $dry -eq 1 ] && scale=5
[ -z "$budget" ] && budget=$((dry ? 2000 : 510))
py=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && py=.venv/bin/python
export PYTHONUNBUFFERED=1

step() {  # step NAME MAX_SECONDS CMD...: run time-boxed, keep the output; one failure does not stop the rest
    local name=$1 max=$(($2 * scale))
    shift 2
    case $skip in *",$name,"*) echo "== $name: skipped (--skip)" | tee -a "$out/summary.txt"; return ;; esac
    if [ -n "$only" ]; then case $only in *",$name,"*) ;; *) return ;; esac; fi
    local left=$((budget - ($(date +%s) - start) - 10))
    [ "$left" -lt "$max" ] && max=$left
    if [ "$max" -lt 10 ]; then echo "== $name: skipped (budget spent)" | tee -a "$out/summary.txt"; return; fi
    echo "== $name (<= ${max}s): $*"
    echo "=== $name (<= ${max}s): $*" >>"$out/steps.log"
    local t0 from
    t0=$(date +%s)
    from=$(($(stat -c %s "$out/steps.log") + 1))
    timeout -k 5 "$max" "$@" >>"$out/steps.log" 2>&1
    local rc=$?
    local verdict="exit $rc"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="TIMED OUT at ${max}s"
    echo "== $name: $verdict in $(($(date +%s) - t0))s" | tee -a "$out/summary.txt"
    tail -c "+$from" "$out/steps.log" | tail -n 25
}

if [ -n "$wheels" ]; then
    wheels=$(cd "$wheels" && pwd) || exit 1
    # no index, no dependencies: only what DIR holds, into its own folder beside (never over) the image's packages
    step install 20 $py -m pip install -q --no-index --find-links "$wheels" --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site "$wheels"/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    [ -d "$wheels/crepe-tiny" ] && PYTHONPATH="$PYTHONPATH:$wheels/crepe-tiny"
fi
# PyAV (av) is a 36 MB wheel that does not fit what travels to the machine: WAV/FLAC go through libsndfile, so a
# stub lets everything else import; a format that needs ffmpeg then fails with an error naming av.
if ! $py -c "import av" 2>/dev/null; then
    mkdir -p /tmp/avstub/av
    echo 'raise_msg = "PyAV (av) is not installed on this machine (gpu_run.sh stub)"' >/tmp/avstub/av/__init__.py
    touch /tmp/avstub/av/container.py
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/avstub"
    echo "note: av not installed, stubbed (formats beyond libsndfile's are not exercised)" | tee -a "$out/summary.txt"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whether or not it is pip-installed
# The reference fixtures live in ../shared; a carried copy in .shared/ stands in where that is absent.
[ ! -e ../shared ] && [ -d .shared/fixtures ] && ln -s "$PWD/.shared" ../shared

assets=demo-assets checks="$py benchmarks/gpu_checks.py --assets $assets"
if [ $dry -eq 1 ]; then  # same steps at tiny sizes on the CPU
    dev=cpu
    tests=(tests/test_content.py tests/test_f0.py tests/test_batch_synthesis.py -k "cuda or half or on_the_device")
    batch=(--models tiny --dtype float32 --batches 1,2 --chunks 0.25 --repeats 1 --loads 5)
    stream=(--models tiny --budget 20 --rounds 2 --max-streams 2)
    load=(--clients 1 --adapters 1 --requests 1 --seconds 20 --audio-s 0.5)
    sizes=(--seconds 1 --swaps 4 --oom-seconds 3 --f0-methods pm,rmvpe)
    lora=(--swaps 5 --reloads 1 --infer-repeats 1 --infer-seconds 1)
    memory=(--seconds 1)
else
    dev=cuda
    tests=(-m gpu tests/test_content.py tests/test_f0.py tests/test_batch_synthesis.py)  # the files with CUDA tests
    batch=(--models full --dtype float16 --full-batches 1,2,4,8,16,32 --chunks 1,0.25 --repeats 3 --loads 50)
    stream=(--models full --budget 22 --rounds 8 --max-streams 256)  # --budget: seconds of search per mode
    load=(--clients 16 --adapters 8 --requests 96 --seconds 8 --audio-s 1)  # --seconds: per phase
    sizes=(--seconds 10 --swaps 100 --oom-seconds 180)
    lora=(--swaps 300 --reloads 10 --infer-repeats 5)
    memory=(--seconds 10,120)
fi

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    $py -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda',
torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    nproc
} >"$out/device.txt" 2>&1
cat "$out/device.txt"
if [ $dry -eq 0 ] && ! $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device: use --dry-run on a CPU" | tee -a "$out/summary.txt"
    exit 1
fi

step assets 30 $py -c "from rvc_lora.demo import ensure_demo_assets; ensure_demo_assets('$assets')"
step tests-gpu 25 $py -m pytest -p no:cacheprovider -q "${tests[@]}"
step precision 40 $checks --device $dev --only precision "${sizes[@]}"
step compile 50 $checks --device $dev --only compile "${sizes[@]}"
step bench-batch 45 $py benchmarks/bench_batch.py --device $dev "${batch[@]}"
step bench-stream 60 $py benchmarks/bench_stream.py --assets $assets --device $dev --modes serial,batched \
    "${stream[@]}"
# The service against a reload-per-voice-change server, real HTTP on loopback: two servers (batching on, with a
# bank slot per voice; batching off) on this device, phases alternated, then the reload baseline on the device.
step load 80 env RVC_LORA_DEVICE=$dev $py benchmarks/load.py --spawn --assets $assets --device $dev --rounds 1 \
    "${load[@]}"
step service-oom 50 $checks --device $dev --only service-oom "${sizes[@]}"
step oom 25 $checks --device $dev --only oom "${sizes[@]}"
step f0 25 $checks --device $dev --only f0 "${sizes[@]}"
step bench-lora 25 $py benchmarks/bench_lora.py --device $dev "${lora[@]}"
step bench-memory 25 $py benchmarks/bench_memory.py --assets $assets --device $dev "${memory[@]}"
echo "total $(($(date +%s) - start))s" | tee -a "$out/summary.txt"
