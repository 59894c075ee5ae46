"""Deterministic completions and token counts, shared by Meridian's chat and Meivan's complete.

A reply is ``n`` words taken cyclically from the last message that has text, where ``n`` is the
state's ``stream_chunks`` capped by ``max_tokens``; one word is one completion token, so the
JSON and SSE forms of a completion agree on content and usage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Completion", "message_text", "plan_completion", "text_tokens"]

_FALLBACK = ("ok",)


def text_tokens(text: str) -> int:
    """Approximate token count of ``text``: one token per started four characters."""
    return (len(text) + 3) // 4


def message_text(message: dict[str, Any]) -> str:
    """The text of a chat message: its string content, or its text parts joined by spaces."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


@dataclass(frozen=True, slots=True)
class Completion:
    """One planned reply: ``pieces`` concatenate to ``content``, one piece per SSE delta."""

    pieces: tuple[str, ...]
    prompt_tokens: int
    finish_reason: str

    @property
    def content(self) -> str:
        """The whole reply text."""
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        """Tokens of the reply: one per piece."""
        return len(self.pieces)

    def usage(self) -> dict[str, int]:
        """The ``usage`` object of the reply."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def plan_completion(messages: Sequence[dict[str, Any]], chunks: int, limit: int) -> Completion:
    """The reply to ``messages``: ``min(chunks, limit)`` words, cut short (``length``) by limit.

    ``prompt_tokens`` is the characters of all message texts // 4 plus 4 per message (at least 1).
    """
    texts = [message_text(m) for m in messages]
    prompt_tokens = max(1, sum(len(t) for t in texts) // 4 + 4 * len(texts))
    source: Sequence[str] = _FALLBACK
    for text in reversed(texts):
        words = text.split()
        if words:
            source = words
            break
    n = max(0, min(chunks, limit))
    pieces = tuple(
        source[i % len(source)] if i == 0 else " " + source[i % len(source)] for i in range(n)
    )
    return Completion(pieces, prompt_tokens, "length" if limit < chunks else "stop")
