#!/usr/bin/env bash
# Smoke test of the container image, with podman, on a machine that reaches no container registry:
#   1. make a Debian bookworm base image locally (debootstrap + podman import),
#   2. collect the wheels on the host (torch CPU + the project's dependencies) and serve them on
#      127.0.0.1 as the build's package index,
#   3. build the CPU variant of docker/Dockerfile on that base,
#   4. run it with `rvc-lora serve --demo` on 127.0.0.1 only, wait for /readyz and the image's
#      HEALTHCHECK, POST a real /convert (base voice, then a demo adapter if one is listed), check
#      the user is not root, and stop it with SIGTERM.
#
# Needs root, podman (+ runc), debootstrap and a host python3 of the same minor version as the base
# (3.11, bookworm's): apt-get install podman buildah runc debootstrap.
# Usage: docker/smoke.sh      (from anywhere; not part of CI: about 10 minutes the first time)
# Env:   RVC_LORA_SMOKE_DIR (work dir, default /var/tmp/rvc-lora-smoke; the base rootfs, the
#        wheelhouse and the logs stay there between runs), RVC_LORA_SMOKE_PORT (default 18000),
#        RVC_LORA_SMOKE_INDEX_PORT (default 18001), DEBIAN_MIRROR, KEEP=1 (leave the container).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${RVC_LORA_SMOKE_DIR:-/var/tmp/rvc-lora-smoke}
PORT=${RVC_LORA_SMOKE_PORT:-18000}
INDEX_PORT=${RVC_LORA_SMOKE_INDEX_PORT:-18001}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_VERSION=2.13.0
BASE=localhost/rvc-lora-base:bookworm
IMAGE=localhost/rvc-lora:cpu-smoke
NAME=rvc-lora-smoke
READY_TIMEOUT=${RVC_LORA_SMOKE_READY_TIMEOUT:-600}
export CONTAINERS_CONF="$REPO/docker/containers.conf"

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'smoke: FAILED: %s\n' "$*" >&2; exit 1; }

for cmd in podman debootstrap python3 tar; do
    command -v "$cmd" >/dev/null || die "$cmd not found (apt-get install podman buildah runc debootstrap)"
done
python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || die "host python3 must be 3.11 (the base's python) so the collected wheels fit the image"
[[ -f "$REPO/README.md" ]] || die "README.md is missing (pyproject.toml names it; the build copies it)"
mkdir -p "$WORK"

INDEX_PID=""
cleanup() {
    if [[ -n "$INDEX_PID" ]]; then kill "$INDEX_PID" 2>/dev/null || true; fi
    if [[ "${KEEP:-0}" != 1 ]]; then podman rm -f -t 5 "$NAME" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

step "1/6 base image $BASE"
if podman image exists "$BASE"; then
    echo "exists"
else
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || die "debootstrap failed, see $WORK/debootstrap.log"
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE"
    rm -rf "$WORK/rootfs"
fi

step "2/6 wheelhouse: torch $TORCH_VERSION (CPU) and the project's dependencies"
python3 -m pip download --quiet --dest "$WORK/wheelhouse" \
    "torch==$TORCH_VERSION" "${REPO}[index]" "setuptools>=68" wheel >"$WORK/download.log" 2>&1 \
    || { tail -20 "$WORK/download.log"; die "pip download failed, see $WORK/download.log"; }
rm -f "$WORK/wheelhouse"/rvc_lora-* "$WORK/wheelhouse"/rvc-lora-*
# A PEP 503 layout (simple/<normalised name>/<files>) that http.server's listings serve as is.
python3 - "$WORK/wheelhouse" "$WORK/index/simple" <<'PY'
import re, shutil, sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.rmtree(dst, ignore_errors=True)
for f in sorted(src.iterdir()):
    stem = f.name.split("-")[0] if f.suffix == ".whl" else f.name.rsplit("-", 1)[0]
    project = dst / re.sub(r"[-_.]+", "-", stem).lower()
    project.mkdir(parents=True, exist_ok=True)
    (project / f.name).symlink_to(f)
print(f"{sum(1 for _ in dst.iterdir())} projects")
PY
python3 -m http.server --bind 127.0.0.1 --directory "$WORK/index" "$INDEX_PORT" \
    >"$WORK/index.log" 2>&1 &
INDEX_PID=$!
sleep 1
kill -0 "$INDEX_PID" 2>/dev/null || die "package index did not start on 127.0.0.1:$INDEX_PORT"

step "3/6 build $IMAGE (CPU variant) on $BASE"
INDEX_URL="http://127.0.0.1:$INDEX_PORT/simple"
start=$SECONDS
podman build --pull=never --format docker --network host \
    -f "$REPO/docker/Dockerfile" --ignorefile "$REPO/docker/Dockerfile.dockerignore" \
    --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_VARIANT=cpu --build-arg DEVICE=cpu \
    --build-arg TORCH_INDEX_URL="$INDEX_URL" --build-arg PIP_INDEX_URL="$INDEX_URL" \
    -t "$IMAGE" "$REPO" 2>&1 | tee "$WORK/build.log" | grep -E '^(STEP|COMMIT|torch )' || true
podman image exists "$IMAGE" || die "build failed, see $WORK/build.log"
echo "built in $((SECONDS - start)) s; size $(podman image inspect "$IMAGE" --format '{{.Size}}') bytes"
kill "$INDEX_PID"; INDEX_PID=""

step "4/6 run: rvc-lora serve --demo on 127.0.0.1:$PORT"
podman rm -f -t 5 "$NAME" >/dev/null 2>&1 || true
# Host network with the server bound to 127.0.0.1: reachable from this machine only. No systemd
# here, so no healthcheck timer: step 5 runs the image's HEALTHCHECK by hand.
podman run -d --name "$NAME" --pull=never --network host --health-interval disable \
    -e RVC_LORA_HOST=127.0.0.1 -e RVC_LORA_PORT="$PORT" \
    "$IMAGE" rvc-lora serve --demo 2> >(grep -v 'systemd connection' >&2) >/dev/null
[[ "$(podman exec "$NAME" id -u)" == 10001 ]] || die "container does not run as uid 10001"
echo "uid $(podman exec "$NAME" id -u), device $(podman exec "$NAME" printenv RVC_LORA_DEVICE)"

step "5/6 wait for /readyz (models loaded, warm-up done) and the HEALTHCHECK"
start=$SECONDS
until python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/readyz', timeout=5)" 2>/dev/null; do
    if [[ "$(podman inspect "$NAME" --format '{{.State.Running}}')" != true ]]; then
        podman logs "$NAME" 2>&1 | tail -40
        die "the container exited before it was ready"
    fi
    if (( SECONDS - start > READY_TIMEOUT )); then
        podman logs "$NAME" 2>&1 | tail -40
        die "not ready after ${READY_TIMEOUT} s"
    fi
    sleep 3
done
echo "ready after $((SECONDS - start)) s"
podman healthcheck run "$NAME" >/dev/null || die "the image's HEALTHCHECK fails on a ready server"
echo "HEALTHCHECK: healthy"

step "6/6 POST /convert with real audio"
python3 - "$PORT" <<'PY'
import io, json, math, struct, sys, time, urllib.request, uuid, wave

base = f"http://127.0.0.1:{sys.argv[1]}"


def tone(seconds: float = 2.0, sr: int = 16000) -> bytes:
    """A voiced-like signal: 140 Hz harmonics with a slow vibrato, as 16-bit mono WAV."""
    frames, phase = bytearray(), 0.0
    for n in range(int(seconds * sr)):
        f0 = 140.0 * (1 + 0.03 * math.sin(2 * math.pi * 5 * n / sr))
        phase += 2 * math.pi * f0 / sr
        x = sum(math.sin(k * phase) / k for k in range(1, 8)) * 0.2
        frames += struct.pack("<h", int(max(-1.0, min(1.0, x)) * 32767))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr), w.writeframes(bytes(frames))
    return buf.getvalue()


def convert(audio: bytes, **fields: str) -> None:
    boundary = uuid.uuid4().hex
    body = b""
    for key, value in fields.items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="in.wav"\r\n'
             "Content-Type: audio/wav\r\n\r\n").encode() + audio + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{base}/convert", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    t0 = time.monotonic()
    try:
        resp = urllib.request.urlopen(req, timeout=300)
    except urllib.error.HTTPError as e:
        sys.exit(f"/convert {fields}: HTTP {e.code}: {e.read()[:500]!r}")
    out, elapsed = resp.read(), time.monotonic() - t0
    ctype = resp.headers.get("Content-Type", "")
    assert resp.status == 200 and ctype.startswith("audio/"), (resp.status, ctype)
    with wave.open(io.BytesIO(out)) as w:
        n, sr, width = w.getnframes(), w.getframerate(), w.getsampwidth()
        pcm = w.readframes(n)
    peak = max(abs(v) for (v,) in struct.iter_unpack("<h", pcm)) if width == 2 and n else 0
    assert n / sr > 1.5 and peak > 0, f"output {n / sr:.2f} s at {sr} Hz, peak {peak}"
    print(f"/convert {fields or '(base voice)'}: 200 {ctype}, {n / sr:.2f} s at {sr} Hz, peak {peak}, "
          f"{elapsed:.1f} s, X-Adapter={resp.headers.get('X-Adapter')}, "
          f"Server-Timing={resp.headers.get('Server-Timing')}")


audio = tone()
convert(audio, f0_method="pm", format="wav", seed="0")
listed = json.load(urllib.request.urlopen(f"{base}/adapters", timeout=10))
items = listed.get("adapters", listed.get("items", [])) if isinstance(listed, dict) else listed
if items:
    convert(audio, adapter=items[0]["id"], f0_method="pm", format="wav", seed="0")
else:
    print("no adapter listed: the adapter path was not exercised")
PY

podman stop -t 30 "$NAME" 2> >(grep -v 'systemd connection' >&2) >/dev/null
code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
echo "stopped with SIGTERM: exit code $code"
[[ "$code" != 137 ]] || die "the server did not stop within 30 s of SIGTERM (killed)"
printf '\nsmoke: PASSED\n'
