import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from infra.settings import ConfigError, Settings, compound_home, load_settings, write_settings

SETTINGS = Settings(
    s3_endpoint="http://127.0.0.1:8333", s3_access_key=SecretStr("AK"), s3_secret_key=SecretStr("very-secret"),
    mlflow_tracking_uri="http://127.0.0.1:5000", ray_address="127.0.0.1:6379",
    ray_dashboard_url="http://127.0.0.1:8265",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for field in Settings.model_fields:
        monkeypatch.delenv(f"COMPOUND_{field.upper()}", raising=False)
    monkeypatch.delenv("COMPOUND_HOME", raising=False)


def test_round_trip_through_the_file_keeps_secrets_private(tmp_path: Path) -> None:
    path = write_settings(SETTINGS, tmp_path)
    assert path.stat().st_mode & 0o077 == 0
    assert load_settings(tmp_path) == SETTINGS
    assert "very-secret" not in repr(load_settings(tmp_path))


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_settings(SETTINGS, tmp_path)
    monkeypatch.setenv("COMPOUND_S3_ENDPOINT", "https://s3.example.internal")
    monkeypatch.setenv("COMPOUND_MLFLOW_TRACKING_URI", "http://mlflow.team:5000")
    settings = load_settings(tmp_path)
    assert settings.s3_endpoint == "https://s3.example.internal"
    assert settings.mlflow_tracking_uri == "http://mlflow.team:5000"
    assert settings.ray_address == SETTINGS.ray_address


def test_environment_alone_is_enough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for field, value in SETTINGS.model_dump(exclude_none=True).items():
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        monkeypatch.setenv(f"COMPOUND_{field.upper()}", str(raw))
    assert load_settings(tmp_path / "nothing-here") == SETTINGS


def test_missing_settings_say_how_to_fix_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run `compound up`.*COMPOUND_S3_ENDPOINT"):
        load_settings(tmp_path)


def test_malformed_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "settings.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"settings\.json is not valid JSON"):
        load_settings(tmp_path)
    (tmp_path / "settings.json").write_text(json.dumps({**SETTINGS.model_dump(mode="json"), "s3_endpiont": "x"}))
    with pytest.raises(ConfigError, match="s3_endpiont"):
        load_settings(tmp_path)


@pytest.mark.parametrize(("content", "problem"), [
    (b"[1, 2]", "holds a JSON list, not an object"),
    (b"null", "holds a JSON null, not an object"),
    (b"\x80\x81 not text", "is not valid JSON"),
])
def test_file_that_is_no_settings_object_is_named(tmp_path: Path, content: bytes, problem: str) -> None:
    (tmp_path / "settings.json").write_bytes(content)
    with pytest.raises(ConfigError, match=rf"settings\.json {problem}.*run `compound up` to rewrite it"):
        load_settings(tmp_path)


def test_home_defaults_and_follows_compound_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert compound_home() == Path("~/.compound").expanduser()
    monkeypatch.setenv("COMPOUND_HOME", str(tmp_path))
    assert compound_home() == tmp_path


def test_only_the_s3_environment_carries_the_secret() -> None:
    assert "very-secret" not in SETTINGS.model_dump_json()  # secrets print masked
    assert SETTINGS.s3_env()["AWS_SECRET_ACCESS_KEY"] == "very-secret"


def test_keys_come_in_pairs_or_not_at_all() -> None:
    without_keys = SETTINGS.model_copy(update={"s3_access_key": None, "s3_secret_key": None})
    assert "AWS_ACCESS_KEY_ID" not in without_keys.s3_env()
    with pytest.raises(ValueError, match="both s3_access_key and s3_secret_key"):
        Settings(**{**SETTINGS.model_dump(), "s3_secret_key": None})
