"""Drives a Blyan node with the official OpenAI Python SDK (tests/paid_inference.rs).

Usage: sdk_e2e.py BASE_URL API_KEY
Prints one JSON object on its last line: the served model id, and per
request the usage and the node's `blyan` billing object. Exits non-zero
on any check that fails here.
"""
import json
import sys

import openai
from openai import OpenAI


def main() -> int:
    base, key = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
    models = client.models.list()
    served = [m for m in models.data if getattr(m, "served_here", False)]
    assert served, f"no served model in {models.data}"
    model = served[0].id
    assert all(m.object == "model" for m in models.data)

    messages = [{"role": "user", "content": "Say something about blocks."}]
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=12)
    assert plain.object == "chat.completion"
    u = plain.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u
    assert 1 <= u.completion_tokens <= 12, u
    plain_blyan = plain.model_extra["blyan"]
    assert plain_blyan["charged"] is True, plain_blyan

    text, usage, blyan, finish = "", None, None, None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        extra = chunk.model_extra or {}
        if "blyan" in extra:
            blyan = extra["blyan"]
        if chunk.choices:
            c = chunk.choices[0]
            text += c.delta.content or ""
            finish = c.finish_reason or finish
            assert chunk.usage is None, "usage only in the last chunk"
        else:
            usage = chunk.usage
    assert usage is not None, "include_usage: a usage chunk"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert finish in ("stop", "length"), finish
    assert blyan and blyan["charged"] is True, blyan

    # Without include_usage no chunk carries usage (OpenAI's behaviour); the
    # finishing chunk still carries the node's billing object.
    third = None
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=3, stream=True
    ):
        assert getattr(chunk, "usage", None) is None
        third = (chunk.model_extra or {}).get("blyan", third)
    assert third and third["charged"] is True, third
    # An unknown model is 404 model_not_found, raised as the SDK's NotFoundError.
    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e.body
    # A forged key is 401, raised as AuthenticationError.
    forged = key[:-2] + ("00" if not key.endswith("00") else "11")
    bad = OpenAI(base_url=f"{base}/v1", api_key=forged, max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("forged key accepted")
    except openai.AuthenticationError as e:
        assert e.code == "invalid_api_key", e.body

    print(json.dumps({
        "model": model,
        "requests": [
            {"usage": plain.usage.model_dump(), "blyan": plain_blyan},
            {"usage": usage.model_dump(), "blyan": blyan, "text": text},
            {"usage": None, "blyan": third},
        ],
        "unstreamed_answer_ok": True,
        "streamed_answer_ok": True,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
