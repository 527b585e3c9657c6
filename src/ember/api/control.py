"""The control plane, wired: one object that builds its services and starts and stops them.

The services own their state and meet only through their public methods:

* `Functions` (functions.py): what the data plane runs, per function, loaded from the store;
* `Publisher` (publisher.py): pushes it to the gateway's route table and the pool;
* `Namespaces` (namespaces.py): tenants, quotas, the names that must not meet;
* `Secrets` (secrets.py), `Keys` (keys.py);
* `Deploys` (deploys.py): deploy, remove, scale;
* `Traffic` (traffic.py): aliases, rollback, rollouts;
* `Bundles` (bundles.py): code directories, blobs, the collection of old revisions.

The store is the source of truth. Every change takes the one write lock, so changes apply one
at a time, as the store records them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from ember import auth
from ember.api.bundles import Bundles
from ember.api.deploys import Deploys
from ember.api.functions import Functions, make_target
from ember.api.keys import Keys
from ember.api.names import Address
from ember.api.namespaces import Namespaces
from ember.api.publisher import Publisher
from ember.api.secrets import Secrets
from ember.api.source_builds import SourceBuilds
from ember.api.traffic import Traffic
from ember.blobs.base import Blobs
from ember.config import ServerConfig
from ember.errors import EmberError
from ember.gateway.router import RouteTable
from ember.layers.builder import Layers
from ember.layers.uv import PackageIndex
from ember.pool.manager import Pool
from ember.pool.target import Target
from ember.secretbox import SecretBox
from ember.store.base import RevisionRecord, Store
from ember.telemetry.outcomes import Outcomes

log = logging.getLogger("ember.api")


class Control:
    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        blobs: Blobs,
        pool: Pool,
        routes: RouteTable,
        keys: auth.KeyTable,
        box: SecretBox,
        outcomes: Outcomes,
        forget_function: Callable[[str], None],
        published: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.store = store  # the API reads records straight from it
        self.pool = pool  # and the pool's statistics
        writes = asyncio.Lock()
        self.address = Address(config.host, config.port)
        self.layers = Layers(
            config.layers_dir,
            PackageIndex(
                index_url=config.index_url,
                extra_index_urls=tuple(config.extra_index_urls),
                find_links=tuple(config.find_links),
                no_index=config.no_index,
                offline=config.offline,
            ),
            config.build_timeout,
            config.max_layer_mb * 1024 * 1024,
            Path(config.package_cache) if config.package_cache else None,
        )
        self.bundles = Bundles(
            config.code_dir, blobs, store, config.revision_retention, self.layers
        )
        self.functions = Functions(store, self.bundles, self._target)
        self.publisher = Publisher(self.functions, routes, pool, published)
        self.namespaces = Namespaces(
            store, config.sandbox_uid_base, self.functions, self.publisher, writes
        )
        self.secrets = Secrets(store, box, self.functions, self.namespaces, self.publisher, writes)
        if config.source_builds:  # in a throw-away sandbox of the deploying namespace
            self.layers.in_sandbox = SourceBuilds(config, pool, self.namespaces.uid_of).build
        self.keys = Keys(store, keys, config.credentials_path)
        self.traffic = Traffic(
            store, self.functions, self.bundles, self.publisher, pool, outcomes, writes
        )
        self.deploys = Deploys(
            config,
            store,
            self.bundles,
            self.functions,
            self.namespaces,
            self.secrets,
            self.traffic,
            self.publisher,
            pool,
            self.address,
            writes,
            forget_function,
            self.layers,
        )
        self.stopping = asyncio.Event()  # set at the first signal: log streams end

    def _target(self, rec: RevisionRecord) -> Target:
        """A revision as the pool runs it: its code, its namespace's uid, its secrets."""
        namespace = rec.function.partition("/")[0]
        return make_target(
            rec,
            self.bundles.code_dir(rec.bundle),
            self.namespaces.uid_of(namespace),
            self.secrets.open_for(namespace, rec.spec),
            self.layers.site(rec.layer),
        )

    async def start(self) -> None:
        await self.restore()
        await self.keys.ensure_admin_credentials()
        self.traffic.start()

    async def restore(self) -> None:
        """After a restart: route every function's serving revision again; code from blobs."""
        await self.namespaces.restore()
        await self.secrets.restore()
        await self.keys.restore()
        for fn in await self.store.functions():
            try:
                await self.functions.load(fn.name)
            except (EmberError, OSError, KeyError, ValueError) as exc:  # one broken: not the rest
                log.error("function %s cannot be restored: %s", fn.name, exc)
                self.functions.forget(fn.name)
        self.publisher.publish()  # the keep-alive loop starts scale.min instances from here
        log.info("restored %d function(s)", len(self.functions.qualified_names()))
        await self.bundles.sweep()  # what a clean-up cut short by a shutdown left

    async def stop(self) -> None:
        self.stopping.set()
        await self.deploys.delayed.cancel()  # clean-ups not yet due: the next start sweeps
        await self.traffic.stop()
        await self.bundles.close()
