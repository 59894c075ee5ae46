"""The gateway: app factory, routing, forwarding, vendor dialects, CLI, mocks."""
