"""API keys: stored as digests, pushed whole to the key table the gateway and the API ask, and
the admin key of the credentials file."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ember import auth
from ember.errors import EmberError, NotFound, UserError
from ember.store.base import KeyRecord, Store

log = logging.getLogger("ember.api")


class Keys:
    def __init__(self, store: Store, table: auth.KeyTable, credentials: Path) -> None:
        self.store = store
        self.table = table
        self.credentials = credentials  # EMBER_HOME/credentials: the CLI's admin key

    async def restore(self) -> None:
        self.table.replace(
            auth.Key(
                id=k.id, digest=k.digest, name=k.name, scopes=k.scopes, rate=k.rate, burst=k.burst
            )
            for k in await self.store.keys()
            if k.revoked_at is None
        )

    async def create(self, name: str, scopes: list[str], rate: float, burst: int) -> str:
        """A new key; the token is returned once and never stored."""
        scopes = auth.validate_scopes(scopes)
        if not (rate == 0 or 0.001 <= rate <= 1e6) or not 0 <= burst <= 1_000_000:
            raise UserError(
                f"rate={rate:g} must be 0 (unlimited) or 0.001-1000000 requests/s and "
                f"burst={burst} 0-1000000"
            )
        key_id, token, digest = auth.new_token()
        await self.store.add_key(
            KeyRecord(
                id=key_id,
                digest=digest,
                name=name[:100],
                scopes=scopes,
                rate=rate,
                burst=burst,
                created_at=time.time(),
            )
        )
        await self.restore()
        return token

    async def revoke(self, key_id: str) -> None:
        if not await self.store.revoke_key(key_id, time.time()):
            raise NotFound(f"no active key with id '{key_id[:40]}'; list them with `ember keys ls`")
        await self.restore()

    async def ensure_admin_credentials(self) -> None:
        """On first start (or when the file is gone): an admin key in EMBER_HOME/credentials,
        0600, for the CLI on this machine. Whoever can read EMBER_HOME is admin anyway."""
        path = self.credentials
        if path.exists():
            try:
                self.table.verify(f"Bearer {path.read_text().strip()}")
                return
            except EmberError:
                log.warning("%s holds no valid key; writing a new admin key", path)
        token = await self.create("admin (credentials file)", ["admin"], 0.0, 0)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        tmp.replace(path)
        log.info("admin key written to %s", path)
