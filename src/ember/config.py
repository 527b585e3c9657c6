"""The server's one frozen config: defaults in one place; `validate()` names key, value and rule.

Only the CLI reads environment variables; everything below it receives a `ServerConfig`.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from ember.errors import UserError


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True):
    home: Path
    host: str = "127.0.0.1"
    port: int = 8080
    grace_period: float = 30.0  # seconds in-flight invocations get on shutdown
    queue_depth: int = 100  # waiting requests per revision before 429
    init_timeout: float = 60.0  # seconds a module may take to import (its init phase)
    # Seconds an unused function zygote stays warm while its idle-time histogram is not yet
    # representative (then the histogram decides: autoscaler/histogram.py).
    zygote_keepalive: float = 600.0
    # MB instances and zygotes may use on this node (each counts its memory: setting);
    # 0: 80 % of the machine's memory.
    memory_budget_mb: int = 0
    budget_wait: float = 5.0  # seconds a start may wait for memory before 429
    revision_retention: int = 10  # revisions kept per function (aliases keep theirs too)
    max_body_bytes: int = 6 * 1024 * 1024  # request bodies; larger → 413
    # Request bodies held in memory at once, over every request (read, waiting, running);
    # a request that would go beyond gets 503.
    max_buffered_bytes: int = 256 * 1024 * 1024
    max_connections: int = 1024  # open HTTP connections; one more is answered 503 and closed
    head_timeout: float = 10.0  # seconds a request line and headers may take to arrive → 408
    max_bundle_bytes: int = 64 * 1024 * 1024  # compressed upload
    max_unpacked_bytes: int = 256 * 1024 * 1024
    max_bundle_files: int = 10_000
    activation_retention: int = 100_000  # rows kept in the store
    log_retention: int = 200_000  # log lines kept in the store
    log_bytes_per_invocation: int = 1024 * 1024  # beyond this, output is dropped with a note
    flush_interval: float = 0.5  # seconds between telemetry drains to the store
    use_cgroups: bool = True  # memory limits by cgroup where the host allows it
    # auto: the root sandbox when privileged, else user namespaces, else none (rlimits only);
    # userns: user namespaces even as root; off: none.
    sandbox: str = "auto"
    require_isolation: bool = False  # refuse to start without the sandbox and cgroups
    sandbox_uid_base: int = 900_000  # tenant N runs as uid/gid base + N
    log_level: str = "info"
    # Where builds of functions' requirements download from (docs/dependencies.md); never
    # taken from a function's own files.
    index_url: str = ""  # "": uv's default, PyPI
    extra_index_urls: list[str] = []
    find_links: list[str] = []  # directories or pages of wheels (an offline wheelhouse)
    no_index: bool = False  # find_links only
    offline: bool = False  # no network: uv's cache and find_links only
    package_cache: str = ""  # uv's cache of downloaded wheels; "": EMBER_HOME/layers/.cache
    build_timeout: float = 300.0  # seconds a resolution or an install may take
    max_layer_mb: int = 4096  # installed size of one function's requirements
    # Requirements only source distributions satisfy are built in a sandbox of the deploying
    # namespace (ember.api.source_builds), within these limits; False: refused.
    source_builds: bool = True
    build_memory_mb: int = 2048  # the sandboxed build's cgroup cap
    build_disk_mb: int = 2048  # its private /tmp, where it builds
    # Layer zygotes (ember.pool.layer_zygotes) kept at most, least recently used evicted
    # first; 0: none (every zygote imports its requirements itself).
    layer_zygotes: int = 32
    # Seconds a layer zygote no function zygote uses is kept (its function still deployed).
    layer_zygote_keepalive: float = 3600.0
    # Where async invocations wait (ember.queue): "" = SQLite in EMBER_HOME/queue.db;
    # nats://HOST:PORT = a NATS JetStream server.
    queue: str = ""
    async_max_body_bytes: int = 1024 * 1024  # an async invocation's body; larger → 413
    # Seconds an ended async invocation (its result, its Idempotency-Key) is kept.
    async_retention: float = 7 * 24 * 3600.0
    # The only variables of the server's environment that reach functions (the CLI fills it).
    base_env: dict[str, str] = {}

    def validate(self) -> ServerConfig:
        rules: list[tuple[str, object, bool, str]] = [
            ("port", self.port, 0 <= self.port <= 65535, "must be 0-65535"),
            ("grace_period", self.grace_period, self.grace_period >= 0, "must be >= 0"),
            ("queue_depth", self.queue_depth, self.queue_depth >= 0, "must be >= 0"),
            ("zygote_keepalive", self.zygote_keepalive, self.zygote_keepalive >= 0, "must be >= 0"),
            ("init_timeout", self.init_timeout, self.init_timeout > 0, "must be > 0"),
            ("memory_budget_mb", self.memory_budget_mb, self.memory_budget_mb >= 0, "must be >= 0"),
            ("budget_wait", self.budget_wait, self.budget_wait >= 0, "must be >= 0"),
            (
                "revision_retention",
                self.revision_retention,
                self.revision_retention >= 1,
                "must be >= 1",
            ),
            ("max_body_bytes", self.max_body_bytes, self.max_body_bytes > 0, "must be > 0"),
            (
                "max_buffered_bytes",
                self.max_buffered_bytes,
                self.max_buffered_bytes >= self.max_body_bytes,
                f"must be at least max_body_bytes ({self.max_body_bytes})",
            ),
            ("max_connections", self.max_connections, self.max_connections >= 1, "must be >= 1"),
            ("head_timeout", self.head_timeout, self.head_timeout > 0, "must be > 0"),
            ("flush_interval", self.flush_interval, self.flush_interval > 0, "must be > 0"),
            ("build_timeout", self.build_timeout, self.build_timeout > 0, "must be > 0"),
            ("max_layer_mb", self.max_layer_mb, self.max_layer_mb >= 1, "must be >= 1"),
            ("build_memory_mb", self.build_memory_mb, self.build_memory_mb >= 64, "must be >= 64"),
            ("build_disk_mb", self.build_disk_mb, self.build_disk_mb >= 16, "must be >= 16"),
            ("layer_zygotes", self.layer_zygotes, self.layer_zygotes >= 0, "must be >= 0"),
            (
                "queue",
                self.queue,
                self.queue == "" or self.queue.startswith(("nats://", "tls://")),
                "must be empty (SQLite in EMBER_HOME) or a nats:// URL",
            ),
            (
                "async_max_body_bytes",
                self.async_max_body_bytes,
                0 < self.async_max_body_bytes <= self.max_body_bytes,
                f"must be > 0 and at most max_body_bytes ({self.max_body_bytes})",
            ),
            ("async_retention", self.async_retention, self.async_retention > 0, "must be > 0"),
            (
                "layer_zygote_keepalive",
                self.layer_zygote_keepalive,
                self.layer_zygote_keepalive >= 0,
                "must be >= 0",
            ),
            (
                "no_index",
                self.no_index,
                not self.no_index or bool(self.find_links),
                "needs find_links (a wheelhouse) to install anything",
            ),
            (
                "sandbox",
                self.sandbox,
                self.sandbox in ("auto", "userns", "off"),
                "must be auto, userns or off",
            ),
            (
                "log_level",
                self.log_level,
                self.log_level in ("debug", "info", "warning", "error"),
                "must be debug, info, warning or error",
            ),
        ]
        for key, value, ok, rule in rules:
            if not ok:
                raise UserError(f"server config: {key}={value!r} {rule}", code="bad_config")
        return self

    @property
    def db_path(self) -> Path:
        return self.home / "ember.db"

    @property
    def queue_path(self) -> Path:
        return self.home / "queue.db"

    @property
    def blob_dir(self) -> Path:
        return self.home / "blobs"

    @property
    def code_dir(self) -> Path:
        return self.home / "code"

    @property
    def layers_dir(self) -> Path:
        return self.home / "layers"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def credentials_path(self) -> Path:
        return self.home / "credentials"

    @property
    def master_key_path(self) -> Path:
        return self.home / "master.key"

    @property
    def sandbox_root(self) -> Path:
        """An empty directory each sandbox mounts its own root on (in its own mount namespace)."""
        return self.run_dir / "sandbox-root"
