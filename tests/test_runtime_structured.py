"""Sampling for the OpenAI API, without a model: presence / frequency penalties and logit_bias by OpenAI's rules,
logprobs of the raw logits, and grammar masks (llguidance) that keep random logits inside a JSON schema and close
the value within the token budget."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ortlora.errors import OrtloraError
from ortlora.runtime.request import Request
from ortlora.runtime.sampling import Sampler, SamplingParams
from ortlora.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from ortlora.testing import build_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder)
    return Tokenizer(folder)


def test_presence_and_frequency_penalties_and_logit_bias_follow_openai():
    """OpenAI: logit[j] -= frequency * count[j] + presence * (count[j] > 0), counts over the output only; the bias
    is added. Checked on many random logit vectors through greedy choice (the argmax of the adjusted logits)."""
    rng = np.random.default_rng(0)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=1.5, logit_bias={9: 2.0, 3: -1.0})
    out = [3, 3, 7, 3]
    for _ in range(200):
        logits = rng.standard_normal(12).astype(np.float32) * 2
        expected = logits.astype(np.float64)
        expected[3] -= 1.5 * 3 + 0.5 + 1.0
        expected[7] -= 1.5 * 1 + 0.5
        expected[9] += 2.0
        # the prompt does not count: only `generated` does
        assert Sampler(p)(logits, previous=[1, 2, 5], generated=out) == int(np.argmax(expected))
    logits = rng.standard_normal(50).astype(np.float32)
    assert Sampler(SamplingParams(logit_bias={int(np.argmax(logits)): -100}))(logits) != int(np.argmax(logits))
    assert Sampler(SamplingParams(logit_bias={5: 100}))(logits) == 5
    with pytest.raises(OrtloraError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(OrtloraError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101})


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([0.0, 0.3, 1.0, 2.0]), st.integers(1, 40))
def test_sampled_token_is_always_allowed(seed, temperature, n_allowed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(64) * 5).astype(np.float32)
    allowed = np.zeros(64, bool)
    allowed[rng.choice(64, n_allowed, replace=False)] = True
    token = Sampler(SamplingParams(temperature=temperature, seed=seed, top_k=5))(logits, allowed=allowed)
    assert allowed[token]
    only = np.zeros(64, bool)
    only[0] = True  # the grammar allows only EOS, which min_new_tokens bans: the grammar wins
    assert Sampler(SamplingParams())(logits, banned=[0], allowed=only) == 0


def test_logprobs_are_the_raw_logits_log_softmax(tok):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(tok.vocab_size).astype(np.float32) * 3
    ref = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    req = Request([1, 2], SamplingParams(temperature=0.7, seed=0, logprobs=3, presence_penalty=1.0,
                                         max_new_tokens=4), tok)
    chunk = req.feed(logits, False)
    lp = chunk.logprobs[0]
    assert lp.token == chunk.token_ids[0] and abs(lp.logprob - ref[lp.token]) < 1e-9
    assert [t for t, _ in lp.top] == list(np.argsort(-ref)[:3])


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
     "required": ["name", "n"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
     "required": ["tags"]},
    {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "x": {"type": "number"},
                                      "deep": {"type": "object", "properties": {"ok": {"type": "boolean"}}}},
     "required": ["kind", "x", "deep"]},
]


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("seed", range(10))
def test_random_logits_under_a_schema_close_valid_json_within_the_budget(tok, schema, seed):
    """Unbounded strings and numbers: random logits would write them until max_tokens; the closing preference in
    the budget's last tokens ends the value, so the output parses and validates."""
    from ortlora.runtime.constraints import check, json_schema_grammar

    grammar = json_schema_grammar(schema)
    check(grammar, tok, [0])
    rng = np.random.default_rng(seed)
    req = Request([1], SamplingParams(temperature=1.0, seed=seed, max_new_tokens=80, grammar=grammar), tok,
                  eos_ids=frozenset({0}))
    text = ""
    for _ in range(80):
        chunk = req.feed(rng.standard_normal(tok.vocab_size).astype(np.float32) * 4, False)
        text += chunk.text
        if chunk.finish_reason:
            break
    assert req.finish_reason == "stop", text
    jsonschema.validate(json.loads(text), schema)


def test_a_bad_schema_is_a_clear_error(tok):
    from ortlora.runtime.constraints import GrammarError, check, json_schema_grammar

    with pytest.raises(GrammarError):
        check(json_schema_grammar({"type": "object", "properties": {"a": {"type": "nonsense"}}}), tok)


def test_plain_temperature_sampling_draws_from_the_softmax():
    """The no-cut path (top_p 1, no top_k / min_p) draws from the whole softmax without sorting: frequencies over
    40,000 draws match the probabilities (3 sigma ~ 0.007), and masked tokens never come."""
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4], np.float32)) * 2  # temperature 2 undoes the factor
    sampler = Sampler(SamplingParams(temperature=2.0, seed=0))
    freq = np.bincount([sampler(logits) for _ in range(40000)], minlength=4) / 40000
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.01)
    allowed = np.array([True, False, True, False])
    freq = np.bincount([sampler(logits, allowed=allowed) for _ in range(40000)], minlength=4) / 40000
    np.testing.assert_allclose(freq, [0.25, 0, 0.75, 0], atol=0.01)


# -- vLLM's structured_outputs kinds: regex, choice, grammar (Lark or GBNF) -----------------------------------------
def _constrained_run(tok, grammar: str, seed: int, budget: int = 40) -> tuple[str, str]:
    """Random logits through a grammar-constrained Request until it stops: (text, finish_reason)."""
    rng = np.random.default_rng(seed)
    req = Request([1], SamplingParams(temperature=1.0, seed=seed, max_new_tokens=budget, grammar=grammar), tok,
                  eos_ids=frozenset({0}))
    text = ""
    for _ in range(budget):
        chunk = req.feed(rng.standard_normal(tok.vocab_size).astype(np.float32) * 4, False)
        text += chunk.text
        if chunk.finish_reason:
            break
    return text, req.finish_reason


@pytest.mark.parametrize("seed", range(8))
def test_regex_choice_and_grammars_let_only_matching_outputs_through(tok, seed):
    """Random logits would write anything; the masks let only outputs of the language through, and each output
    ends by the grammar (finish "stop"), not by the budget. The check is independent: Python's `re`."""
    import re

    from ortlora.runtime.constraints import check, choice_grammar, cfg_grammar, regex_grammar

    cases = [
        (regex_grammar(r"[a-c]{2,4}-[0-9]{3}"), lambda t: re.fullmatch(r"[a-c]{2,4}-[0-9]{3}", t)),
        (choice_grammar(["yes", "no", "maybe so", "naïve \"q\""]), lambda t: t in ("yes", "no", "maybe so",
                                                                                    'naïve "q"')),
        (cfg_grammar('start: item ("," item)*\nitem: "x" | "yy" | NUM\nNUM: /[1-9]/'),
         lambda t: re.fullmatch(r"(x|yy|[1-9])(,(x|yy|[1-9]))*", t)),
        (cfg_grammar('root ::= "(" inner ")"\ninner ::= "a" | "b" inner'),  # GBNF, as llama.cpp writes it
         lambda t: re.fullmatch(r"\(b*a\)", t)),
    ]
    for grammar, matches in cases:
        check(grammar, tok, [0])
        text, reason = _constrained_run(tok, grammar, seed)
        assert matches(text) and reason == "stop", (grammar[:60], text, reason)


def test_unconstrained_random_logits_do_not_match_so_the_check_can_fail(tok):
    import re

    text = ""
    rng = np.random.default_rng(0)
    req = Request([1], SamplingParams(temperature=1.0, seed=0, max_new_tokens=12), tok, eos_ids=frozenset({0}))
    for _ in range(12):
        text += req.feed(rng.standard_normal(tok.vocab_size).astype(np.float32) * 4, False).text
    assert not re.fullmatch(r"[a-c]{2,4}-[0-9]{3}", text)


@pytest.mark.parametrize("build, bad", [("regex_grammar", "[0-9"), ("cfg_grammar", "start: undefined_rule"),
                                        ("cfg_grammar", "root ::= missing"), ("json_schema_grammar", {"type": 5})])
def test_bad_regex_and_grammars_are_grammar_errors(tok, build, bad):
    from ortlora.runtime import constraints

    with pytest.raises(constraints.GrammarError):
        constraints.check(getattr(constraints, build)(bad), tok)


def test_grammar_for_dispatches_vllm_kinds(tok):
    from ortlora.runtime.constraints import GrammarError, check, grammar_for

    for kind, value in (("json", {"type": "object"}), ("json_object", True), ("regex", "a+"),
                        ("choice", ["a", "b"]), ("grammar", 'start: "a"')):
        check(grammar_for(kind, value), tok)
    with pytest.raises(GrammarError, match="structural_tag"):
        grammar_for("structural_tag", {})


def test_reasoning_gate_ends_on_the_end_tags_tokens():
    from ortlora.runtime.constraints import ReasoningGate

    one = ReasoningGate((9,))
    assert [one.feed(t) for t in (1, 2, 9, 3)] == [False, False, True, True]
    several = ReasoningGate((5, 6, 7))
    assert [several.feed(t) for t in (5, 6, 1, 5, 6, 7, 2)] == [False] * 5 + [True, True]
    assert ReasoningGate((5,), open=False).ended
