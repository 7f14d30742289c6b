"""fetch_ham10000 fails at once, with a clear message, when there is no network."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from skincache.data import FetchError, fetch_ham10000


def test_fetch_fails_fast_without_network(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    with pytest.raises(FetchError) as e:
        fetch_ham10000(tmp_path / "ham")
    assert time.monotonic() - start < 5
    msg = str(e.value)
    assert "No network" in msg and "127.0.0.1:9" in msg
    assert "hf download marmal88/skin_cancer --repo-type dataset" in msg and "Dataverse" in msg
    assert not (tmp_path / "ham").exists()


def test_fetch_honours_hf_hub_offline(tmp_path: Path, monkeypatch) -> None:
    called: list[object] = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: called.append(a))
    with pytest.raises(FetchError, match="HF_HUB_OFFLINE"):
        fetch_ham10000(tmp_path, repo_id="someone/else")
    assert called == []  # refused before touching the network
