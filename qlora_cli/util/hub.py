"""Whether the Hugging Face hub can be used right now: switched off (HF_HUB_OFFLINE), or not reachable.

Asked before a model or dataset is fetched by its hub id, so that a machine without the hub gets one
message at once instead of a library's retries (datasets retries five times, about 30 s) and a
connection traceback.
"""

from __future__ import annotations

import os


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_host() -> str:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def hub_reachable(timeout: float = 5.0) -> bool:
    import socket

    try:
        socket.create_connection((hub_host(), 443), timeout=timeout).close()
        return True
    except OSError:
        return False
