"""The Dockerfile, .dockerignore and .env.example.

There is no Docker engine here, so the image is not built: the HEALTHCHECK command is
run for real against a live server, and the rest is checked against the repository.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from gateway.config import load_settings
from tests.support import CONTRACT_VARIABLES, ROOT, GatewayProcess, clean_env

DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def healthcheck_command() -> list[str]:
    [check] = [args for keyword, args in instructions() if keyword == "HEALTHCHECK"]
    command = json.loads(check[check.index("CMD") + 3 :].strip())
    assert isinstance(command, list) and command[0] == "python", "slim images have no curl: use python"
    return [sys.executable, *command[1:]]


def test_docker_healthcheck_command_passes_on_a_live_server_and_fails_once_it_is_gone(
    config_factory: Callable[..., Path],
) -> None:
    command = healthcheck_command()
    gateway = GatewayProcess(config_factory()).start()
    try:
        alive = subprocess.run(command, env=clean_env({"PORT": str(gateway.port)}), timeout=30, check=False)
        assert alive.returncode == 0
    finally:
        gateway.stop()
    gone = subprocess.run(
        command, env=clean_env({"PORT": str(gateway.port)}), capture_output=True, timeout=30, check=False
    )
    assert gone.returncode != 0


def test_dockerfile_builds_a_slim_non_root_prod_image_from_runtime_dependencies() -> None:
    steps = instructions()
    args = {keyword: [a for k, a in steps if k == keyword] for keyword, _ in steps}
    assert args["FROM"] == ["python:3.11-slim"]
    assert args["USER"] and args["USER"][-1] not in {"root", "0"}
    assert args["EXPOSE"] == ["8078"]
    env = " ".join(args["ENV"])
    assert "PROFILE=prod" in env and "HOST=0.0.0.0" in env
    install = " ".join(a for a in args["RUN"] if "pip install" in a)
    assert install and "dev" not in install and "-e " not in install, "runtime dependencies only"
    # USER comes after everything that needs root
    last_root_step = max(i for i, (k, _) in enumerate(steps) if k == "RUN")
    assert max(i for i, (k, _) in enumerate(steps) if k == "USER") > last_root_step


def test_dockerfile_copies_only_what_exists_and_dockerignore_lets_through() -> None:
    allowed = {
        line[1:].strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = [a for k, a in instructions() if k == "COPY" and not a.startswith("--from")]
    assert copied
    for arguments in copied:
        *sources, _target = arguments.split()
        for source in sources:
            path = source.rstrip("/")
            assert (ROOT / path).exists(), f"COPY {source}: no such file in the repository"
            assert path.split("/")[0] in allowed, f"COPY {source}: excluded by .dockerignore"
    assert {"config.yaml", "templates", "gateway", "plugins", "pyproject.toml"} <= allowed


def env_example_lines() -> list[str]:
    return ENV_EXAMPLE.read_text().splitlines()


def test_env_example_lists_every_contract_variable_once_with_a_comment() -> None:
    lines = env_example_lines()
    assignment = re.compile(r"^(?:#\s*)?([A-Z][A-Z0-9_]*)=")
    positions: dict[str, list[int]] = {}
    for number, line in enumerate(lines):
        if match := assignment.match(line):
            positions.setdefault(match.group(1), []).append(number)
    missing = [v for v in CONTRACT_VARIABLES if v not in positions]
    assert not missing, f".env.example lacks {missing}"
    for variable, found in positions.items():
        assert len(found) == 1, f"{variable} appears {len(found)} times"
        comment = lines[found[0] - 1]
        assert comment.startswith("# ") and not assignment.match(comment), f"{variable} has no comment line"
        assert len(comment) > 10, f"{variable}: say what it is for"


def test_env_example_active_lines_give_valid_production_settings() -> None:
    active = dict(
        line.split("=", 1)
        for line in env_example_lines()
        if line and not line.startswith("#") and "=" in line
    )
    assert not any(v.startswith(("'", '"')) for v in active.values()), "docker --env-file keeps quotes"
    settings = load_settings(ROOT / "config.yaml", env=clean_env(active))
    assert settings.profile == "prod" and settings.json_logs
    assert settings.server.host == "0.0.0.0" and settings.server.port == 8078
    assert settings.transport_chain == ["acs"]
