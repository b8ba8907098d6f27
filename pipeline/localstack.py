"""The local stack: real Kafka (KRaft, from Maven jars) and the embedded ClickHouse server.

Both run as detached processes that outlive the command that started them.
Each records its PID in a file; stopping, and every liveness check, goes by that
PID and verifies it is still our process (PIDs are reused), never by name.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import StackError
from pipeline.private_files import PRIVATE_UMASK, open_private, private_dir, tighten_tree, write_private
from pipeline.settings import PROJECT_ROOT, Settings

__all__ = ["EmbeddedClickHouse", "LocalKafka", "LocalStack", "ManagedProcess", "ServiceStatus", "port_in_use"]

KAFKA_POM = PROJECT_ROOT / "pipeline" / "kafka" / "pom.xml"
KAFKA_LOG4J = PROJECT_ROOT / "pipeline" / "kafka" / "log4j2.properties"


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    address: str
    log_path: str
    data_dir: str
    connect: str = ""  # how an analyst connects (user, where the password is), when that is not obvious


def port_in_use(host: str, port: int) -> bool:
    """True when something accepts connections on ``host:port``."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool], log: Path) -> None:
    """Poll ``predicate``; raise :class:`StackError` with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if not alive():
            raise StackError(f"{what} exited during start-up; last log lines:\n{_tail(log)}")
        time.sleep(0.25)
    raise StackError(f"{what} not ready after {timeout:.0f}s; last log lines:\n{_tail(log)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ManagedProcess:
    """A detached child process tracked by a PID file.

    ``marker`` is a string that must appear in the process's command line for a PID
    to count as ours (so a reused PID is never signalled).
    """

    def __init__(
        self, name: str, argv: list[str], pid_file: Path, log_file: Path, marker: str, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.pid_file = pid_file
        self.log_file = log_file
        self.marker = marker
        self.env = env

    def pid(self) -> int | None:
        """The PID if our process is alive; cleans a stale PID file."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if self.marker in _cmdline(pid) and not _is_zombie(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def is_running(self) -> bool:
        return self.pid() is not None

    def start(self) -> int:
        """Launch detached (own session, output appended to the log); returns the PID."""
        private_dir(self.log_file.parent)
        private_dir(self.pid_file.parent)
        with open_private(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.env,
                cwd=self.pid_file.parent,
                umask=PRIVATE_UMASK,  # its data and logs are private whatever our caller's umask
            )
        # Until exec completes, /proc/<pid>/cmdline is still ours, not the child's: wait for the
        # marker so the PID file never names a process that pid() would disown.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None and self.marker not in _cmdline(proc.pid):
            time.sleep(0.02)
        write_private(self.pid_file, str(proc.pid))
        return proc.pid

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM our process, wait, SIGKILL after ``timeout``; a no-op when it is not running."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() is not None:
            _reap(pid)
            time.sleep(0.2)
        if self.pid() is not None:
            os.kill(pid, signal.SIGKILL)
            for _ in range(50):
                _reap(pid)
                if self.pid() is None:
                    break
                time.sleep(0.1)
        for _ in range(100):  # our own child must be collected, or it lingers as a zombie
            if _reap(pid):
                break
            time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def _reap(pid: int) -> bool:
    """Collect our exited child; True once it is gone (or was never our child to collect)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def _java(java: str | None) -> str:
    candidates = [java] if java else []
    if not java and os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    if not java:
        candidates.append(shutil.which("java") or "")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            out = subprocess.run([candidate, "-version"], capture_output=True, text=True, timeout=30)
            match = re.search(r'version "(\d+)', out.stderr + out.stdout)
            if match and int(match.group(1)) >= 17:
                return candidate
            raise StackError(
                f"Kafka needs Java 17 or newer; {candidate} is {match.group(1) if match else 'unknown'}. "
                "Install openjdk-17-jre-headless or point JAVA_HOME at a newer JDK."
            )
    raise StackError(
        "Java 17+ is required to run Kafka and was not found: install openjdk-17-jre-headless or set JAVA_HOME."
    )


class LocalKafka:
    """Single-node Kafka in KRaft mode on 127.0.0.1, data and logs under ``<state_dir>/kafka``."""

    def __init__(self, settings: Settings, java: str | None = None, heap: str = "512m") -> None:
        self.settings = settings
        self.java = java
        self.heap = heap
        self.home = settings.state_dir / "kafka"
        self.libs = self.home / "libs"
        self.data = self.home / "data"
        self.config = self.home / "server.properties"
        self.log = self.home / "logs" / "stdout.log"
        self.process = ManagedProcess("kafka", [], self.home / "kafka.pid", self.log, marker=str(self.config))

    def ensure_jars(self) -> None:
        """Fetch the broker jars with Maven unless present. Raises StackError when Maven is missing or fails."""
        if any(self.libs.glob("kafka_2.13-*.jar")):
            return
        mvn = shutil.which("mvn")
        if not mvn:
            raise StackError("Maven is needed once to fetch the Kafka jars: install maven (apt-get install maven).")
        result = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(KAFKA_POM),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={self.libs}",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if result.returncode != 0:
            raise StackError(f"fetching the Kafka jars failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")

    def _write_config(self) -> None:
        s = self.settings
        lines = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "listeners": f"PLAINTEXT://127.0.0.1:{s.kafka_port},CONTROLLER://127.0.0.1:{s.kafka_controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{s.kafka_port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{s.kafka_controller_port}",
            "log.dirs": str(self.data),
            "num.partitions": str(s.topic_partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "log.retention.check.interval.ms": "60000",
        }
        private_dir(self.home)
        write_private(self.config, "".join(f"{k}={v}\n" for k, v in lines.items()))

    def _classpath(self) -> str:
        return f"{self.libs}/*"

    def start(self, timeout: float = 90.0) -> None:
        """Start the broker unless it runs; returns when it serves metadata. Raises StackError."""
        if self.process.is_running():
            return
        java = _java(self.java)
        s = self.settings
        for port, var in (
            (s.kafka_port, "FEEDBACK_KAFKA_PORT"),
            (s.kafka_controller_port, "FEEDBACK_KAFKA_CONTROLLER_PORT"),
        ):
            if port_in_use("127.0.0.1", port):
                raise StackError(
                    f"127.0.0.1:{port} is in use by another process: stop it or choose another port with {var}."
                )
        self.ensure_jars()
        self._write_config()
        tighten_tree(self.home / "logs")
        tighten_tree(self.data)  # topic data from before it was private
        if not (self.data / "meta.properties").exists():
            self._format(java)
        self.process.argv = [
            java,
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
            f"-Dkafka.logs.dir={self.home / 'logs'}",
            "-cp",
            self._classpath(),
            "kafka.Kafka",
            str(self.config),
        ]
        self.process.start()
        wait_until(self._ready, timeout, "Kafka", self.process.is_running, self.log)

    def _format(self, java: str) -> None:
        cmd = [
            java,
            "-cp",
            self._classpath(),
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            # One argument, "=" form: a random id may start with "-", which argparse would take for an option.
            f"--cluster-id={_cluster_id()}",
            "-c",
            str(self.config),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, umask=PRIVATE_UMASK)
        if result.returncode != 0:
            raise StackError(f"formatting Kafka storage in {self.data} failed:\n{result.stdout}{result.stderr}")

    def _ready(self) -> bool:
        from confluent_kafka.admin import AdminClient

        # Probe the socket first: librdkafka logs every refused connection to stderr.
        if not port_in_use("127.0.0.1", self.settings.kafka_port):
            return False
        admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap, "socket.timeout.ms": 2000})
        try:
            return len(admin.list_topics(timeout=2).brokers) >= 1
        except Exception:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        self.process.stop(timeout)

    def status(self) -> ServiceStatus:
        return ServiceStatus(
            "kafka",
            self.process.is_running(),
            self.process.pid(),
            self.settings.kafka_bootstrap,
            str(self.home / "logs" / "server.log"),
            str(self.data),
        )


def _cluster_id() -> str:
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


class EmbeddedClickHouse:
    """The chDB HTTP server (``sinks.chdb_server``) on 127.0.0.1, data under ``<state_dir>/clickhouse``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = settings.state_dir / "clickhouse"
        self.data = self.home / "data"
        self.log = self.home / "server.log"
        argv = [
            sys.executable,
            "-m",
            "sinks.chdb_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(settings.clickhouse_port),
            "--data-dir",
            str(self.data),
            "--password-file",
            str(settings.clickhouse_password_file),
        ]
        self.process = ManagedProcess(
            "clickhouse", argv, self.home / "clickhouse.pid", self.log, str(self.data), _server_env()
        )

    def _write_password(self) -> None:
        """The password file the server reads (0600): FEEDBACK_CLICKHOUSE_PASSWORD when set, else
        the generated one (created on first start); clients read the same file."""
        path = self.settings.clickhouse_password_file
        wanted = self.settings.clickhouse_password
        if not wanted:
            self.settings.clickhouse_secret()  # generates it unless present
            os.chmod(path, 0o600)
            return
        if path.exists() and path.read_text().strip() == wanted:
            os.chmod(path, 0o600)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(wanted + "\n")
        os.replace(tmp, path)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.settings.clickhouse_port}/ping", timeout=2) as r:
                return bool(r.read() == b"Ok.\n")
        except OSError:
            return False

    def start(self, timeout: float = 60.0) -> None:
        """Start the server unless it runs; returns when /ping answers. Raises StackError."""
        if self.process.is_running():
            return
        if port_in_use("127.0.0.1", self.settings.clickhouse_port):
            raise StackError(
                f"127.0.0.1:{self.settings.clickhouse_port} is in use by another process: stop it or "
                "choose another port with FEEDBACK_CLICKHOUSE_PORT."
            )
        private_dir(self.data)
        tighten_tree(self.home)  # data and log from before they were private
        self._write_password()
        self.process.start()
        wait_until(self._ready, timeout, "embedded ClickHouse", self.process.is_running, self.log)

    def stop(self, timeout: float = 30.0) -> None:
        self.process.stop(timeout)

    def status(self) -> ServiceStatus:
        return ServiceStatus(
            "clickhouse",
            self.process.is_running(),
            self.process.pid(),
            self.settings.clickhouse_endpoint,
            str(self.log),
            str(self.data),
            f"{self.settings.clickhouse_endpoint} user {self.settings.clickhouse_user}, password in "
            f"{self.settings.clickhouse_password_file}",
        )


#: The only variables the embedded ClickHouse server inherits: it must hold no project secret
#: (FEEDBACK_INTERNAL_TOKENS, FEEDBACK_PSEUDONYM_KEY, the ClickHouse password: that one it reads
#: from its 0600 file), whatever a query could still reach.
_SERVER_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ")


def _server_env() -> dict[str, str]:
    env = {name: os.environ[name] for name in _SERVER_ENV if name in os.environ}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    return env


class LocalStack:
    """Kafka and ClickHouse as the settings ask: local ones are started, external ones only checked."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.kafka = LocalKafka(settings)
        self.clickhouse = EmbeddedClickHouse(settings)

    def up(self) -> None:
        """Start what is local and not running; idempotent. Raises StackError."""
        private_dir(self.settings.state_dir)  # 0700: nothing under it is reachable by other users
        if self.settings.uses_local_kafka:
            self.kafka.start()
        if self.settings.uses_embedded_clickhouse:
            self.clickhouse.start()
        else:
            from sinks.clickhouse import connect

            connect(self.settings).ping()

    def down(self) -> None:
        """Stop the local services this state folder started; idempotent."""
        self.clickhouse.stop()
        self.kafka.stop()

    def status(self) -> list[ServiceStatus]:
        return [self.kafka.status(), self.clickhouse.status()]
