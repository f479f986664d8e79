"""OpenAI request bodies -> engine `Work`: plain functions with explicit inputs, shared by every endpoint and by
both engine clients (one process, Ray).

    prompts = completion_prompts(limits, tokenizer, body.prompt)       # text / ids -> token ids, size-checked
    chat = chat_inputs(limits, tokenizer, body, parser)                # chat: prompt, tools, grammar, reasoning
    grammar = output_grammar(tokenizer, limits.eos_ids, body)          # structured outputs: compiled, or a 400
    work = build_work(body, limits, prompts, max_tokens, explicit_max=True, grammar=grammar, adapter=..., tenant=...)

Everything here may raise APIError (a 400 naming the field); nothing touches an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable

from ortlora.errors import OrtloraError
from ortlora.runtime.sampling import SamplingParams
from ortlora.serve.engine_client import AdapterChoice, Limits, Work
from ortlora.serve.errors import APIError
from ortlora.serve.tools import ToolPlan

MIN_TEMPERATURE = 1e-5  # logits / 1e-300 overflow: a temperature this low is greedy anyway


# -- prompts -------------------------------------------------------------------------------------------------------
def check_size(limits: Limits, text: str, param: str) -> None:
    """Refuse text that cannot fit the context before tokenizing it: no token covers more than
    `limits.max_token_chars` characters, so a longer text has more tokens than the context holds."""
    limit = limits.context_length * limits.max_token_chars
    if len(text) > limit:
        raise APIError(400, f"This model's maximum context length is {limits.context_length} tokens; the {param} "
                            f"has {len(text)} characters, more than that many tokens can hold. Shorten it.",
                       param=param, code="context_length_exceeded")


def completion_prompts(limits: Limits, tokenizer, prompt) -> list[list[int]]:
    """A completions `prompt` (text, texts, ids or lists of ids) as token-id lists."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    elif isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    for p in prompts:
        if isinstance(p, str):
            check_size(limits, p, "prompt")
    out = []
    for p in prompts:
        if isinstance(p, str):
            ids = tokenizer.encode(p)
        else:
            ids = list(p)
            bad = [t for t in ids if not 0 <= t < limits.vocab_size]
            if bad:
                raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size})",
                               param="prompt")
        if not ids:
            raise APIError(400, "prompt must not be empty (it encodes to no tokens)", param="prompt")
        out.append(ids)
    return out


def chat_prompt(limits: Limits, tokenizer, messages: list[dict], tools: list[dict] | None = None,
                options: dict[str, Any] | None = None) -> list[int]:
    """The prompt ids of a conversation; `tools` ([{"type": "function", "function": ...}]) go to the template as
    transformers' apply_chat_template(tools=...) passes them; `options`: add_generation_prompt,
    continue_final_message and the template's own variables (`ChatCompletionRequest.template_options`)."""
    check_size(limits, "".join(str(m.get("content") or "") for m in messages), "messages")
    try:
        text = tokenizer.apply_chat_template(messages, **_template_args(tools, options))
    except OrtloraError as exc:
        raise APIError(400, str(exc), param="messages") from None
    except Exception as exc:  # jinja2 TemplateError: the template refused these messages
        raise APIError(400, f"the model's chat template refused the messages: {exc}", param="messages") from None
    check_size(limits, text, "messages")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise APIError(400, "the messages render to an empty prompt (no tokens) with this model's chat template",
                       param="messages")
    return ids


def _template_args(tools: list[dict] | None, options: dict[str, Any] | None) -> dict[str, Any]:
    return {"add_generation_prompt": True, **(options or {}), **({"tools": tools} if tools else {})}


@dataclass(frozen=True)
class ChatInputs:
    """What a chat request (or a Responses request, as chat) sends the engine, and how its output is read back."""
    plan: ToolPlan
    prompt: list[int]
    grammar: str | None
    thinking: bool = False  # with a reasoning parser: the output starts inside the reasoning
    grammar_after: tuple[int, ...] | None = None  # the grammar waits for these ids (the reasoning's end tag)


def chat_inputs(limits: Limits, tokenizer, body, parser=None) -> ChatInputs:
    """The prompt (the template rendered with the request's options), the tool plan, the grammar (a required or
    named call's schema, else structured outputs or response_format) and, with a reasoning parser
    (serve.reasoning), whether the output starts thinking: then the grammar applies after the reasoning ends, as
    vLLM applies it. Template rendering is slow for long conversations: call it off the event loop."""
    from ortlora.serve.reasoning import generation_prompt
    from ortlora.serve.tools import template_messages

    plan = ToolPlan.of(body)
    messages, options = template_messages(body), body.template_options()
    prompt = chat_prompt(limits, tokenizer, messages, plan.tools, options)
    grammar = output_grammar(tokenizer, limits.eos_ids, body, plan.schema)  # a required call: its schema
    thinking = False
    if parser is not None:
        opening = generation_prompt(tokenizer, messages, _template_args(plan.tools, options))
        thinking = parser.starts_thinking(opening, body.chat_template_kwargs)
    after = parser.end_ids if thinking and grammar is not None else None
    return ChatInputs(plan, prompt, grammar, thinking, after)


# -- what the output must follow -------------------------------------------------------------------------------------
def output_grammar(tokenizer, eos_ids: frozenset[int], body, tool_schema: dict | None = None) -> str | None:
    """The llguidance grammar a request's output must follow (None: free text): a required or named tool call's
    schema, else `structured_outputs` (or its `guided_*` alias), else `response_format`'s. Compiled here (cached
    for the engine), so a bad schema, regex or grammar is a 400 naming its field."""
    from ortlora.runtime import constraints

    structured = getattr(body, "structured_outputs", None)
    try:
        if tool_schema is not None:
            param = "tools"
            grammar = constraints.json_schema_grammar(tool_schema)
        elif structured is not None:
            kind, value = structured.constraint()
            param = body._structured_param + ("." + kind if body._structured_param == "structured_outputs" else "")
            grammar = constraints.grammar_for(kind, value)
        else:
            fmt, param = body.response_format, "response_format"
            if fmt is None or fmt.type == "text":
                return None
            grammar = constraints.json_schema_grammar(fmt.json_schema.schema_ if fmt.type == "json_schema" else None)
        constraints.check(grammar, tokenizer, eos_ids)
    except constraints.GrammarError as exc:
        raise APIError(400, f"{param}: {exc}", param=param) from None
    return grammar


# -- sampling --------------------------------------------------------------------------------------------------------
def sampling_params(body, limits: Limits, max_new_tokens: int, seed: int | None, grammar: str | None = None,
                    prompt_logprobs: int | None = None, grammar_after: tuple[int, ...] | None = None
                    ) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=max(body.top_k, 0), top_p=1.0 if body.top_p is None else body.top_p, min_p=body.min_p,
            repetition_penalty=body.repetition_penalty, seed=seed, stop=tuple(body.stop_list()),
            ignore_eos=body.ignore_eos, min_new_tokens=min(body.min_tokens, max_new_tokens),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=logit_bias(limits, body.logit_bias), logprobs=body.logprobs_k(), grammar=grammar,
            prompt_logprobs=prompt_logprobs, grammar_after=grammar_after,
            skip_special_tokens=body.skip_special_tokens, include_stop_str_in_output=body.include_stop_str_in_output)
    except OrtloraError as exc:
        if isinstance(exc, APIError):
            raise
        raise APIError(400, str(exc)) from None


def logit_bias(limits: Limits, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    out = tuple((int(k), float(v)) for k, v in (bias or {}).items())
    bad = [t for t, _ in out if t >= limits.vocab_size]
    if bad:
        raise APIError(400, f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size})",
                       param="logit_bias")
    return out


# -- work --------------------------------------------------------------------------------------------------------------
def build_work(body, limits: Limits, prompts: list[list[int]], max_tokens: int | None, *, explicit_max: bool,
               adapter: AdapterChoice | None, tenant: str = "", cache_namespace: Hashable = ("tenant", ""),
               grammar: str | None = None, prompt_logprobs: int | None = None,
               grammar_after: tuple[int, ...] | None = None) -> Work:
    """One job per (prompt, choice): each prompt checked against the context, its new tokens bounded by what is
    left of it (`max_tokens` None: all of it; asked for explicitly and too many: a 400, as OpenAI answers)."""
    ctx = limits.context_length
    n = body.n or 1
    budgets = []
    for ids in prompts:
        if len(ids) >= ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens; the prompt has {len(ids)} "
                                "tokens. Shorten the prompt.", param="prompt", code="context_length_exceeded")
        room = ctx - len(ids)
        if explicit_max and max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                                "completion). Reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        budgets.append(room if max_tokens is None else min(max_tokens, room))
    if len(prompts) * n > limits.max_choices:
        raise APIError(400, f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} choices; at most "
                            f"{limits.max_choices} per request", param="n")
    params = [sampling_params(body, limits, budget, None if body.seed is None else body.seed + j, grammar,
                              prompt_logprobs, grammar_after) for budget in budgets for j in range(n)]
    return Work(adapter, prompts, n, params, tenant, cache_namespace)
