"""The pool on its own, with a real root zygote, function zygote and instances (no HTTP)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from ember.cli.main import PASSED_ENV
from ember.config import ServerConfig
from ember.pool.manager import Pool
from ember.pool.target import Target
from ember.spec import FunctionSpec, ScaleSpec
from ember.telemetry.buffer import TelemetryBuffer
from ember.wire.messages import Invoke

CODE = """import os, time
def handle(req, ctx):
    time.sleep(0.05)
    return {"pid": os.getpid()}
"""


def test_requests_arriving_together_never_exceed_scale_max(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "handler.py").write_text(CODE)
    spec = FunctionSpec(name="capped", scale=ScaleSpec(max=2))
    target = Target(function="capped", number=1, sha256="x" * 64, code_dir=str(code), spec=spec)

    async def main() -> set[int]:
        env = {k: v for k, v in os.environ.items() if k in PASSED_ENV}
        config = ServerConfig(home=tmp_path / "home", use_cgroups=False, base_env=env)
        pool = Pool(config, TelemetryBuffer(1024))
        await pool.start()
        try:
            await pool.prepare(target)
            pool.retire_all_but([target.key])
            rp = pool.revision(target)
            loop = asyncio.get_running_loop()
            calls = [
                rp.invoke(
                    Invoke(
                        id=f"r{i}",
                        method="GET",
                        path="/",
                        query=b"",
                        headers=[],
                        body=b"",
                        deadline=time.time() + 30,
                    ),
                    loop.time() + 30,
                )
                for i in range(8)
            ]
            results = await asyncio.gather(*calls)  # all in one loop turn
            assert len(rp.instances) <= 2
            return {json.loads(r.body)["pid"] for r, _tier, _inst in results}
        finally:
            await pool.shutdown()

    pids = asyncio.run(main())
    assert 1 <= len(pids) <= 2
