"""Is the Hugging Face Hub reachable? One probe that answers in seconds, and a cache-only mode for a Hub call.

Without a network, datasets and huggingface_hub retry every request (5 retries, 1-8 s apart: ~30 s per file)
before they fail. `hub_call()` asks the endpoint once with a short timeout instead; when it does not answer (or
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) the call runs under `offline_mode()`: it is served from the local
cache or fails at once, and the block gets the reason to put in its error message.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

PROBE_TIMEOUT_S = 2.5  # one HEAD request to the endpoint
PROBE_TTL_S = 60.0  # a probe's answer is reused this long: one command loads several splits
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = ("1", "ON", "YES", "TRUE")
_probes: dict[str, tuple[float, str | None]] = {}  # endpoint -> (time, reason or None)


def offline_setting() -> str | None:
    """Why offline mode is on ("HF_HUB_OFFLINE=1 is set"), or None when it is off."""
    from huggingface_hub import constants

    for var in OFFLINE_VARS:
        if os.environ.get(var, "").upper() in _TRUE:
            return f"{var}=1 is set"
    datasets = sys.modules.get("datasets")
    if constants.HF_HUB_OFFLINE or (datasets is not None and datasets.config.HF_HUB_OFFLINE):
        return "offline mode is on"
    return None


def _probe(endpoint: str, timeout: float) -> str | None:
    """None when `endpoint` answers an HTTP request (any status), else why not."""
    from huggingface_hub.utils import get_session

    answer: list[str | None] = []

    def ask() -> None:
        try:
            get_session().head(endpoint, timeout=timeout, follow_redirects=False)
            answer.append(None)
        except Exception as e:  # DNS, refused, timeout, TLS, proxy: the Hub calls would fail the same way
            answer.append(f"no network, {endpoint} unreachable: {type(e).__name__}")

    # a thread bounds the wait: name resolution ignores the request's timeout
    worker = threading.Thread(target=ask, name="hub-probe", daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return answer[0] if answer else f"no network, {endpoint} unreachable: no answer in {timeout:g} s"


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the Hub endpoint (huggingface_hub.constants.ENDPOINT, i.e. $HF_ENDPOINT) answers, else the
    reason: offline mode set (no request made) or no answer within `timeout` seconds. Cached for PROBE_TTL_S."""
    from huggingface_hub import constants

    reason = offline_setting()
    if reason is not None:
        return reason
    endpoint, now = constants.ENDPOINT, time.monotonic()
    cached = _probes.get(endpoint)
    if cached is not None and now - cached[0] < PROBE_TTL_S:
        return cached[1]
    reason = _probe(endpoint, timeout)
    _probes[endpoint] = (now, reason)
    return reason


@contextlib.contextmanager
def offline_mode() -> Iterator[None]:
    """huggingface_hub and datasets read HF_HUB_OFFLINE once, at import: switch their flags on for the block."""
    from huggingface_hub import constants

    had_datasets = "datasets" in sys.modules
    saved_hub = constants.HF_HUB_OFFLINE
    saved_datasets = sys.modules["datasets"].config.HF_HUB_OFFLINE if had_datasets else None
    constants.HF_HUB_OFFLINE = True
    if had_datasets:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_hub
        if "datasets" in sys.modules:  # imported inside the block, it took the flag on: give it its own
            env = os.environ.get("HF_DATASETS_OFFLINE")
            own = saved_hub if env is None else env.upper() in _TRUE
            sys.modules["datasets"].config.HF_HUB_OFFLINE = saved_datasets if had_datasets else own


@contextlib.contextmanager
def hub_call() -> Iterator[str | None]:
    """Run a Hub request as usual when the Hub answers the probe; else under `offline_mode()` (local cache only,
    no retries). Yields None, or why the Hub is unreachable, for the block's error message."""
    reason = hub_unreachable()
    if reason is None:
        yield None
        return
    with offline_mode():
        yield reason
