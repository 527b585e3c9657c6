"""The ASGI entry: `/fn/…` straight to the gateway, everything else to the control plane."""

from __future__ import annotations

from typing import Any

from ember.gateway.app import PREFIX, Gateway


class EmberApp:
    def __init__(self, gateway: Gateway, api: Any) -> None:
        self.gateway = gateway
        self.api = api

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PREFIX):
            await self.gateway(scope, receive, send)
        else:
            await self.api(scope, receive, send)
