"""Schemathesis hooks for the serve fuzz (tests/test_serve.py, `SCHEMATHESIS_HOOKS=fuzz_hooks`).

Bodies drawn from the OpenAPI document are also sent (1) steered to a served model with a short output, so that
cases reach tokenizing, sampling, grammars and the engine instead of stopping at "model not found", and (2) with
one value or key anywhere in them replaced by a hostile one: text that is not Unicode (a lone surrogate), digits
that are not ASCII, a name with a trailing newline, NUL, a 20 000-character string, numbers at and past the
edges of float and int64. Path parameters get the same strings. Every such case must be a 4xx, never a 5xx.
"""

from __future__ import annotations

import schemathesis
from hypothesis import strategies as st

MODELS = ("base", "a1", "a2", "a3", "a4")
GENERATION = {"/v1/completions": "max_tokens", "/v1/chat/completions": "max_tokens",
              "/v1/responses": "max_output_tokens"}  # the field that bounds the output
HOSTILE_TEXT = ("\ud800", "a\udfffb", "²", "٣", "𝟘", "a1\n", "upper\n", "\x00", "x" * 20_000, "../a1",
                "0.5", "1e999", "NaN", "", " ", "\u202e", "\r\n\r\n", "a1+a2", "*")
HOSTILE_NUMBERS = (10**30, -(10**30), 2**63, 2**64, 1e308, -1e308, -0.0, 5e-324, True, 0, -1)
# what a client can send in a URL or a multipart form (those encode text as UTF-8 themselves); a path parameter
# is never empty (that is another route)
ENCODABLE = tuple(t for t in HOSTILE_TEXT if not any(0xD800 <= ord(c) <= 0xDFFF for c in t))
IN_PATH = tuple(t for t in ENCODABLE if t)


def _places(value, path=()):
    """Every leaf and dict key of a JSON value, as (path, is_key)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield path + (k,), True
            yield from _places(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _places(v, path + (i,))
    else:
        yield path, False


def _put(body, place, new):
    path, is_key = place
    if not path:
        return new
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if is_key:
        if isinstance(new, str):
            parent[new] = parent.pop(last)
    else:
        parent[last] = new
    return body


def _hostile(body, texts=HOSTILE_TEXT):
    import copy

    places = list(_places(body))
    if not places:
        return st.just(body)
    values = st.sampled_from(texts) | st.sampled_from(HOSTILE_NUMBERS)
    return st.tuples(st.sampled_from(places), values).map(lambda pv: _put(copy.deepcopy(body), *pv))


@schemathesis.hook
def flatmap_body(ctx, body):
    options = [st.just(body)]
    if isinstance(body, (dict, list)):
        if ctx.operation.path in GENERATION and isinstance(body, dict):
            served = st.fixed_dictionaries({"model": st.sampled_from(MODELS),
                                            GENERATION[ctx.operation.path]: st.integers(1, 4)})
            steered = served.map(lambda steer: {**body, **steer})
            options += [steered, steered.flatmap(_hostile)]
        else:  # adapter management: uploads are multipart forms
            options.append(_hostile(body, ENCODABLE))
    return st.one_of(*options)


@schemathesis.hook
def flatmap_path_parameters(ctx, params):
    if not params:
        return st.just(params)
    key = sorted(params)[0]
    return st.one_of(st.just(params), st.sampled_from(IN_PATH).map(lambda v: {**params, key: v}))
