"""`compound user …` and `compound audit`: the server's users (a token each, a team and a role) and its
audit log. Only an admin may run them."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from compound.cli.common import console, home_option, json_option, server_errors, server_of
from server.users import ROLES


@click.group()
def user() -> None:
    """The compound server's users: bearer tokens, teams and roles (viewer < submitter < promoter < admin)."""


@user.command("add")
@click.argument("name")
@click.option("--team", required=True, help="The team whose quota the user's jobs count against.")
@click.option("--role", required=True, type=click.Choice(ROLES), help="What the user may do.")
@json_option
@home_option
@server_errors
def add(name: str, team: str, role: str, as_json: bool, home: Path | None) -> None:
    """Add a user; prints their token and MLflow password once (neither is kept in the clear)."""
    made = server_of(home).request("POST", "/api/users", {"name": name, "team": team, "role": role})
    if as_json:
        click.echo(json.dumps(made))
        return
    console.print(f"user {made['name']} ({made['role']}, team {made['team']}) added. Shown once:\n"
                  f"  token (COMPOUND_SERVER_TOKEN): [bold]{made['token']}[/bold]\n"
                  f"  MLflow UI login: {made['name']} / [bold]{made['mlflow_password']}[/bold]",
                  highlight=False, soft_wrap=True)


@user.command("list")
@json_option
@home_option
@server_errors
def list_(as_json: bool, home: Path | None) -> None:
    """Every user, revoked ones included."""
    found = server_of(home).request("GET", "/api/users")
    if as_json:
        click.echo(json.dumps(found))
        return
    table = Table("user", "team", "role", "created", "revoked")
    for u in found:
        table.add_row(u["name"], u["team"], u["role"], u["created"][:19], (u["revoked"] or "-")[:19])
    console.print(table)


@user.command("revoke")
@click.argument("name")
@home_option
@server_errors
def revoke(name: str, home: Path | None) -> None:
    """Revoke NAME's token and remove their MLflow login."""
    server_of(home).request("POST", f"/api/users/{name}/revoke")
    console.print(f"user {name}: revoked")


@click.command()
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1), help="How many, newest first.")
@json_option
@home_option
@server_errors
def audit(limit: int, as_json: bool, home: Path | None) -> None:
    """The server's audit log: who did what, when, and how it ended (refusals included)."""
    entries = server_of(home).request("GET", "/api/audit", limit=limit)
    if as_json:
        click.echo(json.dumps(entries))
        return
    table = Table("when (UTC)", "who", "action", "target", "outcome", "detail")
    for e in entries:
        table.add_row(e["at"][:19], e["who"], e["action"], e["target"] or "-", e["outcome"], e["detail"] or "")
    console.print(table)


@user.command("whoami")
@json_option
@home_option
@server_errors
def whoami(as_json: bool, home: Path | None) -> None:
    """The user the settings' token belongs to."""
    me = server_of(home).request("GET", "/api/whoami")
    click.echo(json.dumps(me) if as_json else f"{me['name']} ({me['role']}, team {me['team']})")
