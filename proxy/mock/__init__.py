"""Built-in mock upstreams: Meridian (OpenAI-compatible) and Meivan, as aiohttp applications.

Deterministic, zero-latency unless told otherwise, and scriptable per request through
:class:`MockState` (``state.script(Fault(status=429, retry_after=2))``) or, from another process,
the ``/_mock/`` control endpoints. Use ``meridian_app()`` / ``meivan_app()`` with an aiohttp test
client, or :func:`start_mock` for a real socket.
"""

from __future__ import annotations

from .control import fault_from_json
from .embeddings import vector, vector_base64
from .meivan import default_services, meivan_app
from .meridian import MERIDIAN_MODELS, meridian_app
from .pipeline import MOCK_STATE
from .server import start_mock
from .state import Fault, MockState, RateWindow, Received

__all__ = [
    "MERIDIAN_MODELS",
    "MOCK_STATE",
    "Fault",
    "MockState",
    "RateWindow",
    "Received",
    "default_services",
    "fault_from_json",
    "meivan_app",
    "meridian_app",
    "start_mock",
    "vector",
    "vector_base64",
]
