"""What the load sends: the request bodies of every workload, built once.

The bodies are what a typical OpenAI-SDK caller sends to Meridian: a short chat, the same chat with
``stream: true``, and a batch of 16 texts to embed (the upstream answers 1536 floats per text).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

__all__ = [
    "BENCH_KEY",
    "CHAT_BODY",
    "CHAT_MODEL",
    "EMBED_BODY",
    "EMBED_DIMENSIONS",
    "EMBED_INPUTS",
    "EMBED_MODEL",
    "STREAM_BODY",
    "WORKLOADS",
    "Workload",
]

BENCH_KEY = "sg-bench-local-only-not-a-secret-000000000000000"
"""The one API key the benchmark's sidegate configs accept (hashed in the config at start-up)."""

CHAT_MODEL = "meridian-1"
EMBED_MODEL = "meridian-embed-3"
EMBED_DIMENSIONS = 1536

_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Answer in one short paragraph."},
    {"role": "user", "content": "Explain quantum computing in one sentence, for a ten-year-old."},
]
CHAT_BODY = orjson.dumps(
    {"model": CHAT_MODEL, "messages": _MESSAGES, "temperature": 0.7, "max_tokens": 256}
)
STREAM_BODY = orjson.dumps({**orjson.loads(CHAT_BODY), "stream": True})
EMBED_INPUTS = tuple(
    f"Document {i}: the quarterly report for region {i % 4} notes steady growth in orders, "
    f"a {i + 2}% rise in returns and a new warehouse opening in the spring."
    for i in range(16)
)
EMBED_BODY = orjson.dumps({"model": EMBED_MODEL, "input": list(EMBED_INPUTS)})


@dataclass(frozen=True, slots=True)
class Workload:
    """One kind of request: where it goes and what it sends."""

    name: str
    path: str
    body: bytes
    stream: bool = False


WORKLOADS = {
    "chat": Workload("chat", "/v1/chat/completions", CHAT_BODY),
    "stream": Workload("stream", "/v1/chat/completions", STREAM_BODY, stream=True),
    "embeddings": Workload("embeddings", "/v1/embeddings", EMBED_BODY),
}
