"""The HTTP server: OpenAI-compatible routes over the embedded engine (see app.build_app)."""

from lorascope.server.app import build_app

__all__ = ["build_app"]
