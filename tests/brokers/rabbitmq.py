"""A RabbitMQ node of the tests' own (Debian's `rabbitmq-server`): its own epmd, node name, ports
on 127.0.0.1 and directories (data, logs, config, Erlang cookie) under a test directory; killed
on exit, and killed and started again (same name, same data: durable queues and persistent
messages survive) for reconnect tests. It boots in 5-15 s, so a test session starts it once.

Without the executable the tests skip, saying how to install it; under CI=true they fail.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import aio_pika
import pytest

START_TIMEOUT = 45.0  # s for the node to accept AMQP logins
SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # Debian's /usr/sbin one su's to `rabbitmq`


def rabbitmq_binaries() -> tuple[str, str] | None:
    """The server's start script and `epmd`, or None if either is missing."""
    server = SCRIPT if Path(SCRIPT).exists() else shutil.which("rabbitmq-server")
    epmd = shutil.which("epmd") or next(iter(Path("/usr/lib/erlang").glob("erts-*/bin/epmd")), None)
    if server is None or epmd is None:
        return None
    return server, str(epmd)


class RabbitMQ:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port, dist, self._epmd_port = _free_ports(3)
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.node = f"ember{self.port}@localhost"
        self._log = directory / "node.log"
        self._env = {
            **os.environ,
            "HOME": str(directory),  # the Erlang cookie goes here, private to this node
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_DIST_PORT": str(dist),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(directory / "node.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_PORT": str(self._epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        self._server = ""
        self._epmd: subprocess.Popen[bytes] | None = None
        self._node: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RabbitMQ:
        binaries = rabbitmq_binaries()
        if binaries is None:
            missing = "no rabbitmq-server executable: apt-get install rabbitmq-server"
            if os.environ.get("CI") == "true":
                pytest.fail(missing)
            pytest.skip(missing)
        self._server, epmd = binaries
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "rabbitmq.conf").write_text("")
        (self.directory / "rabbitmq-env.conf").write_text("")
        (self.directory / "enabled_plugins").write_text("[].\n")
        try:
            self._epmd = self._spawn([epmd, "-port", str(self._epmd_port)], "epmd.log")
            self.start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    def start(self) -> None:
        """Start the node (again) and wait until it accepts logins."""
        self._node = self._spawn([self._server], "node.log")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._node.poll() is not None:
                pytest.fail(f"rabbitmq-server exited:\n{self._log.read_text(errors='replace')}")
            if _accepts(self.port) and asyncio.run(_logs_in(self.url)):
                return
            time.sleep(0.1)
        pytest.fail(f"rabbitmq-server did not start in {START_TIMEOUT:.0f} s")

    def kill(self) -> None:
        """SIGKILL the node and its helpers (a crash: clients see their connections drop, and
        what the node had not written to disk yet is lost)."""
        _kill(self._node)
        self._node = None

    def stop(self) -> None:
        """Shut the node down cleanly (SIGTERM: it closes connections, then writes its state)."""
        if self._node is not None:
            self._node.send_signal(signal.SIGTERM)  # the start script stops the node
            try:
                self._node.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def _spawn(self, command: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.directory / log, "ab") as out:
            return subprocess.Popen(
                command,
                env=self._env,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # one process group: the script, beam, its children
            )

    def _stop(self) -> None:
        self.kill()
        _kill(self._epmd)
        self._epmd = None


def _kill(process: subprocess.Popen[bytes] | None) -> None:
    if process is None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


async def _logs_in(url: str) -> bool:
    try:
        connection = await aio_pika.connect(url, timeout=2.0)
    except (TimeoutError, OSError, aio_pika.exceptions.AMQPError):
        return False
    await connection.close()
    return True


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
