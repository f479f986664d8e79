"""Reasoning parsers (serve/reasoning.py) without a model: `<think>` blocks split from the answer the same way
whole and streamed in any pieces, the start state read from the rendered generation prompt (an R1-style template
that opens the block, a Qwen3-style one that closes it with enable_thinking false), the engine's gate that lets a
grammar apply only after the reasoning, and the chat shapes that carry the reasoning."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ortlora.serve.reasoning import PARSERS, ReasoningParser, chat_delta, generation_prompt, get_parser

QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and m.get('reasoning_content') %}<think>\n{{ m['reasoning_content'] }}\n"
    "</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
R1_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


def _tokenizer(folder, template, think_tokens: bool):
    """The tiny test tokenizer with a thinking template; `think_tokens`: <think> and </think> are single (added,
    non-special) tokens as in Qwen3 and R1 distills, else byte-level pieces."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HF

    from ortlora.runtime.tokenizer import Tokenizer
    from ortlora.testing import build_tokenizer

    build_tokenizer(folder, chat_template=template)
    if think_tokens:
        hf = HF.from_file(str(folder / "tokenizer.json"))
        hf.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
        hf.save(str(folder / "tokenizer.json"))
    return Tokenizer(folder)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return _tokenizer(tmp_path_factory.mktemp("qwen3"), QWEN3_TEMPLATE, True)


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    return _tokenizer(tmp_path_factory.mktemp("r1"), R1_TEMPLATE, False)


CASES = [  # (text, thinking at the start, reasoning, content)
    ("<think>\nLet me see.\n</think>\n\nThe answer is 4.", True, "Let me see.", "The answer is 4."),
    ("Let me see.\n</think>\n\nThe answer is 4.", True, "Let me see.", "The answer is 4."),  # opened in the prompt
    ("Let me see, 2 + 2", True, "Let me see, 2 + 2", None),  # cut inside the reasoning: no answer
    ("</think>\n\nJust this.", True, None, "Just this."),  # an empty block
    ("The answer is 4.", False, None, "The answer is 4."),  # the prompt closed the block
    ("a </think> b", False, None, "a </think> b"),  # ... then tags are text
    ("x <think> y </think> z", True, "x <think> y", "z"),  # a <think> inside the reasoning stays
]


@pytest.mark.parametrize("name", sorted(PARSERS))
@pytest.mark.parametrize("text, thinking, reasoning, content", CASES)
def test_split_separates_reasoning_from_the_answer(qwen, name, text, thinking, reasoning, content):
    assert get_parser(name, qwen).split(text, thinking) == (reasoning, content)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CASES), st.lists(st.integers(0, 60), max_size=8), st.booleans())
def test_streamed_in_any_pieces_equals_the_whole(case, cuts, thinking_first):
    """Tags split across deltas (`</thi` + `nk>`) are held back, never shown as reasoning or content."""
    text, thinking, reasoning, content = case

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [1, 2]

    parser = ReasoningParser(Tok())
    stream = parser.stream(thinking)
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    parts = [stream.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [stream.finish()]
    assert ("".join(p.reasoning for p in parts) or None, "".join(p.content for p in parts) or None) == (
        reasoning, content)
    assert not any("</think>" in p.reasoning + p.content for p in parts) or not thinking


def test_start_state_comes_from_the_rendered_generation_prompt(qwen, r1):
    msgs = [{"role": "user", "content": "2 + 2?"}]
    p = get_parser("qwen3", qwen)
    on = {"add_generation_prompt": True}
    off = {"add_generation_prompt": True, "enable_thinking": False}
    assert generation_prompt(qwen, msgs, on) == "<|im_start|>assistant\n"
    assert p.starts_thinking(generation_prompt(qwen, msgs, on), on)
    assert generation_prompt(qwen, msgs, off).endswith("</think>\n\n")
    assert not p.starts_thinking(generation_prompt(qwen, msgs, off), off)
    # an earlier turn's </think> in the history does not count: only the generation prompt is read
    history = msgs + [{"role": "assistant", "content": "4", "reasoning_content": "adding"},
                      {"role": "user", "content": "3 + 3?"}]
    assert "</think>" in qwen.apply_chat_template(history) and p.starts_thinking(generation_prompt(qwen, history, on))
    r = get_parser("deepseek_r1", r1)
    assert generation_prompt(r1, msgs, on).endswith("<think>\n") and r.starts_thinking(generation_prompt(r1, msgs, on))
    # qwen3 without a tag in the prompt: chat_template_kwargs' enable_thinking decides; deepseek_r1 always thinks
    assert not p.starts_thinking("", {"enable_thinking": False}) and r.starts_thinking("", {"enable_thinking": False})
    # continuing a final assistant message that opened a block: still thinking
    cont = {"add_generation_prompt": False, "continue_final_message": True}
    assert p.starts_thinking(generation_prompt(qwen, msgs + [{"role": "assistant", "content": "<think>hm"}], cont))


def test_unknown_parser_names_the_known_ones(qwen):
    from ortlora.errors import OrtloraError

    with pytest.raises(OrtloraError, match="deepseek_r1, qwen3"):
        get_parser("nope", qwen)


@pytest.mark.parametrize("fixture", ["qwen", "r1"])
def test_a_grammar_gated_by_the_reasoning_applies_only_to_the_answer(request, fixture):
    """The engine hook as runtime/request.py would run it: no mask while the gate is open, the grammar's mask
    from the token after `</think>` (one token, or several pieces). Random logits that favour the end tag after a
    few steps: the reasoning is free text, the answer matches the regex."""
    from ortlora.runtime.constraints import Constraint, regex_grammar

    tok = request.getfixturevalue(fixture)
    parser = get_parser("qwen3", tok)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        gate, c = parser.gate(True), Constraint(regex_grammar("[0-9]{3}"), tok, [0])
        ids, end = [], list(parser.end_ids)
        for step in range(80):
            logits = rng.standard_normal(tok.vocab_size) * 3
            logits[0] = -np.inf  # no EOS inside the reasoning
            if 6 <= step and not gate.ended:  # steer to the end tag, one piece at a time
                logits[end[len(ids) - 6] if len(ids) - 6 < len(end) else end[0]] = 100
            if gate.ended:
                mask = c.allowed(tok.vocab_size)
                logits = np.where(mask, logits, -np.inf)
            token = int(np.argmax(logits))
            ids.append(token)
            if gate.ended:
                c.advance(token)
                if c.finished:
                    break
            else:
                gate.feed(token)
        thought, answer = parser.split(tok.decode(ids, skip_special_tokens=False))
        assert thought and re.fullmatch(r"[0-9]{3}", answer or ""), (thought, answer)


def test_chat_message_and_deltas_carry_reasoning_content_in_openais_shape(qwen):
    from serve_helpers import openai_validator

    from ortlora.serve import protocol as P
    from ortlora.serve.openai_compat import Output, chat_response
    from ortlora.serve.tools import ToolPlan

    body = P.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])
    out = Output(text="<think>\nsum it\n</think>\n\nIt is 4.", finish_reason="stop")
    r = chat_response("chatcmpl-1", 1, body, [out], P.Usage(prompt_tokens=1, completion_tokens=9, total_tokens=10),
                      ToolPlan.of(body), None, reasoning=get_parser("qwen3", qwen), thinking=True)
    msg = r.model_dump()["choices"][0]["message"]
    assert (msg["content"], msg["reasoning_content"], msg["reasoning"]) == ("It is 4.", "sum it", "sum it")
    openai_validator("CreateChatCompletionResponse").validate(json.loads(r.model_dump_json()))
    plain = chat_response("chatcmpl-1", 1, body, [out], P.Usage(prompt_tokens=1, completion_tokens=9,
                                                               total_tokens=10), ToolPlan.of(body), None)
    assert "reasoning_content" not in plain.model_dump()["choices"][0]["message"]
    delta = chat_delta(get_parser("qwen3", qwen).stream(True).feed("hm"))
    assert delta == {"reasoning_content": "hm", "reasoning": "hm"}
    openai_validator("CreateChatCompletionStreamResponse").validate(
        {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})


def test_a_required_tool_call_is_parsed_from_the_answer_after_the_reasoning(qwen):
    from ortlora.serve import protocol as P
    from ortlora.serve.openai_compat import Output, chat_response
    from ortlora.serve.tools import ToolPlan

    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    body = P.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=[tool],
                                   tool_choice="required")
    out = Output(text='plan it</think>[{"name":"add","arguments":{"a":1}}]', finish_reason="stop")
    r = chat_response("c", 1, body, [out], P.Usage(prompt_tokens=1, completion_tokens=9, total_tokens=10),
                      ToolPlan.of(body), None, reasoning=get_parser("qwen3", qwen))
    choice = r.choices[0]
    assert choice.message.reasoning_content == "plan it" and choice.finish_reason == "tool_calls"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"a": 1}
