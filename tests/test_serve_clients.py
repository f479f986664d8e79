"""Issue 25 against a real server process, with the clients people point at it: the openai client's Responses API
(plain, streamed, a function tool, text.format; every shape checked against OpenAI's OpenAPI document), an OpenAI
Agents SDK agent on its default Responses model, lm-evaluation-harness with `tokenizer_backend=remote` (scores
against transformers + PEFT), vLLM's tokenizer endpoints and request fields, and `--reasoning-parser` on a chat
template that thinks when `chat_template_kwargs` asks it to.

The model is a tiny random llama whose vocabulary has two ids past its trained tokenizer's, given to `<think>` and
`</think>` (single tokens, as in Qwen3). It writes noise: where a test needs the model to end its reasoning, a
logit bias on `</think>` is searched for (the smallest that makes it come, so some reasoning comes first).
"""

from __future__ import annotations

import json
import re
import sys

import httpx
import jsonschema
import numpy as np
import pytest

from reference import hf_logits, targets_for
from serve_helpers import ServerProcess, openai_validator

# thinks only when asked: without enable_thinking the generation prompt closes an empty block (Qwen3's
# enable_thinking=false rendering), so answers are plain unless a request opts in
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and m.get('reasoning_content') %}<think>\n{{ m['reasoning_content'] }}\n"
    "</think>\n\n{% endif %}{{ m['content'] or '' }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking %}<think>\n{% else %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}")
ADD = {"type": "function", "name": "add", "description": "add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
    "additionalProperties": False}, "strict": True}
PET = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                        "age": {"type": "integer", "minimum": 0, "maximum": 30}},
       "required": ["name", "age"], "additionalProperties": False}
THINK = {"enable_thinking": True}


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    from tokenizers import AddedToken, Tokenizer

    from ortlora.adapters.onnx_adapter import write_onnx_adapter
    from ortlora.adapters.peft import read_peft

    root = tmp_path_factory.mktemp("clients")
    model = tiny.model("llama", max_position_embeddings=1024, vocab_size=322)  # the trained tokenizer has 320
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    if tok.token_to_id("</think>") is None:
        tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
        tok.save(str(model / "tokenizer.json"))
        config = json.loads((model / "tokenizer_config.json").read_text())
        (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    folder = tiny.export(model, "thinking", lora_targets=targets_for("llama"))
    adapters = root / "adapters"
    adapters.mkdir()
    peft = {"a1": tiny.adapter(model, "a1", r=4, target_modules=["q_proj", "v_proj"]),
            "a2": tiny.adapter(model, "a2", r=8, target_modules=targets_for("llama"))}
    for name, path in peft.items():
        write_onnx_adapter(adapters / f"{name}.onnx_adapter", read_peft(path).onnx_tensors())
    return dict(model=model, folder=folder, adapters=adapters, peft=peft, root=root)


@pytest.fixture(scope="module")
def server(setup):
    s = ServerProcess(setup["folder"], "--adapters", str(setup["adapters"]), "--reasoning-parser", "qwen3",
                      "--max-batch", "4", log=setup["root"] / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def tok(setup):
    from ortlora.runtime.tokenizer import Tokenizer

    return Tokenizer(setup["folder"])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _post(server, path, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def _events(server, body) -> list[dict]:
    """A streamed response's events, each checked as OpenAI frames them (`event: TYPE` before its data)."""
    with httpx.stream("POST", server.url + "/v1/responses", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert "[DONE]" not in "".join(lines)
    names, events = lines[0::2], [json.loads(line[6:]) for line in lines[1::2]]
    assert [n[7:] for n in names] == [e["type"] for e in events]
    return events


# -- the Responses API ---------------------------------------------------------------------------------------------
def test_openai_responses_create_plain_streamed_tool_and_text_format(server, client):
    """The openai client's primary API: answers agree with chat's for the same conversation (one path to the
    engine), the stream adds up to the final object, a function tool gives a function_call item whose arguments
    follow its schema, text.format gives JSON that does; every object and event validates against OpenAI's
    OpenAPI document."""
    response, event = openai_validator("Response"), openai_validator("ResponseStreamEvent")
    base = {"model": "a1", "input": "Say hi", "instructions": "Be brief.", "max_output_tokens": 12,
            "temperature": 0}
    r = client.responses.create(**base)
    chat = client.chat.completions.create(model="a1", max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}])
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    raw = _post(server, "/v1/responses", base).json()
    response.validate(raw)
    assert raw["output"][0]["content"][0]["text"] == r.output_text

    streamed = list(client.responses.create(**base, stream=True))
    deltas = [e.delta for e in streamed if e.type == "response.output_text.delta"]
    assert "".join(deltas) == streamed[-1].response.output_text == r.output_text
    assert streamed[-1].type == f"response.{r.status}"
    events = _events(server, base)
    for e in events:
        event.validate(e)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created" and events[-1]["type"] in ("response.completed",
                                                                                "response.incomplete")

    for choice in ({"type": "function", "name": "add"}, "required"):
        r = client.responses.create(model="a2", input="add 2 and 3", tools=[ADD], tool_choice=choice,
                                    max_output_tokens=60, temperature=0)
        (call,) = [o for o in r.output if o.type == "function_call"]
        assert call.name == "add" and call.call_id.startswith("call_"), r.output
        jsonschema.validate(json.loads(call.arguments), ADD["parameters"])
        raw = _post(server, "/v1/responses", {"model": "a2", "input": "add 2 and 3", "tools": [ADD],
                                              "tool_choice": choice, "max_output_tokens": 60, "temperature": 0})
        response.validate(raw.json())
        streamed = _events(server, {"model": "a2", "input": "add 2 and 3", "tools": [ADD], "tool_choice": choice,
                                    "max_output_tokens": 60, "temperature": 0})
        for e in streamed:
            event.validate(e)
        args = "".join(e["delta"] for e in streamed if e["type"] == "response.function_call_arguments.delta")
        assert args == call.arguments

    fmt = {"format": {"type": "json_schema", "name": "pet", "schema": PET, "strict": True}}
    for seed in range(3):
        r = client.responses.create(model="a1", input="a pet", text=fmt, max_output_tokens=60, temperature=1.0,
                                    extra_body={"seed": seed})
        jsonschema.validate(json.loads(r.output_text), PET)
    with client.responses.stream(model="a2", input="a pet", text=fmt, max_output_tokens=60) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()  # (the helper wants response.completed)
    assert "".join(deltas) == final.output_text
    jsonschema.validate(json.loads(final.output_text), PET)


def test_responses_refusals_are_400s_naming_the_field(server):
    for body, param in (({"previous_response_id": "resp_1"}, "previous_response_id"),
                        ({"tools": [{"type": "web_search"}]}, "tools.[0]"),
                        ({"tool_choice": "required"}, "tool_choice"),
                        ({"model": "nope"}, "model")):
        r = _post(server, "/v1/responses", {"model": "a1", "input": "hi", **body})
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text
        openai_validator("ErrorResponse").validate(r.json())


def test_agents_sdk_agent_runs_its_tool_and_its_run_ends(server):
    """An Agents SDK agent on its default model (OpenAIResponsesModel): tool_choice "required" makes the first
    turn call the tool (the random model would not on its own); the SDK runs it, sends the call and its output
    back, resets tool_choice, and the agent's output type (text.format) ends the run with a parsed answer."""
    import asyncio

    import openai
    from agents import (Agent, ModelSettings, Runner, function_tool, set_default_openai_client,
                        set_tracing_disabled)
    from agents.models.openai_responses import OpenAIResponsesModel
    from pydantic import BaseModel

    class Answer(BaseModel):
        total: int

    sent, calls = [], []

    async def record(request: httpx.Request) -> None:
        sent.append((request.url.path, json.loads(request.content)))

    @function_tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    set_tracing_disabled(True)  # nothing leaves this machine
    set_default_openai_client(openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key="none", max_retries=0,
        http_client=httpx.AsyncClient(timeout=120, event_hooks={"request": [record]})), use_for_tracing=False)
    agent = Agent(name="calculator", instructions="Add with the tool.", model="a1", tools=[add], output_type=Answer,
                  model_settings=ModelSettings(tool_choice="required", max_tokens=60, temperature=0))
    result = asyncio.run(Runner.run(agent, "What is 2 + 3?", max_turns=4))
    assert len(calls) == 1 and isinstance(result.final_output, Answer)
    assert [type(i).__name__ for i in result.new_items] == ["ToolCallItem", "ToolCallOutputItem",
                                                           "MessageOutputItem"]
    assert [path for path, _ in sent] == ["/v1/responses", "/v1/responses"]
    second = sent[1][1]["input"]
    assert [i.get("type") for i in second[1:]] == ["function_call", "function_call_output"]
    assert second[2]["output"] == str(sum(calls[0]))
    from agents.models.multi_provider import MultiProvider

    assert isinstance(MultiProvider().get_model("a1"), OpenAIResponsesModel)  # the default the agent ran on


# -- lm-evaluation-harness -----------------------------------------------------------------------------------------
LM_DOCS = [("The quick brown", " fox jumps"), ("LoRA adapters share", " one base model"), ("Hello", " world")]


def test_lm_eval_local_completions_with_the_remote_tokenizer(server, setup, tok, tmp_path):
    """lm-eval 0.4's `local-completions` with `tokenizer_backend=remote` (it tokenizes through /tokenize and reads
    /tokenizer_info) on a tiny local loglikelihood task: every score equals transformers + PEFT's."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": x}) + "\n" for c, x in LM_DOCS))
    (tmp_path / "tiny.yaml").write_text(
        f"task: ortlora_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{continuation}}'\n"
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n")
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["ortlora_tiny"], task_manager=TaskManager(include_path=str(tmp_path)),
        model_args=f"model=a1,base_url={server.url}/v1/completions,tokenizer_backend=remote,num_concurrent=1,"
                   "max_retries=1,tokenized_requests=True", log_samples=True)
    samples = {s["doc"]["context"]: s["resps"][0][0] for s in out["samples"]["ortlora_tiny"]}
    assert len(samples) == len(LM_DOCS)
    rows = [tok.encode(c, add_special_tokens=False) + tok.encode(x, add_special_tokens=False) for c, x in LM_DOCS]
    logits = hf_logits(setup["model"], rows, setup["peft"]["a1"])
    for (context, _), row, lg in zip(LM_DOCS, rows, logits):
        n, lp = len(tok.encode(context, add_special_tokens=False)), _log_softmax(lg)
        want = sum(float(lp[i - 1, row[i]]) for i in range(n, len(row)))
        greedy = all(int(np.argmax(lg[i - 1])) == row[i] for i in range(n, len(row)))
        score, is_greedy = samples[context]
        assert abs(score - want) < 1e-3 and is_greedy == greedy, (context, score, want)


# -- tokenizer endpoints and vLLM's fields -------------------------------------------------------------------------
def test_tokenizer_endpoints_have_vllms_shapes(server, tok):
    r = _post(server, "/tokenize", {"prompt": "Hello </think> world", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("Hello </think> world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 1024 and tok.token_id("</think>") in r["tokens"]
    assert r["token_strs"] == [tok.id_to_token(t) for t in r["tokens"]]
    assert _post(server, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "Hello </think> world"}
    msgs = [{"role": "user", "content": "hi"}]
    for kwargs in ({}, THINK):
        counted = _post(server, "/tokenize", {"messages": msgs, "chat_template_kwargs": kwargs}).json()["count"]
        chat = _post(server, "/v1/chat/completions", {"model": "a1", "messages": msgs, "max_tokens": 1,
                                                      "chat_template_kwargs": kwargs}).json()
        assert counted == chat["usage"]["prompt_tokens"]
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["chat_template"] == TEMPLATE
    assert info["model_max_length"] == 1024 and info["vocab_size"] == 322
    assert httpx.get(server.url + "/version").json()["version"]
    bad = _post(server, "/detokenize", {"tokens": [5, 100000]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_vllm_output_fields_are_honoured(server, tok, setup):
    """skip_special_tokens, include_stop_str_in_output, return_tokens_as_token_ids, prompt_logprobs (values from
    transformers + PEFT; completions per choice, chat at the top, as vLLM places them)."""
    special = {"model": "a1", "prompt": "x", "max_tokens": 3, "temperature": 0, "ignore_eos": True,
               "logit_bias": {"2": 100}}  # <|im_end|>: a special token, not EOS
    assert _post(server, "/v1/completions", special).json()["choices"][0]["text"] == ""
    kept = _post(server, "/v1/completions", {**special, "skip_special_tokens": False}).json()
    assert kept["choices"][0]["text"] == "<|im_end|>" * 3

    plain = {"model": "a2", "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    text = _post(server, "/v1/completions", plain).json()["choices"][0]["text"]
    # a stop string the output reaches a few characters in (its first occurrence)
    stop = next(text[k:k + 2] for k in range(3, len(text) - 2) if text[k:k + 2] not in text[:k + 1])
    at = text.index(stop)
    for include, want in ((False, text[:at]), (True, text[:at + len(stop)])):
        c = _post(server, "/v1/completions", {**plain, "stop": [stop], "include_stop_str_in_output": include}).json()
        assert c["choices"][0]["text"] == want and c["choices"][0]["finish_reason"] == "stop", (include, stop)

    as_ids = _post(server, "/v1/completions", {**plain, "logprobs": 2, "return_tokens_as_token_ids": True}).json()
    named = _post(server, "/v1/completions", {**plain, "logprobs": 2}).json()
    ids = [int(t.removeprefix("token_id:")) for t in as_ids["choices"][0]["logprobs"]["tokens"]]
    assert tok.decode(ids) == text and named["choices"][0]["logprobs"]["tokens"] != as_ids["choices"][0][
        "logprobs"]["tokens"]
    assert all(k.startswith("token_id:") for top in as_ids["choices"][0]["logprobs"]["top_logprobs"] for k in top)

    prompt = tok.encode("The quick brown fox")
    ref = _log_softmax(hf_logits(setup["model"], [prompt], setup["peft"]["a2"])[0])
    c = _post(server, "/v1/completions", {**plain, "n": 2, "temperature": 0.5, "prompt_logprobs": 3, "echo": True,
                                          "logprobs": 1}).json()
    chat = _post(server, "/v1/chat/completions", {"model": "a2", "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 2, "prompt_logprobs": 0}).json()
    assert "prompt_logprobs" not in chat["choices"][0] and len(chat["prompt_logprobs"]) == chat["usage"][
        "prompt_tokens"]
    for choice in c["choices"]:
        scores = choice["prompt_logprobs"]
        assert scores[0] is None and len(scores) == len(prompt)
        for i, entry in enumerate(scores[1:], 1):
            mine = entry[str(prompt[i])]
            assert abs(mine["logprob"] - ref[i - 1, prompt[i]]) < 1e-4
            best = [t for t, e in entry.items() if e["rank"] <= 3]  # the 3 asked for; the prompt's own token
            assert [int(t) for t in sorted(best, key=lambda t: entry[t]["rank"])] == \
                list(np.argsort(-ref[i - 1], kind="stable")[:3])
            assert mine["rank"] == 1 + int((ref[i - 1] > ref[i - 1, prompt[i]] + 1e-6).sum())  # exact, as vLLM
        # echo's logprobs come from the same scoring, with its own k
        assert all(top is None or len(top) <= 1 for top in choice["logprobs"]["top_logprobs"][:len(prompt)])
        assert choice["logprobs"]["token_logprobs"][1:len(prompt)] == pytest.approx(
            [scores[i][str(prompt[i])]["logprob"] for i in range(1, len(prompt))])


# -- chat templates and reasoning ----------------------------------------------------------------------------------
def _chat(server, **body) -> dict:
    r = _post(server, "/v1/chat/completions", {"model": "a1", "temperature": 0, "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _ending_bias(server, end_id: int) -> tuple[list[dict], float]:
    """A conversation and the smallest logit bias on `</think>` (to 1/512) that ends this tiny model's reasoning
    within 16 tokens, so that some reasoning comes before it (a prompt whose output ends at once, or that ends its
    reasoning without a bias, is passed over)."""
    for question in ("hello", "2+2?", "What is the sum of two and three?", "Name a colour."):
        msgs = [{"role": "user", "content": question}]
        lo, hi = 0.0, 8.0
        for _ in range(12):
            bias = (lo + hi) / 2
            out = _chat(server, messages=msgs, max_tokens=16, chat_template_kwargs=THINK,
                        logit_bias={str(end_id): bias}, structured_outputs={"regex": "[0-9]{3}"})
            lo, hi = (lo, bias) if out["choices"][0]["message"]["content"] else (bias, hi)
        out = _chat(server, messages=msgs, max_tokens=16, chat_template_kwargs=THINK, logit_bias={str(end_id): hi},
                    structured_outputs={"regex": "[0-9]{3}"})
        unbiased = _chat(server, messages=msgs, max_tokens=16, chat_template_kwargs=THINK)
        if out["choices"][0]["message"].get("reasoning_content") and unbiased["choices"][0]["message"]["content"] \
                is None:  # without the bias it thinks past 16 tokens
            return msgs, hi
    raise AssertionError("no prompt thinks before its end tag")


def test_chat_template_kwargs_reach_the_template(server, tok):
    """The template thinks only with enable_thinking: the prompt differs by the open block, and with
    --reasoning-parser the output is then all reasoning (cut before its end tag), else all content."""
    msgs = [{"role": "user", "content": "hi"}]
    plain = _chat(server, messages=msgs, max_tokens=6)
    thinking = _chat(server, messages=msgs, max_tokens=6, chat_template_kwargs=THINK)
    for out, kwargs in ((plain, {}), (thinking, THINK)):
        rendered = tok.apply_chat_template(msgs, **kwargs)
        assert out["usage"]["prompt_tokens"] == len(tok.encode(rendered, add_special_tokens=False))
    assert rendered.endswith("<think>\n") and plain["usage"]["prompt_tokens"] > thinking["usage"]["prompt_tokens"]
    assert plain["choices"][0]["message"]["content"] and "reasoning_content" not in plain["choices"][0]["message"]
    m = thinking["choices"][0]["message"]
    assert m["content"] is None and m["reasoning_content"] and m["reasoning"] == m["reasoning_content"]
    # add_generation_prompt / continue_final_message: the prompt ends inside the assistant's message
    cont = _chat(server, messages=msgs + [{"role": "assistant", "content": "Sure, I"}], max_tokens=4,
                 add_generation_prompt=False, continue_final_message=True)
    rendered = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "Sure, I"}],
                                       add_generation_prompt=False, continue_final_message=True)
    assert rendered.endswith("Sure, I") and cont["usage"]["prompt_tokens"] == len(tok.encode(
        rendered, add_special_tokens=False))
    r = _post(server, "/v1/chat/completions", {"model": "a1", "messages": msgs, "chat_template_kwargs": {"tools": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


def test_reasoning_parser_on_a_template_that_thinks_streamed_and_not(server, tok):
    """Reasoning comes back apart from the answer (chat: reasoning_content / reasoning, streamed as their own
    deltas; Responses: a reasoning item before the message), and a grammar applies only after `</think>`: the
    reasoning is free text, the answer matches the regex. Without the block open the grammar applies at once."""
    end = tok.token_id("</think>")
    msgs, bias = _ending_bias(server, end)
    body = dict(messages=msgs, max_tokens=16, chat_template_kwargs=THINK, logit_bias={str(end): bias},
                structured_outputs={"regex": "[0-9]{3}"})
    whole = _chat(server, **body)["choices"][0]["message"]
    thought, answer = whole["reasoning_content"], whole["content"]
    assert thought and re.fullmatch("[0-9]{3}", answer) and not re.fullmatch("[0-9]+", thought)
    openai_validator("CreateChatCompletionResponse").validate(_chat(server, **body))

    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120, json={
            "model": "a1", "temperature": 0, "ignore_eos": True, "stream": True, **body}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == thought
    assert "".join(d.get("reasoning", "") for d in deltas) == thought
    assert "".join(d.get("content") or "" for d in deltas) == answer
    assert not any("</think>" in (d.get("content") or "") + d.get("reasoning_content", "") for d in deltas)
    stream_shape = openai_validator("CreateChatCompletionStreamResponse")
    for c in chunks:
        stream_shape.validate(c)

    # the Responses API: a reasoning item, then the message; streamed events add up to the same
    rbody = {"model": "a1", "input": msgs, "max_output_tokens": 16, "temperature": 0, "ignore_eos": True,
             "chat_template_kwargs": THINK, "logit_bias": {str(end): bias},
             "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "integer"}}}}
    obj = _post(server, "/v1/responses", {**rbody, "logit_bias": None}).json()
    openai_validator("Response").validate(obj)  # (no bias: cut inside the reasoning, all of it a reasoning item)
    assert [o["type"] for o in obj["output"]] == ["reasoning"] and obj["status"] == "incomplete"
    assert obj["usage"]["output_tokens_details"]["reasoning_tokens"] == 16
    obj = _post(server, "/v1/responses", rbody).json()
    openai_validator("Response").validate(obj)
    assert [o["type"] for o in obj["output"]] == ["reasoning", "message"], obj["output"]
    number = obj["output"][1]["content"][0]["text"]
    assert isinstance(json.loads(number), int) and obj["output"][0]["content"][0]["text"]
    assert 0 < obj["usage"]["output_tokens_details"]["reasoning_tokens"] < obj["usage"]["output_tokens"]
    events = _events(server, rbody)
    for e in events:
        openai_validator("ResponseStreamEvent").validate(e)
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == \
        obj["output"][0]["content"][0]["text"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == number
    assert events[-1]["response"]["usage"] == obj["usage"]

    # without thinking the generation prompt closes the block: the grammar applies from the first token
    plain = _chat(server, messages=msgs, max_tokens=16, structured_outputs={"regex": "[0-9]{3}"})
    assert re.fullmatch("[0-9]{3}", plain["choices"][0]["message"]["content"])
    assert "reasoning_content" not in plain["choices"][0]["message"]


def test_reasoning_parser_is_a_serve_option_with_vllms_names(tmp_path):
    from ortlora.serve.config import REASONING_PARSERS
    from ortlora.serve.reasoning import PARSERS

    assert REASONING_PARSERS == tuple(sorted(PARSERS))
    import subprocess

    r = subprocess.run([sys.executable, "-m", "ortlora.cli", "serve", "-m", str(tmp_path), "--reasoning-parser",
                        "nope"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "deepseek_r1" in r.stderr and "Traceback" not in r.stderr
