"""Sampling against transformers' logits processors, incremental detokenization, chat templates against
transformers' apply_chat_template. No model: only a locally trained tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ortlora.errors import OrtloraError
from ortlora.runtime.sampling import Sampler, SamplingParams, repetition_penalty
from ortlora.runtime.tokenizer import REPLACEMENT, Tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from ortlora.testing import build_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer(tok_dir)


def hf_kept(logits: np.ndarray, **kw) -> set[int]:
    """The tokens transformers' warpers leave finite (temperature 1), for comparison with our candidate set."""
    import torch
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    x = torch.tensor(logits)[None]
    if kw.get("top_k"):
        x = TopKLogitsWarper(kw["top_k"])(None, x)
    if kw.get("top_p", 1.0) < 1.0:
        x = TopPLogitsWarper(kw["top_p"])(None, x)
    if kw.get("min_p", 0.0) > 0:
        x = MinPLogitsWarper(kw["min_p"])(None, x)
    return set(torch.nonzero(torch.isfinite(x[0])).flatten().tolist())


@pytest.mark.parametrize("vocab", [50, 3000])  # 3000 > the 512 candidates sorted first: the full-vocabulary path
@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_p=0.9), dict(top_p=0.3), dict(min_p=0.05),
                                dict(top_k=40, top_p=0.8, min_p=0.02), dict(top_p=0.999), dict(top_k=2000)])
def test_candidates_match_transformers_warpers(vocab, kw):
    rng = np.random.default_rng(vocab)
    for scale in (0.5, 3.0):  # flat and peaked distributions
        logits = (rng.standard_normal(vocab) * scale).astype(np.float32)
        idx, probs = Sampler(SamplingParams(temperature=1.0, **kw)).candidates(logits)
        assert set(idx.tolist()) == hf_kept(logits, **kw)
        full = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert np.all(np.diff(probs) <= 0)  # best first
        if not kw.get("top_k"):  # without top-k, probabilities are the full softmax's
            np.testing.assert_allclose(probs, full[idx], rtol=1e-5)


def test_sampling_frequencies_follow_the_kept_distribution():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.06, 0.04], np.float32))
    s = Sampler(SamplingParams(temperature=1.0, top_k=3, seed=0))
    counts = np.bincount([s(logits) for _ in range(6000)], minlength=5)
    assert counts[3:].sum() == 0
    np.testing.assert_allclose(counts[:3] / 6000, [4 / 9, 3 / 9, 2 / 9], atol=0.025)  # ~4 sigma at n=6000


def test_temperature_sharpens():
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    cold = np.bincount([Sampler(SamplingParams(temperature=0.25, seed=i))(logits) for i in range(400)], minlength=3)
    hot = np.bincount([Sampler(SamplingParams(temperature=4.0, seed=i))(logits) for i in range(400)], minlength=3)
    assert cold[0] > 330 and hot[0] < 220  # p0 = 0.86 at T=0.25, 0.38 at T=4


def test_seed_reproducible_and_greedy():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    runs = [[s(logits) for _ in range(20)] for s in (Sampler(SamplingParams(temperature=1.0, seed=3)),
                                                       Sampler(SamplingParams(temperature=1.0, seed=3)),
                                                       Sampler(SamplingParams(temperature=1.0, seed=4)))]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert Sampler(SamplingParams())(logits) == int(np.argmax(logits))
    assert Sampler(SamplingParams(temperature=1.0, top_k=1, seed=9))(logits) == int(np.argmax(logits))


def test_repetition_penalty_matches_transformers():
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = np.random.default_rng(1).standard_normal(100).astype(np.float32)
    seen = [3, 7, 7, 50, 99]
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), torch.tensor(logits)[None])[0].numpy()
    np.testing.assert_allclose(repetition_penalty(logits, seen, 1.3), ref, rtol=1e-6)
    assert Sampler(SamplingParams(repetition_penalty=1e6))(logits, [int(np.argmax(logits))]) != int(np.argmax(logits))


def test_banned_tokens_never_come():
    logits = np.zeros(10, np.float32)
    logits[4] = 50.0
    assert Sampler(SamplingParams())(logits, banned=[4]) != 4


def test_invalid_settings_listed_at_once():
    with pytest.raises(OrtloraError) as e:
        SamplingParams(max_new_tokens=-1, temperature=-1, top_p=0, min_p=1.5, stop=("",))
    msg = str(e.value)
    for word in ("max_new_tokens", "temperature", "top_p", "min_p", "stop strings"):
        assert word in msg


# -- detokenization ----------------------------------------------------------------------------------------------
def test_stream_never_splits_a_character(tok):
    text = "Ünïcödé text, emoji 🙂 and CJK 中文 keep the byte-level tokenizer honest."
    ids = tok.encode(text, add_special_tokens=False)
    # the test means something only if some tokens end inside a multi-byte character
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)
    stream = tok.stream()
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == text == tok.decode(ids)


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=0, max_size=40))
def test_stream_join_equals_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    stream = tok.stream()
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all(REPLACEMENT not in p for p in pieces) or REPLACEMENT in text


def test_special_tokens_and_eos(tok):
    assert tok.eos_ids == [tok.token_id("<|endoftext|>")]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert tok.token_id("<|im_start|>") in ids
    assert tok.decode(ids) == "user\nhi"


# -- chat templates ---------------------------------------------------------------------------------------------
QWEN_LIKE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role != 'system' %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)
JSON_TOOLS = ("{% for m in messages %}{{ m | tojson }}{% endfor %}"
              "{% if not messages %}{{ raise_exception('no') }}{% endif %}")


@pytest.mark.parametrize("template", [None, QWEN_LIKE, JSON_TOOLS])
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tok_dir, tmp_path, template, gen):
    import json
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    shutil.copytree(tok_dir, folder)
    if template is not None:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Ünï 🙂 "},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}]
    ref = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False,
                                                                      add_generation_prompt=gen)
    assert Tokenizer(folder).apply_chat_template(messages, add_generation_prompt=gen) == ref
