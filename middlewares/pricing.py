"""What a request costs: exact integer prices, upper-bound estimates, usage from answers and SSE.

Money is **integer nano-USD** (10⁻⁹ USD) everywhere: prices are converted once, exactly, from the
config's decimals (:func:`rates`); a request's cost is rounded **up** to a whole nano-USD once, so
a ledger's sum is the exact integer sum of the per-request costs. Token prices are nano-USD per
1M tokens (``2.50`` USD → ``2_500_000_000``), so even sub-nano per-token prices stay exact.

:func:`estimate` is an upper bound of a request's cost before it is sent, without a tokenizer:

* prompt: one token per UTF-8 byte of every string (keys included) in ``messages``, ``tools``,
  ``functions``, ``tool_choice`` and ``response_format``, ``len(str(n))`` per number, plus 16 —
  byte-level BPE never makes more tokens than bytes, and the keys pay for the chat template;
* embeddings: one token per UTF-8 byte of each input string plus 2, one per id of a token
  array, plus 16;
* output: the largest of ``max_tokens`` / ``max_completion_tokens`` (capped by the model's
  ``max_output_tokens``), else ``max_output_tokens``, else the caller's default; times ``n``;
* images: ``n`` × the price of the size and quality; audio: ``per_request`` + ``per_second`` ×
  ``max_audio_seconds``. Image inputs to chat (vision) are not bounded.

A stream cut short is charged from :class:`SseUsage`: completion tokens are estimated as the
larger of the number of deltas that carried text and ``ceil(text bytes / 4)``, never zero once
any text was sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

import orjson

from .errors import BadRequest, SidegateError
from .values import value_type

__all__ = [
    "DEFAULT_IMAGE_QUALITY",
    "DEFAULT_IMAGE_SIZE",
    "NANO_PER_USD",
    "PER_TOKENS",
    "TAIL_USAGE_MIN",
    "Estimate",
    "PriceLike",
    "PricingError",
    "Rates",
    "SseUsage",
    "Usage",
    "cost",
    "estimate",
    "image_price",
    "is_usage_only_event",
    "nano_to_usd",
    "rates",
    "token_usage_at_end",
    "usage_at_end",
    "usage_from_response",
    "usage_from_sse",
    "usd_to_nano",
]

NANO_PER_USD = 10**9
PER_TOKENS = 10**6  # token prices are per this many tokens
DEFAULT_IMAGE_SIZE = "1024x1024"
DEFAULT_IMAGE_QUALITY = "standard"
_ANY = "*"
_PROMPT_OVERHEAD = 16
_ITEM_OVERHEAD = 2
_TOKEN_KINDS = frozenset({"chat", "complete", "embeddings", "passthrough"})
_PROMPT_FIELDS = ("messages", "tools", "functions", "tool_choice", "response_format")
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n")
_USAGE_SET = re.compile(rb'"usage"(?!:null)')  # a usage that may not be null
_MAX_EVENT = 1 << 20
_UNREAD_MAX = 1 << 14  # bytes of events a stream keeps to count later (see SseUsage)
_UNREAD_OVERHEAD = 64  # what keeping one costs beyond its bytes, about


class PricingError(SidegateError):
    """The price table cannot cost a request (a config gap that load-time checks should catch)."""

    status = 500
    type = "server_error"
    code = "price_missing"


class PriceLike(Protocol):
    """What :func:`rates` reads: the ``pricing.<model>`` config section (USD decimals)."""

    @property
    def input(self) -> Decimal | None: ...
    @property
    def output(self) -> Decimal | None: ...
    @property
    def per_image(self) -> Decimal | Mapping[str, Decimal | Mapping[str, Decimal]] | None: ...
    @property
    def per_request(self) -> Decimal | None: ...
    @property
    def per_second(self) -> Decimal | None: ...
    @property
    def max_output_tokens(self) -> int | None: ...
    @property
    def max_audio_seconds(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Rates:
    """A price in nano-USD: ``input``/``output`` per 1M tokens; ``images[size][quality]`` per
    image (``"*"`` stands for any); ``per_request``, and ``per_second`` of audio."""

    input: int | None = None
    output: int | None = None
    images: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    per_request: int | None = None
    per_second: int | None = None
    max_output_tokens: int | None = None
    max_audio_seconds: int | None = None


@value_type
class Usage:
    """What a request used. ``audio_seconds`` is None when the answer carried no duration."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    image_size: str | None = None
    image_quality: str | None = None
    audio_seconds: Decimal | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@value_type
class Estimate:
    """An upper bound of a request's usage and cost (nano-USD), known before it is sent."""

    prompt_tokens: int
    completion_tokens: int
    images: int
    cost_nano: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usd_to_nano(usd: Decimal) -> int:
    """``usd`` in nano-USD, exactly (integer arithmetic, no decimal context rounding); a
    fraction of a nano-USD is a ValueError."""
    numerator, denominator = usd.as_integer_ratio()
    nano, rest = divmod(numerator * NANO_PER_USD, denominator)
    if rest:
        raise ValueError(f"{usd} USD is not a whole number of nano-USD")
    return nano


def nano_to_usd(nano: int) -> Decimal:
    """``nano`` nano-USD as an exact Decimal of USD."""
    return Decimal(nano).scaleb(-9)


def _nano(usd: Decimal | None) -> int | None:
    return None if usd is None else usd_to_nano(usd)


def rates(price: PriceLike) -> Rates:
    """Convert a config price to integer nano-USD, exactly (do it once, at load)."""
    table: dict[str, dict[str, int]] = {}
    per_image = price.per_image
    if isinstance(per_image, Decimal):
        table[_ANY] = {_ANY: usd_to_nano(per_image)}
    elif per_image is not None:
        for size, entry in per_image.items():
            if isinstance(entry, Decimal):
                table[size] = {_ANY: usd_to_nano(entry)}
            else:
                table[size] = {quality: usd_to_nano(usd) for quality, usd in entry.items()}
    return Rates(
        _nano(price.input),
        _nano(price.output),
        table,
        _nano(price.per_request),
        _nano(price.per_second),
        price.max_output_tokens,
        price.max_audio_seconds,
    )


def image_price(prices: Rates, size: str | None, quality: str | None) -> int:
    """Nano-USD of one image; an unlisted size or quality costs the highest price that could
    apply to it."""
    if not prices.images:
        raise PricingError("This model has no per_image price.")
    row = prices.images.get(size or DEFAULT_IMAGE_SIZE)
    if row is None:
        return max(p for r in prices.images.values() for p in r.values())
    found = row.get(quality or DEFAULT_IMAGE_QUALITY, row.get(_ANY))
    return max(row.values()) if found is None else found


def _image_options(body: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``size`` and ``quality`` of an image request; a non-string is priced as unlisted."""
    size, quality = body.get("size"), body.get("quality")
    return (
        size if size is None or isinstance(size, str) else "?",
        quality if quality is None or isinstance(quality, str) else "?",
    )


def _priced(price: int | None, name: str, quantity: int) -> int:
    if quantity == 0:
        return 0
    if price is None:
        raise PricingError(f"This model has no '{name}' price.")
    return price * quantity


def _token_cost(prices: Rates, prompt_tokens: int, completion_tokens: int) -> int:
    per_m = _priced(prices.input, "input", prompt_tokens)
    per_m += _priced(prices.output, "output", completion_tokens)
    return -(-per_m // PER_TOKENS)


def cost(usage: Usage, prices: Rates, kind: str) -> int:
    """The cost of ``usage`` in nano-USD, rounded up once: tokens for chat, complete, embeddings
    and passthrough; images × per-image; audio per request plus per second of duration (the
    ``max_audio_seconds`` bound when the answer had none)."""
    if kind in _TOKEN_KINDS:
        return _token_cost(prices, usage.prompt_tokens, usage.completion_tokens)
    if kind == "images":
        return usage.images * image_price(prices, usage.image_size, usage.image_quality)
    if kind == "audio":
        if prices.per_request is None and prices.per_second is None:
            raise PricingError("This model has neither a per_request nor a per_second price.")
        total = prices.per_request or 0
        if prices.per_second is not None:
            seconds = usage.audio_seconds
            if seconds is None:
                seconds = Decimal(prices.max_audio_seconds or 0)
            numerator, denominator = seconds.as_integer_ratio()
            total += -(-prices.per_second * numerator // denominator)
        return total
    raise ValueError(f"cannot price an endpoint of kind {kind!r}")


def _text_bound(value: Any) -> int:
    """One per UTF-8 byte of every string in ``value`` (keys included), ``len(str(x))`` of
    anything else. JSON's own str, list and dict (chat messages: a list of dicts of strings) are
    walked in loops here, without a call per string; anything else as :func:`_any_bound` does."""
    kind = type(value)
    if kind is str:
        return len(value) if value.isascii() else len(value.encode())
    total = 0
    if kind is list:
        for item in value:
            if type(item) is str:
                total += len(item) if item.isascii() else len(item.encode())
            elif type(item) is dict:
                total += _dict_bound(item)
            else:
                total += _text_bound(item)
        return total
    if kind is dict:
        return _dict_bound(value)
    return _any_bound(value)


def _dict_bound(value: dict[Any, Any]) -> int:
    total = 0
    for key, item in value.items():
        if type(key) is not str:
            key = str(key)
        total += len(key) if key.isascii() else len(key.encode())
        if type(item) is str:
            total += len(item) if item.isascii() else len(item.encode())
        else:
            total += _text_bound(item)
    return total


def _any_bound(value: Any) -> int:
    """:func:`_text_bound` of any value: str, Mapping, list and tuple (subclasses too) are
    walked; JSON's dict and list are tested before the slower abstract Mapping."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode())
    if isinstance(value, dict):
        return sum(map(_text_bound, map(str, value))) + sum(map(_text_bound, value.values()))
    if isinstance(value, list):
        return sum(map(_text_bound, value))
    if isinstance(value, Mapping):
        return sum(map(_text_bound, map(str, value))) + sum(map(_text_bound, value.values()))
    if isinstance(value, tuple):
        return sum(map(_text_bound, value))
    return len(str(value))


def _input_bound(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode()) + _ITEM_OVERHEAD
    if isinstance(value, list):
        return sum(1 if isinstance(item, int) else _input_bound(item) for item in value)
    return _text_bound(value)


def _count(body: Mapping[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"'{name}' must be a non-negative integer.", param=name)
    return value


def _output_bound(body: Mapping[str, Any], prices: Rates, default: int | None) -> int:
    asked = (_count(body, "max_tokens", None), _count(body, "max_completion_tokens", None))
    given = [n for n in asked if n is not None]
    cap = prices.max_output_tokens
    if given:
        bound = max(given) if cap is None else min(max(given), cap)
    elif cap is not None or default is not None:
        bound = cap if cap is not None else default or 0
    else:
        raise PricingError("This model has no max_output_tokens to reserve without max_tokens.")
    return bound * (_count(body, "n", 1) or 0)


def estimate(
    kind: str,
    body: Mapping[str, Any],
    prices: Rates,
    *,
    default_max_output_tokens: int | None = None,
) -> Estimate:
    """An upper bound of the usage and cost of a ``kind`` request with JSON ``body`` (see the
    module docstring); audio ignores ``body``. Passthrough calls are reserved by a configured
    amount instead. Bad ``max_tokens`` / ``n`` raise :class:`BadRequest`."""
    if kind in ("chat", "complete"):
        fields = [value for name in _PROMPT_FIELDS if (value := body.get(name)) is not None]
        prompt = _PROMPT_OVERHEAD + sum(map(_text_bound, fields))
        completion = _output_bound(body, prices, default_max_output_tokens)
        return Estimate(prompt, completion, 0, _token_cost(prices, prompt, completion))
    if kind == "embeddings":
        usage = Usage(_input_bound(body.get("input")) + _PROMPT_OVERHEAD)
    elif kind == "images":
        size, quality = _image_options(body)
        usage = Usage(images=_count(body, "n", 1) or 0, image_size=size, image_quality=quality)
    elif kind == "audio":
        usage = Usage()
    else:
        raise ValueError(f"cannot estimate an endpoint of kind {kind!r}")
    total = cost(usage, prices, kind)
    return Estimate(usage.prompt_tokens, usage.completion_tokens, usage.images, total)


def _whole(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _token_usage(usage: Any) -> Usage | None:
    if not isinstance(usage, Mapping):
        return None
    prompt = _whole(usage.get("prompt_tokens", usage.get("input_tokens")))
    completion = _whole(usage.get("completion_tokens", usage.get("output_tokens")))
    if prompt is None and completion is None:
        return None
    return Usage(prompt or 0, completion or 0)


def usage_from_response(
    kind: str, payload: Any, request: Mapping[str, Any] | None = None
) -> Usage | None:
    """The usage in a JSON answer: ``usage`` of chat, Meivan complete, embeddings and
    passthrough; ``len(data)`` of images (size and quality from the ``request`` body); the
    ``duration`` of a ``verbose_json`` transcription (``payload`` None for a text answer).
    None when the answer carries no usable usage (charge the estimate then)."""
    if kind in _TOKEN_KINDS:
        return _token_usage(payload.get("usage")) if isinstance(payload, Mapping) else None
    if kind == "images":
        data = payload.get("data") if isinstance(payload, Mapping) else None
        if not isinstance(data, list):
            return None
        size, quality = _image_options(request or {})
        return Usage(images=len(data), image_size=size, image_quality=quality)
    if kind == "audio":
        duration = payload.get("duration") if isinstance(payload, Mapping) else None
        if isinstance(duration, int | float) and not isinstance(duration, bool) and duration >= 0:
            return Usage(audio_seconds=Decimal(repr(duration)))
        return Usage()
    raise ValueError(f"no usage in an endpoint of kind {kind!r}")


_WHITESPACE = frozenset(b" \t\r\n")
TAIL_USAGE_MIN = 1 << 16
"""Answers at least this long are read for their usage from the end (:func:`usage_at_end`)."""


def token_usage_at_end(kind: str, body: bytes) -> Usage | None:
    """The usage of a token-priced answer (chat, complete, embeddings, passthrough) of at least
    :data:`TAIL_USAGE_MIN` bytes, read by :func:`usage_at_end`: what
    :func:`usage_from_response` would find in the parsed answer. None when it is shorter, of
    another kind, or does not end with its usage (then parse it whole)."""
    if len(body) < TAIL_USAGE_MIN or kind not in _TOKEN_KINDS:
        return None
    found = usage_at_end(body)
    return _token_usage(found) if isinstance(found, dict) else None


def usage_at_end(body: bytes) -> Any:
    """The ``usage`` of a JSON object that ends with it, read from its end without parsing the
    rest; None when ``body`` does not end that way (the caller parses it whole then).

    It ends that way when, less trailing whitespace, it is ``"usage"``, a colon and a flat
    object (no nested object or array, no backslash) followed by the ``}`` that ends the
    document, the member preceded by ``,`` or ``{``. That member belongs to the object the last
    ``}`` closes: the outermost one. (No string can hold it: inside a string every quote is
    escaped, and a backslash is refused.) The rest of the document is not checked: an
    embeddings answer of 16 × 1,536 numbers is ~400 KB, whose parse would cost over a
    millisecond. Upstreams put ``usage`` last (the vendor references do); one that does not is
    parsed whole.
    """
    end = _last_visible(body, len(body))
    close = _last_visible(body, end)
    if close < 1 or body[end] != 0x7D or body[close] != 0x7D:  # "}"
        return None
    start = body.rfind(b"{", 0, close)
    key = body.rfind(b'"usage"', 0, start) if start > 0 else -1
    if key < 1 or body[start:close].find(b"[") >= 0 or body.find(b"\\", key, close) >= 0:
        return None
    before = _last_visible(body, key)
    if body[key + 7 : start].strip() != b":" or before < 0 or body[before] not in b",{":
        return None
    try:
        return orjson.loads(body[start : close + 1])
    except orjson.JSONDecodeError:
        return None


def _last_visible(body: bytes, before: int) -> int:
    """The index of the last byte before ``before`` that is not JSON whitespace, or -1."""
    index = before - 1
    while index >= 0 and body[index] in _WHITESPACE:
        index -= 1
    return index


def _event_data(event: bytes) -> bytes:
    """The data of one SSE event: its ``data:`` lines joined, each less one leading space."""
    if event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2:
        return event[6:-2]  # the usual event: one data line (the general case below agrees)
    lines = [line for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(line[6:] if line.startswith(b"data: ") else line[5:] for line in lines)


def _data_json(data: bytes) -> Any:
    """The JSON document ``data`` holds, else None (``[DONE]``, empty, not JSON)."""
    if not data or data == b"[DONE]":
        return None  # only a shortcut: neither is JSON
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _event_json(event: bytes) -> Any:
    return _data_json(_event_data(event))


def is_usage_only_event(event: bytes) -> bool:
    """Whether one SSE event is the usage-only chunk (``choices == []`` with a ``usage``)."""
    parsed = _event_json(event)
    return (
        isinstance(parsed, dict)
        and parsed.get("choices") == []
        and isinstance(parsed.get("usage"), dict)
    )


class SseUsage:
    """Usage of a Meridian chat stream, read as its raw chunks pass.

    :meth:`feed` when the client sees the stream unchanged; :meth:`strip` (then :meth:`flush`)
    when the usage-only chunk must be hidden from it. Only an incomplete event is held.

    The text counts (:attr:`text_bytes`, :attr:`text_deltas`) are read only when a stream ends
    without its usage or is cut short, so an event that cannot carry a usage (see
    :meth:`_take`) is kept unread, up to :data:`_UNREAD_MAX` bytes a stream, and its text is
    counted when the counts are asked for or that bound is reached: a stream whose usage
    arrives is mostly never parsed at all. The counts are the same either way.
    """

    def __init__(self) -> None:
        self._tail = b""
        self.usage: Usage | None = None
        self._text_bytes = 0
        self._text_deltas = 0
        self._unread: list[bytes] = []  # events' data
        self._unread_chunks: list[bytes] = []  # whole chunks of complete events
        self._unread_size = 0

    @property
    def text_bytes(self) -> int:
        """UTF-8 bytes of the text streamed so far (``content`` and ``tool_calls`` bound)."""
        if self._unread or self._unread_chunks:
            self._read_unread()
        return self._text_bytes

    @property
    def text_deltas(self) -> int:
        """Deltas so far that carried any text."""
        if self._unread or self._unread_chunks:
            self._read_unread()
        return self._text_deltas

    def feed(self, chunk: bytes) -> Usage | None:
        """Read ``chunk``; the final usage once it has been seen, else None. (It reads as
        :meth:`strip` does; what that would forward is not needed.)"""
        self.strip(chunk)
        return self.usage

    def strip(self, chunk: bytes) -> bytes:
        """Read ``chunk``; the complete events in it to forward, without the usage-only one."""
        cut = self._clean_head(chunk)
        if cut:
            if cut == len(chunk):
                return chunk
            return chunk[:cut] + self._strip(chunk[cut:])
        return self._strip(chunk)

    def _strip(self, chunk: bytes) -> bytes:
        data = chunk[6:-2]
        if (
            self._tail
            or not (chunk.startswith(b"data: ") and chunk.endswith(b"\n\n"))
            or 10 in data
        ):
            return b"".join([e for e in self._events(chunk) if not self._take(_event_data(e))])
        # The usual chunk: one whole event, one "data: " line (no newline but the last two);
        # _events makes it the one event ``chunk``, _event_data its data ``chunk[6:-2]``.
        return b"" if self._take(data) else chunk

    def _clean_head(self, chunk: bytes) -> int:
        """How many bytes at the start of ``chunk`` are whole events that cannot carry a usage
        (see :meth:`_take`), now kept unread together; 0 when none, or when in doubt.

        The head ends at the last event end (``\\n\\n``) before the first ``"usage"`` not
        followed by ``:null``; it holds no backslash and no carriage return, so its events end
        where ``\\n\\n`` is found, and the one it ends with is an event end of ``chunk`` as
        :meth:`_events` finds them: nothing is held before it, and the newline before it is
        not a third one in a row. :meth:`_take`'s test holds for each event of the head: no
        ``"usage"`` in it is followed by anything but ``:null`` (neither spans a newline), and
        an event's data is some of its lines less their ``data:`` prefixes (which hold no
        quote), joined by newlines.
        """
        if self._tail:
            return 0
        if 92 in chunk or 13 in chunk:  # 92: "\\", 13: "\r"
            usage = _USAGE_SET.search(chunk)
            end = len(chunk) if usage is None else usage.start()
            cut = chunk.rfind(b"\n\n", 0, end) + 2
            if chunk.find(b"\\", 0, cut) >= 0 or chunk.find(b"\r", 0, cut) >= 0:
                return 0
        elif chunk.count(b'"usage"') == chunk.count(b'"usage":null'):
            cut = chunk.rfind(b"\n\n") + 2
        else:
            usage = _USAGE_SET.search(chunk)
            if usage is None:  # (counts differ, so one is there)
                return 0
            cut = chunk.rfind(b"\n\n", 0, usage.start()) + 2
        if cut < 3 or chunk[cut - 3] == 10:  # three newlines in a row: leave it to _events
            return 0
        self._keep(self._unread_chunks, chunk[:cut] if cut < len(chunk) else chunk)
        return cut

    def flush(self) -> bytes:
        """At the end of the stream: the incomplete event :meth:`strip` held back."""
        tail, self._tail = self._tail, b""
        return tail

    def completion_tokens_estimate(self) -> int:
        """Completion tokens of the text streamed so far (for a stream cut short)."""
        return max(self.text_deltas, -(-self.text_bytes // 4))

    def partial_usage(self, prompt_tokens: int) -> Usage:
        """The final usage if seen, else ``prompt_tokens`` and the completion estimate."""
        return self.usage or Usage(prompt_tokens, self.completion_tokens_estimate())

    def _events(self, chunk: bytes) -> list[bytes]:
        if (
            not self._tail
            and chunk.endswith(b"\n\n")
            and chunk.find(b"\n\n") == len(chunk) - 2
            and b"\r\n\r\n" not in chunk
        ):
            return [chunk]  # the usual chunk: one whole event (the general case below agrees)
        data = self._tail + chunk
        if 13 in data:  # a carriage return: an event may end with "\r\n\r\n"
            start, events = 0, []
            for end in _EVENT_END.finditer(data):
                events.append(data[start : end.end()])
                start = end.end()
            self._tail = data[start:]
        else:  # what _EVENT_END finds, found faster
            *ended, self._tail = data.split(b"\n\n")
            events = [event + b"\n\n" for event in ended]
        if len(self._tail) > _MAX_EVENT:  # not SSE as we know it: pass it on unread
            events.append(self._tail)
            self._tail = b""
        return events

    def _take(self, data: bytes) -> bool:
        """Read one event's ``data`` now, or keep it to count its text later; whether it is the
        usage-only event.

        Without a backslash (byte 92) no string in ``data`` can hold a quote or spell a key with
        escapes, so in valid JSON every quote delimits a string and each ``"usage"`` in the bytes
        is the whole string ``usage`` (a ``"`` closing another string cannot be followed by
        ``usage``); every key ``usage`` is one of them. When each is followed by ``:null``
        (the counts match), every ``usage`` in the document is null, or ``data`` is no JSON at
        all: the event is not the usage one and leaves :attr:`usage` as it is; only its text
        remains to be counted, and that can wait.
        """
        if 92 in data or data.count(b'"usage"') != data.count(b'"usage":null'):  # 92: "\\"
            return self._read_data(data)
        self._keep(self._unread, data)
        return False

    def _keep(self, unread: list[bytes], piece: bytes) -> None:
        """Keep ``piece`` unread in ``unread``; read everything kept once past the bound."""
        unread.append(piece)
        self._unread_size += len(piece) + _UNREAD_OVERHEAD
        if self._unread_size > _UNREAD_MAX:
            self._read_unread()

    def _read_unread(self) -> None:
        unread, self._unread, self._unread_size = self._unread, [], 0
        chunks, self._unread_chunks = self._unread_chunks, []
        for data in unread:
            self._read_data(data)
        for chunk in chunks:  # whole events, without a carriage return
            for event in chunk.split(b"\n\n")[:-1]:
                self._read_data(_event_data(event + b"\n\n"))

    def _read_data(self, data: bytes) -> bool:
        """Count the text of one event's ``data``, note its usage; whether it is usage-only.

        Every delta adds the UTF-8 bytes of its ``content`` and :func:`_text_bound` of its
        ``tool_calls``; one that adds any is a text delta. The ``content`` string, the common
        case, is measured inline: what :func:`_text_bound` would return for it.
        """
        parsed = _data_json(data)
        if not isinstance(parsed, dict):
            return False
        choices = parsed.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if not isinstance(delta, dict):
                    continue
                content = delta.get("content")
                if isinstance(content, str):
                    text = len(content) if content.isascii() else len(content.encode())
                else:
                    text = _text_bound(content or "")
                if delta.get("tool_calls"):
                    text += _text_bound(delta["tool_calls"])
                if text:
                    self._text_bytes += text
                    self._text_deltas += 1
        usage = parsed.get("usage")
        if usage is None:
            return False
        found = _token_usage(usage)
        if found is not None:
            self.usage = found
        return choices == [] and isinstance(usage, dict)


def usage_from_sse(chunks: Iterable[bytes]) -> Usage | None:
    """The final usage of a whole Meridian SSE stream, or None when it carried none."""
    parser = SseUsage()
    for chunk in chunks:
        parser.feed(chunk)
    return parser.usage
