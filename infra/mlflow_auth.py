"""MLflow's basic-auth app with one rule more: only a user with the `promoter` role moves a registered
model's `champion` alias (`mlflow server --app-name compound-auth`).

MLflow's permissions stop at the registered model: whoever may edit a model (its creator, the stack's
own login) may set any of its aliases. compound's promotion path logs in as a second user, the
promoter, whose role grants EDIT on every registered model; this rule refuses `champion` to everyone
else, admins included, so a job, a worker or a pipeline's register stage cannot crown a model past
the gate. The server makes the promoter (user, role, grant) at start-up from its environment, as
MLflow makes its admin, so the local stack and Kubernetes share one path.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

PROMOTER_ROLE = "promoter"
GUARDED_ALIASES = frozenset({"champion"})
ALIAS_ROUTE = "/mlflow/registered-models/alias"  # set (POST) and delete (DELETE), REST and ajax paths alike
# The promoter's login, in the server's environment (never a command line), as MLflow takes its admin's.
PROMOTER_USERNAME_ENV, PROMOTER_PASSWORD_ENV = "COMPOUND_MLFLOW_PROMOTER_USERNAME", "COMPOUND_MLFLOW_PROMOTER_PASSWORD"


def create_app(app=None):
    """The basic-auth app, with the champion rule checked before MLflow's own (so it binds admins too)."""
    from mlflow.server import app as mlflow_app
    from mlflow.server import auth

    app = app or mlflow_app
    app.before_request(_guard_champion)
    served = auth.create_app(app)  # initialises the users' store
    ensure_promoter(os.environ.get(PROMOTER_USERNAME_ENV), os.environ.get(PROMOTER_PASSWORD_ENV))
    return served


def ensure_promoter(username: str | None, password: str | None) -> None:
    """Make the promoter role (EDIT on every registered model) and, if a login is given, its user with
    that password and the role; each step only if missing, so every worker and every restart may run it."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth import store
    from mlflow.utils.workspace_utils import DEFAULT_WORKSPACE_NAME

    def once(make, find):
        try:
            return make()
        except MlflowException as error:  # another worker made it first
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return find()

    role = next((r for r in store.list_roles([DEFAULT_WORKSPACE_NAME]) if r.name == PROMOTER_ROLE), None) or once(
        lambda: store.create_role(PROMOTER_ROLE, DEFAULT_WORKSPACE_NAME, "may move the champion alias"),
        lambda: store.get_role_by_name(DEFAULT_WORKSPACE_NAME, PROMOTER_ROLE))
    if not any(p.resource_type == "registered_model" and p.resource_pattern == "*"
               for p in store.list_role_permissions(role.id)):
        store.add_role_permission(role.id, "registered_model", "*", "EDIT")
    if not username or not password:
        log.warning("no promoter login in %s/%s: nobody can move `champion` until a user is given the %r role",
                    PROMOTER_USERNAME_ENV, PROMOTER_PASSWORD_ENV, PROMOTER_ROLE)
        return
    if not store.has_user(username, use_primary=True):
        once(lambda: store.create_user(username, password), lambda: None)
    elif not store.authenticate_user(username, password, use_primary=True):
        store.update_user(username, password=password)  # the settings hold a new one
    user = store.get_user(username)
    if not is_promoter(user.id):
        once(lambda: store.assign_role_to_user(user.id, role.id), lambda: None)


def set_password(database_uri: str, username: str, password: str) -> None:
    """Give `username` in the users' store at `database_uri` a new password (the store's owner recovering a
    lost one; a running server takes it at the next login check), keeping every other user and grant."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(database_uri)
    if store.has_user(username, use_primary=True):
        store.update_user(username, password=password)


def is_promoter(user_id: int) -> bool:
    from mlflow.server.auth import store

    return any(role.name == PROMOTER_ROLE for role in store.list_user_roles(user_id))


def _guard_champion():
    from flask import jsonify, request
    from mlflow.server import auth

    if request.method not in ("POST", "DELETE") or not request.path.endswith(ALIAS_ROUTE):
        return None
    body = request.get_json(silent=True)
    alias = (body.get("alias") if isinstance(body, dict) else None) or request.args.get("alias") or ""
    if str(alias).strip().lower() not in GUARDED_ALIASES:
        return None
    login = auth.authenticate_request()
    if not isinstance(login, auth.Authorization):
        return login  # MLflow's 401, asking for a login
    if is_promoter(auth.store.get_user(login.username).id):
        return None
    response = jsonify(error_code="PERMISSION_DENIED", message=(
        f"only a user with the {PROMOTER_ROLE!r} role may move {alias!r}, and {login.username!r} has not got it: "
        "promote with `compound registry promote`, which logs in as the promoter"))
    response.status_code = 403
    return response
