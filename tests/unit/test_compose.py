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
