"""`ember up`: open the store, start the pool, restore functions, serve until a signal, clean up."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import uvicorn

from ember import bundle
from ember.api.app import build
from ember.api.control import Control
from ember.auth import KeyTable
from ember.blobs.local import LocalBlobs
from ember.config import ServerConfig
from ember.errors import EmberError
from ember.gateway.app import Gateway
from ember.gateway.router import RouteTable
from ember.pool.manager import Pool
from ember.queue.base import Queue
from ember.queue.dispatcher import Dispatcher
from ember.queue.sqlite import SQLiteQueue
from ember.secretbox import SecretBox
from ember.server.heap import Heap
from ember.server.http import front_protocol
from ember.store.sqlite import SQLiteStore
from ember.telemetry.buffer import TelemetryBuffer
from ember.telemetry.metrics import Metrics
from ember.telemetry.outcomes import Outcomes
from ember.triggers.manager import Triggers

log = logging.getLogger("ember")
PRUNE_EVERY = 60.0


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        config.home.mkdir(parents=True, exist_ok=True)
        config.home.chmod(0o700)  # keys, secrets and the store: the server's uid only
        self.telemetry = TelemetryBuffer(config.log_bytes_per_invocation)
        self.keys = KeyTable()
        self.store = SQLiteStore(config.db_path)
        self.pool = Pool(config, self.telemetry)
        self.routes = RouteTable()
        self.heap = Heap()
        self.metrics = Metrics(
            self.pool.instance_counts, self.pool.node_statistics, self.heap.statistics
        )
        self.outcomes = Outcomes()
        self.control = Control(
            config,
            self.store,
            LocalBlobs(config.blob_dir),
            self.pool,
            self.routes,
            self.keys,
            SecretBox.load_or_create(config.master_key_path),
            self.outcomes,
            self.forget_function,
            self.heap.published,
        )
        self.gateway = Gateway(
            self.routes,
            self.pool,
            self.telemetry,
            self.metrics,
            self.keys,
            config.max_body_bytes,
            self.outcomes,
            config.max_buffered_bytes,
            config.async_max_body_bytes,
        )
        self.queue = _queue(config)
        self.dispatcher = Dispatcher(self.queue, self.gateway, config.async_retention)
        self.metrics.queue = self.dispatcher.statistics
        self.triggers = Triggers(self.store, self.gateway, self.dispatcher)
        self.control.deploys.triggers = self.triggers
        self.metrics.triggers = self.triggers.statistics
        # All but /fn/, which the front serves.
        self.app = build(self.control, self.metrics, self.dispatcher, self.triggers)
        self._flusher: asyncio.Task[None] | None = None
        self._forgetting: set[asyncio.Task[None]] = set()
        self.stop_deadline = 0.0  # the loop's clock: when attempts under way stop being awaited

    def forget_function(self, function: str) -> None:
        """`ember rm`: what the data plane keeps per function ("namespace/name") goes with it:
        keep-alive state, its async invocations, metric series, log accounting, rollout
        outcomes."""
        self.pool.forget_function(function)
        self._forgetting.add(asyncio.get_running_loop().create_task(self.triggers.forget(function)))
        self.dispatcher.forget(function)
        self.metrics.forget(function)
        self.telemetry.forget(function)
        self.outcomes.forget(function)

    async def start(self) -> None:
        for path in (self.config.code_dir, self.config.blob_dir):
            path.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        await self.pool.start()
        await self.control.start()
        await self.dispatcher.start()
        await self.triggers.start()  # after the functions are routed and the queue is open
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        last_prune = time.monotonic()
        while True:
            await asyncio.sleep(self.config.flush_interval)
            await self.flush()
            if time.monotonic() - last_prune > PRUNE_EVERY:
                await self.store.prune(self.config.activation_retention, self.config.log_retention)
                last_prune = time.monotonic()

    async def flush(self) -> None:
        activations, logs = self.telemetry.drain()
        try:
            await self.store.write_telemetry(activations, logs)
        except Exception:
            log.exception(
                "writing %d activations and %d log lines failed", len(activations), len(logs)
            )

    def stopping(self) -> None:
        """A signal came: async invocations start no new attempts from now on."""
        self.triggers.stopping = True
        self.dispatcher.stop_taking()
        self.stop_deadline = asyncio.get_running_loop().time() + self.config.grace_period

    async def stop(self) -> None:
        self.heap.stop()
        await self.triggers.stop()  # no more events read; what is unacknowledged goes back
        if not self.dispatcher.stopping:
            self.stopping()
        await self.dispatcher.drain(self.stop_deadline)  # the grace for attempts under way
        await self.control.stop()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.pool.shutdown()
        await self.dispatcher.close()
        await self.flush()
        await self.store.close()


def _queue(config: ServerConfig) -> Queue:
    if config.queue:
        from ember.queue.nats import NatsQueue

        return NatsQueue(config.queue)
    return SQLiteQueue(config.queue_path)


class _Uvicorn(uvicorn.Server):
    """Ends log-follow streams as soon as a signal arrives, so shutdown is not held up by them."""

    def __init__(
        self, config: uvicorn.Config, stopping: asyncio.Event, on_stop: Callable[[], object]
    ) -> None:
        super().__init__(config)
        self._stopping = stopping
        self._on_stop = on_stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._stopping.set()
        self._on_stop()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the signal after its shutdown, which would kill the process before
        # the pool and the store are closed; the handlers stay ours until `run` returns.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle_exit)
        yield


async def _deploy_dirs(server: Server, dirs: list[Path]) -> None:
    for directory in dirs:
        data = await asyncio.to_thread(bundle.pack, directory)
        name = directory.resolve().name.lower().replace("_", "-").replace(" ", "-")
        for d in await server.control.deploys.deploy(data, name, "default"):
            log.info("deployed %s revision %d", d.name, d.revision)
            print(f"ember: deployed {d.name}; try:\n  curl '{d.url}'", flush=True)


async def run(config: ServerConfig, deploy: list[Path]) -> int:
    server = Server(config)  # the pool notes the fd limit functions get: the one we started with
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # two fds per instance (its socket and a pidfd): take what we may
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        await server.start()
    except EmberError as exc:
        print(f"ember: {exc.message}", file=sys.stderr, flush=True)
        await server.stop()
        return exc.exit_code
    # What is alive now lives as long as the server: keep full collections from walking it
    # (and from now on what lives as long as a function: server/heap.py).
    server.heap.start()
    uv = _Uvicorn(
        uvicorn.Config(
            server.app,
            host=config.host,
            port=config.port,
            http=front_protocol(server.gateway, config.max_connections, config.head_timeout),
            lifespan="off",
            access_log=False,
            log_level=config.log_level,
            timeout_graceful_shutdown=config.grace_period,  # type: ignore[arg-type]
            server_header=False,
        ),
        server.control.stopping,
        # From the signal handler: on the loop, between its callbacks, not inside one.
        functools.partial(asyncio.get_running_loop().call_soon_threadsafe, server.stopping),
    )
    serving = asyncio.get_running_loop().create_task(uv.serve())
    try:
        while not uv.started and not serving.done():
            await asyncio.sleep(0.01)
        if uv.started:
            port = server.control.address.port = uv.servers[0].sockets[0].getsockname()[1]
            log.info("ember serving on http://%s:%d (home %s)", config.host, port, config.home)
            print(f"ember: listening on http://{config.host}:{port}", flush=True)
            await _deploy_dirs(server, deploy)
        await serving
    except SystemExit:  # uvicorn exits when it cannot bind; it has logged why
        return 1
    except EmberError as exc:
        print(f"ember: {exc.message}", file=sys.stderr, flush=True)
        uv.should_exit = True
        await serving
        return exc.exit_code
    finally:
        await server.stop()
    return 0 if uv.started else 1


def serve(config: ServerConfig, deploy: list[Path]) -> int:
    """Run the server in the foreground until SIGTERM or SIGINT; returns the exit code."""
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run(config, deploy))
    return uvloop.run(run(config, deploy))
