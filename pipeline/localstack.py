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

__all__ = [
    "EmbeddedClickHouse",
    "KafkaNode",
    "KafkaNodeSpec",
    "LocalKafka",
    "LocalStack",
    "ManagedProcess",
    "ServiceStatus",
    "broker_config",
    "kafka_found_on_disk",
    "kafka_layout",
    "port_in_use",
]

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


@dataclass(frozen=True)
class KafkaNodeSpec:
    """Where one local broker lives and listens: ``home`` holds its config, data, logs and PID file."""

    node_id: int
    port: int
    controller_port: int
    home: Path


def kafka_layout(settings: Settings) -> list[KafkaNodeSpec]:
    """The local brokers the settings ask for. One: ``<state_dir>/kafka`` itself, as it always
    was; more: ``<state_dir>/kafka/node-<id>`` each, on the ports :meth:`Settings.kafka_node_ports` gives."""
    root = settings.state_dir / "kafka"
    if settings.kafka_brokers == 1:
        return [KafkaNodeSpec(1, settings.kafka_port, settings.kafka_controller_port, root)]
    return [
        KafkaNodeSpec(n + 1, *settings.kafka_node_ports(n), root / f"node-{n + 1}")
        for n in range(settings.kafka_brokers)
    ]


def kafka_found_on_disk(state_dir: Path) -> int:
    """How many brokers the state folder was set up for: the node-<id> folders with a config
    (``feedback up --brokers N``), 1 for the single broker's data, 0 for none."""
    root = state_dir / "kafka"
    nodes = [d for d in root.glob("node-*") if (d / "server.properties").exists()]
    if nodes:
        return len(nodes)
    return 1 if (root / "data" / "meta.properties").exists() else 0


def broker_config(settings: Settings, node: KafkaNodeSpec, layout: list[KafkaNodeSpec]) -> dict[str, str]:
    """One broker's server.properties. With several brokers every node is a broker and a
    controller (a static quorum of them all), and topics, the consumer offsets and the
    transaction log default to :func:`replication_for` the cluster's size."""
    from pipeline.kafka_admin import replication_for

    rf, min_isr = replication_for(len(layout))
    lines = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{node.controller_port}",
        "log.dirs": str(node.home / "data"),
        "num.partitions": str(settings.topic_partitions),
        "offsets.topic.replication.factor": str(rf),
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": str(rf),
        "transaction.state.log.min.isr": str(min_isr),
        "share.coordinator.state.topic.replication.factor": str(rf),
        "share.coordinator.state.topic.min.isr": str(min_isr),
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
        "log.retention.check.interval.ms": "60000",
    }
    if len(layout) > 1:
        del lines["controller.quorum.bootstrap.servers"]
        lines["controller.quorum.voters"] = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in layout)
        lines["default.replication.factor"] = str(rf)  # topics any client creates (a worker's changelogs)
        lines["min.insync.replicas"] = str(min_isr)
        lines["unclean.leader.election.enable"] = "false"  # never elect a replica that lacks acknowledged writes
    return lines


class KafkaNode:
    """One local broker process: its config, storage format, start, readiness and PID file."""

    def __init__(self, settings: Settings, spec: KafkaNodeSpec, layout: list[KafkaNodeSpec], libs: Path) -> None:
        self.settings = settings
        self.spec = spec
        self.layout = layout
        self.libs = libs
        self.home = spec.home
        self.data = spec.home / "data"
        self.config = spec.home / "server.properties"
        self.log = spec.home / "logs" / "stdout.log"
        self.name = "kafka" if len(layout) == 1 else f"kafka-{spec.node_id}"
        self.what = "Kafka" if len(layout) == 1 else f"Kafka broker {spec.node_id} (127.0.0.1:{spec.port})"
        self.process = ManagedProcess(self.name, [], spec.home / "kafka.pid", self.log, marker=str(self.config))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.spec.port}"

    def check_ports(self) -> None:
        """Raise StackError naming the setting when another process holds one of this node's ports."""
        if len(self.layout) == 1:
            where = (
                (self.spec.port, "FEEDBACK_KAFKA_PORT"),
                (self.spec.controller_port, "FEEDBACK_KAFKA_CONTROLLER_PORT"),
            )
        else:
            step = f"+ {2 * (self.spec.node_id - 1)}"
            where = (
                (self.spec.port, f"FEEDBACK_KAFKA_PORT ({self.what}: the port {step})"),
                (self.spec.controller_port, f"FEEDBACK_KAFKA_CONTROLLER_PORT ({self.what}'s controller: {step})"),
            )
        for port, var in where:
            if port_in_use("127.0.0.1", port):
                raise StackError(
                    f"127.0.0.1:{port} is in use by another process: stop it or choose another port with {var}."
                )

    def prepare(self, java: str, cluster_id: str) -> None:
        """Write the config; format the storage on first start (one ``cluster_id`` for all nodes)."""
        private_dir(self.home)
        write_private(
            self.config, "".join(f"{k}={v}\n" for k, v in broker_config(self.settings, self.spec, self.layout).items())
        )
        tighten_tree(self.home / "logs")
        tighten_tree(self.data)  # topic data from before it was private
        if not (self.data / "meta.properties").exists():
            self._format(java, cluster_id)

    def launch(self, java: str, heap: str) -> None:
        self.process.argv = [
            java,
            f"-Xmx{heap}",
            f"-Xms{heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
            f"-Dkafka.logs.dir={self.home / 'logs'}",
            "-cp",
            f"{self.libs}/*",
            "kafka.Kafka",
            str(self.config),
        ]
        self.process.start()

    def _format(self, java: str, cluster_id: str) -> None:
        # One node: a standalone dynamic quorum. Several: the static voters of the config.
        quorum = ["--standalone"] if len(self.layout) == 1 else []
        cmd = [
            java,
            "-cp",
            f"{self.libs}/*",
            "kafka.tools.StorageTool",
            "format",
            *quorum,
            # One argument, "=" form: a random id may start with "-", which argparse would take for an option.
            f"--cluster-id={cluster_id}",
            "-c",
            str(self.config),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, umask=PRIVATE_UMASK)
        if result.returncode != 0:
            raise StackError(f"formatting {self.what} storage in {self.data} failed:\n{result.stdout}{result.stderr}")

    def ready(self) -> bool:
        """This node answers metadata naming every broker of the cluster."""
        from confluent_kafka.admin import AdminClient

        # Probe the socket first: librdkafka logs every refused connection to stderr.
        if not port_in_use("127.0.0.1", self.spec.port):
            return False
        admin = AdminClient({"bootstrap.servers": self.address, "socket.timeout.ms": 2000})
        try:
            return len(admin.list_topics(timeout=2).brokers) >= len(self.layout)
        except Exception:
            return False

    def status(self) -> ServiceStatus:
        return ServiceStatus(
            self.name,
            self.process.is_running(),
            self.process.pid(),
            self.address,
            str(self.home / "logs" / "server.log"),
            str(self.data),
        )


class LocalKafka:
    """Kafka in KRaft mode on 127.0.0.1 from the Maven jars: one combined broker and controller
    under ``<state_dir>/kafka`` (the default), or ``FEEDBACK_KAFKA_BROKERS`` of them forming one
    cluster, each under ``<state_dir>/kafka/node-<id>``. The jars in ``<state_dir>/kafka/libs`` serve all."""

    def __init__(self, settings: Settings, java: str | None = None, heap: str | None = None) -> None:
        self.settings = settings
        self.java = java
        self.heap = heap or ("512m" if settings.kafka_brokers == 1 else "384m")  # several JVMs share 2 cores
        self.libs = settings.state_dir / "kafka" / "libs"
        self.layout = kafka_layout(settings)
        self.nodes = [KafkaNode(settings, spec, self.layout, self.libs) for spec in self.layout]
        # Kept for callers that knew the single broker's paths.
        self.home = settings.state_dir / "kafka"
        self.data = self.nodes[0].data
        self.config = self.nodes[0].config
        self.log = self.nodes[0].log
        self.process = self.nodes[0].process

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

    def _check_layout(self) -> None:
        found = kafka_found_on_disk(self.settings.state_dir)
        wanted = len(self.layout)
        if found and found != wanted:
            held = "one broker" if found == 1 else f"a {found}-broker cluster"
            raise StackError(
                f"{self.home} holds {held}, not the {wanted} asked for: run `feedback up --brokers {found}` "
                f"(FEEDBACK_KAFKA_BROKERS={found}), or use another FEEDBACK_STATE_DIR."
            )

    def start(self, timeout: float | None = None) -> None:
        """Start every broker not running; returns when each serves metadata naming all of them.
        Raises StackError naming the broker that failed. ``timeout``: 90 s for one, 150 s for a cluster."""
        idle = [node for node in self.nodes if not node.process.is_running()]
        if not idle:
            return
        self._check_layout()
        java = _java(self.java)
        for node in idle:
            node.check_ports()
        self.ensure_jars()
        cluster_id = _cluster_id()
        for node in self.nodes:  # a cluster id of a node already formatted is its own (not rewritten)
            if node in idle:
                node.prepare(java, cluster_id)
        for node in idle:  # all at once: a quorum elects a leader only once a majority runs
            node.launch(java, self.heap)
        deadline = time.monotonic() + (timeout or (90.0 if len(self.nodes) == 1 else 150.0))
        for node in self.nodes:
            wait_until(node.ready, max(1.0, deadline - time.monotonic()), node.what, node.process.is_running, node.log)

    def _ready(self) -> bool:
        return all(node.ready() for node in self.nodes)

    def _classpath(self) -> str:
        return f"{self.libs}/*"

    def _format(self, java: str) -> None:
        """Format the first (or only) broker's storage with a new cluster id."""
        self.nodes[0]._format(java, _cluster_id())

    def _found_nodes(self) -> list[KafkaNode]:
        """The brokers this state folder holds, whatever the settings ask now (for stop and status)."""
        found = kafka_found_on_disk(self.settings.state_dir)
        if found in (0, len(self.layout)):
            return self.nodes
        other = self.settings.model_copy(update={"kafka_brokers": found})
        layout = kafka_layout(other)
        return [KafkaNode(other, spec, layout, self.libs) for spec in layout]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every broker first (a broker shutting down alone waits on a quorum that is
        leaving too), then wait for each by PID."""
        nodes = self._found_nodes()
        for node in nodes:
            pid = node.process.pid()
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
        for node in nodes:
            node.process.stop(timeout)

    def status(self) -> list[ServiceStatus]:
        return [node.status() for node in self._found_nodes()]


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
        return [*self.kafka.status(), self.clickhouse.status()]
