"""clickhouse-connect's own integration suite against the embedded ClickHouse server (``make test-compat``).

The suite is not part of the clickhouse-connect wheel (nor of its sdist, which holds only
``tests/test_bare_install.py``): it needs a checkout of the ClickHouse/clickhouse-connect
repository (``--source``, default ``.local/compat/clickhouse-connect``; cloned from GitHub at
the pinned client's tag when absent and the network allows; where GitHub is out of reach, the
newest snapshot at hand, which may be older than the pinned client: ``docs/security.md`` says
which one the last result used) and a Python environment with the suite's test
dependencies (``--python``, default ``.local/compat/venv``, created with ``uv`` when absent:
the pinned clickhouse-connect plus pytest, pytest-asyncio, pytest-mock, pandas, pyarrow,
polars, SQLAlchemy and alembic; these are test-only and stay out of the project's lock).

It starts ``python -m sinks.chdb_server`` on a free port with a fresh data directory and a
password, points the suite at it through its ``CLICKHOUSE_CONNECT_TEST_*`` variables, runs it
under ``nice``, and prints the pass/fail/skip counts and every failing test id (the
exceptions and their reasons are listed in ``docs/security.md``).
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMPAT = ROOT / ".local" / "compat"
TEST_DEPS = [
    "pytest",
    "pytest-asyncio",
    "pytest-mock",
    "pandas",
    "pyarrow",
    "numpy<2.3",
    "polars",
    "sqlalchemy>=2,<3",
    "alembic>=1.18",
    "backports.zstd",
    "lz4",
    "pytz",
    "tzlocal",
    "orjson",
    "aiohttp",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ensure_source(source: Path, tag: str) -> None:
    if (source / "tests" / "integration_tests").is_dir():
        return
    source.parent.mkdir(parents=True, exist_ok=True)
    url = "https://github.com/ClickHouse/clickhouse-connect"
    result = subprocess.run(["git", "clone", "-q", "--depth", "1", "--branch", tag, url, str(source)], check=False)
    if result.returncode != 0:
        raise SystemExit(
            f"no clickhouse-connect checkout at {source} and cloning {url} at {tag} failed: "
            "put a checkout there (its tests/ folder is enough) or pass --source"
        )


def _ensure_python(venv: Path, client_version: str) -> Path:
    python = venv / "bin" / "python"
    if python.exists():
        return python
    uv = ROOT / ".venv" / "bin" / "uv"
    subprocess.run([str(uv), "venv", "-q", "-p", sys.executable, str(venv)], check=True)
    env = {**os.environ, "VIRTUAL_ENV": str(venv)}
    subprocess.run(
        [str(uv), "pip", "install", "-q", f"clickhouse-connect[chdb]=={client_version}", *TEST_DEPS],
        check=True,
        env=env,
    )
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=COMPAT / "clickhouse-connect")
    parser.add_argument("--python", type=Path, default=None, help="Python of an environment with the suite's deps")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -k session)")
    args = parser.parse_args(argv)
    client_version = version("clickhouse-connect")
    _ensure_source(args.source, f"v{client_version}")
    python = args.python or _ensure_python(COMPAT / "venv", client_version)
    with tempfile.TemporaryDirectory(prefix="chdb-compat-") as tmp:
        folder = Path(tmp)
        password = secrets.token_urlsafe(16)
        password_file = folder / "password"
        password_file.write_text(password)
        password_file.chmod(0o600)
        port = _free_port()
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "sinks.chdb_server", "--port", str(port)),
                *("--data-dir", str(folder / "data"), "--password-file", str(password_file)),
            ],
            cwd=ROOT,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": str(folder)},
        )
        try:
            for _ in range(300):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1):
                        break
                except OSError:
                    if server.poll() is not None:
                        raise SystemExit("the embedded server exited during start-up") from None
                    time.sleep(0.1)
            report = folder / "report.xml"
            suite = _suite_folder(args.source, folder / "suite")
            env = {
                **os.environ,
                "CLICKHOUSE_CONNECT_TEST_HOST": "127.0.0.1",
                "CLICKHOUSE_CONNECT_TEST_PORT": str(port),
                "CLICKHOUSE_CONNECT_TEST_USER": "default",
                "CLICKHOUSE_CONNECT_TEST_PASSWORD": password,
                "PYTHONPATH": str(suite),
            }
            cmd = ["nice", "-n", "19", str(python), "-m", "pytest", "tests/integration_tests", "-q", "-p"]
            cmd += ["no:cacheprovider", f"--junitxml={report}", "--rootdir", str(suite), "-o", "addopts="]
            cmd += ["-o", "log_cli=false", *args.pytest_args]
            if (suite / "pyproject.toml").exists():
                cmd += ["-c", str(suite / "pyproject.toml")]
            try:
                subprocess.run(cmd, cwd=suite, env=env, timeout=args.timeout, check=False)
            except subprocess.TimeoutExpired:
                print(f"the suite did not finish within {args.timeout:.0f}s", file=sys.stderr)
                return 1
            return _summarize(report)
        finally:
            server.terminate()
            server.wait(30)


def _suite_folder(source: Path, folder: Path) -> Path:
    """A folder holding the checkout's ``tests/`` (and its pytest config) but not its
    ``clickhouse_connect/`` package: the suite then imports the client installed in its
    environment (the pinned version), not the checkout's uncompiled sources."""
    folder.mkdir()
    (folder / "tests").symlink_to(source / "tests", target_is_directory=True)
    if (source / "pyproject.toml").exists():
        (folder / "pyproject.toml").write_text((source / "pyproject.toml").read_text())
    return folder


def _summarize(report: Path) -> int:
    if not report.exists():
        print("no report: pytest did not run", file=sys.stderr)
        return 1
    failed: list[str] = []
    passed = skipped = 0
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    total = passed + len(failed) + skipped
    print(f"clickhouse-connect suite: {passed} passed, {len(failed)} failed, {skipped} skipped of {total}")
    for name in failed:
        print(f"  FAILED {name}")
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
