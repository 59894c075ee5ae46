"""What sidegate knows of each vendor's API: its endpoints and the field that names the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sidegate.middlewares.contract import EndpointKind, Vendor

__all__ = ["ENDPOINTS", "MODEL_FIELD", "Endpoint"]

MERIDIAN = frozenset({Vendor.MERIDIAN})
MEIVAN = frozenset({Vendor.MEIVAN})
BOTH = MERIDIAN | MEIVAN

MODEL_FIELD = {Vendor.MERIDIAN: "model", Vendor.MEIVAN: "service_id"}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A routed endpoint: forwarded to the upstream that serves the model its body names."""

    method: str
    path: str
    kind: EndpointKind
    vendors: frozenset[Vendor]
    body: Literal["json", "multipart"]


ENDPOINTS = (
    Endpoint("POST", "/v1/chat/completions", EndpointKind.CHAT, MERIDIAN, "json"),
    Endpoint("POST", "/v1/embeddings", EndpointKind.EMBEDDINGS, BOTH, "json"),
    Endpoint("POST", "/v1/images/generations", EndpointKind.IMAGES, MERIDIAN, "json"),
    Endpoint("POST", "/v1/audio/transcriptions", EndpointKind.AUDIO, MERIDIAN, "multipart"),
    Endpoint("POST", "/v1/complete", EndpointKind.COMPLETE, MEIVAN, "json"),
)
