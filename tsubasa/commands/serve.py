"""`tsubasa serve`: run the Ray Serve application (gateway + LLM deployment)."""

from __future__ import annotations

from tsubasa.commands.common import fail


def serve() -> None:
    """Start the OpenAI-compatible gateway and the LLM deployment on a local Ray."""
    fail("serving is not built yet (see the serving issue)", code=1)
