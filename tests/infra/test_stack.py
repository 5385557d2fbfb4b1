"""The local stack against its real processes: SeaweedFS, the MLflow server and a Ray head."""

import base64
import contextlib
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import mlflow
import psutil
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError
from click.testing import CliRunner
from mlflow import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient

from compound.cli import cli
from infra import seaweed
from infra.settings import RAY_CLIENT_ENV, Settings, load_settings, write_private
from infra.stack import GRPC_OFFSET, NODE_PREFIX, Stack, StackError, StackPorts, ephemeral_ports_start
from jobs.submit import JobsClient


def test_s3_put_get_list(settings: Settings) -> None:
    s3 = settings.s3_client()
    key = f"smoke/{uuid.uuid4().hex}.txt"
    s3.put_object(Bucket=settings.shards_bucket, Key=key, Body=b"hello shards")
    assert s3.get_object(Bucket=settings.shards_bucket, Key=key)["Body"].read() == b"hello shards"
    listed = s3.list_objects_v2(Bucket=settings.shards_bucket, Prefix="smoke/")["Contents"]
    assert key in [o["Key"] for o in listed]
    assert {b["Name"] for b in s3.list_buckets()["Buckets"]} >= set(settings.buckets)


def test_anonymous_and_wrong_key_requests_are_refused(settings: Settings) -> None:
    anonymous = boto3.client("s3", endpoint_url=settings.s3_endpoint, region_name=settings.s3_region,
                             config=Config(signature_version=UNSIGNED))
    with pytest.raises(ClientError, match="AccessDenied"):
        anonymous.list_objects_v2(Bucket=settings.shards_bucket)
    with pytest.raises(ClientError, match="AccessDenied"):
        anonymous.put_object(Bucket=settings.shards_bucket, Key="anonymous.txt", Body=b"x")
    wrong = boto3.client("s3", endpoint_url=settings.s3_endpoint, region_name=settings.s3_region,
                         aws_access_key_id=settings.s3_access_key.get_secret_value(),
                         aws_secret_access_key="not-the-secret")
    with pytest.raises(ClientError):
        wrong.list_objects_v2(Bucket=settings.shards_bucket)


HTTP1_GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
HTTP2_START = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # preface, empty SETTINGS


def _over_tls(port: int, tls: seaweed.Tls | None, *, grpc: bool) -> bytes | str:
    """What a TLS client gets from a SeaweedFS port for an HTTP/1.1 GET (or, from a gRPC port, the start of
    an HTTP/2 connection): the first bytes of the answer, or the error that ended the exchange. With `tls`
    it presents the stack's certificate; without, none (TLS 1.3 refuses that after the handshake)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # it is the server that judges here
    context.set_alpn_protocols(["h2" if grpc else "http/1.1"])
    if tls is not None:
        context.load_cert_chain(tls.cert, tls.key)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw) as conn:
            conn.sendall(HTTP2_START if grpc else HTTP1_GET)
            return conn.recv(64)
    except (ssl.SSLError, ConnectionError) as error:
        return f"refused: {error}"


def test_only_the_s3_api_answers_without_the_stacks_certificate(stack: Stack, settings: Settings) -> None:
    """SeaweedFS's master, volume, filer and admin ports, HTTP and gRPC, would otherwise list, read, write and
    delete what is stored (the master's /col/delete drops a bucket's data) without any key."""
    ports, tls = stack.saved_ports(), seaweed.Tls.at(stack.home / "s3" / "tls")
    internal = {"master": ports.weed_master, "volume": ports.weed_volume, "filer": ports.weed_filer,
                "admin": ports.weed_admin}
    for name, port in internal.items():
        with pytest.raises(urllib.error.HTTPError) as plain:  # plain HTTP, as curl or a web page would
            urllib.request.urlopen(f"http://127.0.0.1:{port}/col/delete?collection={settings.shards_bucket}", timeout=5)
        assert plain.value.code == 400, name  # "client sent an HTTP request to an HTTPS server"
        assert "certificate required" in str(_over_tls(port, None, grpc=False)), name
        assert _over_tls(port, tls, grpc=False).startswith(b"HTTP/1.1"), name  # the certificate is what opens it
    for name, port in {"s3": ports.s3, **internal}.items():
        assert "certificate required" in str(_over_tls(port + GRPC_OFFSET, None, grpc=True)), f"{name} gRPC"
        assert _over_tls(port + GRPC_OFFSET, tls, grpc=True)[3] == 4, f"{name} gRPC"  # its SETTINGS frame


def test_mlflow_asks_who_you_are_except_for_its_health(settings: Settings) -> None:
    search = f"{settings.mlflow_tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(search, timeout=10)
    assert anonymous.value.code == 401
    with urllib.request.urlopen(f"{settings.mlflow_tracking_uri}/health", timeout=10) as health:
        assert health.status == 200
    login = base64.b64encode(f"{settings.mlflow_username}:{settings.mlflow_password.get_secret_value()}".encode())
    request = urllib.request.Request(search, headers={"Authorization": f"Basic {login.decode()}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def test_ray_asks_for_its_token_at_the_job_server_and_the_gcs(settings: Settings, tmp_path: Path) -> None:
    jobs = f"{settings.ray_dashboard_url}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as anonymous:  # a job is code run as the stack's owner
        urllib.request.urlopen(jobs, timeout=10)
    assert anonymous.value.code == 401
    request = urllib.request.Request(jobs, headers={"Authorization": f"Bearer {settings.ray_token.get_secret_value()}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200
    # A driver is let into the cluster by the token: with a wrong one Ray keeps being refused (it retries).
    def driver_connects(token: str) -> bool:
        env = {**os.environ, **RAY_CLIENT_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        try:
            return subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={settings.ray_address!r})"],
                                  check=False, env=env, capture_output=True, timeout=60, cwd=tmp_path).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    assert not driver_connects("not-the-token")
    assert driver_connects(settings.ray_token.get_secret_value())


def test_mlflow_run_with_metric_and_artifact_lands_in_s3(settings: Settings, tmp_path: Path) -> None:
    client = mlflow.MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    experiment_id = client.create_experiment(f"stack-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "loss", 0.25)
    (tmp_path / "notes.txt").write_text("artifact body")
    client.log_artifact(run.info.run_id, str(tmp_path / "notes.txt"))
    client.set_terminated(run.info.run_id)

    assert client.get_run(run.info.run_id).data.metrics["loss"] == 0.25
    objects = settings.s3_client().list_objects_v2(Bucket=settings.mlflow_bucket)["Contents"]
    stored = [o["Key"] for o in objects if o["Key"].endswith(f"{run.info.run_id}/artifacts/notes.txt")]
    assert len(stored) == 1
    body = settings.s3_client().get_object(Bucket=settings.mlflow_bucket, Key=stored[0])["Body"].read()
    assert body == b"artifact body"


def test_ray_job_succeeds_and_its_logs_are_readable(settings: Settings) -> None:
    client = JobSubmissionClient(settings.ray_dashboard_url)
    job_id = client.submit_job(
        entrypoint="python -c \"import ray; ray.init(); print('cpus', ray.cluster_resources()['CPU'])\""
    )
    deadline = time.monotonic() + 120
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "the job did not finish in 120 s"
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert "cpus " in logs


def _cluster_resources(settings: Settings) -> dict[str, float]:
    client = JobSubmissionClient(settings.ray_dashboard_url)
    job_id = client.submit_job(entrypoint="python -c \"import json, ray; ray.init(); "
                                          "print('resources', json.dumps(ray.cluster_resources()))\"")
    deadline = time.monotonic() + 120
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "the job did not finish in 120 s"
        time.sleep(0.5)
    line = next(line for line in client.get_job_logs(job_id).splitlines() if line.startswith("resources "))
    return json.loads(line.removeprefix("resources "))


def test_extra_ray_nodes_join_the_head_and_drain_or_die_on_demand(stack: Stack, settings: Settings) -> None:
    try:
        for name in ("drill-a", "drill-b"):
            stack.add_node(name, num_cpus=1, resources={"drill": 1})
        assert stack.nodes() == [f"{NODE_PREFIX}drill-a", f"{NODE_PREFIX}drill-b"]
        assert _cluster_resources(settings)["drill"] == 2
        stack.drain_node("drill-a", deadline_s=30)  # accepted by Ray: as a spot reclaim's notice
        with pytest.raises(StackError, match="no alive Ray node named 'nowhere'"):
            stack.drain_node("nowhere", deadline_s=30)
        assert stack.stop_service(f"{NODE_PREFIX}drill-a")  # drained, then gone
        assert stack.stop_service(f"{NODE_PREFIX}drill-b", grace_s=0)  # killed without notice
        assert stack.nodes() == []
        # What the queue admits by: the head alone once Ray knows the others dead (they are still listed, dead).
        client, deadline = JobsClient(settings.ray_dashboard_url, settings.ray_token), time.monotonic() + 60
        while len(capacity := client.capacity()) > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [node.get("drill", 0) for node in capacity] == [0]
    finally:
        for node in stack.nodes():  # the session's other tests count on the head alone
            stack.stop_service(node, grace_s=0)


def test_services_listen_on_loopback_only(stack: Stack) -> None:
    pids = set()
    for status in stack.status():
        leader = psutil.Process(status.pid)
        pids |= {leader.pid} | {child.pid for child in leader.children(recursive=True)}
    addresses = {c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in pids}
    assert addresses and addresses <= {"127.0.0.1", "::ffff:127.0.0.1"}


def test_up_twice_starts_nothing_new(stack: Stack) -> None:
    before = {s.name: s.pid for s in stack.status()}
    _, started = stack.up()
    assert started == []
    assert {s.name: s.pid for s in stack.status()} == before
    result = CliRunner().invoke(cli, ["up", "--home", str(stack.home)])
    assert result.exit_code == 0
    assert "already running" in result.output


def test_credentials_stay_out_of_output_command_lines_and_logs_and_files_are_private(
        stack: Stack, settings: Settings) -> None:
    secrets = [settings.s3_secret_key.get_secret_value(), settings.mlflow_password.get_secret_value(),
               settings.mlflow_promoter_password.get_secret_value(), settings.ray_token.get_secret_value(),
               settings.server_token.get_secret_value()]
    for args in (["up", "--home", str(stack.home)], ["stack", "status", "--home", str(stack.home)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert not any(secret in result.output for secret in secrets)
    assert not any(secret in repr(settings) or secret in str(settings.model_dump()) for secret in secrets)
    for path in ("settings.json", "secrets.json", "s3/s3.json", "s3/tls/key.pem"):
        assert (stack.home / path).stat().st_mode & 0o077 == 0, path
    for status in stack.status():  # `ps` shows every process's command line to every user
        leader = psutil.Process(status.pid)
        for process in [leader, *leader.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                command = " ".join(process.cmdline())
                assert not any(secret in command for secret in secrets), (status.name, command[:300])
        assert not any(secret in status.log_file.read_text(errors="replace") for secret in secrets)


def test_free_ports_lie_below_the_ephemeral_range_and_lanes_never_share_one() -> None:
    def opened(ports: StackPorts) -> set[int]:
        single = ports.model_dump(exclude={"ray_min_worker", "ray_max_worker"})
        weed = {ports.s3, ports.weed_master, ports.weed_volume, ports.weed_filer, ports.weed_admin}
        workers = set(range(ports.ray_min_worker, ports.ray_max_worker + 1))
        return set(single.values()) | {port + GRPC_OFFSET for port in weed} | workers

    first, second = ({p for _ in range(20) for p in opened(StackPorts.free(lane, lanes=2))} for lane in (0, 1))
    assert not first & second
    assert 1024 < min(first | second) and max(first | second) < max(ephemeral_ports_start(), 31_000)


def test_taken_port_is_a_clear_error_and_starts_nothing(stack: Stack, tmp_path: Path) -> None:
    other = Stack(tmp_path / "other")
    taken = stack.saved_ports().mlflow
    ports = StackPorts.free().model_copy(update={"mlflow": taken})
    with pytest.raises(StackError, match=rf"port {taken} \(MLflow server\) already in use"):
        other.up(ports)
    assert all(s.pid is None for s in other.status())
    result = CliRunner().invoke(cli, ["up", "--home", str(tmp_path / "cli"), "--s3-port", str(stack.saved_ports().s3)])
    assert result.exit_code == 1
    assert f"port {stack.saved_ports().s3} (S3 API)" in result.output and "already in use" in result.output


def test_down_stops_only_what_up_started(stack: Stack, tmp_path: Path) -> None:
    assert Stack(tmp_path / "empty").down() == []
    # A pid file naming a process that up did not start (here: a sleeping stranger) is left alone.
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "fake" / "run").mkdir(parents=True)
        (tmp_path / "fake" / "run" / "s3.pid").write_text(f'{{"pid": {stranger.pid}, "created": 1.0}}')
        assert Stack(tmp_path / "fake").down() == []
        assert stranger.poll() is None
    finally:
        stranger.kill()
    assert all(s.healthy for s in stack.status())


def test_failed_service_reports_its_log_and_rolls_back(tmp_path: Path) -> None:
    home = tmp_path / "broken"
    (home / "mlflow").mkdir(parents=True)
    (home / "mlflow" / "mlflow.db").write_text("this is not a sqlite database")
    with pytest.raises(StackError, match=r"(?s)mlflow exited during start-up.*last lines of .*mlflow\.log"):
        Stack(home).up(StackPorts.free())
    shutil.rmtree(Stack(home).ray_dir)
    assert all(s.pid is None for s in Stack(home).status())
    assert not (home / "settings.json").exists()
    assert "Traceback" not in (home / "logs" / "ray.log").read_text()  # Ray came up, then was stopped


def test_data_survives_down_and_up(stack: Stack, settings: Settings, tmp_path: Path) -> None:
    key = f"persist/{uuid.uuid4().hex}"
    settings.s3_client().put_object(Bucket=settings.checkpoints_bucket, Key=key, Body=b"kept")
    client = mlflow.MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    run = client.create_run(client.create_experiment(f"persist-{uuid.uuid4().hex[:8]}"))
    client.log_metric(run.info.run_id, "accuracy", 0.9)
    (tmp_path / "model.txt").write_text("weights")
    client.log_artifact(run.info.run_id, str(tmp_path / "model.txt"))

    pids = [s.pid for s in stack.status()]
    assert sorted(stack.down()) == ["mlflow", "ray", "s3", "server"]
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert all(s.pid is None for s in stack.status())
    _, started = stack.up()
    assert sorted(started) == ["mlflow", "ray", "s3", "server"]

    assert settings.s3_client().get_object(Bucket=settings.checkpoints_bucket, Key=key)["Body"].read() == b"kept"
    assert client.get_run(run.info.run_id).data.metrics["accuracy"] == 0.9
    downloaded = client.download_artifacts(run.info.run_id, "model.txt", str(tmp_path / "back"))
    assert Path(downloaded).read_text() == "weights"


@pytest.fixture
def settings_file(stack: Stack) -> Iterator[Path]:
    """The running stack's settings file, put back as it was should a test leave it damaged."""
    path = stack.home / "settings.json"
    original = path.read_bytes()
    yield path
    write_private(path, original.decode())


DAMAGED_SETTINGS = {
    "bad JSON": '{"s3_endpoint": "http://127.0.0.1:8333", ',
    "not an object": "[]",
    "keys missing": json.dumps({"s3_endpoint": "http://127.0.0.1:8333", "mlflow_tracking_uri": "http://x"}),
}


@pytest.mark.parametrize("damage", DAMAGED_SETTINGS.values(), ids=DAMAGED_SETTINGS.keys())
def test_up_rewrites_a_damaged_settings_file_with_the_keys_the_store_has(
    stack: Stack, settings: Settings, settings_file: Path, damage: str, caplog: pytest.LogCaptureFixture,
) -> None:
    settings_file.write_text(damage)
    with caplog.at_level(logging.WARNING, logger="infra.stack"):
        _, started = stack.up()
    assert started == []
    assert f"{settings_file} " in caplog.text and "the S3 keys come from" in caplog.text
    recovered = load_settings(stack.home)
    assert (recovered.s3_access_key, recovered.s3_secret_key) == (settings.s3_access_key, settings.s3_secret_key)
    # The running services' logins are the ones they were started with, not new ones that nothing accepts.
    for field in ("mlflow_password", "mlflow_promoter_password", "ray_token", "server_token"):
        assert getattr(recovered, field) == getattr(settings, field), field
    assert MlflowClient(recovered.mlflow_tracking_uri).search_experiments(max_results=1) is not None
    key = f"recovered/{uuid.uuid4().hex}"
    recovered.s3_client().put_object(Bucket=recovered.shards_bucket, Key=key, Body=b"still mine")
    assert settings.s3_client().get_object(Bucket=settings.shards_bucket, Key=key)["Body"].read() == b"still mine"


def test_compound_up_says_what_is_wrong_with_the_settings_file(
    stack: Stack, settings: Settings, settings_file: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    settings_file.write_text("{not json")
    result = CliRunner().invoke(cli, ["up", "--home", str(stack.home)])
    assert result.exit_code == 0, result.output
    assert result.exception is None and "Traceback" not in result.output
    assert f"{settings_file} is not valid JSON" in caplog.text + result.output
    assert load_settings(stack.home).s3_secret_key == settings.s3_secret_key


def test_new_keys_only_when_neither_file_has_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stopped = Stack(tmp_path)
    (tmp_path / "settings.json").write_text("[]")
    assert stopped.settings_for(StackPorts()).s3_access_key.get_secret_value().startswith("compound-")
    assert "has no S3 keys either, so new ones are generated" in caplog.text
    (tmp_path / "s3").mkdir()
    identity = {"name": "compound", "credentials": [{"accessKey": "AK", "secretKey": "SK"}], "actions": ["Admin"]}
    (tmp_path / "s3" / "s3.json").write_text(json.dumps({"identities": [identity]}))
    recovered = stopped.settings_for(StackPorts())
    assert (recovered.s3_access_key.get_secret_value(), recovered.s3_secret_key.get_secret_value()) == ("AK", "SK")


def test_status_exits_non_zero_when_the_stack_is_down(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["stack", "status", "--home", str(tmp_path)])
    assert result.exit_code == 1
    assert "s3" in result.output and "no" in result.output


@pytest.fixture(autouse=True)
def _no_ambient_mlflow_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_a_lost_mlflow_password_is_replaced_without_losing_mlflow_s_users(tmp_path: Path) -> None:
    """With the settings file and its copy both gone, `up` makes a new password for the stack's login in
    MLflow's users' store (MLflow's own store, as its server reads it); the store itself stays."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    from infra.stack import MLFLOW_USER

    (tmp_path / "mlflow").mkdir()
    users = SqlAlchemyStore()
    users.init_db(f"sqlite:///{tmp_path / 'mlflow' / 'basic_auth.db'}")
    users.create_user(MLFLOW_USER, "the-lost-password", is_admin=True)
    users.create_user("kept", "kept-password-1")
    stack = Stack(tmp_path)
    password = stack.settings_for(StackPorts()).mlflow_password.get_secret_value()
    assert stack.new_mlflow_login and password != "the-lost-password"
    assert users.authenticate_user(MLFLOW_USER, password) and not users.authenticate_user(MLFLOW_USER,
                                                                                          "the-lost-password")
    assert users.authenticate_user("kept", "kept-password-1")  # the store was not made anew
