"""The OpenAPI document at /openapi.json, whole: the schemas that routes write out by hand (the chat
request and replies, with their own `$defs`) move into `components.schemas`, where their `$ref`s point,
so that every reference in the document resolves and generators and validators can read it."""

from __future__ import annotations

from fastapi import FastAPI

COMPONENTS = "#/components/schemas/"


def install(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict:
        return with_definitions_in_components(build())
    app.openapi = openapi


def with_definitions_in_components(document: dict) -> dict:
    """`document` with every nested `$defs` moved into components.schemas and `#/$defs/X` references
    rewritten to point there (in place; a second call changes nothing). Raises ValueError if two
    definitions of one name differ."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})

    def visit(node):
        if isinstance(node, list):
            return [visit(item) for item in node]
        if not isinstance(node, dict):
            return node
        node = {key: visit(value) for key, value in node.items()}
        if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/$defs/"):
            node["$ref"] = COMPONENTS + node["$ref"].removeprefix("#/$defs/")
        for name, definition in node.pop("$defs", {}).items():
            if schemas.setdefault(name, definition) != definition:
                raise ValueError(f"two schemas named {name!r} differ")
        return node

    document["paths"] = visit(document.get("paths", {}))
    document["components"]["schemas"] = {name: visit(schema) for name, schema in schemas.items()}
    return document
