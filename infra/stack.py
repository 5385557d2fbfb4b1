"""The local stack: SeaweedFS (S3 API), an MLflow server, a Ray head and the compound server, all on 127.0.0.1.

`up` starts what is not running, waits for each health check and writes the settings file;
`down` stops what `up` started, by the pids it recorded, and the extra Ray nodes `add_node` started
beside the head (the drills of a cluster that loses and regains nodes). Data, logs and pid files live under the
state dir (`$COMPOUND_HOME`, default `~/.compound`):

    settings.json  endpoints and S3 keys (0600)     ports.json  the ports the stack uses
    secrets.json   the services' logins again (0600), for a settings file damaged while they run
    s3/            SeaweedFS data and s3.json        mlflow/     SQLite tracking store
    ray/           link to Ray's session dir         logs/, run/ one log and pid file per service
    scheduler/     the compound server's database: schedules, users, audit log (SQLite)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr

from infra import mlflow_auth, seaweed
from infra.settings import (
    RAY_CLIENT_ENV,
    SETTINGS_FILE,
    ConfigError,
    Settings,
    default_scheduler_store,
    new_server_token,
    read_settings_file,
    write_private,
    write_settings,
)

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
GRPC_OFFSET = 10_000  # SeaweedFS serves gRPC at each HTTP port + 10000
FREE_PORTS_FROM = 20_000  # `StackPorts.free` stays above the well-known ports and Ray's default worker range
STARTUP_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 45.0  # Ray drains its node before it exits
LOG_TAIL_LINES = 25
MLFLOW_USER = "compound"  # the stack's login to its MLflow server, an admin of its auth app
MLFLOW_PROMOTER = "compound-promoter"  # the promotion path's login: the one that may move `champion`
# The secrets the services are started with, kept a second time (secrets.json, 0600) for a settings
# file that was damaged while they run; the S3 keys have SeaweedFS's own identity file.
SECRETS_COPY = "secrets.json"
KEPT_SECRETS = ("mlflow_password", "mlflow_promoter_password", "ray_token", "server_token")
SERVER_ADMIN = "owner"  # the compound server's account of whoever ran `compound up`
MLFLOW_LOGIN_CACHE_S = 300
SQLITE_BUSY_S = 60
KILL_WAIT_S = 10.0
SERVICE_NAMES = ("s3", "mlflow", "ray", "server")  # start order: the store first, the server last
NODE_PREFIX = "ray-node-"  # the service name of an extra Ray node (`Stack.add_node`)
# Ray starts its workers at nice 15 so a busy node's control plane stays responsive; on a laptop the
# workers are the point, and at nice 15 the head's own processes (and the store) preempt training.
# Ray Train's controller moves a job through its states one poll of the workers at a time, every 2 s
# by default: seconds at every start and finish of a job (a smoke job, measured: 54 s → 46 s at 0.5).
# A worker group placed on a node that just joined waits for its first Python worker there (a minute and more
# on two busy cores): Ray Train's 60 s start-up limit would shrink an elastic job back instead of growing it.
# Ray Train asks for drained nodes every 5 s by default: a fifth of a short drain deadline gone before a job
# hears of it (the drills drain with 20 s).
RAY_HEAD_ENV = {"RAY_worker_niceness": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}
# `weed mini` otherwise allows as many volumes as the disk has free GiB at its start, one per bucket at
# least: on a disk with a few GiB free, the checkpoints bucket found no volume to grow into once its first
# filled, and every write failed with S3's InternalError (CI, 18 min into `make test`). Volumes are
# sparse files; what guards the disk is SeaweedFS's own minimum of free space (1 %), which it keeps.
WEED_VOLUME_MB = 256
WEED_MAX_VOLUMES = 400


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message says why and what to do."""


class StackPorts(BaseModel):
    """Every port the stack opens on 127.0.0.1 (SeaweedFS also opens each of its ports + 10000)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    s3: int = 8333
    mlflow: int = 5000
    ray: int = 6379
    ray_dashboard: int = 8265
    ray_client: int = 10001
    ray_agent: int = 52365
    ray_min_worker: int = 20000  # Ray's default range overlaps SeaweedFS's gRPC ports
    ray_max_worker: int = 20100
    weed_master: int = 9333
    weed_volume: int = 9340
    weed_filer: int = 8888
    weed_admin: int = 23646
    # The compound server's API (it runs the schedules too); read from ports.json as "scheduler" before it was one.
    server: int = Field(default=8766, validation_alias=AliasChoices("server", "scheduler"))

    @classmethod
    def free(cls, lane: int = 0, lanes: int = 1) -> StackPorts:
        """Ports that are free right now, for tests and side-by-side stacks; stacks picking at the same
        moment (one per test process) take different `lane`s of `lanes` and can never pick the same.

        All lie below the kernel's ephemeral range: a service stopped and started again (an outage drill,
        `compound up` after a crash) finds its ports still free, since nothing that asks the kernel for
        any port (client sockets, Ray's and gloo's listeners) is handed one there.
        """
        top = max(ephemeral_ports_start(), FREE_PORTS_FROM + GRPC_OFFSET + 1000)
        # SeaweedFS's ports come from the bottom, with their gRPC twins 10000 above; the others between.
        weed_band = min(top - FREE_PORTS_FROM - GRPC_OFFSET, GRPC_OFFSET // 2)
        chosen: set[int] = set()

        def pick(low: int, high: int, span: int = 1, with_grpc: bool = False) -> int:
            width = (high - low) // lanes
            low += lane * width
            for _ in range(10_000):
                start = low + secrets.randbelow(width - span)
                needed = set(range(start, start + span)) | ({start + GRPC_OFFSET} if with_grpc else set())
                if not needed & chosen and all(port_is_free(p) for p in needed):
                    chosen.update(needed)
                    return start
            raise StackError("could not find free ports on 127.0.0.1")

        weed_low, others_low, others_high = FREE_PORTS_FROM, FREE_PORTS_FROM + weed_band, FREE_PORTS_FROM + GRPC_OFFSET
        weed = {name: pick(weed_low, others_low, with_grpc=True)
                for name in ("s3", "weed_master", "weed_volume", "weed_filer", "weed_admin")}
        worker = pick(others_low, others_high, span=101)
        others = {name: pick(others_low, others_high)
                  for name in ("mlflow", "ray", "ray_dashboard", "ray_client", "ray_agent", "server")}
        return cls(**weed, **others, ray_min_worker=worker, ray_max_worker=worker + 100)


def ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default (no /proc: the ports chosen still work, unprotected)


@dataclass(frozen=True)
class Service:
    """One process of the stack and how to tell it is up."""

    name: str
    command: list[str]
    health_url: str
    ports: dict[str, int]  # what each port is for -> port, all checked free before starting
    env: dict[str, str] = field(default_factory=dict)
    healthy_statuses: tuple[int, ...] = (200,)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    healthy: bool
    log_file: Path


class Stack:
    """The four services of one state dir."""

    def __init__(self, home: Path) -> None:
        self.home = home.expanduser()
        self.new_mlflow_login = False  # set when this object made the MLflow password: `up` shows it once

    # -- paths -------------------------------------------------------------------------------------
    def _pid_file(self, name: str) -> Path:
        return self.home / "run" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    @property
    def ray_dir(self) -> Path:
        """Ray's session dir. Ray puts unix sockets in it, whose paths may not exceed 107 bytes, so
        it lives under a short path in the temp dir (one per state dir); `<home>/ray` links to it."""
        digest = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"compound-ray-{digest}"

    # -- configuration -----------------------------------------------------------------------------
    def saved_ports(self) -> StackPorts | None:
        path = self.home / "ports.json"
        return StackPorts.model_validate_json(path.read_text()) if path.is_file() else None

    @property
    def _identity_file(self) -> Path:
        return self.home / "s3" / "s3.json"

    @property
    def _tls(self) -> seaweed.Tls:
        return seaweed.Tls.at(self.home / "s3" / "tls")

    def settings_for(self, ports: StackPorts) -> Settings:
        """Endpoints for `ports`, with the S3 keys this state dir already has (or new ones)."""
        access_key, secret_key = self._s3_keys()
        return Settings(
            s3_endpoint=f"http://{HOST}:{ports.s3}",
            s3_access_key=SecretStr(access_key),
            s3_secret_key=SecretStr(secret_key),
            mlflow_tracking_uri=f"http://{HOST}:{ports.mlflow}",
            mlflow_username=MLFLOW_USER,
            mlflow_password=SecretStr(self._mlflow_password()),
            mlflow_promoter_username=MLFLOW_PROMOTER,
            mlflow_promoter_password=SecretStr(self._kept_secret("mlflow_promoter_password")
                                               or secrets.token_urlsafe(24)),
            ray_address=f"{HOST}:{ports.ray}",
            ray_dashboard_url=f"http://{HOST}:{ports.ray_dashboard}",
            ray_token=SecretStr(self._kept_secret("ray_token") or os.environ.get("COMPOUND_RAY_TOKEN")
                                or secrets.token_hex(32)),
            server_url=f"http://{HOST}:{ports.server}",
            server_token=SecretStr(self._kept_secret("server_token") or new_server_token()),
        )

    def _s3_keys(self) -> tuple[str, str]:
        """The keys of the settings file; else those SeaweedFS holds in its own identity file, so a
        damaged settings file locks no one out of the data already stored; else new ones."""
        path = self.home / SETTINGS_FILE
        try:
            values = read_settings_file(path)
            if keys := _key_pair(values.get("s3_access_key"), values.get("s3_secret_key")):
                return keys
            problem = f"{path} holds no S3 keys" if path.is_file() else None
        except ConfigError as error:
            problem = str(error)
        keys = seaweed.keys_in(self._identity_file)
        if problem is not None:
            recovery = (f"the S3 keys come from {self._identity_file}" if keys
                        else f"{self._identity_file} has no S3 keys either, so new ones are generated")
            log.warning("%s; %s, and `compound up` rewrites the settings file", problem, recovery)
        return keys or ("compound-" + secrets.token_hex(8), secrets.token_urlsafe(32))

    @property
    def _auth_db(self) -> Path:
        return self.home / "mlflow" / "basic_auth.db"

    @property
    def _secrets_copy(self) -> Path:
        return self.home / SECRETS_COPY

    def _kept_secret(self, field: str) -> str | None:
        """A secret of the settings file; else of the copy `up` keeps beside it: the running services were
        started with these, so a damaged settings file must not replace them with new ones."""
        for path in (self.home / SETTINGS_FILE, self._secrets_copy):
            with contextlib.suppress(ConfigError):
                value = read_settings_file(path).get(field)
                if isinstance(value, str) and value:
                    return value
        return None

    def _mlflow_password(self) -> str:
        """The kept one; else a new one, which becomes the stack's login in MLflow's users' store (the
        other users, the promoter's role and the grants stay)."""
        if password := self._kept_secret("mlflow_password"):
            return password
        password = secrets.token_urlsafe(24)
        if self._auth_db.exists():
            log.warning("no MLflow password in %s or %s: the stack's login in %s gets a new one",
                        self.home / SETTINGS_FILE, self._secrets_copy, self._auth_db)
            mlflow_auth.set_password(f"sqlite:///{self._auth_db}?timeout={SQLITE_BUSY_S}", MLFLOW_USER, password)
        self.new_mlflow_login = True
        return password

    def services(self, settings: Settings, ports: StackPorts) -> list[Service]:
        bin_dir = Path(sysconfig.get_path("scripts"))
        s3_dir, mlflow_dir = self.home / "s3", self.home / "mlflow"
        origin = f"http://{HOST}:{ports.s3}"  # the S3 API's own: no web page elsewhere may call it
        weed_ports = {
            "S3 API": ports.s3, "SeaweedFS master": ports.weed_master, "SeaweedFS volume": ports.weed_volume,
            "SeaweedFS filer": ports.weed_filer, "SeaweedFS admin": ports.weed_admin,
        }
        weed_ports |= {f"{label} gRPC": port + GRPC_OFFSET for label, port in weed_ports.items()}
        s3 = Service(
            name="s3",
            command=[
                str(bin_dir / "weed"), "mini", f"-dir={s3_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
                "-master.telemetry=false", f"-s3.config={self._identity_file}", f"-s3.allowedOrigins={origin}",
                f"-filer.allowedOrigins={origin}", "-admin.ui=false",
                f"-s3.port={ports.s3}", f"-s3.port.grpc={ports.s3 + GRPC_OFFSET}",
                f"-master.port={ports.weed_master}", f"-master.port.grpc={ports.weed_master + GRPC_OFFSET}",
                f"-volume.port={ports.weed_volume}", f"-volume.port.grpc={ports.weed_volume + GRPC_OFFSET}",
                f"-filer.port={ports.weed_filer}", f"-filer.port.grpc={ports.weed_filer + GRPC_OFFSET}",
                f"-admin.port={ports.weed_admin}", f"-admin.port.grpc={ports.weed_admin + GRPC_OFFSET}",
                "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-master.volumeSizeLimitMB={WEED_VOLUME_MB}", f"-volume.max={WEED_MAX_VOLUMES}",
            ],
            health_url=f"http://{HOST}:{ports.s3}/",
            healthy_statuses=(403,),  # anonymous requests are refused once the keys are loaded
            ports=weed_ports,
            env=seaweed.environment(self._tls),
        )
        mlflow = Service(
            name="mlflow",
            command=[
                sys.executable, "-m", "mlflow", "server", "--app-name", "compound-auth",
                # SQLite's busy timeout: a request waits for another's write instead of failing at 5 s (a 503)
                "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}?timeout={SQLITE_BUSY_S}",
                "--artifacts-destination", f"s3://{settings.mlflow_bucket}/",
                "--host", HOST, "--port", str(ports.mlflow), "--workers", "1",
            ],
            health_url=f"http://{HOST}:{ports.mlflow}/health",
            ports={"MLflow server": ports.mlflow},
            # The stack's login is the auth app's admin and the promoter its promoter, both made at its start
            # (passwords in the environment, never on the command line); users without a grant may do nothing.
            env={**settings.s3_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                 "MLFLOW_AUTH_CONFIG_PATH": str(mlflow_dir / "basic_auth.ini"),
                 "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_USER,
                 "MLFLOW_AUTH_ADMIN_PASSWORD": settings.mlflow_password.get_secret_value(),
                 mlflow_auth.PROMOTER_USERNAME_ENV: MLFLOW_PROMOTER,
                 mlflow_auth.PROMOTER_PASSWORD_ENV: settings.mlflow_promoter_password.get_secret_value(),
                 "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32)},  # signs the UI's sessions
        )
        ray = Service(
            name="ray",
            command=[
                str(bin_dir / "ray"), "start", "--head", "--block", "--disable-usage-stats",
                f"--num-cpus={os.cpu_count() or 1}", f"--node-ip-address={HOST}", f"--port={ports.ray}",
                f"--dashboard-host={HOST}", f"--dashboard-port={ports.ray_dashboard}",
                f"--ray-client-server-port={ports.ray_client}", f"--dashboard-agent-listen-port={ports.ray_agent}",
                f"--min-worker-port={ports.ray_min_worker}", f"--max-worker-port={ports.ray_max_worker}",
                f"--temp-dir={self.ray_dir}",
            ],
            health_url=f"http://{HOST}:{ports.ray_dashboard}/api/gcs_healthz",  # open; the rest asks for the token
            ports={"Ray GCS": ports.ray, "Ray dashboard": ports.ray_dashboard, "Ray client": ports.ray_client,
                   "Ray dashboard agent": ports.ray_agent},
            env=self._ray_env(settings),  # jobs run with this interpreter (PATH)
        )
        server = Service(
            name="server",
            command=[sys.executable, "-m", "server", "--port", str(ports.server)],
            health_url=f"http://{HOST}:{ports.server}/health",
            ports={"compound server": ports.server},
            # Its database URL (which may hold a password) and the owner's token: environment, not command line.
            env={**RAY_CLIENT_ENV, **settings.mlflow_env(), **settings.ray_env(), "COMPOUND_HOME": str(self.home),
                 "COMPOUND_SCHEDULER_STORE": settings.scheduler_store or default_scheduler_store(self.home),
                 "COMPOUND_SERVER_ADMIN": SERVER_ADMIN,
                 "COMPOUND_SERVER_ADMIN_TOKEN": settings.server_token.get_secret_value()},
        )
        return [s3, mlflow, ray, server]

    # -- lifecycle ---------------------------------------------------------------------------------
    def up(self, ports: StackPorts | None = None, timeout_s: float = STARTUP_TIMEOUT_S) -> tuple[Settings, list[str]]:
        """Start whatever is not running; returns the settings and the names of the services started."""
        saved = self.saved_ports()
        ports = ports or saved or StackPorts()
        running = {name for name in SERVICE_NAMES if self._process(name) is not None}
        if running and saved is not None and saved != ports:
            raise StackError(
                f"the stack in {self.home} is running ({', '.join(sorted(running))}) on other ports; "
                "run `compound down` first to change ports"
            )
        settings = self.settings_for(ports)
        services = self.services(settings, ports)
        to_start = [s for s in services if s.name not in running]
        for service in to_start:
            _check_ports_free(service)

        for directory in ("s3", "mlflow", "logs", "run"):
            (self.home / directory).mkdir(parents=True, exist_ok=True)
        self.ray_dir.mkdir(mode=0o700, exist_ok=True)
        if not (self.home / "ray").is_symlink():
            (self.home / "ray").symlink_to(self.ray_dir)
        self.home.chmod(0o700)  # keys, certificates and the data are the owner's alone
        write_private(self._identity_file, seaweed.identities(settings))
        self._tls.ensure()
        (self.home / "mlflow" / "basic_auth.ini").write_text(
            f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = sqlite:///{self._auth_db}?timeout={SQLITE_BUSY_S}\n"
            f"authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # A password check is a PBKDF2 hash, 220 ms a request here: checked once per 5 minutes instead.
            f"auth_cache_ttl_seconds = {MLFLOW_LOGIN_CACHE_S}\n")
        (self.home / "ports.json").write_text(ports.model_dump_json(indent=2))

        started: list[Service] = []
        try:
            for service in to_start:
                self._start(service)
                started.append(service)
            deadline = time.monotonic() + timeout_s
            for service in services:
                self._wait_healthy(service, deadline)
            self._create_buckets(settings, deadline)
        except BaseException:
            for service in reversed(started):  # leave nothing half-started behind
                self.stop_service(service.name)
            raise
        write_settings(settings, self.home)
        write_private(self._secrets_copy, json.dumps({field: getattr(settings, field).get_secret_value()
                                                     for field in KEPT_SECRETS}))
        return settings, [s.name for s in started]

    def down(self, *, grace_s: float = STOP_TIMEOUT_S) -> list[str]:
        """Stop the services this state dir's `up` started; returns the names stopped. Each may take
        `grace_s` to exit before it is killed (0: killed at once, its state not needed again)."""
        stopped = []
        for name in [*self.nodes(), *reversed(SERVICE_NAMES)]:  # the head's extra nodes, clients, the store last
            if self.stop_service(name, grace_s=grace_s):
                stopped.append(name)
        return stopped

    def status(self) -> list[ServiceStatus]:
        result = []
        ports = self.saved_ports()
        urls = {}
        if ports is not None:
            urls = {s.name: (s.health_url, s.healthy_statuses) for s in self.services(self.settings_for(ports), ports)}
        for name in SERVICE_NAMES:
            process = self._process(name)
            healthy = process is not None and name in urls and _answers(*urls[name])
            result.append(ServiceStatus(name, process.pid if process else None, healthy, self.log_file(name)))
        return result

    # -- extra Ray nodes (drills of a changing cluster) ---------------------------------------------
    def add_node(self, name: str, *, num_cpus: int = 1, resources: dict[str, float] | None = None,
                 timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Start one more Ray node on this machine, `name` in the cluster, and wait until the head has it.
        Stopped with `stop_service(NODE_PREFIX + name)` (drained, or killed with grace_s=0) and by `down`.
        Give each node a name of its own: one killed moments ago stays alive to Ray under its name until its
        health checks fail (15 s), and `wait` and `drain_node` would find that one."""
        address, settings = self._running_head()
        service = Service(
            name=NODE_PREFIX + name,
            command=[sys.executable, "-m", "infra.ray_node", "start", f"--address={address}", "--block",
                     "--disable-usage-stats", f"--num-cpus={num_cpus}", f"--node-ip-address={HOST}",
                     f"--node-name={name}", "--dashboard-agent-listen-port=0",
                     *([f"--resources={json.dumps(resources)}"] if resources else [])],
            health_url="", ports={},
            env={**self._ray_env(settings), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"},
        )
        self._start(service)
        self._node_command("wait", address, name, str(timeout_s), settings=settings)

    def drain_node(self, name: str, *, deadline_s: float) -> None:
        """Tell the cluster that node `name` goes in `deadline_s`, as a spot reclaim would (Ray's drain)."""
        address, settings = self._running_head()
        self._node_command("drain", address, name, str(deadline_s), settings=settings)

    def nodes(self) -> list[str]:
        """The service names of the extra Ray nodes running."""
        run = self.home / "run"
        names = [path.stem for path in run.glob(f"{NODE_PREFIX}*.pid")] if run.is_dir() else []
        return sorted(name for name in names if self._process(name) is not None)

    def _running_head(self) -> tuple[str, Settings]:
        """The Ray head's GCS address and the stack's settings; `StackError` if the head is not running."""
        ports = self.saved_ports()
        if ports is None or self._process("ray") is None:
            raise StackError("the stack's Ray head is not running: `compound up` first")
        return f"{HOST}:{ports.ray}", self.settings_for(ports)

    def _node_command(self, *args: str, settings: Settings) -> None:
        result = subprocess.run([sys.executable, "-m", "infra.ray_node", *args], capture_output=True, text=True,
                                check=False, env={**os.environ, **self._ray_env(settings)}, cwd=self.home)
        if result.returncode:
            raise StackError(f"ray node {args[0]} failed: {(result.stderr or result.stdout).strip()[-2000:]}")

    def _ray_env(self, settings: Settings) -> dict[str, str]:
        """What the cluster's processes run with: jobs find the stack's settings in COMPOUND_HOME, workers take
        the S3 keys from AWS_* (as on Kubernetes) and everything the Ray token."""
        bin_dir = Path(sysconfig.get_path("scripts"))
        return {**RAY_CLIENT_ENV, **RAY_HEAD_ENV, **settings.s3_env(), **settings.mlflow_env(), **settings.ray_env(),
                "COMPOUND_HOME": str(self.home), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    # -- processes ---------------------------------------------------------------------------------
    def _start(self, service: Service) -> None:
        log.info("starting %s", service.name)
        with self.log_file(service.name).open("ab") as log_file:
            # A session of its own: the process group is the service, and ^C in the shell that
            # ran `compound up` does not reach it.
            process = subprocess.Popen(
                service.command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **service.env}, cwd=self.home, start_new_session=True,
            )
        created = psutil.Process(process.pid).create_time()
        self._pid_file(service.name).write_text(json.dumps({"pid": process.pid, "created": created}))

    def _process(self, name: str) -> psutil.Process | None:
        """The service's process if its pid file names a live process that is still the one started."""
        path = self._pid_file(name)
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        try:
            process = psutil.Process(record["pid"])
            if abs(process.create_time() - record["created"]) < 1e-3 and process.status() != psutil.STATUS_ZOMBIE:
                return process
        except psutil.NoSuchProcess:
            pass
        path.unlink()  # stale: the process is gone (or the pid was reused by another)
        return None

    def _wait_healthy(self, service: Service, deadline: float) -> None:
        while not _answers(service.health_url, service.healthy_statuses):
            if self._process(service.name) is None:
                raise StackError(f"{service.name} exited during start-up.\n{self._log_tail(service.name)}")
            if time.monotonic() > deadline:
                raise StackError(f"{service.name} did not become healthy in time.\n{self._log_tail(service.name)}")
            time.sleep(0.25)
        log.debug("%s is up", service.name)

    def _create_buckets(self, settings: Settings, deadline: float) -> None:
        """Create the missing buckets through the S3 API, retrying while the store warms up.

        `weed -bucket` once left a bucket uncreated for a whole start-up (404 throughout); asking
        the API ourselves retries what is transient and says what went wrong if it never works.
        """
        client = settings.s3_client()
        for bucket in settings.buckets:
            while (error := _create_bucket(client, bucket)) is not None:
                if not _is_transient(error) or time.monotonic() > deadline:
                    raise StackError(f"could not create the S3 bucket {bucket!r}: {error}\n{self._log_tail('s3')}")
                time.sleep(0.25)

    def stop_service(self, name: str, *, grace_s: float = STOP_TIMEOUT_S) -> bool:
        """Stop one service this state dir's `up` started; False if it was not running."""
        process = self._process(name)
        if process is None:
            return False
        log.info("stopping %s (pid %d)", name, process.pid)
        group = os.getpgid(process.pid)
        if grace_s > 0:  # none: killed outright (a raylet told to stop first drains its node: a notice)
            process.terminate()  # the leader stops its children itself (Ray drains its node first)
            with contextlib.suppress(psutil.TimeoutExpired):
                process.wait(grace_s)
        left = _group_members(group)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)  # whatever of the group is left
        psutil.wait_procs([process, *left], timeout=KILL_WAIT_S)  # all gone, their ports free, before a restart
        self._pid_file(name).unlink(missing_ok=True)
        return True

    def _log_tail(self, name: str) -> str:
        path = self.log_file(name)
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:] if path.is_file() else []
        return f"last lines of {path}:\n" + "\n".join("    " + line for line in lines)


def _group_members(group: int) -> list[psutil.Process]:
    """The live processes of a process group (a service's, all started in its session)."""
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == group:
                members.append(process)
    return members


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    # Some services bind the IPv4-mapped IPv6 address instead; that must be free too.
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("::ffff:127.0.0.1", port))
        except OSError:
            return False
    return True


def _check_ports_free(service: Service) -> None:
    taken = [f"port {port} ({label})" for label, port in service.ports.items() if not port_is_free(port)]
    if taken:
        raise StackError(
            f"cannot start {service.name}: {', '.join(taken)} already in use on {HOST} by another process. "
            "Stop that process, or choose other ports (see `compound up --help`)."
        )


def _answers(url: str, statuses: tuple[int, ...]) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status in statuses
    except urllib.error.HTTPError as error:
        return error.code in statuses
    except (urllib.error.URLError, OSError):
        return False


def _create_bucket(client, bucket: str) -> Exception | None:  # client: a botocore S3 client
    """Create `bucket` unless it exists; returns the error if that failed."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as error:
        return None if error.response["Error"]["Code"] in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"} else error
    except BotoCoreError as error:  # connection refused or reset, timeouts
        return error
    log.info("created S3 bucket %r", bucket)
    return None


def _is_transient(error: Exception) -> bool:
    """Worth retrying: no connection yet, or a 5xx, which is how SeaweedFS answers while its filer
    is not reachable yet (InternalError, ServiceUnavailable). A 4xx such as InvalidAccessKeyId
    will not pass by waiting: a running store keeps the keys it started with."""
    from botocore.exceptions import ClientError

    if not isinstance(error, ClientError):
        return True
    return error.response["ResponseMetadata"].get("HTTPStatusCode", 500) >= 500


def _key_pair(access_key: object, secret_key: object) -> tuple[str, str] | None:
    if isinstance(access_key, str) and isinstance(secret_key, str) and access_key and secret_key:
        return access_key, secret_key
    return None
