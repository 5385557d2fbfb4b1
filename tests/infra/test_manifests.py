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
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    everyone = {"compound-settings", "compound-s3", "compound-mlflow", "compound-ray"}
    # The promoter's login reaches where promotions run (the head's drivers) and MLflow, which makes it.
    for c, secrets in ((head, everyone | {"compound-mlflow-promoter"}), (container, everyone),
                       (_containers(docs[("Deployment", "mlflow")])[0],
                        {"compound-settings", "compound-s3", "compound-mlflow-promoter"})):
        assert {next(iter(ref.values()))["name"] for ref in c["envFrom"]} == secrets, c["name"]
    assert not re.search(r"SECRET|PASSWORD|TOKEN", yaml.safe_dump(docs[("ConfigMap", "compound-settings")]))


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
    (volume,) = [v for v in head["volumes"] if "configMap" in v]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert volume["configMap"]["name"] == "compound-jobs"
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
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    assert not any(re.search(r"PASSWORD|TOKEN=|SECRET", o) for o in launcher["docker"]["run_options"])
    (ssh,) = launcher["provider"]["security_group"]["IpPermissions"]  # nothing but SSH from outside the group
    assert (ssh["FromPort"], ssh["ToPort"]) == (22, 22)
    assert all(not r["CidrIp"].startswith("0.0.0.0") for r in ssh["IpRanges"])


def test_the_server_is_one_replica_with_its_schedules_and_users_in_a_postgresql_of_their_own(docs: dict) -> None:
    deployment = docs[("Deployment", "server")]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    (container,) = _containers(deployment)
    assert container["readinessProbe"]["httpGet"]["port"] == DEFAULTS.server
    assert f"python -m server --host 0.0.0.0 --port {DEFAULTS.server}" in container["args"][0]
    service = docs[("Service", "server")]["spec"]["ports"][0]["port"]
    data = docs[("ConfigMap", "compound-settings")]["data"]
    assert _port(data["COMPOUND_SERVER_URL"]) == service == DEFAULTS.server
    store = next(e["value"] for e in container["env"] if e["name"] == "COMPOUND_SCHEDULER_STORE")
    assert store.startswith("postgresql://scheduler:") and "@scheduler-db:5432/schedules" in store
    assert ("Service", "scheduler-db") in docs and ("CronJob", "scheduler-db-backup") in docs
    db = docs[("StatefulSet", "scheduler-db")]["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in db["env"]}["POSTGRES_USER"] == "scheduler"  # not MLflow's user


def test_every_container_runs_unprivileged_within_limits(docs: dict) -> None:
    for (kind, name), doc in docs.items():
        for container in _containers(doc):
            where = f"{kind} {name}: {container['name']}"
            limits = container.get("resources", {}).get("limits", {})
            assert {"cpu", "memory"} <= set(limits), where
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False and context["capabilities"]["drop"] == ["ALL"], where
    pods = [doc for doc in docs.values() if _containers(doc)]
    for doc in pods:
        contexts = _pod_security_contexts(doc)
        assert contexts and all(c.get("runAsNonRoot") is True for c in contexts), doc["metadata"]["name"]


def _pod_security_contexts(node: object) -> list[dict]:
    """The pod-level securityContext of every pod template below `node`."""
    if isinstance(node, dict):
        if "containers" in node:
            return [node.get("securityContext", {})]
        return [c for value in node.values() for c in _pod_security_contexts(value)]
    if isinstance(node, list):
        return [c for item in node for c in _pod_security_contexts(item)]
    return []


def test_no_password_reaches_a_command_line_and_every_service_asks_who_you_are(docs: dict) -> None:
    for (kind, name), doc in docs.items():
        for container in _containers(doc):
            command = " ".join(container.get("command", []) + container.get("args", []))
            assert not re.search(r"PASSWORD|--backend-store-uri|_TOKEN", command), f"{kind} {name}: {command}"
    assert docs[("RayCluster", "compound")]["spec"]["authOptions"] == {"mode": "token", "secretName": "compound-ray"}
    mlflow = _containers(docs[("Deployment", "mlflow")])[0]
    assert "--app-name compound-auth" in mlflow["args"][0]  # basic-auth with the promoter rule
    ray_clients = [*_containers(docs[("RayCluster", "compound")]), *_containers(docs[("RayJob", "compound-train")])]
    for container in ray_clients:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "compound-ray", container["name"]


def test_network_policies_deny_by_default_and_open_each_service_to_its_clients(docs: dict) -> None:
    policies = {name: doc["spec"] for (kind, name), doc in docs.items() if kind == "NetworkPolicy"}
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    opened = [p["podSelector"]["matchLabels"] for name, p in policies.items() if name != "default-deny-ingress"]
    assert {"ray.io/cluster": "compound"} in opened and {"app": "mlflow"} in opened and {"app": "mlflow-db"} in opened
    db = policies["mlflow-db-from-its-clients"]["ingress"][0]["from"]
    assert [peer["podSelector"]["matchLabels"] for peer in db] == [{"app": "mlflow"}, {"app": "mlflow-db-backup"}]
    db = policies["scheduler-db-from-its-clients"]["ingress"][0]["from"]
    assert [peer["podSelector"]["matchLabels"] for peer in db] == [{"app": "server"}, {"app": "scheduler-db-backup"}]
