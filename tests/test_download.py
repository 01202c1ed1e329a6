"""Verified, resumable downloads against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from typing import ClassVar

import pytest

from tvt.data.download import DownloadError, download, extract, fetch_dataset


def _archive_bytes() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, payload in {"hr/0001.txt": b"first image" * 500, "hr/0002.txt": b"second" * 700}.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


ARCHIVE = _archive_bytes()
SHA = hashlib.sha256(ARCHIVE).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ARCHIVE with Range support; `plan` scripts what the first requests get."""

    plan: ClassVar[list[str]] = []  # per request: "ok", "corrupt", "truncate"
    requests: ClassVar[list[str | None]] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        type(self).requests.append(self.headers.get("Range"))
        mode = type(self).plan.pop(0) if type(self).plan else "ok"
        body = ARCHIVE
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
        payload = body[start:]
        if mode == "corrupt":
            payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(payload)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if mode == "truncate":
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # drop the connection mid-transfer
            return
        self.wfile.write(payload)


@pytest.fixture()
def server():
    _Handler.plan = []
    _Handler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/data.tar.gz"
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_hash(server, tmp_path):
    dest = tmp_path / "data.tar.gz"
    assert download(server, dest, SHA, progress=False, backoff=0) == SHA
    assert dest.read_bytes() == ARCHIVE
    assert not dest.with_name("data.tar.gz.part").exists()


def test_corrupted_download_is_rejected_and_retried(server, tmp_path):
    _Handler.plan = ["corrupt"]
    dest = tmp_path / "data.tar.gz"
    assert download(server, dest, SHA, progress=False, backoff=0) == SHA
    assert dest.read_bytes() == ARCHIVE  # the corrupted copy was discarded, not used
    assert len(_Handler.requests) == 2
    assert _Handler.requests[1] is None  # retried from scratch, not resumed onto bad bytes


def test_persistently_corrupted_download_fails_and_leaves_nothing(server, tmp_path):
    _Handler.plan = ["corrupt"] * 3
    dest = tmp_path / "data.tar.gz"
    with pytest.raises(DownloadError, match="sha256 .* != expected"):
        download(server, dest, SHA, retries=3, progress=False, backoff=0)
    assert not dest.exists()
    assert not dest.with_name("data.tar.gz.part").exists()


def test_interrupted_download_resumes_with_range(server, tmp_path):
    _Handler.plan = ["truncate"]
    dest = tmp_path / "data.tar.gz"
    assert download(server, dest, SHA, progress=False, backoff=0) == SHA
    assert dest.read_bytes() == ARCHIVE
    assert _Handler.requests[0] is None
    assert _Handler.requests[1] is not None and _Handler.requests[1].startswith("bytes=")


def test_unpinned_hash_is_refused_unless_trusted(server, tmp_path):
    with pytest.raises(DownloadError, match="no sha256 pinned"):
        download(server, tmp_path / "x.tar.gz", None, progress=False)
    assert download(server, tmp_path / "x.tar.gz", None, trust_new_hashes=True, progress=False) == SHA


def test_fetch_dataset_extracts_and_is_idempotent(server, tmp_path):
    spec = {"role": "test", "archives": [{"url": server, "sha256": SHA}]}
    target = fetch_dataset("toy", spec, tmp_path, progress=False)
    assert (target / "hr" / "0001.txt").read_bytes() == b"first image" * 500
    n = len(_Handler.requests)
    fetch_dataset("toy", spec, tmp_path, progress=False)
    assert len(_Handler.requests) == n  # nothing fetched again


def test_extract_rejects_path_traversal(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(Exception, match="outside|path"):
        extract(evil, tmp_path / "out")
    assert not (tmp_path / "outside.txt").exists()
