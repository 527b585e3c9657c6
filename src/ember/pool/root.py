"""The root zygote supervisor: launches `python -m ember.runtime.root` and asks it for zygotes."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys

from ember.errors import PlatformError
from ember.pool.channel import AsyncChannel
from ember.pool.target import Target
from ember.wire.messages import MountCode, SandboxPlan, Shutdown, SpawnBlank, SpawnZygote

log = logging.getLogger("ember.pool")


class CodeMountFailed(PlatformError):
    """A revision's code could not be shown to a layer zygote; `errno` says why (0: unknown)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(f"could not show the code to a layer zygote: {message}")
        self.errno = errno


def function_env(target: Target) -> dict[str, str]:
    """The function's variables, plus the secrets it asked to see as variables."""
    env = dict(target.spec.env)
    for ref in target.spec.secrets:
        if ref.env and ref.name in target.secrets:
            env[ref.env] = target.secrets[ref.name].decode("utf-8", "surrogateescape")
    return env


class RootZygote:
    def __init__(self, env: dict[str, str], nofile: int = 0) -> None:
        self.nofile = nofile  # the fd limit functions get (the server raises its own)
        self.env = env  # the root zygote's whole environment, inherited by every function
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: AsyncChannel[object] | None = None
        self.starts = 0
        self._starting = asyncio.Lock()
        self._stopping = False

    @property
    def alive(self) -> bool:
        return self.channel is not None and not self.channel.closed

    async def ensure(self) -> bool:
        """Start the root zygote if it is not running; True if it had to be started."""
        async with self._starting:  # one root, however many starts ask at once
            return await self._ensure()

    async def _ensure(self) -> bool:
        if self.alive:
            return False
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",  # no current directory on sys.path: it would be bound into every sandbox
            "-m",
            "ember.runtime.root",
            str(child.fileno()),
            str(self.nofile),
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,  # Ctrl-C in a terminal reaches the server, not the tree
            cwd="/",
        )
        child.close()
        self.channel = AsyncChannel(parent, Shutdown, lambda _msg, _sender: None, self._lost)
        self.starts += 1
        log.info("root zygote started (pid %d)", self.proc.pid)
        return True

    def forget(self) -> None:
        """Treat the root zygote as gone (its channel failed); the next `ensure` starts one."""
        if self.channel is not None:
            self.channel.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    def _lost(self) -> None:
        if self.proc is not None and self.proc.returncode is None and not self._stopping:
            log.warning("root zygote channel closed; it will be restarted on the next start")

    def spawn_blank(self, cgroups: list[str], split: bool, spare: bool = False) -> socket.socket:
        """Fork a zygote-to-be; the server's end of its channel. It waits there for its spec."""
        assert self.channel is not None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:  # the channel owns `child` from here and closes it once the fd is sent
            self.channel.send(SpawnBlank(cgroups=cgroups, split=split, spare=spare), child)
        except OSError:
            parent.close()
            raise
        return parent

    async def mount_code(self, pidfd: int, source: str, name: str) -> None:
        """Show the code directory `source` read-only at `/code/NAME` in the sandbox of the
        layer zygote `pidfd` (ember.runtime.code_mount, done by a child of the root zygote);
        `CodeMountFailed` with the errno when it could not."""
        if self.channel is None or self.channel.closed:
            raise CodeMountFailed(0, "the root zygote is gone; retry")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.channel.send(MountCode(source=source, name=name), theirs, also=pidfd)
            ours.setblocking(False)
            async with asyncio.timeout(10):
                report = await asyncio.get_running_loop().sock_recv(ours, 4096)
        except (OSError, TimeoutError) as exc:
            raise CodeMountFailed(0, f"no answer from the root zygote: {exc!r}") from exc
        finally:
            ours.close()
        if report != b"ok":
            number, _, message = report.decode(errors="replace").partition(" ")
            raise CodeMountFailed(int(number) if number.isdigit() else 0, message or "no answer")

    async def stop(self) -> None:
        self._stopping = True
        if self.channel is not None and not self.channel.closed:
            try:
                self.channel.send(Shutdown())
            except OSError:
                pass
            self.channel.close()
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def spec_message(target: Target, init_timeout: float, sandbox: SandboxPlan | None) -> SpawnZygote:
    """What a zygote-to-be needs to become `target`'s zygote; sent on its own channel."""
    spec = target.spec
    return SpawnZygote(
        revision=target.label,
        code_dir=target.code_dir,
        source=spec.source,
        module=spec.module,
        attribute=spec.attribute,
        env=function_env(target),
        function=target.function,
        number=target.number,
        memory_mb=spec.memory,
        concurrency=spec.concurrency,
        init_timeout=init_timeout,
        network=spec.network,
        sandbox=sandbox,
        namespace=target.namespace,
        layer_dir=target.layer_dir,
    )
