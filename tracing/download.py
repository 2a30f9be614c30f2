"""Download one file, once, atomically, with a progress bar; fail within seconds when the host is unreachable.

Plain URLs are streamed with httpx (what huggingface_hub itself depends on) into a tqdm bar; Hugging Face
Hub files go through ``huggingface_hub.hf_hub_download`` (tokens, mirrors, its own bar). Either way the
file is written inside a temporary folder next to the target and renamed over it when complete
(:func:`tracing.io.atomic_path`), so an interrupted download never leaves a file a later load would trust.

Before any request the host is resolved and connected to with a short timeout (:func:`unreachable_reason`):
without network a download fails at once with the cause, instead of after a client's retries.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from tracing.io import atomic_path

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
HUB_ENDPOINT = "https://huggingface.co"


class DownloadError(RuntimeError):
    """A file could not be downloaded (the message says why)."""


def unreachable_reason(url: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why ``url``'s host cannot be reached now (name lookup or TCP connection, each within ``timeout``
    seconds), or None when a connection succeeds."""
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return f"{url!r} is not a URL with a host"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses: list = []
    failure: list[BaseException] = []

    def resolve() -> None:  # getaddrinfo has no timeout of its own: run it where we can stop waiting
        try:
            addresses.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as error:
            failure.append(error)

    lookup = threading.Thread(target=resolve, daemon=True)
    lookup.start()
    lookup.join(timeout)
    if lookup.is_alive():
        return f"the name {host} did not resolve within {timeout:g} s"
    if failure:
        return f"the name {host} does not resolve ({failure[0]})"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"no connection to {host}:{port} ({type(error).__name__}: {error})"
    return None


def download_url(url: str, target: str | os.PathLike, description: str) -> Path:
    """Stream ``url`` into ``target`` (atomically) with a progress bar labelled ``description``."""
    import httpx
    from tqdm.auto import tqdm

    target = Path(target)
    reason = unreachable_reason(url)
    if reason is not None:
        raise DownloadError(reason)
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    try:
        with atomic_path(target) as tmp, httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            response.raise_for_status()
            expected = int(response.headers.get("content-length") or 0) or None
            written = 0
            with open(tmp, "wb") as file, tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                                               desc=description) as bar:
                for chunk in response.iter_bytes(1 << 20):
                    file.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            if expected is not None and written != expected and not response.headers.get("content-encoding"):
                raise DownloadError(f"the download stopped after {written} of {expected} bytes")
    except httpx.HTTPStatusError as error:
        raise DownloadError(f"the server answered {error.response.status_code} "
                            f"{error.response.reason_phrase}") from error
    except httpx.HTTPError as error:
        raise DownloadError(f"{type(error).__name__}: {error}") from error
    return target


def download_hub_file(repo_id: str, filename: str, target: str | os.PathLike, *, repo_type: str = "dataset",
                      endpoint: str | None = None) -> Path:
    """``filename`` of the Hub repository ``repo_id`` into ``target`` (atomically), through huggingface_hub."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    target = Path(target)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        raise DownloadError("HF_HUB_OFFLINE is set")
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT
    reason = unreachable_reason(endpoint)
    if reason is not None:
        raise DownloadError(reason)
    try:
        with atomic_path(target) as tmp:
            fetched = hf_hub_download(repo_id, filename, repo_type=repo_type, local_dir=tmp.parent / "hub",
                                      endpoint=endpoint)
            os.replace(fetched, tmp)
    except (OSError, EntryNotFoundError, ValueError) as error:  # the Hub's HTTP errors are OSErrors
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise DownloadError(f"the Hub refused it ({lines[0] if lines else type(error).__name__})") from error
    return target
