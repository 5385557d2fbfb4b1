"""`compound registry …`: the registered models, their versions with lineage and figures, and the gated
promotion of a version to `champion` (or a rollback to the previous champion)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click
from rich.table import Table

from compound.cli.common import (
    console,
    exits_cleanly_on,
    home_option,
    json_option,
    server_errors,
    settings_of,
)

REJECTED_EXIT = 3  # a promotion the gate refused: not an error, but not what was asked


@click.group()
def registry() -> None:
    """The MLflow model registry: versions, aliases (champion, challenger), promotion and rollback."""


def _mlflow(settings):
    from mlflow import MlflowClient

    return MlflowClient(settings.mlflow_tracking_uri)


def _registry_errors(function):
    """A missing model or version, or a held lock → a clear message and exit 1."""
    import functools

    @functools.wraps(function)
    @exits_cleanly_on("pipelines.registry.RegistryError")
    def wrapper(*args, **kwargs):
        from mlflow.exceptions import MlflowException

        try:
            return function(*args, **kwargs)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise click.ClickException(f"{str(error).splitlines()[0]}; `compound registry list` shows the "
                                           "registered models") from None
            raise click.ClickException(f"the MLflow server failed: {str(error).splitlines()[0][:300]}") from None
    return wrapper


@registry.command("list")
@json_option
@home_option
@_registry_errors
@server_errors
def list_(as_json: bool, home: Path | None) -> None:
    """Every registered model, its latest version and its aliases."""
    from pipelines.registry import models as registered_models

    settings = settings_of(home)
    models = _through_server(settings, "GET", "/api/registry")
    if models is None:
        models = registered_models(_mlflow(settings))
    if as_json:
        click.echo(json.dumps(models))
        return
    table = Table("model", "versions", "latest", "aliases")
    for model in models:
        aliases = ", ".join(f"{alias}=v{version}" for alias, version in sorted(model["aliases"].items()))
        table.add_row(model["name"], str(model["versions"]), f"v{model['latest']}" if model["latest"] else "-",
                      aliases or "-")
    console.print(table)


@registry.command("show")
@click.argument("name")
@json_option
@home_option
@_registry_errors
@server_errors
def show(name: str, as_json: bool, home: Path | None) -> None:
    """NAME's versions: aliases, figures, lineage, the last promotion decision; and the champion history."""
    from jobs.tags import CODE_VERSION_TAG
    from pipelines.registry import (
        DATASET_ID_TAG,
        DECISION_TAG,
        PIPELINE_RUN_TAG,
        REASONS_TAG,
        RECIPE_TAG,
        TEACHER_RUN_TAG,
        figures_of,
        model_view,
    )

    settings = settings_of(home)
    found = _through_server(settings, "GET", f"/api/registry/{name}")
    if found is None:
        found = model_view(_mlflow(settings), name)
    shown, changes = found["versions"], found["history"]
    if as_json:
        click.echo(json.dumps({"name": name, "versions": shown, "history": changes}))
        return
    table = Table("version", "aliases", "int8 top-1", "int8 vs fp32", "int8 ms", "recipe", "decision", "lineage",
                  title=f"model {name}")
    def figure(tags: dict[str, str], key: str, fmt: str) -> str:
        value = figures_of(tags).get(key)
        return "-" if value is None else fmt.format(value)

    for v in shown:
        tags = v["tags"]
        lineage = "\n".join(f"{key.removeprefix('compound.')}={tags[key]}" for key in
                            (PIPELINE_RUN_TAG, TEACHER_RUN_TAG, DATASET_ID_TAG, CODE_VERSION_TAG) if tags.get(key))
        table.add_row(f"v{v['version']}", ", ".join(v["aliases"]) or "-", figure(tags, "int8_top1", "{:.2%}"),
                      figure(tags, "int8_change_points", "{:+.2f}"), figure(tags, "int8_latency_ms", "{:.2f}"),
                      tags.get(RECIPE_TAG, "-"), tags.get(DECISION_TAG, "-"), lineage or "-")
    console.print(table)
    for v in shown:
        if v["tags"].get(REASONS_TAG):
            console.print(f"v{v['version']} {v['tags'][DECISION_TAG]}:\n  " +
                          v["tags"][REASONS_TAG].replace("\n", "\n  "), highlight=False, soft_wrap=True)
    if changes:
        console.print("champion history: " + ", ".join(
            f"v{c['version']} ({c['action']} {c['at']})" for c in changes), highlight=False, soft_wrap=True)


@registry.command("promote")
@click.argument("name")
@click.option("--version", "version", required=True, type=click.IntRange(min=1), help="The version to promote.")
@click.option("--force", is_flag=True, help="Promote even if the gate does not hold (say why with --reason).")
@click.option("--reason", default=None, help="Why; recorded with the decision.")
@json_option
@home_option
@_registry_errors
@server_errors
def promote(name: str, version: int, force: bool, reason: str | None, as_json: bool, home: Path | None) -> None:
    """Make version V of NAME the champion if its gate holds (the gate its pipeline recorded on it).

    Exits 3 when the gate refuses; the decision and its reasons are recorded on the version either way.
    """
    if force and not reason:
        raise click.UsageError("--force needs a --reason: it is recorded with the decision")
    settings = settings_of(home)
    decision = _through_server(settings, "POST", f"/api/registry/{name}/promote",
                               {"version": version, "force": force, "reason": reason})
    if decision is None:  # no server in the settings: promoted here, as the promoter the settings name
        from pipelines.registry import promote as promote_version

        decision = asdict(promote_version(settings, name=name, version=version, force=force, reason=reason))
    _print_decision(decision, as_json)
    if decision["action"] == "rejected":
        sys.exit(REJECTED_EXIT)


@registry.command("rollback")
@click.argument("name")
@click.option("--reason", default=None, help="Why; recorded with the rollback.")
@json_option
@home_option
@_registry_errors
@server_errors
def rollback(name: str, reason: str | None, as_json: bool, home: Path | None) -> None:
    """Make the previous champion of NAME champion again, recorded as a rollback."""
    settings = settings_of(home)
    decision = _through_server(settings, "POST", f"/api/registry/{name}/rollback", {"reason": reason})
    if decision is None:
        from pipelines.registry import rollback as rollback_model

        decision = asdict(rollback_model(settings, name=name, reason=reason))
    _print_decision(decision, as_json)


def _through_server(settings, method: str, path: str, body: dict | None = None):
    """What the server answers, where the settings name one (it checks the caller's role, audits changes,
    promotes as the promoter and reads MLflow with its own login); None where they name none."""
    from server.client import ServerClient

    return ServerClient.of(settings).request(method, path, body) if settings.server_url else None


def _print_decision(decision: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(decision))
        return
    style = "red" if decision["action"] == "rejected" else "green"
    console.print(f"model {decision['model']} v{decision['version']}: [{style}]{decision['action']}[/{style}]; "
                  f"champion: {'v' + str(decision['champion']) if decision['champion'] else 'none'}", highlight=False)
    for line in decision["reasons"]:
        console.print(f"  {line}", highlight=False, markup=False)
