"""The manifests for scale parse and agree with each other, with the pins and with the local stack."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from infra.settings import Settings
from infra.stack import StackPorts

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
LAUNCHER = ROOT / "infra" / "aws" / "ray-cluster.yaml"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RAY_VERSION = next(d.split("==")[1] for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
IMAGE = f"ghcr.io/compound-ml/compound:{PYPROJECT['project']['version']}"
DEFAULTS = StackPorts()


def _docs() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def _containers(node: object) -> list[dict]:
    """Every container spec anywhere below `node`."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "containers":
                found += value
            else:
                found += _containers(value)
    elif isinstance(node, list):
        for item in node:
            found += _containers(item)
    return found


def _port(url_or_address: str) -> int:
    return int(re.search(r":(\d+)$", url_or_address.rstrip("/")).group(1))


@pytest.fixture(scope="module")
def docs() -> dict[tuple[str, str], dict]:
    return _docs()


def test_everything_runs_the_one_image_built_on_the_pinned_ray(docs: dict) -> None:
    images = {c["image"] for doc in docs.values() for c in _containers(doc)} - {"postgres:16"}
    launcher = yaml.safe_load(LAUNCHER.read_text())
    assert images | {launcher["docker"]["image"]} == {IMAGE}
    dockerfile = DOCKERFILE.read_text()
    assert f"FROM rayproject/ray:{RAY_VERSION}-py311-gpu" in dockerfile
    assert f"-t {IMAGE} " in dockerfile
    assert docs[("RayCluster", "compound")]["spec"]["rayVersion"] == RAY_VERSION


def test_gpu_workers_request_gpus_and_read_credentials_from_the_secret(docs: dict) -> None:
    cluster = docs[("RayCluster", "compound")]["spec"]
    (worker,) = cluster["workerGroupSpecs"]
    (container,) = worker["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for doc in (docs[("RayCluster", "compound")], docs[("Deployment", "mlflow")]):
        for c in _containers(doc):
            refs = {next(iter(ref.values()))["name"] for ref in c["envFrom"]}
            assert refs == {"compound-settings", "compound-s3"}
    assert "SECRET_KEY" not in yaml.safe_dump(docs[("ConfigMap", "compound-settings")])


def test_settings_point_at_the_services_the_manifests_define(docs: dict) -> None:
    data = docs[("ConfigMap", "compound-settings")]["data"]
    settings = Settings(**{k.removeprefix("COMPOUND_").lower(): v for k, v in data.items()})
    head = docs[("RayCluster", "compound")]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert head_ports == {"gcs": DEFAULTS.ray, "dashboard": DEFAULTS.ray_dashboard, "client": DEFAULTS.ray_client}
    assert _port(settings.ray_address) == head_ports["gcs"]
    assert _port(settings.ray_dashboard_url) == head_ports["dashboard"]
    mlflow_service = docs[("Service", "mlflow")]["spec"]["ports"][0]["port"]
    assert _port(settings.mlflow_tracking_uri) == mlflow_service == DEFAULTS.mlflow
    assert "--port 5000" in docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]["args"][0]


def test_rayjob_targets_the_cluster_and_reads_its_spec_from_the_mounted_configmap(docs: dict) -> None:
    job = docs[("RayJob", "compound-train")]["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": "compound"}
    head = docs[("RayCluster", "compound")]["spec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = head["containers"][0]["volumeMounts"]
    (volume,) = head["volumes"]
    assert volume["configMap"]["name"] == "compound-jobs" and mount["name"] == volume["name"]
    *command, spec_path = job["entrypoint"].split()
    assert command == ["compound", "job", "run"]
    assert spec_path.startswith(mount["mountPath"] + "/")


def test_launcher_uses_the_stack_ports_and_valid_settings() -> None:
    launcher = yaml.safe_load(LAUNCHER.read_text())
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert f"--port={DEFAULTS.ray}" in head_start and f"--dashboard-port={DEFAULTS.ray_dashboard}" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start  # loopback unless the user says otherwise
    env = dict(
        option.removeprefix("--env ").split("=", 1) for option in launcher["docker"]["run_options"]
        if option.startswith("--env COMPOUND_")
    )
    settings = Settings(**{k.removeprefix("COMPOUND_").lower(): v for k, v in env.items()})
    assert settings.s3_access_key is None  # AWS S3 through the instance profile
    assert _port(settings.ray_address) == DEFAULTS.ray
    gpu = launcher["available_node_types"]["gpu_worker"]
    assert gpu["max_workers"] <= launcher["max_workers"]


def test_the_scheduler_is_one_replica_with_its_schedules_in_postgresql(docs: dict) -> None:
    deployment = docs[("Deployment", "scheduler")]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    (container,) = _containers(deployment)
    assert container["readinessProbe"]["httpGet"]["port"] == DEFAULTS.scheduler
    assert f"--port {DEFAULTS.scheduler}" in container["args"][0]
    store = next(e["value"] for e in container["env"] if e["name"] == "COMPOUND_SCHEDULER_STORE")
    assert store.startswith("postgresql://") and "@mlflow-db:5432/" in store and ("Service", "mlflow-db") in docs
