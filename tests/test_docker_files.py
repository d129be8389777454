"""docker/: the compose file's structure and the Dockerfile, checked against the CLI they run (no Docker daemon)."""
from __future__ import annotations

import re
import tomllib
from urllib.parse import urlsplit

import click
import pytest

from conftest import REPO

yaml = pytest.importorskip("yaml", reason="pyyaml reads the compose file")

DOCKER = REPO / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def serve_command() -> click.Command:
    from edje_qdrant.cli.serve import serve

    return serve


def _envvars(command: click.Command) -> set[str]:
    out: set[str] = set()
    for p in command.params:
        env = getattr(p, "envvar", None)
        out.update([env] if isinstance(env, str) else env or [])
    return out


def test_compose_runs_qdrant_and_the_service_with_healthchecks(compose):
    services = compose["services"]
    assert set(services) == {"qdrant", "edje"}
    qdrant, edje = services["qdrant"], services["edje"]
    assert qdrant["image"].startswith("qdrant/qdrant:")
    for svc in (qdrant, edje):
        check = svc["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1
        assert {"interval", "timeout", "retries"} <= set(check)
    assert "/readyz" in " ".join(qdrant["healthcheck"]["test"])
    assert "/healthz" in " ".join(edje["healthcheck"]["test"])
    assert edje["depends_on"]["qdrant"]["condition"] == "service_healthy"


def test_compose_volumes_and_ports(compose):
    services = compose["services"]
    named = set(compose["volumes"])
    for svc in services.values():
        for vol in svc["volumes"]:
            source = vol.split(":")[0]
            assert source in named or source.startswith(("${", ".", "/")), vol
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{port}: publish on loopback only"
    assert any(v.endswith(":/qdrant/storage") for v in services["qdrant"]["volumes"])
    assert any(v.endswith(":/images:ro") for v in services["edje"]["volumes"])


def test_compose_env_points_the_service_at_qdrant(compose, serve_command):
    edje = compose["services"]["edje"]
    env = edje["environment"]
    url = urlsplit(env["QDRANT_URL"])
    assert url.hostname == "qdrant" and url.port == 6333
    assert env["QDRANT_API_KEY"] == "${QDRANT_API_KEY:-}"  # from the shell / .env, never written here
    assert compose["services"]["qdrant"]["environment"]["QDRANT__SERVICE__API_KEY"] == "${QDRANT_API_KEY:-}"
    known = _envvars(serve_command)
    assert set(env) <= known, f"unknown to `edje-qdrant serve`: {set(env) - known}"
    assert env["EDJE_HOST"] == "0.0.0.0"
    port = int(env["EDJE_PORT"])
    assert any(str(p).endswith(f":{port}") for p in edje["ports"])


def test_compose_command_parses_with_the_serve_command(compose, serve_command):
    command = compose["services"]["edje"]["command"]
    assert command[0] == "serve"
    ctx = serve_command.make_context("serve", list(command[1:]))
    assert ctx.params["max_k"] == 100 and ctx.params["max_rerank_k"] == 1000


def test_compose_build_uses_the_dockerfile(compose):
    build = compose["services"]["edje"]["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == REPO and (context / build["dockerfile"]).is_file()
    assert build["args"]["TORCH_VARIANT"] == "${TORCH_VARIANT:-cpu}"


def test_dockerfile_cpu_default_cuda_arg_and_runtime(dockerfile):
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", dockerfile, re.M)
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in dockerfile
    torch_pin = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M).group(1)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    torch_req = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    from packaging.requirements import Requirement

    assert torch_pin in Requirement(torch_req).specifier, f"torch {torch_pin} outside {torch_req}"
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"COPY source {path} missing"
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M), "run as a non-root user"
    assert re.search(r"^HEALTHCHECK .*", dockerfile, re.M) and "/healthz" in dockerfile
    assert re.search(r"^EXPOSE 8000$", dockerfile, re.M) and "EDJE_PORT=8000" in dockerfile
    assert 'ENTRYPOINT ["edje-qdrant"]' in dockerfile
    assert pyproject["project"]["scripts"]["edje-qdrant"] == "edje_qdrant.cli.main:main"


def test_dockerfile_extras_exist_in_pyproject(dockerfile):
    extras = set(pyproject_extras())
    wanted = set(re.search(r'pip install "\.\[([\w,]+)\]"', dockerfile).group(1).split(","))
    assert wanted <= extras, f"pyproject.toml lacks optional-dependencies {wanted - extras}"


def pyproject_extras() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
