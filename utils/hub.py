"""Hugging Face Hub downloads that fail fast and in one line without network.

huggingface_hub retries a failed request five times over about 25 seconds before it
gives up with a message cut mid-word. Here a file or repository already in the local
cache is used as it is (no request at all), and otherwise one short connection attempt
to the hub decides: without network the caller gets a :class:`HubError` naming what was
wanted within a few seconds; with network the normal download runs (and its retries help).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants, hf_hub_download, snapshot_download

PROBE_TIMEOUT_S = 3.0


class HubError(OSError):
    """The hub cannot be reached and the file is not cached; the message says what to do."""


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """``None`` when a TCP connection to the hub endpoint opens within ``timeout``, else why not.

    Behind a proxy (the ``*_PROXY`` variables) a direct connection proves nothing, so the
    probe is skipped and huggingface_hub, which uses the proxy, decides.
    """
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # bounds the name lookup as well as the connection
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return None
    except OSError as exc:
        return f"cannot reach {constants.ENDPOINT}: {exc.strerror or type(exc).__name__}"
    finally:
        socket.setdefaulttimeout(previous)


def _require_network(what: str) -> None:
    reason = hub_reachable()
    if reason is not None:
        raise HubError(f"{what} is not in the local Hugging Face cache and {reason}")


def hub_file(repo_id: str, filename: str) -> Path:
    """The local path of ``filename`` of ``repo_id``: from the cache, else downloaded.

    Raises:
        HubError: not cached and the hub is unreachable (fast, one line).
    """
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        pass
    _require_network(f"{repo_id}/{filename}")
    return Path(hf_hub_download(repo_id, filename))


def hub_snapshot(repo_id: str, files: list[str] | None = None) -> Path:
    """A local directory holding ``repo_id`` (a model for ``from_pretrained``): cached, else downloaded.

    Args:
        repo_id: ``owner/name`` of a model repository.
        files: only these files (paths in the repository); ``None``: the whole repository.

    Raises:
        HubError: not cached and the hub is unreachable (fast, one line).
    """
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=files, local_files_only=True))
        if files is None or all((local / f).is_file() for f in files):
            return local
    except Exception:
        pass
    _require_network(repo_id)
    return Path(snapshot_download(repo_id, allow_patterns=files))
