"""Rebuild openai_openapi_responses.json from OpenAI's published OpenAPI document (github.com/openai/openai-openapi,
openapi.json): the components.schemas reachable from the shapes ortlora serves, without descriptions, examples,
titles, deprecation marks and the documentation generators' `x-` hints (`x-oaiTypeLabel` kept).

    python tests/data/openai_openapi_excerpt.py path/to/openapi.json COMMIT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOTS = ["CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
         "ListModelsResponse", "Model", "ErrorResponse", "Response", "ResponseStreamEvent"]
_DROP = {"description", "example", "examples", "title", "deprecated"}
_NAMES = {"properties", "patternProperties", "$defs"}  # keys below these are names, never keywords


def strip(node, names: bool = False):
    if isinstance(node, list):
        return [strip(v) for v in node]
    if not isinstance(node, dict):
        return node
    if names:
        return {k: strip(v) for k, v in node.items()}
    return {k: strip(v, k in _NAMES) for k, v in node.items() if k not in _DROP and (not k.startswith("x-") or k == "x-oaiTypeLabel")}


def reachable(schemas: dict, roots: list[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _refs(schemas[name])
    return seen


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return [r for k, v in node.items() for r in ([v.rsplit("/", 1)[-1]] if k == "$ref" else _refs(v))]
    return [r for v in node for r in _refs(v)] if isinstance(node, list) else []


def main(spec: str, commit: str) -> None:
    doc = json.loads(Path(spec).read_text())
    schemas = doc["components"]["schemas"]
    names = sorted(reachable(schemas, ROOTS))
    out = {"source": f"https://github.com/openai/openai-openapi openapi.json at {commit} (components.schemas "
                     "reachable from the response shapes ortlora serves, the Responses API's Response and "
                     "ResponseStreamEvent included; descriptions and examples removed; rebuilt by "
                     "tests/data/openai_openapi_excerpt.py)",
           "openapi": doc["openapi"], "components": {"schemas": {n: strip(schemas[n]) for n in names}}}
    (Path(__file__).parent / "openai_openapi_responses.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
