"""Every message between the server, the root zygote, function zygotes and instances.

Three tagged unions, one per channel. New fields get defaults so old and new peers interoperate.
"""

from __future__ import annotations

import msgspec

Headers = list[tuple[bytes, bytes]]


# One control message is one SOCK_SEQPACKET packet, both ways, well under the default socket
# buffer (~208 KB): the server refuses to send a larger one and reads no more than this.
MAX_CONTROL_PACKET = 128 * 1024


class _Msg(msgspec.Struct, frozen=True, tag_field="t", array_like=False):
    pass


# ---- server → root zygote (control channel), fd of the new zygote's channel rides along;
# ---- then server → that new zygote: SpawnZygote ----


class SandboxPlan(msgspec.Struct, frozen=True):
    """What the function zygote sets up before importing user code (ember.runtime.sandbox)."""

    root: str  # an empty directory the new root file system is mounted on
    uid: int  # unprivileged uid/gid of the function's namespace (tenant)
    gid: int
    hostname: str
    tmp_mb: int = 64  # size of the private /tmp
    cgroups: list[str] = []  # cgroup.procs files the zygote joins before the import
    hide: list[str] = []  # directories never visible inside, even under a bound directory
    secrets: dict[str, bytes] = {}  # files of /run/secrets
    userns: bool = False  # no privileges: a user namespace maps uid/gid to the server's own
    binds: list[str] = []  # host directories shown read-only where they are (Ember's builds)


class SpawnZygote(_Msg, tag="spawn", frozen=True):
    revision: str  # "name@number", for logs and process titles
    code_dir: str
    source: str  # directory inside code_dir that is put on sys.path and made cwd
    module: str
    attribute: str
    env: dict[str, str] = {}
    function: str = ""
    number: int = 0
    memory_mb: int = 128
    concurrency: int = 1
    init_timeout: float = 60.0  # seconds the module may take to import
    network: str = "host"  # none: a network namespace of its own with only loopback
    sandbox: SandboxPlan | None = None  # None: rlimits only (the host lacks the privileges)
    namespace: str = "default"
    layer_dir: str = ""  # the installed requirements (a layer's `site`); "": none


class SpawnBlank(_Msg, tag="blank", frozen=True):
    """Fork a zygote-to-be. It waits on its own channel (the fd that rides along) for the
    `SpawnZygote` of the function it will serve, so the function's code, environment and
    secrets never pass through the root zygote. With `split`, it first enters its pid
    namespace and `cgroups` (a spare made ahead of need, or the root sandbox's first step)."""

    cgroups: list[str] = []
    split: bool = False
    spare: bool = False  # report `SpareReady` once placed, before waiting for a function


class SpawnLayerZygote(_Msg, tag="spawn-layer", frozen=True):
    """Become a layer zygote (ember.runtime.layer_zygote), sent on a zygote-to-be's own
    channel instead of `SpawnZygote`: enter the function's sandbox with no code at `/code`,
    import `preload` from the layer once, then fork function zygotes on `ForkZygote`."""

    label: str  # for logs: "namespace/function [layer]"
    layer_dir: str
    preload: list[str] = []  # top-level modules of the layer to import
    env: dict[str, str] = {}
    init_timeout: float = 60.0
    network: str = "host"
    sandbox: SandboxPlan | None = None


class MountCode(_Msg, tag="mount-code", frozen=True):
    """To the root zygote: show the code directory `source` read-only at `/code/NAME` in the
    mount namespace of a layer zygote. Two fds ride along: a socket for the answer (b"ok", or
    "ERRNO message") and the layer zygote's pidfd."""

    source: str
    name: str


class Shutdown(_Msg, tag="shutdown", frozen=True):
    pass


# ---- function zygote → server ----


class ZygoteStarted(_Msg, tag="started", frozen=True):
    pid: int  # sent before the import, so a zygote that hangs in it can be killed


class SpareReady(_Msg, tag="spare-ready", frozen=True):
    """A spare is in its cgroups: its cgroup directories may now be renamed."""


class ZygoteReady(_Msg, tag="ready", frozen=True):
    pid: int
    import_ms: float
    import_anon_kb: int = 0  # anonymous memory the import added (not page cache)
    warnings: list[str] = []
    output: str = ""  # what the module printed while it was imported


class ZygoteFailed(_Msg, tag="failed", frozen=True):
    error_type: str
    message: str
    traceback: str
    output: str = ""
    platform: bool = False  # the sandbox could not be set up: not the function's fault


class Forked(_Msg, tag="forked", frozen=True):
    """Sent by the new instance itself: `pid` is its pid in the zygote's pid namespace; the
    server learns the host's pid from the packet's SCM_CREDENTIALS (the kernel translates)."""

    instance: str
    pid: int


class ForkFailed(_Msg, tag="fork-failed", frozen=True):
    instance: str
    error: str


class InstanceExited(_Msg, tag="exited", frozen=True):
    pid: int
    status: int  # os.waitstatus_to_exitcode: negative = killed by that signal


# ---- server → function zygote; fd of the instance's socket rides along with ForkInstance ----


class ForkInstance(_Msg, tag="fork", frozen=True):
    instance: str
    rlimit_as: int = 0  # bytes of address space beyond the zygote's; 0 = none


# ---- server → layer zygote; fd of the new function zygote's channel rides along ----


class ForkZygote(_Msg, tag="fork-zygote", frozen=True):
    """Fork a function zygote; it waits on its own channel for its `SpawnZygote`. `code`: the
    directory its code shows at (`/code/NAME` in a sandbox, the host's path without one)."""

    code: str


# ---- server ↔ instance ----


class Invoke(_Msg, tag="invoke", frozen=True):
    id: str
    method: str
    path: str
    query: bytes
    headers: Headers
    body: bytes
    deadline: float  # unix time
    revision: int = 0
    raw_path: str = ""  # `path` as sent, percent-encoding kept (latin-1); "" = same as path


class ErrorInfo(msgspec.Struct, frozen=True):
    error_type: str
    message: str
    stack_trace: list[str]
    kind: str = "exception"  # exception | memory


class Result(_Msg, tag="result", frozen=True):
    id: str
    status: int
    headers: Headers
    body: bytes
    error: ErrorInfo | None = None
    duration_ms: float = 0.0
    max_rss_kb: int = 0


class Log(_Msg, tag="log", frozen=True):
    id: str  # request id, "" when outside any invocation
    stream: str  # stdout | stderr | log
    ts: float
    data: str


RootMessage = SpawnBlank | MountCode | Shutdown
SpareCommand = SpawnZygote | SpawnLayerZygote | Shutdown  # what a spare waits for
ZygoteMessage = (
    SpareReady | ZygoteStarted | ZygoteReady | ZygoteFailed | Forked | ForkFailed | InstanceExited
)
ZygoteCommand = ForkInstance | Shutdown
LayerCommand = ForkZygote | Shutdown
InstanceMessage = Result | Log
InstanceCommand = Invoke | Shutdown
