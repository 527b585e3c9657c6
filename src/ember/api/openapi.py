"""The OpenAPI 3.1 document of `/api/v1`, generated from the msgspec types of `schemas`."""

from __future__ import annotations

from typing import Any

import msgspec

from ember.api import schemas as s

Op = tuple[str, str, str, Any, Any]  # method, path, summary, request body type, response type

OPERATIONS: list[Op] = [
    ("get", "/api/v1/functions", "List functions", None, s.FunctionList),
    (
        "post",
        "/api/v1/deploy",
        "Deploy a bundle (tar.gz body; ?name= for a bare directory)",
        bytes,
        s.DeployResponse,
    ),
    ("get", "/api/v1/functions/{name}", "Describe a function", None, s.FunctionDetail),
    ("delete", "/api/v1/functions/{name}", "Remove a function", None, s.Deleted),
    ("get", "/api/v1/functions/{name}/revisions", "List revisions", None, s.RevisionList),
    (
        "post",
        "/api/v1/functions/{name}/scale",
        "Set the number of instances now",
        s.ScaleRequest,
        s.ScaleResponse,
    ),
    (
        "get",
        "/api/v1/functions/{name}/logs",
        "Captured output as NDJSON (?since=&follow=&limit=)",
        None,
        s.LogLine,
    ),
    (
        "get",
        "/api/v1/functions/{name}/activations",
        "Activation records, newest first",
        None,
        s.ActivationList,
    ),
    ("get", "/api/v1/doctor", "Isolation and limits on this host", None, s.CheckList),
]


def _operation(summary: str, body: Any, response: Any, path: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{response.__name__}"}
    media = "application/x-ndjson" if response is s.LogLine else "application/json"
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "OK", "content": {media: {"schema": ref}}},
            "4XX": {
                "description": "Bad request",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                },
            },
        },
    }
    if "{name}" in path:
        op["parameters"] = [
            {
                "name": "name",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": "^[a-z][a-z0-9-]{0,62}$"},
            }
        ]
    if body is bytes:
        op["requestBody"] = {
            "content": {
                "application/gzip": {
                    "schema": {"type": "string", "contentMediaType": "application/gzip"}
                }
            }
        }
    elif body is not None:
        op["requestBody"] = {
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{body.__name__}"}}
            }
        }
    return op


def document() -> dict[str, Any]:
    types = {t for _, _, _, b, r in OPERATIONS for t in (b, r) if t not in (None, bytes)}
    types.add(s.ErrorBody)
    _, components = msgspec.json.schema_components(
        sorted(types, key=lambda t: t.__name__), ref_template="#/components/schemas/{name}"
    )
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, body, response in OPERATIONS:
        paths.setdefault(path, {})[method] = _operation(summary, body, response, path)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Ember control plane", "version": "1"},
        "paths": paths,
        "components": {"schemas": components},
    }
