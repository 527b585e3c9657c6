"""Secrets: sealed values per namespace, opened only into the targets of the revisions that list
them; a new value reaches new zygotes, and a value in use cannot go."""

from __future__ import annotations

import asyncio
import time

import msgspec

from ember import manifest
from ember.api.functions import Functions, generation
from ember.api.names import validate_namespace
from ember.api.namespaces import Namespaces
from ember.api.publisher import Publisher
from ember.errors import NotFound, UserError
from ember.secretbox import SecretBox
from ember.spec import FunctionSpec
from ember.store.base import Store

MAX_FUNCTION_SECRETS = 32 * 1024  # bytes of secrets one function may list, in all


class Secrets:
    def __init__(
        self,
        store: Store,
        box: SecretBox,
        functions: Functions,
        namespaces: Namespaces,
        publisher: Publisher,
        writes: asyncio.Lock,
    ) -> None:
        self.store = store
        self.box = box
        self.functions = functions
        self.namespaces = namespaces
        self.publisher = publisher
        self.writes = writes
        self._sealed: dict[tuple[str, str], bytes] = {}  # (namespace, secret) -> sealed value

    async def restore(self) -> None:
        self._sealed = {(r.namespace, r.name): r.sealed for r in await self.store.secrets()}

    def names(self, namespace: str) -> list[str]:
        return sorted(name for ns, name in self._sealed if ns == namespace)

    def open_for(self, namespace: str, spec: FunctionSpec) -> dict[str, bytes]:
        """The values of the secrets a function lists (those that exist)."""
        out: dict[str, bytes] = {}
        for ref in spec.secrets:
            sealed = self._sealed.get((namespace, ref.name))
            if sealed is not None:
                out[ref.name] = self.box.open(namespace, ref.name, sealed)
        return out

    def check_listed(self, namespace: str, spec: FunctionSpec) -> None:
        """Before a deploy: every secret the function lists exists and fits."""
        missing = [r.name for r in spec.secrets if (namespace, r.name) not in self._sealed]
        if missing:
            raise UserError(
                f"function '{spec.name}' lists secret(s) {', '.join(missing)} that namespace "
                f"'{namespace}' does not have; set them first: ember secrets set "
                f"{missing[0]} --namespace {namespace}",
                code="missing_secret",
                status=422,
            )
        self._check_fit(namespace, spec, {})

    async def set(self, namespace: str, name: str, value: bytes) -> bool:
        """Store a sealed value; functions that list it get it on their next zygote start.
        True when it is new."""
        validate_namespace(namespace)
        manifest.validate_secret_name(name)
        sealed = self.box.seal(namespace, name, value)
        async with self.writes:
            for target in self.functions.listing(namespace, name):  # they must still start
                self._check_fit(namespace, target.spec, {name: value})
            await self.namespaces.ensure(namespace)
            created = (namespace, name) not in self._sealed
            await self.store.put_secret(namespace, name, sealed, time.time())
            self._sealed[(namespace, name)] = sealed
            self._refresh_users(namespace, name)
            return created

    async def delete(self, namespace: str, name: str) -> None:
        async with self.writes:
            users = sorted(
                {f"{t.function}@{t.number}" for t in self.functions.listing(namespace, name)}
            )
            if users:
                raise UserError(
                    f"secret '{name}' is listed by {', '.join(users)} (serving, aliased or the "
                    "rollback target); deploy without it and move aliases off those revisions "
                    "first",
                    code="secret_in_use",
                    status=409,
                )
            if not await self.store.delete_secret(namespace, name):
                raise NotFound(f"namespace '{namespace}' has no secret '{name}'")
            self._sealed.pop((namespace, name), None)

    def _check_fit(self, namespace: str, spec: FunctionSpec, new: dict[str, bytes]) -> None:
        """A function's secrets travel in one control message and its env form must be text:
        at most MAX_FUNCTION_SECRETS bytes in all, UTF-8 where `env:` is asked for. `new`
        holds values about to replace stored ones."""
        total = 0
        for ref in spec.secrets:
            value = new.get(ref.name)
            if value is None:
                value = self.box.open(namespace, ref.name, self._sealed[(namespace, ref.name)])
            total += len(value)
            if ref.env:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(
                        f"secret '{ref.name}' is not UTF-8 text, so function '{spec.name}' "
                        f"cannot have it as ${ref.env}; read /run/secrets/{ref.name} instead",
                        code="secret_not_text",
                        status=422,
                    ) from None
        if total > MAX_FUNCTION_SECRETS:
            raise UserError(
                f"function '{spec.name}' would get {total} bytes of secrets; at most "
                f"{MAX_FUNCTION_SECRETS // 1024} KB in all: keep large material in the bundle "
                "and only its key in a secret",
                code="secrets_too_large",
                status=422,
            )

    def _refresh_users(self, namespace: str, secret: str) -> None:
        """Functions listing the secret get new targets: new requests go to a new zygote with
        the new value; requests on the old one finish there, then it is reaped."""
        renewed = []
        for target in self.functions.listing(namespace, secret):
            values = self.open_for(namespace, target.spec)
            renewed.append(
                msgspec.structs.replace(target, secrets=values, generation=generation(values))
            )
        self.functions.retarget(renewed)
        self.publisher.publish()
