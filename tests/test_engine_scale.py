"""The engine at real size: a folder of symlinks (the Hugging Face cache's layout) serves mixed batches; one session
holds the weights once; the prefix cache gives the tokens of runs without it and never crosses adapters or
namespaces."""

from __future__ import annotations

import os
import shutil

import numpy as np

from ortlora.runtime.batch import Batch, run_to_end
from ortlora.runtime.request import Request
from ortlora.runtime.sampling import SamplingParams

N = 6
SYSTEM = [(7 * i + 3) % 300 + 5 for i in range(40)]  # a shared "system prompt": 2 full cache blocks and a piece
QUESTIONS = [[11, 12, 13], [40, 41], [99, 98, 97, 96]]


def _model(folder, files, **kw):
    from ortlora import Model

    m = Model(folder, slots=4, max_len=96, **kw)
    for name, path in files.items():
        m.adapters.load(path, name=name)
    return m


def _greedy(m, prompts, adapters, n=N):
    return [c.token_ids for c in m.complete(prompts, adapters, max_new_tokens=n, min_new_tokens=n)]


def test_a_folder_of_symlinks_serves_mixed_batches(lora, tmp_path, monkeypatch):
    """Snapshot files that link to blobs elsewhere (as huggingface_hub lays out its cache) load, named by a relative
    path too (onnxruntime then refuses a data file outside the folder it is told), and a mixed batch gives the tokens
    of the folder itself."""
    _, folder, _, files = lora
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in folder.iterdir() if p.is_file())):
        shutil.copy2(f, blobs / f"blob{i}")
        os.symlink(os.path.relpath(blobs / f"blob{i}", snap), snap / f.name)
    assert (snap / "model.onnx.data").is_symlink()
    prompts, adapters = [[5, 17, 33, 9], [12, 40, 66], [8, 9, 10], [99]], ["a1", "a2", None, "a1"]
    monkeypatch.chdir(tmp_path)
    linked = _model("snapshots/abc123", {n: snap / p.name for n, p in files.items()})
    assert _greedy(linked, prompts, adapters) == _greedy(_model(folder, files), prompts, adapters)
    assert linked.engine.pool.placed  # the batch ran mixed (a failed mixed step falls back to rows one by one)


def test_prefix_cache_gives_the_same_tokens_and_never_crosses_adapters(lora):
    _, folder, _, files = lora
    cached, plain = _model(folder, files), _model(folder, files, prefix_cache_bytes=0)
    cache = cached.engine.prefix_cache
    assert plain.engine.prefix_cache is None
    for adapter in ("a1", "a2", None):
        prompts = [SYSTEM + q for q in QUESTIONS]
        hits, tokens = cache.hits, cache.hit_tokens
        want = [_greedy(plain, [p], [adapter])[0] for p in prompts]
        got = [_greedy(cached, [p], [adapter])[0] for p in prompts]  # one by one: each after the last is cached
        assert got == want
        # the first of each adapter finds nothing (the others' blocks are theirs); the next two reuse 32 tokens
        assert cache.hits - hits == 2 and cache.hit_tokens - tokens == 2 * 32
    # a mixed batch of prompts whose prefixes are all cached, and the same batch without any cache
    prompts, adapters = [SYSTEM + QUESTIONS[0], SYSTEM + QUESTIONS[1], SYSTEM, QUESTIONS[2]], ["a2", None, "a1", "a1"]
    assert _greedy(cached, prompts, adapters) == _greedy(plain, prompts, adapters)


def test_prefix_cache_keeps_namespaces_apart_and_its_bound(lora):
    """Requests in another namespace (a server: another tenant) find nothing; the LRU stays within its bytes; an
    unloaded adapter's blocks go."""
    _, folder, _, files = lora
    m = _model(folder, files)
    cache = m.engine.prefix_cache

    def run(namespace, prompt, adapter="a1"):
        req = Request(prompt, SamplingParams(max_new_tokens=2), m.tokenizer, m.adapters.acquire(adapter),
                      cache_namespace=namespace)
        return run_to_end(Batch(m.engine, m.adapters), [req])[0], req

    run("tenant-a", SYSTEM + QUESTIONS[0])
    _, other = run("tenant-b", SYSTEM + QUESTIONS[1])
    _, same = run("tenant-a", SYSTEM + QUESTIONS[1])
    assert other.reused == 0 and same.reused == 32
    block_bytes = cache.bytes // len(cache)
    cache.max_bytes = 3 * block_bytes
    run("tenant-c", SYSTEM + QUESTIONS[2])
    assert cache.bytes <= cache.max_bytes and len(cache) == 3
    _, again = run("tenant-c", SYSTEM + QUESTIONS[2])
    assert again.reused == 32  # the most recent chain's head stayed
    m.adapters.unload("a1")
    m.complete([[1, 2]], [None], max_new_tokens=1)  # the engine lets go of unloaded adapters between steps
    assert len(cache) == 0 and cache.bytes == 0


def test_tenants_share_prefix_cache_only_when_both_allow_it(tmp_path):
    from ortlora.serve.tenants import Tenants

    path = tmp_path / "tenants.toml"
    path.write_text("\n".join(f'[tenants.{n}]\napi_key_sha256 = ["{c * 64}"]\nshare_prefix_cache = {s}\n'
                              for n, c, s in (("a", "1", "true"), ("b", "2", "true"), ("c", "3", "false"))))
    tenants = Tenants.load(path)
    assert tenants.cache_namespace("a") == tenants.cache_namespace("b")
    assert len({tenants.cache_namespace(t) for t in ("a", "c", "unknown")}) == 3
    assert Tenants.open().cache_namespace("anonymous") != tenants.cache_namespace("a")


# -- longrope past the original context -----------------------------------------------------------------------------
ORIGINAL = 32


def _hf_logits(hf_dir, prompt, feed):
    """transformers' last-position logits after the prompt and after each fed token (its own KV cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        logits = [out.logits[0, -1].numpy()]
        for t in feed:
            out = model(input_ids=torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[0, -1].numpy())
    return np.stack(logits)


def test_longrope_switches_to_the_long_factors_past_the_original_context_as_transformers(tiny, tmp_path):
    """A phi3 with longrope (original context 32 of 128) exports the full context; the engine's logits equal
    transformers' below the original length, across it while decoding, and for a prompt already past it, with rows
    on either side of it decoded in one batch."""
    from ortlora.runtime.engine import Engine, Row
    from ortlora.testing import build_model

    rng = np.random.default_rng(3)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": ORIGINAL,
            "short_factor": [1.0] * 8, "long_factor": rng.uniform(1.0, 6.0, 8).round(3).tolist()}
    hf = build_model(tmp_path / "phi3-longrope", "phi3", max_position_embeddings=128,
                     original_max_position_embeddings=ORIGINAL, rope_parameters=rope)
    folder = tiny.export(hf, "longrope")
    engine = Engine(folder, slots=2, max_len=128)
    assert engine.info.context_length == 128
    short, long = rng.integers(5, 300, 20).tolist(), rng.integers(5, 300, 40).tolist()  # below / past 32
    feed = rng.integers(5, 300, 24).tolist()  # the short row crosses 32 while decoding
    want = [_hf_logits(hf, p, feed) for p in (short, long)]
    got = [np.empty_like(w) for w in want]
    for slot, prompt in enumerate((short, long)):
        got[slot][0] = engine.prefill([Row(slot, prompt)])[0]
    for t, token in enumerate(feed):
        step = engine.decode([Row(0, [token]), Row(1, [token])])
        for slot in (0, 1):
            got[slot][t + 1] = step[slot]
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)
    # onnxruntime-genai runs the folder as exported, to the same tokens, across the original length too
    import onnxruntime_genai as og

    from ortlora import Model

    og_model = og.Model(str(folder))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(short) + 24, min_length=len(short) + 24, do_sample=False)
    gen = og.Generator(og_model, params)
    gen.append_tokens([short])
    theirs = []
    while not gen.is_done():
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    ours = Model(folder, slots=1, max_len=128).complete([short], max_new_tokens=24, min_new_tokens=24)[0].token_ids
    assert ours == theirs
