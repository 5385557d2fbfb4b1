"""One identity across the stack: each server user gets an MLflow login (the basic-auth app's) whose
permissions match their role, so a user who may not promote through the server cannot move `champion`
in the MLflow UI either. The server makes them as the auth app's admin (its own MLflow login)."""

from __future__ import annotations

import secrets

from infra.mlflow_auth import PROMOTER_ROLE

WORKSPACE = "default"
# A compound role's MLflow role: the permission it holds on every experiment and registered model.
GRANTS = {"viewer": ("compound-viewer", "READ"), "submitter": ("compound-submitter", "EDIT")}


def add_login(tracking_uri: str, name: str, role: str) -> str:
    """Make `name`'s MLflow login for `role`; its password, shown once."""
    from mlflow.server.auth.client import AuthServiceClient

    client, password = AuthServiceClient(tracking_uri), secrets.token_urlsafe(24)
    client.create_user(name, password)  # refused for a name MLflow has (the stack's own logins among them)
    try:
        if role == "admin":
            client.update_user_admin(name, True)
        client.assign_role(name, _role(client, *GRANTS["viewer" if role == "viewer" else "submitter"]).id)
        if role in ("promoter", "admin"):  # the champion rule binds MLflow's admins too
            client.assign_role(name, next(r for r in client.list_roles(WORKSPACE) if r.name == PROMOTER_ROLE).id)
    except BaseException:
        client.delete_user(name)  # made here a moment ago: no login with half its rights
        raise
    return password


def remove_login(tracking_uri: str, name: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    try:
        AuthServiceClient(tracking_uri).delete_user(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def _role(client, name: str, permission: str):
    for role in client.list_roles(WORKSPACE):
        if role.name == name:
            return role
    role = client.create_role(WORKSPACE, name, f"compound's {name.removeprefix('compound-')}s")
    for resource in ("experiment", "registered_model"):
        client.add_role_permission(role.id, resource, "*", permission)
    return role
