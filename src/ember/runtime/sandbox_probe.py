"""What sandbox this host allows: a throw-away sandbox entered in a child, as `ember doctor`
and the server's start ask (`python -m ember.runtime.sandbox DIR [MODE]`)."""

from __future__ import annotations

import os
import sys

from ember.runtime import limits, seccomp
from ember.runtime.sandbox import enter, privileged
from ember.wire.messages import SandboxPlan


def probe(workdir: str, mode: str = "auto") -> tuple[str, str]:
    """Enter a throw-away sandbox in a child: ("root" | "userns" | "none", why not).

    `auto` tries the root sandbox when privileged, else user namespaces; `userns` forces them.
    """
    if not sys.platform.startswith("linux"):
        return "none", f"not Linux ({sys.platform})"
    if not seccomp.supported():
        return "none", f"no seccomp filter for {os.uname().machine}"
    if mode == "auto":
        mode = "root" if privileged() else "userns"
    if mode == "userns" and os.geteuid() == 0 and not privileged():
        return "none", (
            "uid 0 without CAP_SYS_ADMIN (a default container?): give Ember CAP_SYS_ADMIN for "
            "the root sandbox, or run it as an ordinary user for the user-namespace sandbox"
        )
    elif mode == "userns" and privileged():
        return "none", (
            "--sandbox userns is for servers without root; as root, --sandbox auto gives "
            "the stronger root sandbox (a uid and cgroups per tenant)"
        )
    for sub in ("root", "code"):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
    plan = SandboxPlan(
        root=os.path.join(workdir, "root"),
        uid=65534,
        gid=65534,
        hostname="probe",
        tmp_mb=1,
        userns=mode == "userns",
    )
    limits.become_subreaper()  # as the root zygote is: the zygote is handed over to us
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(err_r)
            enter(plan, os.path.join(workdir, "code"), network_none=True)
            code = 0 if os.getuid() == plan.uid and os.listdir("/proc") else 1
        except BaseException as exc:
            os.write(err_w, str(exc).encode()[:500])
        finally:
            os._exit(code)
    os.close(err_w)
    with os.fdopen(err_r, "rb") as errors:
        why = errors.read().decode(errors="replace")
    if _reap_all() == 0:  # the keeper and the zygote it handed over
        return mode, ""
    if mode == "root":
        return "none", why or "the sandbox could not be entered"
    return "none", (why or "user namespaces are not allowed here") + (
        "; run `ember up` as root, or allow unprivileged user namespaces"
    )


def _reap_all() -> int:
    """Wait for every child (adopted ones too); the first non-zero exit code, else 0."""
    worst = 0
    while True:
        try:
            _, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return worst
        worst = worst or os.waitstatus_to_exitcode(status)
