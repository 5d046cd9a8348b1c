"""Hugging Face Hub downloads that fail fast and in one line without network: the cache is used without a
request, else one short connection attempt decides (huggingface_hub alone retries for ~25 s)."""

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants, hf_hub_download, snapshot_download

PROBE_TIMEOUT_S = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class HubError(OSError):
    """The hub cannot be reached and the file is not cached; the message says what to do."""


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """``None`` when the hub endpoint accepts a TCP connection within ``timeout`` (or behind a proxy), else why not."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None
    url = urlparse(constants.ENDPOINT)
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # bounds the name lookup as well as the connection
    try:
        with socket.create_connection(address, timeout):
            return None
    except OSError as exc:
        return f"cannot reach {constants.ENDPOINT}: {exc.strerror or type(exc).__name__}"
    finally:
        socket.setdefaulttimeout(previous)


def _cached_or_fetched(what: str, fetch, files: list[str] | None = None) -> Path:
    """``fetch(local_files_only=True)`` when it has every one of ``files``, else ``fetch()`` if the hub answers."""
    try:
        local = Path(fetch(local_files_only=True))
        if files is None or all((local / f).is_file() for f in files):
            return local
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        pass
    reason = hub_reachable()
    if reason is not None:
        raise HubError(f"{what} is not in the local Hugging Face cache and {reason}")
    return Path(fetch())


def hub_file(repo_id: str, filename: str) -> Path:
    """The local path of ``filename`` of ``repo_id``, cached or downloaded (else HubError, fast)."""
    return _cached_or_fetched(f"{repo_id}/{filename}", lambda **kw: hf_hub_download(repo_id, filename, **kw))


def hub_snapshot(repo_id: str, files: list[str] | None = None) -> Path:
    """A local directory holding ``repo_id`` (``files`` only, if given), cached or downloaded (else HubError)."""
    return _cached_or_fetched(repo_id, lambda **kw: snapshot_download(repo_id, allow_patterns=files, **kw), files)
