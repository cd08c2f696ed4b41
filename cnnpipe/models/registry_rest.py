"""The model registry through MLflow's REST API, for `models`, `promote`, `rollback` and loading a
version to classify with while `cnnpipe server` serves the store: seconds faster than importing
the mlflow package.

Only the calls those commands make, with MlflowClient's names and the attributes of its
results that `cnnpipe.models.registry` reads, so either client serves it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# A registry call answers in milliseconds; this only bounds a server that stopped answering.
TIMEOUT_SECONDS = 30


class RestError(Exception):
    """What the server refused, with MLflow's error code (`RESOURCE_DOES_NOT_EXIST`, ...)."""

    def __init__(self, error_code: str, message: str):
        self.error_code = error_code
        super().__init__(message)


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    creation_timestamp: int
    run_id: str | None
    source: str | None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    model_id: str | None = None

    @classmethod
    def from_json(cls, body: dict) -> Version:
        return cls(body["name"], str(body["version"]), int(body.get("creation_timestamp", 0)), body.get("run_id"),
                   body.get("source"), {tag["key"]: tag.get("value", "") for tag in body.get("tags", [])},
                   list(body.get("aliases", [])), body.get("model_id"))


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    aliases: dict[str, str]

    @classmethod
    def from_json(cls, body: dict) -> RegisteredModel:
        return cls(body["name"], {alias["alias"]: str(alias["version"]) for alias in body.get("aliases", [])})


class RestRegistry:
    def __init__(self, url: str):
        self.tracking_uri = url.rstrip("/")
        # No proxy from the environment: the server is the one `cnnpipe server` runs on this machine.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get_model_version(self, name: str, version: str) -> Version:
        return Version.from_json(self._call("GET", "model-versions/get", name=name, version=str(version))
                                 ["model_version"])

    def get_model_version_by_alias(self, name: str, alias: str) -> Version:
        return Version.from_json(self._call("GET", "registered-models/alias", name=name, alias=alias)["model_version"])

    def search_model_versions(self, filter_string: str) -> list[Version]:
        return [Version.from_json(body) for body in self._pages("model-versions/search", "model_versions",
                                                                filter=filter_string)]

    def search_registered_models(self) -> list[RegisteredModel]:
        return [RegisteredModel.from_json(body) for body in self._pages("registered-models/search",
                                                                        "registered_models")]

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self._call("POST", "registered-models/alias", name=name, alias=alias, version=str(version))

    def set_model_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self._call("POST", "model-versions/set-tag", name=name, version=str(version), key=key, value=value)

    def artifact_file(self, version: Version, relative: str) -> Path | None:
        """A file of the version's logged model, when its artifacts are on this machine's disk (a
        store `cnnpipe server` serves is written directly by the commands): None otherwise."""
        # MLflow 3 names the logged model in `source` (models:/m-...) where it leaves `model_id` out.
        model_id = version.model_id or (version.source or "").removeprefix("models:/")
        if not model_id.startswith("m-"):
            return None
        location = urllib.parse.urlparse(self._call("GET", f"logged-models/{model_id}")["model"]["info"]
                                          .get("artifact_uri", ""))
        if location.scheme not in ("file", ""):
            return None
        path = Path(urllib.parse.unquote(location.path)) / relative
        return path if path.is_file() else None

    def _pages(self, endpoint: str, key: str, **query: str) -> list[dict]:
        found, token = [], None
        while True:
            page = self._call("GET", endpoint, **query, **({"page_token": token} if token else {}))
            found += page.get(key, [])
            token = page.get("next_page_token")
            if not token:
                return found

    def _call(self, method: str, endpoint: str, **fields: str) -> dict:
        url = f"{self.tracking_uri}/api/2.0/mlflow/{endpoint}"
        body = None
        if method == "GET":
            url += "?" + urllib.parse.urlencode(fields)
        else:
            body = json.dumps(fields).encode()
        request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(request, timeout=TIMEOUT_SECONDS) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read())
            except ValueError:
                error = {}
            raise RestError(error.get("error_code", f"HTTP_{exc.code}"),
                            error.get("message", f"{method} {url}: HTTP {exc.code}")) from None
