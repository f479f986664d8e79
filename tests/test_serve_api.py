"""The OpenAI API as agent and evaluation clients use it: logprobs, penalties and logit_bias, structured outputs,
tools, unknown and unsupported fields, vLLM's adapter endpoints, and every response shape checked against OpenAI's
published OpenAPI document (a trimmed copy in tests/data).

A real server process serves the tiny random llama of test_serve.py with a Qwen2.5-style chat template that renders
tools; references are a plain onnxruntime loop (tests/reference.py) and `jsonschema`.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest

from reference import OnnxDecoder
from serve_helpers import ADAPTERS, ServerProcess, build_serve_setup

DATA = Path(__file__).parent / "data"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    out = build_serve_setup(tiny, tmp_path_factory.mktemp("serve-api"))
    folder = out["root"] / "model"  # the same model, with a chat template that renders tools
    shutil.copytree(out["folder"], folder)
    shutil.copy(DATA / "qwen2_tools_template.jinja", folder / "chat_template.jinja")
    out["folder"] = folder
    return out


@pytest.fixture(scope="module")
def server(setup):
    s = ServerProcess(setup["folder"], "--adapters", str(setup["adapters"]), "--max-batch", "8",
                      "--log-level", "info", log=setup["root"] / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def _post(server, path, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


@pytest.fixture(scope="module")
def tok(setup):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(setup["folder"] / "tokenizer.json"))


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _reference_steps(setup, adapter, prompt_ids, out_ids):
    """Raw logits [vocab] before each output token, and the prompt's logits [len, vocab], from onnxruntime."""
    dec = OnnxDecoder(setup["folder"], setup["params"][adapter] if adapter else None)
    prefill, steps = dec.run([list(prompt_ids)], [list(out_ids[:-1])])
    return prefill[0], [prefill[0][-1]] + [s[0] for s in steps]


def _check_top(top: dict[str, float], ref: np.ndarray, k: int) -> None:
    """Completions' top_logprobs are keyed by token text, so tokens of equal text (pieces of one character)
    share an entry: the values are among the reference's k best, the best first of all."""
    best = np.sort(ref)[::-1][:k]
    assert 1 <= len(top) <= k and abs(max(top.values()) - best[0]) < 1e-4
    assert all(np.abs(best - v).min() < 1e-4 for v in top.values())


# -- logprobs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", [None, "a2"])
def test_completion_logprobs_and_echo_equal_reference_log_softmax(server, setup, tok, adapter):
    model = adapter or "base"
    prompt_ids = tok.encode(PROMPT).ids
    body = {"model": model, "prompt": prompt_ids, "max_tokens": 8, "temperature": 1.0, "seed": 3, "logprobs": 5,
            "echo": True, "ignore_eos": True}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    n = len(prompt_ids)
    assert len(lp["tokens"]) == n + 8 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    prefill, _ = _reference_steps(setup, adapter, prompt_ids, [0])
    for i in range(1, n):  # echoed prompt: position i - 1 predicts token i
        ref = _log_softmax(prefill[i - 1])
        assert abs(lp["token_logprobs"][i] - ref[prompt_ids[i]]) < 1e-4
        _check_top(lp["top_logprobs"][i], ref, 5)
    assert lp["text_offset"][:2] == [0, len(lp["tokens"][0])]


def test_sampled_logprobs_equal_reference_for_completions_and_chat_streamed_or_not(server, setup, tok, client):
    """Greedy output ids are the reference's argmax, so each step's reference logits are known: the reported
    logprobs (sampled and top-k) must be their log-softmax, whether the request streams or not."""
    prompt_ids = tok.encode(PROMPT).ids
    dec = OnnxDecoder(setup["folder"], setup["params"]["a1"])
    out, steps = [], []
    while len(out) < 6:
        logits, _ = dec.run([prompt_ids + out], [[]])
        steps.append(logits[0][-1])
        out.append(int(np.argmax(logits[0][-1])))
    ref = [_log_softmax(s) for s in steps]

    c = client.completions.create(model="a1", prompt=prompt_ids, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    np.testing.assert_allclose(lp.token_logprobs, [r[t] for r, t in zip(ref, out)], atol=1e-4)
    for r, top in zip(ref, lp.top_logprobs):
        _check_top(top, r, 3)
    streamed = client.completions.create(model="a1", prompt=prompt_ids, max_tokens=6, temperature=0, logprobs=3,
                                         stream=True, extra_body={"ignore_eos": True})
    values = [v for ch in streamed for v in (ch.choices[0].logprobs.token_logprobs if ch.choices[0].logprobs else [])]
    np.testing.assert_allclose(values, lp.token_logprobs, atol=1e-6)

    messages = [{"role": "user", "content": "Say something."}]
    chat = client.chat.completions.create(model="a1", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=4, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 4 for t in content)
    assert all(t.logprob == t.top_logprobs[0].logprob for t in content)  # greedy: the sampled token is the best
    assert "".join(bytes(t.bytes).decode("utf-8", "replace") for t in content).startswith(
        chat.choices[0].message.content[:1])
    chunks = list(client.chat.completions.create(model="a1", messages=messages, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=4, stream=True,
                                                 extra_body={"ignore_eos": True}))
    got = [t.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    np.testing.assert_allclose(got, [t.logprob for t in content], atol=1e-6)


# -- penalties, logit_bias -----------------------------------------------------------------------------------------
def test_frequency_presence_penalties_and_logit_bias_follow_openai_rules(server, setup, tok):
    prompt_ids = tok.encode(PROMPT).ids
    dec = OnnxDecoder(setup["folder"])
    bias = {int(np.argmax(dec.run([prompt_ids], [[]])[0][0][-1])): -100.0, 7: 5.0}
    out = []
    while len(out) < 10:  # the rule by hand: logit - frequency * count - presence * (count > 0) + bias
        logits = dec.run([prompt_ids + out], [[]])[0][0][-1].astype(np.float64)
        ids, counts = np.unique(out, return_counts=True) if out else (np.array([], int), np.array([]))
        logits[ids] -= 0.7 * counts + 0.4
        for t, b in bias.items():
            logits[t] += b
        out.append(int(np.argmax(logits)))
    body = {"model": "base", "prompt": prompt_ids, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
            "frequency_penalty": 0.7, "presence_penalty": 0.4, "logit_bias": {str(t): b for t, b in bias.items()}}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tok.decode(out)
    plain = _post(server, "/v1/completions", {**body, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}})
    assert plain.json()["choices"][0]["text"] != tok.decode(out)  # the settings changed the output
    forced = _post(server, "/v1/completions", {**body, "logit_bias": {"42": 100}, "frequency_penalty": 0,
                                                "presence_penalty": 0})
    assert forced.json()["choices"][0]["text"] == tok.decode([42] * 10)
    for bad, fragment in (({"presence_penalty": 3}, "presence_penalty"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                          ({"logit_bias": {"99999": 1}}, "outside the vocabulary")):
        r = _post(server, "/v1/completions", {**body, **bad})
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_unknown_fields_are_ignored_with_a_warning_and_unsupported_ones_say_so(server, setup):
    r = _post(server, "/v1/chat/completions", {"model": "a1", "messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 2, "some_future_field": {"x": 1}})
    assert r.status_code == 200, r.text
    assert "some_future_field" in (setup["root"] / "server.log").read_text()
    for field, value in (("audio", {"voice": "alloy", "format": "wav"}), ("prediction", {"type": "content"}),
                         ("functions", [{"name": "f"}]), ("modalities", ["text", "audio"])):
        r = _post(server, "/v1/chat/completions", {"model": "a1", "messages": [{"role": "user", "content": "hi"}],
                                                   field: value})
        assert r.status_code == 400 and "not supported" in r.json()["error"]["message"], (field, r.text)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    r = _post(server, "/v1/chat/completions", {"model": "a1", "messages": [{"role": "user", "content": "hi"}],
                                               "response_format": bad})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


# -- structured outputs --------------------------------------------------------------------------------------------
def _schemas(count: int, seed: int = 0) -> list[dict]:
    """Varied, bounded schemas: enums, nested objects, arrays with bounds, integers with ranges, booleans, strings
    with length limits (bounded, so a random model's output always closes within max_tokens)."""
    rng = random.Random(seed)

    def leaf(depth):
        kind = rng.choice(["enum", "int", "bool", "str", "array", "object"] if depth < 2 else ["enum", "int", "bool"])
        if kind == "enum":
            return {"enum": rng.sample(["red", "green", "blue", "cyan", 3, None, True], rng.randint(1, 4))}
        if kind == "int":
            lo = rng.randint(-50, 50)
            return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
        if kind == "bool":
            return {"type": "boolean"}
        if kind == "str":
            return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 8)}
        if kind == "array":
            lo = rng.randint(0, 2)
            return {"type": "array", "items": leaf(depth + 1), "minItems": lo, "maxItems": lo + rng.randint(0, 2)}
        return obj(depth + 1)

    def obj(depth):
        names = rng.sample(["id", "name", "kind", "size", "tags", "ok", "meta", "level"], rng.randint(1, 3))
        props = {n: leaf(depth) for n in names}
        return {"type": "object", "properties": props, "required": rng.sample(names, rng.randint(1, len(names))),
                "additionalProperties": False}

    return [obj(0) for _ in range(count)]


def test_fifty_json_schema_requests_in_mixed_adapter_batches_all_validate(server):
    schemas = _schemas(50)
    models = ["base", *ADAPTERS]
    results: dict[int, dict] = {}

    def one(i):
        if i >= 50:  # unconstrained rows in the same batches
            r = _post(server, "/v1/completions", {"model": models[i % len(models)], "prompt": "Hi", "max_tokens": 40,
                                                  "ignore_eos": True})
            results[i] = {"status": r.status_code, "body": r.json()}
            return
        body = {"model": models[i % len(models)], "max_tokens": 400, "temperature": 1.0, "seed": i,
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": f"s{i}", "schema": schemas[i], "strict": i % 2 == 0}}}
        if i % 3:
            body["messages"] = [{"role": "user", "content": "Give me JSON."}]
            r = _post(server, "/v1/chat/completions", body)
            text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
            results[i] = {"status": r.status_code, "body": r.json(), "text": text}
        else:
            body["prompt"] = "JSON:"
            r = _post(server, "/v1/completions", body)
            results[i] = {"status": r.status_code, "body": r.json(), "text": r.json()["choices"][0]["text"]
                          if r.status_code == 200 else None}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(60)]
    for t in threads:  # 8 at a time (the batch): every batch mixes adapters, constrained and not
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 60
    for i, res in sorted(results.items()):
        assert res["status"] == 200, res["body"]
        if i >= 50:
            assert res["body"]["usage"]["completion_tokens"] == 40
            continue
        value = json.loads(res["text"])
        jsonschema.validate(value, schemas[i])
        assert res["body"]["choices"][0]["finish_reason"] == "stop"
    metrics = dict(line.rsplit(" ", 1) for line in httpx.get(server.url + "/metrics").text.splitlines()
                   if line and not line.startswith("#"))
    assert float(metrics["ortlora_decode_batch_adapters_max"]) >= 4  # batches mixed adapters


def test_json_object_with_clients_openai_litellm_langchain(server, client, monkeypatch):
    from pydantic import BaseModel, Field

    out = client.chat.completions.create(model="a3", messages=[{"role": "user", "content": "JSON please"}],
                                         response_format={"type": "json_object"}, max_tokens=300, temperature=0.7,
                                         seed=1)
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    assert out.choices[0].message.content.startswith("{")

    class Pet(BaseModel):
        kind: str = Field(max_length=6)
        legs: int = Field(ge=0, le=8)
        friendly: bool

    schema = {"type": "object", "properties": {"kind": {"type": "string", "maxLength": 6},
                                               "legs": {"type": "integer", "minimum": 0, "maximum": 8},
                                               "friendly": {"type": "boolean"}},
              "required": ["kind", "legs", "friendly"], "additionalProperties": False}
    parsed = client.beta.chat.completions.parse(model="a2", messages=[{"role": "user", "content": "A pet."}],
                                                response_format=Pet, max_tokens=200, temperature=0.5, seed=2)
    assert isinstance(parsed.choices[0].message.parsed, Pet)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="a2", messages=[{"role": "user", "content": "A pet."}], stream=True, max_tokens=200, temperature=0.5,
        seed=2, response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": schema}}) if c.choices)
    jsonschema.validate(json.loads(streamed), schema)

    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    r = litellm.completion(model="openai/a1", api_base=server.url + "/v1", api_key="none", max_tokens=200,
                           messages=[{"role": "user", "content": "A pet."}], response_format=Pet, temperature=0.5,
                           seed=3)
    Pet.model_validate_json(r.choices[0].message.content)

    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="a4", base_url=server.url + "/v1", api_key="none", max_tokens=200, temperature=0.5,
                     seed=4)
    pet = llm.with_structured_output(Pet, method="json_schema").invoke("A pet.")
    assert isinstance(pet, Pet)
    pet = llm.with_structured_output(Pet).invoke("A pet.")  # LangChain's default method (function calling)
    assert isinstance(pet, Pet)


# -- tools ---------------------------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}}


def test_chat_template_renders_tools_and_tool_history_as_transformers_does(setup):
    from transformers import AutoTokenizer

    from ortlora.serve import protocol as P
    from ortlora.serve.jobs import chat_prompt
    from ortlora.serve.tools import ToolPlan, template_messages
    from ortlora.runtime.tokenizer import Tokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "3 degrees"}]
    body = P.ChatCompletionRequest(model="base", messages=messages, tools=[WEATHER, ADD])
    plan = ToolPlan.of(body)

    class Srv:
        tokenizer = Tokenizer(setup["folder"])
        context_length, max_token_chars = 1024, tokenizer.max_token_chars()

    ids = chat_prompt(Srv, template_messages(body), plan.tools)
    hf = AutoTokenizer.from_pretrained(setup["folder"])
    hf_messages = [dict(m) for m in messages]
    hf_messages[2] = {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
                      "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}}]}
    expected = hf.apply_chat_template(hf_messages, tools=[WEATHER, ADD], add_generation_prompt=True, tokenize=False)
    assert Srv.tokenizer.decode(ids, skip_special_tokens=False) == expected
    assert '"name": "get_weather"' in expected and "<tool_response>\n3 degrees" in expected


def test_tool_calls_named_required_and_streamed_with_openai_client(server, client):
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    named = client.chat.completions.create(model="a1", messages=messages, tools=[WEATHER, ADD], max_tokens=100,
                                           tool_choice={"type": "function", "function": {"name": "add"}}, seed=1,
                                           temperature=0.8)
    call = named.choices[0].message.tool_calls[0]
    assert named.choices[0].finish_reason == "tool_calls" and call.function.name == "add"
    assert named.choices[0].message.content is None
    jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])

    required = client.chat.completions.create(model="a2", messages=messages, tools=[WEATHER, ADD], max_tokens=100,
                                              tool_choice="required", parallel_tool_calls=False, seed=2,
                                              temperature=0.8)
    calls = required.choices[0].message.tool_calls
    assert required.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    spec = {"get_weather": WEATHER, "add": ADD}[calls[0].function.name]
    jsonschema.validate(json.loads(calls[0].function.arguments), spec["function"]["parameters"])
    assert calls[0].id.startswith("call_")

    # streamed: deltas accumulate into the same kind of call
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        chunks = list(client.chat.completions.create(model="a3", messages=messages, tools=[WEATHER, ADD],
                                                     tool_choice=choice, max_tokens=100, stream=True, seed=3,
                                                     temperature=0.8))
        args, names, reasons = {}, {}, []
        for ch in chunks:
            for c in ch.choices:
                reasons.append(c.finish_reason)
                for d in c.delta.tool_calls or ():
                    if d.function and d.function.name:
                        names[d.index] = d.function.name
                    args[d.index] = args.get(d.index, "") + ((d.function.arguments or "") if d.function else "")
        assert reasons[-1] == "tool_calls" and names
        for k, name in names.items():
            spec = {"get_weather": WEATHER, "add": ADD}[name]
            jsonschema.validate(json.loads(args[k]), spec["function"]["parameters"])

    # a tool result in the history, tool_choice none: plain content
    history = messages + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "add", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "42"}]
    plain = client.chat.completions.create(model="a1", messages=history, tools=[WEATHER, ADD], tool_choice="none",
                                           max_tokens=5)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason in ("stop", "length")


def test_langchain_bind_tools_returns_parsed_tool_calls(server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def add(a: int, b: int) -> int:
        """Add two small numbers."""
        return a + b

    llm = ChatOpenAI(model="a2", base_url=server.url + "/v1", api_key="none", max_tokens=200, temperature=0.5,
                     seed=5)
    msg = llm.bind_tools([add], tool_choice="add").invoke("What is 2 + 3?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "add"
    args = msg.tool_calls[0]["args"]  # the schema LangChain sends allows more properties than a and b
    assert isinstance(args["a"], int) and isinstance(args["b"], int)
    msg = llm.bind_tools([add], tool_choice="any").invoke("What is 2 + 3?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "add"


def test_auto_tool_calls_are_parsed_from_hermes_blocks():
    from ortlora.serve.tools import ToolPlan

    plan = ToolPlan("auto", [WEATHER])
    content, calls = plan.parse('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
                                '"unit": "C"}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, '
                                '"b": 2}}\n</tool_call>')
    assert content == "Let me check." and [c.function.name for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo", "unit": "C"}
    assert plan.parse("no call here") == ("no call here", [])
    assert plan.parse("<tool_call>{broken")[1] == []


# -- vLLM's adapter endpoints --------------------------------------------------------------------------------------
def test_vllm_load_and_unload_lora_adapter_aliases(server, setup):
    shutil.copy(setup["adapters"] / "a1.onnx_adapter", setup["adapters"] / "copy-of-a1.onnx_adapter")
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "v1", "lora_path": "copy-of-a1.onnx_adapter"})
    assert r.status_code == 200, r.text
    assert "v1" in {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    out = _post(server, "/v1/completions", {"model": "v1", "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                            "ignore_eos": True}).json()["choices"][0]["text"]
    same = _post(server, "/v1/completions", {"model": "a1", "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                             "ignore_eos": True}).json()["choices"][0]["text"]
    assert out == same
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "v1"}).status_code == 200
    assert _post(server, "/v1/completions", {"model": "v1", "prompt": PROMPT}).status_code == 404
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "v1"}).status_code == 404


# -- OpenAI's OpenAPI document ---------------------------------------------------------------------------------------
def _validator(name: str):
    """A validator for components.schemas[name] of OpenAI's document. The document is OpenAPI 3.1 but a few
    schemas still say `nullable: true` (3.0's spelling): read as "null allowed", which is what it means."""
    doc = json.loads((DATA / "openai_openapi_responses.json").read_text())

    def nullable(x):
        if isinstance(x, dict):
            x = {k: nullable(v) for k, v in x.items()}
            if x.pop("nullable", False):
                return {"anyOf": [x, {"type": "null"}]}
            return x
        return [nullable(v) for v in x] if isinstance(x, list) else x

    doc = nullable(doc)
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", **doc})


def _sse(server, path, body) -> list[dict]:
    with httpx.stream("POST", server.url + path, json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_every_response_shape_conforms_to_openais_openapi_document(server):
    chat = _validator("CreateChatCompletionResponse")
    completion = _validator("CreateCompletionResponse")
    msgs = [{"role": "user", "content": "hi"}]
    base = {"model": "a1", "max_tokens": 4, "temperature": 0}
    shapes = [
        (completion, "/v1/completions", {**base, "prompt": PROMPT}),
        (completion, "/v1/completions", {**base, "prompt": [PROMPT, "x"], "n": 2, "logprobs": 2}),
        (chat, "/v1/chat/completions", {**base, "messages": msgs}),
        (chat, "/v1/chat/completions", {**base, "messages": msgs, "logprobs": True, "top_logprobs": 2}),
        (chat, "/v1/chat/completions", {**base, "messages": msgs, "max_tokens": 100, "tools": [ADD],
                                        "tool_choice": "required"}),
        (chat, "/v1/chat/completions", {**base, "messages": msgs, "max_tokens": 100, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": ADD["function"]["parameters"]}}}),
    ]
    for validator, path, body in shapes:
        r = _post(server, path, body)
        assert r.status_code == 200, r.text
        validator.validate(r.json())
    _validator("ListModelsResponse").validate(httpx.get(server.url + "/v1/models").json())
    _validator("Model").validate(httpx.get(server.url + "/v1/models/a1").json())
    _validator("ErrorResponse").validate(httpx.get(server.url + "/v1/models/nope").json())
    _validator("ErrorResponse").validate(_post(server, "/v1/completions", {"model": "a1"}).json())

    stream = _validator("CreateChatCompletionStreamResponse")
    for body in ({**base, "messages": msgs, "stream": True, "logprobs": True, "top_logprobs": 1,
                  "stream_options": {"include_usage": True}},
                 {**base, "messages": msgs, "stream": True, "max_tokens": 100, "tools": [ADD],
                  "tool_choice": {"type": "function", "function": {"name": "add"}}},
                 {**base, "messages": msgs, "stream": True, "max_tokens": 100, "tools": [ADD],
                  "tool_choice": "required"}):
        for chunk in _sse(server, "/v1/chat/completions", body):
            stream.validate(chunk)
    # streamed completions share CreateCompletionResponse, whose finish_reason is not nullable there although
    # OpenAI's API sends null until the last chunk: only that field is exempted
    for chunk in _sse(server, "/v1/completions", {**base, "prompt": PROMPT, "stream": True, "logprobs": 1}):
        for c in chunk["choices"]:
            c["finish_reason"] = c["finish_reason"] or "stop"
        completion.validate(chunk)


# -- the command line ----------------------------------------------------------------------------------------------
def test_serve_without_its_extra_says_which_to_install_and_help_shows_defaults(tmp_path):
    import os
    import subprocess
    import sys

    block = ("import sys\n"
             "class Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('uvicorn', 'fastapi'):\n"
             "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
             "sys.meta_path.insert(0, Block())\n"
             "from ortlora.cli import main\n"
             "sys.exit(main(['serve', '-m', 'anywhere']))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "pip install ortlora[serve]" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "ortlora.cli", "serve", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "default: 16" in r.stdout and "default: 8000" in r.stdout


def test_auto_tool_calls_stream_as_tool_call_deltas_and_plain_text_as_content():
    """chat_chunks over scripted engine events: text that opens a <tool_call> block is held back and sent as a
    tool_calls delta at the end; text that only starts like one is released as content."""
    import asyncio
    from types import SimpleNamespace

    from ortlora.serve import protocol as P
    from ortlora.serve.jobs import JobEvents, Jobs, chat_chunks
    from ortlora.runtime.scheduler import Event
    from ortlora.serve.tools import ToolPlan

    body = P.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=[ADD])
    plan = ToolPlan.of(body)
    assert plan.mode == "auto"

    async def run(pieces):
        events = JobEvents()
        for k, text in enumerate(pieces):
            events.sink(Event(0, text, 1, "stop" if k == len(pieces) - 1 else None))
        jobs = Jobs([SimpleNamespace(prompt_ids=[1])], events)
        return [c async for c in chat_chunks(body, jobs, plan, texts=None)]

    chunks = asyncio.run(run([" <tool", '_call>\n{"name": "add", ', '"arguments": {"a": 1, "b": 2}}\n</tool_call>']))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert not any(d.get("content") for d in deltas)
    calls = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
    assert len(calls) == 1 and calls[0][0]["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    chunks = asyncio.run(run(["<to", "day> is", " sunny"]))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "<today> is sunny" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
