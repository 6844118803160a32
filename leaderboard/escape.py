"""Escaping of untrusted entry text for the renderers (issue 16): links only ``http(s)``,
Markdown output with HTML escaped. Imports nothing of the project."""

from __future__ import annotations

import html
import re
from typing import Any


def safe_url(url: Any) -> str:
    """An entry's link, or ``""``: only ``http(s)://host...`` without spaces, quotes or angle
    brackets is rendered (a ``javascript:`` or ``data:`` link is untrusted input, not a link)."""
    text = str(url or "").strip()
    if not re.fullmatch(r"https?://[^\s\"'<>`]+", text, flags=re.IGNORECASE):
        return ""
    return text


def md_escape(text: Any) -> str:
    """Text from an entry, safe in Markdown rendered to HTML: HTML escaped (``<script>``,
    ``<img onerror>`` become text), a Markdown link
    ``[x](...)`` broken (``]\\(``) and a table's ``|`` escaped."""
    out = html.escape(str(text), quote=False)
    return out.replace("|", "\\|").replace("](", "]\\(")
