"""Commands pointed at the local server's plain-HTTP API give Prefect's clients a one-certificate
CA bundle, so that each of them builds its TLS context in a millisecond instead of loading certifi's."""

from __future__ import annotations

import ssl

from cnnpipe.server import local_server
from cnnpipe.settings import get_settings

LOCAL = "http://127.0.0.1:4200/api"


def test_commands_on_the_local_server_get_a_one_certificate_bundle(monkeypatch):
    monkeypatch.setattr(local_server, "local_api_url", lambda settings=None: LOCAL)
    environ: dict[str, str] = {}
    local_server.use_local_server(environ)
    assert environ["PREFECT_API_URL"] == LOCAL
    bundle = environ["PREFECT_API_SSL_CERT_FILE"]
    assert bundle.startswith(str(get_settings().server_dir))
    assert open(bundle).read().count("BEGIN CERTIFICATE") == 1
    ssl.create_default_context(cafile=bundle)  # loads, as Prefect's clients load it
    # Written once, then reused.
    again: dict[str, str] = {}
    local_server.use_local_server(again)
    assert again["PREFECT_API_SSL_CERT_FILE"] == bundle


def test_a_bundle_of_the_users_own_or_another_api_is_left_alone(monkeypatch):
    monkeypatch.setattr(local_server, "local_api_url", lambda settings=None: LOCAL)
    environ = {"PREFECT_API_SSL_CERT_FILE": "/etc/company-ca.pem"}
    local_server.use_local_server(environ)
    assert environ["PREFECT_API_SSL_CERT_FILE"] == "/etc/company-ca.pem"
    elsewhere = {"PREFECT_API_URL": "https://prefect.example.com/api"}
    local_server.use_local_server(elsewhere)
    assert "PREFECT_API_SSL_CERT_FILE" not in elsewhere
    monkeypatch.setattr(local_server, "local_api_url", lambda settings=None: None)
    ephemeral: dict[str, str] = {}
    local_server.use_local_server(ephemeral)
    assert ephemeral == {}
