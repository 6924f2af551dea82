"""Page tokens of ListAgents: opaque to clients, the id of the last agent of a page to us."""

from __future__ import annotations

import base64

from opmasd.core.errors import InvalidArgument


def encode_page_token(last_agent_id: str) -> str:
    return base64.urlsafe_b64encode(f"after:{last_agent_id}".encode()).decode()


def decode_page_token(token: str) -> str:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        text = ""
    if not text.startswith("after:"):
        raise InvalidArgument.single("page_token", "is not a token this server issued")
    return text.removeprefix("after:")
