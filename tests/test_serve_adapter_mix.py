"""The API's adapter extras on a real server with the `openai` client: `adapter_scale` and `adapters` (a weighted
combination) in the extra body, checked against PEFT (scaled) and the in-process runtime, DoRA rows included;
combination names are checked against the tenant."""

from __future__ import annotations

import concurrent.futures

import pytest

from ortlora.adapters.convert import convert_adapter
from reference import peft_model, torch_greedy
from serve_helpers import ServerProcess

ADMIN, ACME = "admin-secret", "acme-secret"
N = 8
PROMPT = [5, 17, 33, 9, 81, 100, 7]


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    from ortlora.serve.tenants import hash_key

    hf = tiny.model("qwen2")
    peft = {"dora": tiny.adapter(hf, "var-dora", r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                 use_dora=True, seed=21),
            "l1": tiny.adapter(hf, "var-l1", r=4, target_modules=["q_proj", "o_proj"], seed=22),
            "l2": tiny.adapter(hf, "var-l2", r=6, target_modules=["k_proj", "up_proj", "q_proj"], seed=23)}
    folder = tiny.export(hf, "var", adapter_path=list(peft.values()))
    root = tmp_path_factory.mktemp("serve-mix")
    (root / "adapters").mkdir()
    for name, p in peft.items():
        convert_adapter(p, root / "adapters" / f"{name}.onnx_adapter", model=folder)
    (root / "tenants.toml").write_text(f"""
[tenants.admin]
api_key_sha256 = ["{hash_key(ADMIN)}"]
adapters = ["*"]
admin = true
[tenants.acme]
api_key_sha256 = ["{hash_key(ACME)}"]
adapters = ["l1"]
""")
    return dict(hf=hf, peft=peft, folder=folder, root=root)


@pytest.fixture(scope="module")
def server(setup):
    s = ServerProcess(setup["folder"], "--adapters", str(setup["root"] / "adapters"), "--tenants",
                      str(setup["root"] / "tenants.toml"), "--max-batch", "8", log=setup["root"] / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(setup):
    from ortlora import Model

    m = Model(setup["folder"], slots=4, max_len=64)
    for name in setup["peft"]:
        m.adapters.load(setup["root"] / "adapters" / f"{name}.onnx_adapter", name=name)
    return m


def _client(server, key=ADMIN):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def _text(client, model="base", **extra):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0,
                                  extra_body={"ignore_eos": True, **extra})
    return r.choices[0].text


def _local(local, adapter, scale=1.0):
    return local.complete([PROMPT], [adapter], adapter_scale=scale, max_new_tokens=N, min_new_tokens=N,
                          ignore_eos=True)[0]


def test_adapter_scale_in_the_extra_body(setup, server, local):
    client = _client(server)
    half = _text(client, "l2", adapter_scale=0.5)
    want = _local(local, "l2", 0.5)
    assert half == want.text
    assert want.token_ids == torch_greedy(peft_model(setup["hf"], setup["peft"]["l2"], 0.5), PROMPT, N)
    assert half != _text(client, "l2") and _text(client, "l2", adapter_scale=0) == _text(client, "base")
    # rows with different scales of one adapter, and DoRA rows, at the same time: each gets its own text
    asks = [("l2", 0.5), ("l2", 2.0), ("l2", 1.0), ("dora", 1.0)]
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        got = list(pool.map(lambda a: _text(client, a[0], adapter_scale=a[1]), asks))
    assert got == [_local(local, a, s).text for a, s in asks]
    import openai

    assert _text(client, "dora", adapter_scale=0.5) == _local(local, "dora", 0.5).text
    with pytest.raises(openai.BadRequestError, match="DoRA adapters are not combined"):
        _text(client, "base", adapters=[{"name": "dora", "weight": 0.5}, {"name": "l1", "weight": 0.5}])


def test_weighted_combination_in_the_extra_body(setup, server, local):
    client = _client(server)
    mix = [{"name": "l1", "weight": 0.7}, {"name": "l2", "weight": 0.3}]
    got = _text(client, "base", adapters=mix)
    assert got == _local(local, {"l1": 0.7, "l2": 0.3}).text
    assert got not in (_text(client, "l1"), _text(client, "l2"), _text(client, "base"))
    assert _text(client, "base", adapters=mix, adapter_scale=0.5) == _local(local, {"l1": 0.7, "l2": 0.3}, 0.5).text
    import openai

    acme = _client(server, ACME)
    assert _text(acme, "l1", adapters=[{"name": "l1", "weight": 0.5}]) == _local(local, "l1", 0.5).text
    with pytest.raises(openai.NotFoundError, match="'l2' does not exist"):  # not this tenant's: as if missing
        _text(acme, "l1", adapters=mix)
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
        _text(client, "base", adapters=[{"name": "nope", "weight": 1.0}])
    with pytest.raises(openai.BadRequestError, match="each adapter may appear once"):
        _text(client, "base", adapters=[{"name": "l1", "weight": 0.5}, {"name": "l1", "weight": 0.5}])
    with pytest.raises(openai.BadRequestError):
        _text(client, "l1", adapter_scale=1000.0)  # out of range
    chat = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, extra_body={"adapters": mix})
    assert chat.choices[0].message.content is not None
