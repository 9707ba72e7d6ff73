"""Turning bad input into one short message for the user and one line in the log.

Every rejection the app makes goes through :func:`reject`: the user sees one sentence (cut to
:data:`MAX_MESSAGE_CHARS`, so a rejected megabyte is never echoed back), and the log gets one line
with the client's address and the cause, never a traceback (``print_exception=False``).
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

logger = logging.getLogger("diffusion_preview.rejects")

MAX_MESSAGE_CHARS = 300


def client_address(request: Any) -> str:
    """``host`` of the request's client, or ``"?"`` when unknown (a direct call in a test)."""
    client = getattr(request, "client", None)
    host = getattr(client, "host", None)
    return str(host) if host else "?"


def one_line(text: object, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def reject(message: object, request: Any = None, title: str = "Check the input", *,
           what: str = "input") -> gr.Error:
    """The ``gr.Error`` to raise for a rejected request, after logging it in one line."""
    text = one_line(message)
    logger.info("rejected %s from %s: %s", what, client_address(request), text)
    return gr.Error(text, title=title, print_exception=False)
