"""docs/FEEDBACK_SYSTEM.md holds: its curl examples give what it says against a real gateway and
broker, and every ``feedback`` command and option it names exists (planned ones do not yet)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer

from pipeline.cli import app
from pipeline.kafka_admin import ensure_topics
from pipeline.settings import PROJECT_ROOT, Settings
from schemas.serde import AvroSerde
from schemas.topics import Topics
from tests.conftest import _free_port
from tests.integration.kafka_read import read_topic
from tests.integration.pipeline_procs import pipeline_process

pytestmark = pytest.mark.integration

RUNBOOK = PROJECT_ROOT / "docs" / "FEEDBACK_SYSTEM.md"
#: Commands the runbook announces as planned: they must not exist yet (when one lands, the
#: runbook's section about it must be rewritten, and this set emptied).
PLANNED: set[str] = set()


@dataclass(frozen=True)
class Example:
    command: str
    expected: str  # the "# → ..." line, without the arrow


def curl_examples(text: str) -> list[Example]:
    """The shell examples between the curl-examples markers: commands, each followed by ``# → …``."""
    block = text.split("<!-- curl-examples:begin -->", 1)[1].split("<!-- curl-examples:end -->", 1)[0]
    examples, lines = [], []
    for line in block.splitlines():
        if line.startswith("```") or not line.strip():
            continue
        if line.startswith("# → "):
            examples.append(Example("\n".join(lines), line.removeprefix("# → ")))
            lines = []
        else:
            lines.append(line)
    assert not lines, f"a command without an expected result: {lines}"
    return examples


def test_the_runbook_has_curl_examples() -> None:
    examples = curl_examples(RUNBOOK.read_text(encoding="utf-8"))
    assert len(examples) >= 5 and all("curl" in e.command for e in examples)


def test_curl_examples_against_the_real_gateway(isolated: Settings, tmp_path: Path) -> None:
    ensure_topics(isolated)
    port, token = _free_port(), "runbook-token-0123456789-abcdefghijk"
    settings = isolated.model_copy(update={"internal_tokens": token, "gateway_port": port})
    examples = curl_examples(RUNBOOK.read_text(encoding="utf-8"))
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GATEWAY": url, "TOKEN": token}
    with pipeline_process(settings, "serve", tmp_path / "gateway.log") as gateway:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert gateway.poll() is None and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.2)
        for example in examples:
            out = subprocess.run(["sh", "-c", example.command], env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, (example.command, out.stderr)
            actual = out.stdout.strip()
            expected = example.expected.split(": ", 1)[0]  # the output, before the explanation
            # The same status (or value) at the end, and every JSON key and string named in the doc.
            assert actual.split()[-1] == expected.split()[-1], (example.command, actual)
            for word in re.findall(r'"([^"…]+)"', expected):
                assert f'"{word}"' in actual, (word, actual)
    # The accepted example's e-mail address reached Kafka redacted, as the runbook says.
    serde = AvroSerde()
    comments = [
        serde.decode(v)["payload"]["comment"] for _, v in read_topic(settings, Topics(settings.topic_prefix).raw)
    ]
    assert "mail me at [EMAIL]" in comments and not any("jane@example.com" in (c or "") for c in comments)


def _mentions(text: str) -> list[tuple[str, str, list[str]]]:
    """Every ``feedback <command> [<sub>] [--options]`` in code spans and code blocks."""
    code = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text)
    found = []
    for chunk in code:
        for line in chunk.splitlines():
            line = line.split(" #", 1)[0]
            for match in re.finditer(r"\bfeedback ([a-z][a-z-]*)((?: [a-z][a-z-]*)?)([^|;&()]*)", line):
                found.append((match.group(1), match.group(2).strip(), re.findall(r"--[a-z][a-z-]*", match.group(3))))
    return found


def _options(command: Any) -> set[str]:
    return {opt for param in command.params for opt in getattr(param, "opts", [])}


def test_every_command_the_runbook_names_exists() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    mentions = _mentions(text)
    root: Any = typer.main.get_command(app)  # a group: its commands by name (typer vendors click)
    named = {name for name, _, _ in mentions}
    assert {"dlq", "worker", "sink", "serve", "stats", "reputation", "forget"} <= named
    for name, sub, options in mentions:
        if name in PLANNED:
            assert name not in root.commands, f"`feedback {name}` exists now: update the runbook's planned note"
            continue
        assert name in root.commands, f"the runbook names `feedback {name}`, which does not exist"
        command = root.commands[name]
        if hasattr(command, "commands"):  # a group such as `dlq`
            assert sub in command.commands, f"the runbook names `feedback {name} {sub}`, which does not exist"
            command = command.commands[sub]
        for option in options:
            assert option in _options(command), f"`feedback {name} {sub}` has no option {option}"
