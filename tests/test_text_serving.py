"""Serving the real model (smollm2-135m) over HTTP: text in and text out, the chat template, EOS and stop strings,
streaming, the official ``openai`` client, and a live migration in the middle of a text stream.

Two instances of the 135M model on the 2-core VM: a decode step takes ~0.1-0.3 s, so requests stay short.
"""

from __future__ import annotations

import json

import httpx
import pytest

from llumnix.engine import gguf_model
from llumnix.engine.tokenizer import TextTokenizer
from llumnix.runtime.frontend import BackgroundServer
from llumnix.runtime.serve_config import build_serve_config

MODEL = "smollm2-135m"
pytestmark = pytest.mark.timeout(300)

try:
    gguf_model.gguf_path(MODEL)
    _missing = None
except gguf_model.ModelNotInstalledError as e:
    _missing = str(e)
if _missing:
    pytest.skip(f"{_missing} (make test installs it)", allow_module_level=True)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(ray_local):
    config = build_serve_config({}, {"model": MODEL, "instances": 2, "port": 0, "num_cpus_per_instance": 0.5,
                                     "num_blocks": 64})  # fmt: skip
    with BackgroundServer(config) as srv:
        yield srv


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.for_model(MODEL)


def post(url: str, path: str, **body) -> dict:
    resp = httpx.post(f"{url}/v1/{path}", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def stream(url: str, path: str, on_chunk=None, **body) -> list[dict]:
    """The SSE chunks, each handed to ``on_chunk`` as it arrives (while the request is still generating)."""
    chunks, done = [], False
    with httpx.stream("POST", f"{url}/v1/{path}", json={**body, "stream": True}, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line:
                continue
            assert not done, line
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            chunks.append(chunk)
            if on_chunk is not None:
                on_chunk(chunk, chunks)
    assert done
    return chunks


def test_text_prompt_gives_text_and_token_ids(server, tokenizer):
    out = post(server.url, "completions", prompt="The capital of France is", max_tokens=6)
    choice = out["choices"][0]
    assert choice["text"].startswith(" Paris") and choice["text"] == tokenizer.decode(choice["token_ids"])
    assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == 6
    assert out["usage"]["prompt_tokens"] == len(tokenizer.encode("The capital of France is")) and out["model"] == MODEL
    by_ids = post(server.url, "completions", prompt=tokenizer.encode("The capital of France is"), max_tokens=6)
    assert by_ids["choices"][0]["token_ids"] == choice["token_ids"]  # token-id prompts still work


def test_chat_applies_the_template_and_stops_at_eos(server, tokenizer):
    out = post(server.url, "chat/completions", messages=QUESTION, max_tokens=40)
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop" and choice["token_ids"][-1] == 2  # <|im_end|>, left out of the text
    assert "<|im_end|>" not in choice["message"]["content"] and len(choice["token_ids"]) < 40
    prompt = tokenizer.encode(tokenizer.apply_chat_template(QUESTION))
    assert out["usage"]["prompt_tokens"] == len(prompt)
    longer = post(server.url, "chat/completions", messages=QUESTION, max_tokens=len(choice["token_ids"]) + 3,
                  ignore_eos=True)  # fmt: skip
    assert longer["choices"][0]["finish_reason"] == "length"
    assert longer["choices"][0]["token_ids"][: len(choice["token_ids"])] == choice["token_ids"]


def test_stop_strings_end_the_text_before_them(server):
    out = post(server.url, "completions", prompt="The capital of France is", max_tokens=16, stop=["."])
    choice = out["choices"][0]
    assert choice["text"] == " Paris" and choice["finish_reason"] == "stop"
    body = {"prompt": "The capital of France is", "max_tokens": 16, "stop": "\n\n"}  # one string: a list of one
    whole = post(server.url, "completions", **body)["choices"][0]
    chunks = stream(server.url, "completions", **body)
    assert whole["text"] == " Paris." and whole["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and len(chunks) < 16  # generation stopped early


def test_streamed_chat_equals_the_whole_answer(server):
    whole = post(server.url, "chat/completions", messages=QUESTION, max_tokens=40)["choices"][0]
    chunks = stream(server.url, "chat/completions", messages=QUESTION, max_tokens=40)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    assert "".join(d["content"] for d in deltas) == whole["message"]["content"]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == whole["token_ids"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "stop"]
    assert chunks[-1]["object"] == "chat.completion.chunk" and chunks[-1]["usage"]["completion_tokens"] == len(
        whole["token_ids"])


def test_the_openai_client_works(server):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e .[test])")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40)
    assert "Paris" in chat.choices[0].message.content and chat.choices[0].finish_reason == "stop"
    text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, stop=["."])
    assert text.choices[0].text == " Paris"
    pieces = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, stream=True)
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == chat.choices[0].message.content


def test_a_migrated_stream_has_the_unmigrated_text(server):
    body = {"prompt": "Llamas are animals that live in", "max_tokens": 24, "ignore_eos": True}
    reference = post(server.url, "completions", **body)["choices"][0]
    migrations = []

    def migrate_once(chunk, chunks):
        if len(chunks) == 3:
            migrations.append(httpx.post(f"{server.url}/admin/migrate", json={"request_id": chunk["id"]},
                                         timeout=30, headers=server.admin_headers).json())  # fmt: skip

    chunks = stream(server.url, "completions", migrate_once, **body)
    assert migrations and migrations[0]["started"], migrations
    assert chunks[-1]["llumnix"]["migrations"] == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference["text"]


def test_bad_chat_requests_get_one_clear_error(server):
    for body, needle in (
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user"}]}, "content"),
        ({"messages": QUESTION, "max_tokens": 10, "max_completion_tokens": 10}, "not both"),
        ({"messages": QUESTION, "max_tokens": 5000}, "exceeds"),
        ({"messages": QUESTION, "temperature": 0.9}, "greedy"),
    ):
        resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
        assert resp.status_code == 400 and needle in resp.json()["error"]["message"], (body, resp.text)
