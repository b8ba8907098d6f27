"""docker-compose.yml stays consistent with the code (no Docker engine needed)."""

from __future__ import annotations

import typer.main
import yaml

from pipeline.cli import app
from pipeline.settings import PROJECT_ROOT, Settings

COMPOSE = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())


def test_compose_has_the_whole_stack() -> None:
    assert {"kafka", "clickhouse", "schema-registry", "worker", "sink", "gateway"} <= set(COMPOSE["services"])


def test_pipeline_services_run_real_cli_commands_with_known_settings() -> None:
    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    fields = {f"FEEDBACK_{name.upper()}" for name in Settings.model_fields}
    for name in ("topics", "worker", "sink", "gateway"):
        service = COMPOSE["services"][name]
        assert service["command"][0] in commands, name
        assert set(service["environment"]) <= fields, name
    # Secrets are required from the environment, never baked into the file.
    env = COMPOSE["services"]["worker"]["environment"]
    assert env["FEEDBACK_PSEUDONYM_KEY"].startswith("${FEEDBACK_PSEUDONYM_KEY:?")
    assert COMPOSE["services"]["gateway"]["environment"]["FEEDBACK_INTERNAL_TOKENS"].startswith("${")


def test_ports_are_published_on_loopback_only() -> None:
    for name, service in COMPOSE["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_clickhouse_requires_a_password_from_the_environment() -> None:
    server = COMPOSE["services"]["clickhouse"]["environment"]
    assert "CLICKHOUSE_SKIP_USER_SETUP" not in server  # that would leave `default` without a password
    assert server["CLICKHOUSE_PASSWORD"].startswith("${FEEDBACK_CLICKHOUSE_PASSWORD:?")
    for name in ("topics", "worker", "sink", "gateway"):
        env = COMPOSE["services"][name]["environment"]
        assert env["FEEDBACK_CLICKHOUSE_PASSWORD"] == server["CLICKHOUSE_PASSWORD"], name
        assert env["FEEDBACK_CLICKHOUSE_USER"] == server["CLICKHOUSE_USER"], name


def test_every_container_runs_as_a_non_root_user() -> None:
    for name, service in COMPOSE["services"].items():
        user = str(service.get("user", ""))
        assert user and user.split(":")[0] not in ("0", "root"), name
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "--require-hashes -r requirements.lock" in dockerfile
