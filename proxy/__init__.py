"""The gateway: app factory, routing, forwarding, vendor dialects, CLI, mocks."""

from .app import create_app, setup
from .reload import reload_config

__all__ = ["create_app", "reload_config", "setup"]
