"""One settings object for every package: where the S3 store, MLflow and Ray are, and the S3 keys.

Read from the file `compound up` writes (`$COMPOUND_HOME/settings.json`, default `~/.compound`)
and then from `COMPOUND_*` environment variables, which win. At scale, set the variables (or
write the file) to point at AWS S3, a shared MLflow server and a Ray cluster; nothing else in
compound hard-codes an endpoint.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

DEFAULT_HOME = Path("~/.compound")
SETTINGS_FILE = "settings.json"

# Ray binds every interface, or hangs resolving the host's IP, unless this is set in the head's
# and every client's environment.
RAY_CLIENT_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class ConfigError(RuntimeError):
    """Settings are missing or malformed; the message says how to fix them."""


class Settings(BaseModel):
    """Endpoints and credentials. Secrets are `SecretStr`: they print as '**********'."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    s3_endpoint: str = Field(description="S3 API URL, e.g. http://127.0.0.1:8333; empty for AWS S3")
    # Both or neither: without keys boto3 uses its default chain (instance profile, IRSA, ~/.aws).
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_region: str = "us-east-1"
    # How long a shard read keeps retrying through a store outage before the job fails.
    s3_retry_window_s: float = Field(default=180.0, gt=0)
    mlflow_tracking_uri: str
    # The MLflow server's login (its basic-auth app); both or neither, for a server that asks nobody.
    mlflow_username: str | None = None
    mlflow_password: SecretStr | None = None
    # The login that moves `champion` (a user with the promoter role, infra/mlflow_auth.py); both or
    # neither: without it promotion uses the login above, which a compound-auth server refuses.
    mlflow_promoter_username: str | None = None
    mlflow_promoter_password: SecretStr | None = None
    ray_address: str = Field(description="GCS address of the Ray head, host:port")
    ray_dashboard_url: str = Field(description="Ray dashboard and job server, http://host:port")
    # The cluster's token (Ray's token auth); None for a cluster that asks nobody.
    ray_token: SecretStr | None = None
    shards_bucket: str = "shards"
    checkpoints_bucket: str = "checkpoints"
    mlflow_bucket: str = "mlflow"
    # The server's database (schedules, users, audit; SQLAlchemy URL, e.g. postgresql://…); default: SQLite
    # in the stack's home.
    scheduler_store: str | None = None
    # The compound server (`compound server`): its URL and this client's bearer token.
    server_url: str | None = None
    server_token: SecretStr | None = None

    @model_validator(mode="after")
    def _keys_come_in_pairs(self) -> Settings:
        if (self.s3_access_key is None) != (self.s3_secret_key is None):
            raise ValueError("set both s3_access_key and s3_secret_key, or neither (to use AWS's default credentials)")
        if (self.mlflow_username is None) != (self.mlflow_password is None):
            raise ValueError("set both mlflow_username and mlflow_password, or neither (for a server without auth)")
        if (self.mlflow_promoter_username is None) != (self.mlflow_promoter_password is None):
            raise ValueError("set both mlflow_promoter_username and mlflow_promoter_password, or neither")
        return self

    @property
    def buckets(self) -> tuple[str, str, str]:
        return (self.shards_bucket, self.checkpoints_bucket, self.mlflow_bucket)

    def s3_client(self):  # -> botocore S3 client; boto3 is imported only where S3 is used
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.s3_endpoint or None, region_name=self.s3_region,
            aws_access_key_id=_reveal(self.s3_access_key), aws_secret_access_key=_reveal(self.s3_secret_key),
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"}),
        )

    def s3_env(self) -> dict[str, str]:
        """Environment with the S3 credentials, for processes that must reach S3 directly."""
        env = {"AWS_DEFAULT_REGION": self.s3_region}
        if self.s3_access_key is not None:
            env["AWS_ACCESS_KEY_ID"] = _reveal(self.s3_access_key)
            env["AWS_SECRET_ACCESS_KEY"] = _reveal(self.s3_secret_key)
        if self.s3_endpoint:
            env["AWS_ENDPOINT_URL_S3"] = env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
        return env


    def mlflow_env(self) -> dict[str, str]:
        """Environment with the MLflow login: MLflow's clients read it there, request by request."""
        if self.mlflow_username is None:
            return {}
        return {"MLFLOW_TRACKING_USERNAME": self.mlflow_username,
                "MLFLOW_TRACKING_PASSWORD": _reveal(self.mlflow_password)}

    def promoter_login(self) -> tuple[str, str] | None:
        """The promoter's username and password, for the promotion path alone (the stack's own login where
        none is set; None for a server without auth); never exported to workers or jobs."""
        if self.mlflow_promoter_username is not None:
            return self.mlflow_promoter_username, _reveal(self.mlflow_promoter_password)
        if self.mlflow_username is not None:
            return self.mlflow_username, _reveal(self.mlflow_password)
        return None

    def ray_env(self) -> dict[str, str]:
        """Environment with the Ray token: Ray's clients, drivers and workers read it there (none: a
        cluster without token auth, Ray's default)."""
        if self.ray_token is None:
            return {}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _reveal(self.ray_token)}


def new_server_token() -> str:
    """A compound server token: 256 random bits, prefixed so a leaked one is recognisable in a scan."""
    return "cpd_" + secrets.token_urlsafe(32)


def _reveal(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret is not None else None


def compound_home() -> Path:
    """The state dir: `$COMPOUND_HOME`, default `~/.compound`."""
    return Path(os.environ.get("COMPOUND_HOME") or DEFAULT_HOME).expanduser()


def default_scheduler_store(home: Path) -> str:
    """The scheduler's job store when the settings name none: SQLite in the stack's home."""
    return f"sqlite:///{home.expanduser() / 'scheduler' / 'schedules.db'}"


def _env_name(field: str) -> str:
    return f"COMPOUND_{field.upper()}"


def load_settings(home: Path | None = None) -> Settings:
    """The settings file of `home` (default: `compound_home()`), overridden by `COMPOUND_*` variables."""
    path = (home or compound_home()) / SETTINGS_FILE
    try:
        values = read_settings_file(path)
    except ConfigError as error:
        raise ConfigError(f"{error}; run `compound up` to rewrite it") from None
    for field in Settings.model_fields:
        if (value := os.environ.get(_env_name(field))) is not None:
            values[field] = value
    try:
        settings = Settings(**values)
    except ValidationError as error:
        missing = [str(e["loc"][0]) for e in error.errors() if e["type"] == "missing"]
        if missing and not path.is_file():
            raise ConfigError(
                f"no stack settings at {path}: run `compound up` for the local stack, or set "
                + ", ".join(_env_name(f) for f in missing)
            ) from None
        raise ConfigError(f"invalid settings ({path} and COMPOUND_* variables): {error}") from None
    # Every MLflow and Ray client of this process logs in as the settings say (both take the login from
    # the environment); drivers and workers on the cluster have it in theirs from the Ray head.
    os.environ.update(settings.mlflow_env() | settings.ray_env())
    return settings


def read_settings_file(path: Path) -> dict[str, object]:
    """The raw values of a settings file, unvalidated; empty if there is no file.

    The one reader of the file: `load_settings` validates what it returns, and `compound up`
    takes the S3 keys from it (and can recover from a `ConfigError` here).
    """
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_bytes())
    except OSError as error:
        raise ConfigError(f"{path} cannot be read ({error.strerror})") from None
    except ValueError as error:  # bad JSON, or bytes that are not text at all
        raise ConfigError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        found = "null" if values is None else type(values).__name__
        raise ConfigError(f"{path} holds a JSON {found}, not an object of settings")
    return values


def write_settings(settings: Settings, home: Path) -> Path:
    """Write the settings file readable by its owner only (it holds the S3 secret, the MLflow passwords and the Ray and server tokens)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / SETTINGS_FILE
    data = settings.model_dump(mode="json")
    data["s3_access_key"] = _reveal(settings.s3_access_key)
    data["s3_secret_key"] = _reveal(settings.s3_secret_key)
    data["mlflow_password"] = _reveal(settings.mlflow_password)
    data["mlflow_promoter_password"] = _reveal(settings.mlflow_promoter_password)
    data["ray_token"] = _reveal(settings.ray_token)
    data["server_token"] = _reveal(settings.server_token)
    write_private(path, json.dumps(data, indent=2))
    return path


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, replacing any old one whole."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
