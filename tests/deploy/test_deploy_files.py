"""deploy/: the Dockerfile passes hadolint, the compose file parses, and no secret is written down.

Docker's engine does not run here; `docker-compose config` (Debian's package, installed by
.ci/run) parses and interpolates the file without one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_the_dockerfile_passes_hadolint_and_runs_as_a_non_root_user():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(DEPLOY / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER 10001$", text, re.MULTILINE) and "pytorch/pytorch" in text and "cuda" in text


def test_the_image_has_the_c_compiler_that_compile_needs():
    # Triton builds its kernel launchers with a C compiler; PyTorch's -runtime images have none.
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert base.endswith("-devel"), base


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed (.ci/run installs it)")
def test_the_compose_file_parses_with_the_example_environment():
    result = subprocess.run(["docker-compose", "-f", str(DEPLOY / "docker-compose.yml"), "--env-file",
                             str(DEPLOY / ".env.example"), "config"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == {"postgres", "prefect-server", "mlflow", "worker"}
    assert all("healthcheck" in services[name] for name in ("postgres", "prefect-server", "mlflow"))
    assert set(config["volumes"]) == {"postgres-data", "mlflow-artifacts", "cnnpipe-data"}
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "--backend-store-uri postgresql://" in services["mlflow"]["command"]
    worker = services["worker"]
    command = worker["command"]
    assert (command if isinstance(command, list) else command.split()) == [
        "worker", "start", "--pool", "cnnpipe", "--type", "process"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed (.ci/run installs it)")
def test_the_compose_file_refuses_to_start_without_a_password(tmp_path):
    (tmp_path / "empty.env").write_text("")
    result = subprocess.run(["docker-compose", "-f", str(DEPLOY / "docker-compose.yml"), "--env-file",
                             str(tmp_path / "empty.env"), "config"], capture_output=True, text=True, check=False,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr


def test_credentials_come_from_the_environment_and_the_example_lists_them():
    compose = (DEPLOY / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{(\w+)", compose))
    listed = {line.split("=")[0] for line in (DEPLOY / ".env.example").read_text().splitlines()
              if line and not line.startswith("#")}
    assert used <= listed
    spec = yaml.safe_load(compose)
    for service in spec["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key or "postgresql" in str(value):
                assert "${POSTGRES_PASSWORD" in str(value) or "${" in str(value), key
    assert "deploy/.env" in (DEPLOY.parent / ".gitignore").read_text().split()
