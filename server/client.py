"""The server's client, for the CLI: requests with the settings' token, errors as one clear line."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from infra.settings import Settings


class ServerError(RuntimeError):
    """The server refused or failed a request, or cannot be reached; the message says which. `status`: the
    HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServerClient:
    def __init__(self, url: str, token: str | None) -> None:
        self.url, self.token = url.rstrip("/"), token

    @classmethod
    def of(cls, settings: Settings) -> ServerClient:
        if settings.server_url is None:
            raise ServerError("no compound server in the settings: `compound up` starts one, or set "
                              "COMPOUND_SERVER_URL and COMPOUND_SERVER_TOKEN")
        return cls(settings.server_url, settings.server_token.get_secret_value() if settings.server_token else None)

    def request(self, method: str, path: str, body: dict | None = None, **params: Any) -> Any:
        import requests

        try:
            response = requests.request(method, f"{self.url}{path}", json=body, params=params or None,
                                        headers=self._headers(), timeout=120)
        except requests.RequestException as error:
            raise ServerError(f"cannot reach the compound server at {self.url} ({type(error).__name__}): start the "
                              "local stack with `compound up`, or set COMPOUND_SERVER_URL") from None
        if response.status_code == 422 and (problems := _spec_problems(response)):
            raise ServerError(problems, 422)  # a submitted spec's, as `validate` prints them
        if response.status_code >= 400:
            raise ServerError(f"the server answered {response.status_code}: {_detail(response)}", response.status_code)
        return response.json()

    def stream(self, path: str) -> Iterator[str]:
        """A text the server sends as it grows (a log), chunk by chunk."""
        import requests

        try:
            with requests.get(f"{self.url}{path}", headers=self._headers(), stream=True,
                              timeout=(30, None)) as response:
                if response.status_code >= 400:
                    raise ServerError(f"the server answered {response.status_code}: {_detail(response)}",
                                      response.status_code)
                yield from response.iter_content(chunk_size=None, decode_unicode=True)
        except requests.RequestException as error:
            raise ServerError(f"lost the compound server at {self.url} ({type(error).__name__}) while following; "
                              "follow again with `compound job logs REF --follow`") from None


    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def _spec_problems(response) -> str | None:
    """A 422 the server raised itself carries a text (the API's schema refusals carry a list)."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        return None
    return detail if isinstance(detail, str) else None


def _detail(response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        return response.text[:500]
    if isinstance(detail, list):  # a request the API's schema refused: each field's problem
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
    return str(detail)
