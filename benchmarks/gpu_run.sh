#!/usr/bin/env bash
# Every CUDA check and GPU number in one run, for the first session that has a GPU (none had one yet).
# Run from the repository root on a CUDA machine with the venv installed (README: CUDA install):
#   bash benchmarks/gpu_run.sh [OUT_DIR]
# Writes each step's output to OUT_DIR (default gpu-results/) and prints the tables; never downloads.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${1:-gpu-results}
mkdir -p "$out"
py=.venv/bin/python
step() {  # step NAME CMD...: run, keep the output, say how it ended (one failure does not stop the rest)
    local name=$1
    shift
    echo "== $name: $*"
    "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $?"
    tail -n 25 "$out/$name.log"
}

$py -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
step tests-gpu $py -m pytest -m gpu -p no:cacheprovider
step tests-half $py -m pytest tests/test_half_precision.py tests/test_synthesizer_lora.py -p no:cacheprovider
step bench-lora $py benchmarks/bench_lora.py --device cuda --swaps 300 --reloads 10 --infer-repeats 5
step bench-pipeline $py benchmarks/bench_pipeline.py --assets demo-assets --device cuda
step bench-memory $py benchmarks/bench_memory.py --assets demo-assets --device cuda --seconds 10,65,120

# issue 4's target: K=8 >= 90% of K=1 and >= 5x the reload baseline, server and baseline on the GPU
port=8765
RVC_LORA_DEVICE=cuda .venv/bin/rvc-lora serve --demo --port $port >"$out/server.log" 2>&1 &
server=$!
for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 2
done
step load $py benchmarks/load.py --url "http://127.0.0.1:$port" --clients 8 --adapters 8 --requests 200 \
    --seconds 180 --audio-s 1 --baseline-model demo-assets/demo-base-v2-40k.pth \
    --hubert demo-assets/demo-hubert_base.pt --fill --device cuda
kill -TERM $server
wait $server
echo "== server exit $? (0 expected after SIGTERM)"
