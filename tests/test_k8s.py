"""docker/k8s/: schema-valid offline (the official Kubernetes JSON schemas that the
`kubernetes-validate` package carries), and consistent with each other and with the image."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "docker" / "k8s"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)


def load_all() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


DOCS = load_all()


def one(kind: str) -> dict[str, Any]:
    [doc] = [d for _, d in DOCS if d["kind"] == kind]
    return doc


def all_of(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in DOCS if d["kind"] == kind]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = one("Deployment")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    [c] = pod_spec()["containers"]
    return c


def schema_versions() -> list[str]:
    """The oldest and the newest Kubernetes release whose schemas the package carries."""
    utils = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate not installed (dev extra)")
    versions = sorted(set(utils.all_versions()), key=lambda v: tuple(int(p) for p in v.split(".")))
    return [versions[0], versions[-1]]


def test_manifests_present() -> None:
    kinds = sorted(d["kind"] for _, d in DOCS)
    assert kinds == ["Deployment", "Ingress", "PersistentVolumeClaim", "PersistentVolumeClaim",
                     "PodDisruptionBudget", "Service"]


@pytest.mark.parametrize("name,doc", DOCS, ids=[f"{n}:{d['kind']}/{d['metadata']['name']}" for n, d in DOCS])
def test_schema_valid_strict(name: str, doc: dict[str, Any]) -> None:
    """Strict: unknown fields (typos) fail too. A kind without a bundled schema fails, not skips."""
    utils = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate not installed (dev extra)")
    for version in schema_versions():
        try:
            utils.validate(doc, version, strict=True)
        except utils.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name} against Kubernetes {version}: {path}: {exc.message}")


def test_one_gpu_per_pod_one_container() -> None:
    resources = container()["resources"]
    assert str(resources["limits"]["nvidia.com/gpu"]) == "1", "one server process owns one GPU"
    assert "memory" in resources["limits"] and "cpu" in resources["requests"]


def test_probes_on_health_routes_and_the_container_port() -> None:
    c = container()
    [port] = c["ports"]
    expose = re.search(r"^EXPOSE (\d+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert expose is not None and port["containerPort"] == int(expose[1])
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz", "model loading must not trip liveness"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in (port["name"], port["containerPort"])


def test_runs_as_the_image_user_non_root() -> None:
    user = re.findall(r"^USER (\d+)(?::(\d+))?$", DOCKERFILE.read_text(), re.MULTILINE)[-1]
    security = pod_spec()["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == int(user[0])
    assert container()["securityContext"]["allowPrivilegeEscalation"] is False


def test_read_only_root_has_writable_tmp_and_home() -> None:
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    if container()["securityContext"].get("readOnlyRootFilesystem"):
        assert {"/tmp", "/home/rvc"} <= set(mounts)
    assert mounts["/models"]["readOnly"] is True


def test_adapters_on_a_volume_shared_by_all_replicas() -> None:
    claims = {p["metadata"]["name"]: p for p in all_of("PersistentVolumeClaim")}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    for volume in volumes.values():
        if "persistentVolumeClaim" in volume:
            claim = claims[volume["persistentVolumeClaim"]["claimName"]]  # every claim used is defined
            if one("Deployment")["spec"]["replicas"] > 1:
                assert "ReadWriteMany" in claim["spec"]["accessModes"] or volume["persistentVolumeClaim"].get(
                    "readOnly"), f"{claim['metadata']['name']}: replicas on several nodes must share it"
    env = {e["name"]: e.get("value") for e in container()["env"]}
    [adapters] = [m for m in container()["volumeMounts"] if m["mountPath"] == env["RVC_LORA_ADAPTER_DIR"]]
    claim = claims[volumes[adapters["name"]]["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not adapters.get("readOnly"), "uploads are written there"


def test_env_are_settings_and_secrets_come_from_a_secret() -> None:
    settings = pytest.importorskip("service.settings")
    fields = {f"RVC_LORA_{name.upper()}" for name in settings.Settings.model_fields}
    for entry in container()["env"]:
        assert entry["name"] in fields, f"{entry['name']} is not a setting (typo?)"
        if SECRET_NAME.search(entry["name"]):
            assert "valueFrom" in entry and "value" not in entry, f"{entry['name']}: literal secret in a manifest"
    [source] = container()["envFrom"]
    assert source["secretRef"]["optional"] is True, "without an API key the service still starts"


def test_grace_period_covers_the_drain() -> None:
    settings = pytest.importorskip("service.settings")
    drain = settings.Settings.model_fields["shutdown_grace_s"].default
    assert pod_spec()["terminationGracePeriodSeconds"] > drain, "SIGKILL would cut running conversions"


def test_service_selects_the_pods_and_names_their_port() -> None:
    service, deployment = one("Service"), one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in container()["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_ingress_hashes_on_the_adapter_header_to_the_service() -> None:
    ingress, service = one("Ingress"), one("Service")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_adapter_id"
    assert annotations.get("nginx.ingress.kubernetes.io/proxy-request-buffering") == "off"
    backends = [p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    service_ports = {p["name"] for p in service["spec"]["ports"]} | {p["port"] for p in service["spec"]["ports"]}
    for backend in backends:
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"].get("name", backend["port"].get("number")) in service_ports
