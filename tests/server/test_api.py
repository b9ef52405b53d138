"""The OpenAI-compatible routes over a live server: the official client, exact greedy equality with
the Python API, the model list, errors (400 naming the field, 404, too-long prompt) and API keys."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from lorascope import LLM, SamplingParams

MAX_TOKENS = 12
SERVED = "tiny-base"  # the served name the conftest's servers use


def test_openai_client_streams_completions(server, tiny) -> None:
    adapter = sorted(tiny[1])[0]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    chunks = list(client.completions.create(
        model=adapter, prompt="The quick brown fox", max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) >= 2, "not streamed token by token"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + MAX_TOKENS
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    client.close()


def test_openai_client_streams_chat(server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "hello"}], max_tokens=MAX_TOKENS, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == MAX_TOKENS
    full = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "hello"}], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True},
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full.choices[0].message.content == streamed, "streamed and whole chat answers differ"
    assert full.usage is not None and full.usage.prompt_tokens == chunks[-1].usage.prompt_tokens
    client.close()


def test_greedy_over_http_equals_python_api(server, tiny) -> None:
    model, adapters = tiny
    names: list[str | None] = [None, *sorted(adapters)[:5]]
    prompts: list[str | list[int]] = ["Multi-LoRA serving is", [5, 17, 99, 200, 3, 41, 7], "Once upon a time"]
    cases = [(prompts[i % len(prompts)], name) for i, name in enumerate(names)]
    llm = LLM(str(model), adapters, max_loras=4, max_cpu_loras=8, max_lora_rank=16, max_model_len=256)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    want = llm.generate([p for p, _ in cases], params, [a for _, a in cases])
    llm.close()
    with server.client() as c:
        for (prompt, name), ref in zip(cases, want, strict=True):
            for stream in (False, True):
                body = {"model": name or SERVED, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                        "ignore_eos": True, "stream": stream}
                ids, text = _complete(c, body)
                assert ids == ref.token_ids, f"adapter {name} stream={stream}: token ids differ from LLM.generate"
                assert text == ref.text
    assert len({tuple(w.token_ids) for w in want}) > 1, "every adapter gave the same tokens: the test is blind"


def _complete(c: httpx.Client, body: dict) -> tuple[list[int], str]:
    if not body["stream"]:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["token_ids"], choice["text"]
    ids, text = [], ""
    with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        choice = json.loads(line.removeprefix("data: "))["choices"][0]
        ids += choice["token_ids"]
        text += choice["text"]
    return ids, text


def test_models_lists_base_and_adapters(server, tiny) -> None:
    with server.client() as c:
        data = c.get("/v1/models").json()["data"]
    by_id = {m["id"]: m for m in data}
    assert by_id[SERVED]["parent"] is None
    assert set(by_id) == {SERVED, *tiny[1]}
    for name, path in tiny[1].items():
        assert by_id[name]["parent"] == SERVED and by_id[name]["root"] == str(path)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 2}, "n"),
        ({"seed": -3}, "seed"),
        ({"min_tokens": 50, "max_tokens": 4}, "min_tokens"),
        ({"prompt": None}, "prompt"),
        ({"prompt": [1, -5]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"stream_options": {"include_usage": "perhaps"}}, "stream_options"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(server, body: dict, field: str) -> None:
    with server.client() as c:
        r = c.post("/v1/completions", json={"model": SERVED, "prompt": "hi"} | body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert field in error["message"] and error["code"] == 400


def test_malformed_json_is_400(server) -> None:
    with server.client() as c:
        r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_unknown_model_is_404_naming_it(server) -> None:
    with server.client() as c:
        for route, extra in (("/v1/completions", {"prompt": "hi"}),
                             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            r = c.post(route, json={"model": "no-such-adapter"} | extra)
            assert r.status_code == 404, r.text
            assert "no-such-adapter" in r.json()["error"]["message"]


def test_too_long_prompt_is_400(server) -> None:
    with server.client() as c:
        for prompt in ("x" * 400, [7] * 300):
            r = c.post("/v1/completions", json={"model": SERVED, "prompt": prompt, "stream": True})
            assert r.status_code == 400, r.text
            assert "context" in r.json()["error"]["message"]


def test_runtime_loading_is_off_by_default(server, tiny) -> None:
    path = next(iter(tiny[1].values()))
    with server.client() as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": str(path)})
        assert r.status_code == 403 and "enable-runtime-lora" in r.json()["error"]["message"]
        assert "new" not in {m["id"] for m in c.get("/v1/models").json()["data"]}


def test_api_key_is_required_except_on_health(tiny, start_server) -> None:
    with start_server(*tiny, api_key="s3cret", max_model_len=4096) as s, httpx.Client(base_url=s.url, timeout=30) as bare:
        body = {"model": SERVED, "prompt": "hi", "max_tokens": 2}
        assert bare.get("/health").status_code == 200
        for method, route in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")):
            r = bare.request(method, route, json=body)
            assert r.status_code == 401, f"{route} without a key: {r.status_code}"
            r = bare.request(method, route, json=body, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401, f"{route} with a wrong key: {r.status_code}"
        with s.client() as good:
            assert good.get("/v1/models").status_code == 200
            assert good.post("/v1/completions", json=body).status_code == 200
        with s.client() as good, good.stream("POST", "/v1/completions", json=body | {"max_tokens": 4000, "stream": True,
                                                                                   "ignore_eos": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        # the dropped stream was aborted through the auth layer too
        m = s.wait_idle()
        assert m["lorascope:kv_blocks_used"][0][1] == 0
        assert ({"finish_reason": "abort"}, 1.0) in m["lorascope:requests_finished_total"]
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="s3cret")
        assert client.completions.create(model=SERVED, prompt="hi", max_tokens=2).usage.completion_tokens == 2
        client.close()
