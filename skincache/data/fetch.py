"""Download HAM10000 (as the `marmal88/skin_cancer` parquet dataset) from the Hugging Face Hub.

Offline, `huggingface_hub` retries and waits before it gives up, with an error about HTTP rather
than about the network. So the endpoint is probed first with one short socket connect, and
`FetchError` says plainly that there is no network and how to get the data by hand.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from skincache.errors import SkincacheError

DEFAULT_REPO = "marmal88/skin_cancer"
PROBE_TIMEOUT_S = 3.0

MANUAL = (
    "To get the data by hand: on a machine with network run\n"
    "  hf download {repo} --repo-type dataset --local-dir DIR\n"
    "(`huggingface-cli download ...` with huggingface_hub < 1.0), copy DIR here and use\n"
    "--data DIR; or download HAM10000 from the Harvard Dataverse (doi:10.7910/DVN/DBW86T:\n"
    "HAM10000_metadata.csv and the image zip files), unzip it into one folder and use\n"
    "--data FOLDER."
)


class FetchError(SkincacheError, RuntimeError):
    """The dataset could not be downloaded; the message says why and what to do instead."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT  # HF_ENDPOINT, when set, is already in here


def _probe_target(endpoint: str) -> tuple[str, int]:
    """(host, port) a download would connect to first: the proxy if one is set."""
    url = urlparse(endpoint)
    proxy = os.environ.get(f"{url.scheme}_proxy") or os.environ.get(f"{url.scheme.upper()}_PROXY")
    if proxy:
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.hostname or "", port


def check_online(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise FetchError at once when the Hub is unreachable or offline mode is on."""
    from huggingface_hub import constants

    endpoint = endpoint or _endpoint()
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or constants.HF_HUB_OFFLINE:
        raise FetchError(f"HF_HUB_OFFLINE is set: not downloading from {endpoint}.")
    host, port = _probe_target(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise FetchError(
            f"No network: cannot reach {endpoint} ({host}:{port}: {e})."
        ) from e


def fetch_ham10000(to: Path, *, repo_id: str = DEFAULT_REPO) -> Path:
    """Download the parquet dataset `repo_id` into the folder `to` and return it.

    The result loads with `load_dataset(to)` (kind "parquet"). Run `skincache audit` on it
    before trusting scores: that split repeats images across splits.
    """
    to = Path(to)
    try:
        check_online()
    except FetchError as e:
        raise FetchError(f"{e}\n{MANUAL.format(repo=repo_id)}") from e
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id=repo_id, repo_type="dataset", local_dir=to,
                          endpoint=_endpoint())
    except Exception as e:  # any hub/HTTP failure becomes one clear error
        raise FetchError(
            f"Downloading {repo_id} into {to} failed: {type(e).__name__}: {e}\n"
            f"{MANUAL.format(repo=repo_id)}"
        ) from e
    return to
