"""vLLM's request fields and the smaller API points of issue 25, without a server: structured_outputs and the
guided_* aliases (validation and grammars, 400s naming the field), `param` on validation errors, chat template
fields (rendered in jinja2's sandbox), logprob token texts (`bytes:` and `token_id:N`), prompt_logprobs' shape,
a `required` tool call cut by max_tokens, the streaming tool splitter, and the tokenizer endpoints' functions."""

from __future__ import annotations


import pytest
from pydantic import ValidationError

from ortlora.serve import protocol as P
from ortlora.serve.errors import APIError, validation_error

MSGS = [{"role": "user", "content": "hi"}]
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from ortlora.runtime.tokenizer import Tokenizer
    from ortlora.testing import build_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder, chat_template=(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"))
    return Tokenizer(folder)


def _error(model, body) -> APIError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_error(info.value.errors())


# -- structured outputs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, base", [(P.ChatCompletionRequest, {"model": "m", "messages": MSGS}),
                                         (P.CompletionRequest, {"model": "m", "prompt": "x"})])
def test_structured_outputs_and_guided_aliases_become_one_constraint(model, base):
    for extra, kind, value, param in (
            ({"structured_outputs": {"regex": "a+"}}, "regex", "a+", "structured_outputs"),
            ({"structured_outputs": {"json": '{"type": "object"}'}}, "json", {"type": "object"}, "structured_outputs"),
            ({"structured_outputs": {"json_object": True}}, "json_object", True, "structured_outputs"),
            ({"guided_choice": ["a", "b"]}, "choice", ["a", "b"], "guided_choice"),
            ({"guided_json": {"type": "object"}, "guided_decoding_backend": "xgrammar"}, "json", {"type": "object"},
             "guided_json"),
            ({"guided_grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"', "guided_grammar")):
        body = model.model_validate({**base, **extra})
        assert body.structured_outputs.constraint() == (kind, value) and body._structured_param == param


@pytest.mark.parametrize("extra, param, fragment", [
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"structural_tag": {"x": 1}}}, "structured_outputs.structural_tag", "not supported"),
    ({"structured_outputs": {"json": "{nope"}}, "structured_outputs.json", "not valid JSON"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "at least 1"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "only one"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "response_format"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "not supported"),
    ({"prompt_logprobs": 2, "stream": True}, "prompt_logprobs", "stream"),
    ({"prompt_logprobs": 21}, "prompt_logprobs", "less than or equal"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", "cannot be set"),
    ({"continue_final_message": True}, "continue_final_message", "add_generation_prompt"),
    ({"continue_final_message": True, "add_generation_prompt": False}, "continue_final_message", "assistant"),
    ({"chat_template": "{{ x }}"}, "chat_template", "not supported"),
    ({"tools": [ADD], "tool_choice": "required", "guided_json": {"type": "object"}}, "tool_choice", "both"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages.[0].content", "valid string"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.[0].function.name", "pattern"),
])
def test_invalid_fields_are_400s_whose_param_names_the_field(extra, param, fragment):
    err = _error(P.ChatCompletionRequest, {"model": "m", "messages": MSGS, **extra})
    assert err.status == 400 and err.param == param and fragment in err.message, (err.param, err.message)


def test_output_grammar_compiles_each_kind_and_a_bad_one_is_a_400_naming_its_field(tok):
    from ortlora.serve.translate import output_grammar

    def grammar_of(_, body):
        return output_grammar(tok, frozenset([0]), body)

    server = None
    for extra in ({"structured_outputs": {"grammar": 'start: "a" | "b"'}}, {"guided_regex": "[0-9]+"},
                  {"guided_choice": ["x", "y"]}, {"structured_outputs": {"json_object": True}}):
        assert grammar_of(server, P.ChatCompletionRequest(model="m", messages=MSGS, **extra))
    assert grammar_of(server, P.ChatCompletionRequest(model="m", messages=MSGS)) is None
    for extra, param in (({"structured_outputs": {"regex": "[0-9"}}, "structured_outputs.regex"),
                         ({"guided_grammar": "root ::= nothing"}, "guided_grammar"),
                         ({"guided_json": {"type": "nonsense"}}, "guided_json")):
        with pytest.raises(APIError) as info:
            grammar_of(server, P.CompletionRequest(model="m", prompt="x", **extra))
        assert info.value.status == 400 and info.value.param == param, info.value.message


# -- chat template fields ----------------------------------------------------------------------------------------
def test_template_options_reach_the_template_and_continue_final_message_cuts_after_it(tok):
    from ortlora.serve.tools import template_messages

    body = P.ChatCompletionRequest(model="m", messages=MSGS, chat_template_kwargs={"enable_thinking": False})
    text = tok.apply_chat_template(template_messages(body), **body.template_options())
    assert text.endswith("<|im_start|>assistant\n<think></think>")
    assert not tok.apply_chat_template(template_messages(body)).endswith("<think></think>")
    body = P.ChatCompletionRequest(model="m", messages=MSGS, add_generation_prompt=False)
    assert tok.apply_chat_template(template_messages(body), **body.template_options()).endswith("hi<|im_end|>\n")
    body = P.ChatCompletionRequest(model="m", messages=MSGS + [{"role": "assistant", "content": "The answer is "}],
                                   add_generation_prompt=False, continue_final_message=True)
    assert tok.apply_chat_template(template_messages(body), **body.template_options()).endswith(
        "<|im_start|>assistant\nThe answer is ")


def test_chat_templates_render_in_jinja2s_sandbox(tmp_path):
    from jinja2.exceptions import SecurityError

    from ortlora.runtime.tokenizer import Tokenizer
    from ortlora.testing import build_tokenizer

    build_tokenizer(tmp_path, chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SecurityError):
        Tokenizer(tmp_path).apply_chat_template(MSGS)
    build_tokenizer(tmp_path, chat_template="{% set x = messages.append(1) %}{{ x }}")  # immutable: no mutation
    with pytest.raises(SecurityError):
        Tokenizer(tmp_path).apply_chat_template(MSGS)


def test_assistant_reasoning_in_history_reaches_the_template():
    from ortlora.serve.tools import template_messages

    body = P.ChatCompletionRequest(model="m", messages=MSGS + [
        {"role": "assistant", "content": "4", "reasoning_content": "adding"},
        {"role": "assistant", "content": "5", "reasoning": "again"}])
    assert [m.get("reasoning_content") for m in template_messages(body)] == [None, "adding", "again"]


# -- logprob texts -------------------------------------------------------------------------------------------------
def test_tokens_that_are_part_of_a_character_are_written_as_bytes_and_do_not_collide(tok):
    from ortlora.runtime.logprobs import TokenLogprob
    from ortlora.serve.openai_compat import TokenText, completion_logprobs

    texts = TokenText(tok)
    ids = tok.encode("héllo wörld ✓")
    partial = [t for t in range(tok.vocab_size) if texts(t)[0].startswith("bytes:")]
    assert len(partial) >= 2  # the byte-level alphabet has lone continuation bytes
    text, raw = texts(partial[0])
    assert text == "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    lp = completion_logprobs(texts, ids, [TokenLogprob(t, -1.0, tuple((p, -2.0 - k) for k, p in enumerate(partial[:3])))
                                          for t in ids])
    assert all(len(top) == 3 for top in lp.top_logprobs)  # three distinct keys, none "\ufffd"
    # offsets count characters: a character split over tokens is counted once
    decoded = tok.decode(ids)
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] <= len(decoded)
    assert all(a <= b for a, b in zip(lp.text_offset, lp.text_offset[1:]))
    as_ids = TokenText(tok, as_ids=True)
    assert as_ids(ids[0]) == (f"token_id:{ids[0]}", texts(ids[0])[1])


def test_prompt_logprobs_have_vllms_shape(tok):
    from ortlora.runtime.logprobs import TokenLogprob
    from ortlora.serve.openai_compat import TokenText, prompt_logprobs_json

    ids = tok.encode("hello world")[:3]
    scores = [None, TokenLogprob(ids[1], -0.5, ((ids[1], -0.5), (7, -1.0))), TokenLogprob(ids[2], -9.0, ((7, -1.0),))]
    out = prompt_logprobs_json(TokenText(tok), ids, scores)
    assert out[0] is None
    assert out[1][str(ids[1])] == {"logprob": -0.5, "rank": 1, "decoded_token": TokenText(tok)(ids[1])[0]}
    assert out[1]["7"]["rank"] == 2 and out[2][str(ids[2])]["rank"] is None and out[2]["7"]["rank"] == 1
    P.CompletionChoice(index=0, text="", finish_reason="stop", prompt_logprobs=out)  # the response model takes it


# -- tools -----------------------------------------------------------------------------------------------------------
def test_a_required_call_cut_by_max_tokens_comes_back_as_a_partial_call_like_a_named_one():
    from ortlora.serve.tools import ToolPlan

    plan = ToolPlan.of(P.ChatCompletionRequest(model="m", messages=MSGS, tools=[ADD], tool_choice="required"))
    content, calls = plan.parse('[{"name":"add","arguments":{"a":1,"b":2}},{"name":"add","arguments":{"a":3,"b')
    assert content is None and [(c.function.name, c.function.arguments) for c in calls] == [
        ("add", '{"a": 1, "b": 2}'), ("add", '{"a":3,"b')]
    named = ToolPlan.of(P.ChatCompletionRequest(model="m", messages=MSGS, tools=[ADD],
                                                tool_choice={"type": "function", "function": {"name": "add"}}))
    assert named.parse('{"a":3,"b')[1][0].function.arguments == calls[1].function.arguments  # the same partial call
    assert plan.parse('[{"na') == ('[{"na', [])  # no name yet: nothing to call
    assert plan.parse('[{"name":"a\\"dd","arguments":{"s":"}{"')[1][0].function.name == 'a"dd'


@pytest.mark.parametrize("pieces, content, calls", [
    (["Hello", " <tool", '_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>'], "Hello ", ["add"]),
    (["\n", "<tool_call>", '{"name":"add","arguments":{}}'], "", ["add"]),  # only a call: no content at all
    (["<to", "day> is", " sunny"], "<today> is sunny", []),  # looked like a tag, was not
    (["<tool_call>not json"], "<tool_call>not json", []),  # did not parse: content after all
])
def test_tool_stream_holds_what_may_be_a_call_and_shows_the_rest(pieces, content, calls):
    from ortlora.serve.tools import ToolPlan, ToolStream

    stream = ToolStream(ToolPlan.of(P.ChatCompletionRequest(model="m", messages=MSGS, tools=[ADD])))
    shown = "".join(stream.feed(p)[0] for p in pieces)
    rest, found = stream.finish()
    assert shown + rest == content and [c.function.name for c in found] == calls


# -- tokenizer endpoints ---------------------------------------------------------------------------------------------
def test_tokenize_detokenize_and_tokenizer_info_as_vllm_and_lm_eval_use_them(tok):
    from ortlora.serve import tokenize as T

    r = T.tokenize(tok, T.TokenizeRequest(prompt="hello world", return_token_strs=True), 256)
    assert r.tokens == tok.encode("hello world") and r.count == len(r.tokens) and r.max_model_len == 256
    assert "".join(r.token_strs).replace("Ġ", " ") == "hello world"
    assert T.detokenize(tok, T.DetokenizeRequest(tokens=r.tokens)).prompt == "hello world"
    chat = T.tokenize(tok, T.TokenizeRequest(messages=MSGS), 256)
    assert chat.tokens == tok.encode(tok.apply_chat_template(MSGS), add_special_tokens=False)
    eos = tok.encode("<|endoftext|>", add_special_tokens=False)  # lm-eval's RemoteTokenizer finds the EOS id so
    assert len(eos) == 1 and eos[0] in tok.eos_ids
    info = T.tokenizer_info(tok, 256).model_dump()
    assert info["eos_token"] == "<|endoftext|>" and "bos_token" in info and info["chat_template"]
    assert info["model_max_length"] == 256 and info["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert T.version().version
    with pytest.raises(APIError) as err:
        T.detokenize(tok, T.DetokenizeRequest(tokens=[tok.vocab_size]))
    assert err.value.param == "tokens"
    assert _error(T.TokenizeRequest, {"prompt": "x", "messages": MSGS}).param == "prompt"
    with pytest.raises(APIError) as err:
        T.tokenize(tok, T.TokenizeRequest(messages=MSGS, continue_final_message=True, add_generation_prompt=False), 9)
    assert err.value.param == "continue_final_message"
