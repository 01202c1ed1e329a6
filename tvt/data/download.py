"""Verified, resumable downloads of dataset archives (paper mode).

Every archive is fetched to ``<name>.part`` (resumed with an HTTP Range request after an
interruption), its sha256 compared with the pinned value, and only then renamed into
place and extracted. A corrupted download is deleted and fetched again from scratch; it
is never extracted or used. Archives without a pinned hash are refused unless the user
explicitly trusts them, in which case the computed hash is recorded so it can be pinned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download could not be completed and verified."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_once(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Append the missing bytes of ``url`` to ``part`` (resuming if it already has some)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # range not satisfiable: we already have every byte
            return
        raise
    with response:
        if have and response.status != 206:  # server ignored the Range header: start over
            have = 0
            part.unlink(missing_ok=True)
        total = response.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        from tqdm import tqdm

        with open(part, "ab") as fh, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                           desc=PurePosixPath(url).name, disable=not progress,
                                           leave=False) as bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                fh.write(block)
                bar.update(len(block))
            fh.flush()
            os.fsync(fh.fileno())
    size = part.stat().st_size
    if total is not None and size < total:  # the server closed early: resume next attempt
        raise ConnectionError(f"connection closed after {size} of {total} bytes")


def download(url: str, dest: Path, sha256: str | None, *, retries: int = 3, timeout: float = 60.0,
             trust_new_hashes: bool = False, progress: bool = True, backoff: float = 1.0) -> str:
    """Download ``url`` to ``dest`` and verify it; return the file's sha256.

    ``dest`` only ever appears complete and verified. Network errors are retried (resuming
    the partial file); a hash mismatch discards the partial file and starts again.
    """
    dest = Path(dest)
    if sha256 is None and not trust_new_hashes:
        raise DownloadError(
            f"{url}: no sha256 pinned in the config; pin it, or pass --trust-new-hashes to "
            "accept and record the hash of what the server sends")
    if dest.exists():
        got = sha256_of(dest)
        if sha256 is None or got == sha256:
            return got
        log.warning("%s exists but its sha256 %s != %s: fetching again", dest, got, sha256)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    problems: list[str] = []
    for attempt in range(1, retries + 1):
        try:
            _fetch_once(url, part, timeout, progress)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            problems.append(f"attempt {attempt}: {exc}")
            log.warning("download of %s failed (%s); retrying", url, exc)
            time.sleep(backoff * attempt)
            continue
        got = sha256_of(part)
        if sha256 is None or got == sha256:
            os.replace(part, dest)
            return got
        problems.append(f"attempt {attempt}: sha256 {got} != expected {sha256}")
        log.warning("download of %s is corrupted (sha256 %s, expected %s); discarding it", url, got, sha256)
        part.unlink(missing_ok=True)
        time.sleep(backoff * attempt)
    raise DownloadError(f"{url}: could not download a verified copy after {retries} attempts ({'; '.join(problems)})")


def _safe_members_zip(zf: zipfile.ZipFile, dest: Path) -> list[str]:
    root = dest.resolve()
    for name in zf.namelist():
        target = (dest / name).resolve()
        if not target.is_relative_to(root):
            raise DownloadError(f"archive member {name!r} would be written outside {dest}")
    return zf.namelist()


def extract(archive: Path, dest: Path) -> None:
    """Extract a zip or tar archive into ``dest`` (refusing members that escape it)."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest, members=_safe_members_zip(zf, dest))
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")  # 'data' rejects absolute paths, '..', devices
    else:
        raise DownloadError(f"{archive}: not a zip or tar archive")


def fetch_dataset(name: str, spec: Mapping, root: Path, *, trust_new_hashes: bool = False,
                  retries: int = 3, progress: bool = True) -> Path:
    """Download, verify and extract every archive of one dataset into ``root/name``.

    Idempotent: a dataset whose ``.complete`` marker matches its archives' hashes is kept.
    """
    target = Path(root) / name
    marker = target / ".complete"
    wanted = [a.get("sha256") for a in spec["archives"]]
    if marker.exists() and None not in wanted and json.loads(marker.read_text())["sha256"] == wanted:
        return target
    downloads = Path(root) / "_downloads"
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hashes = []
    for archive in spec["archives"]:
        filename = archive.get("filename") or PurePosixPath(archive["url"]).name
        path = downloads / filename
        hashes.append(download(archive["url"], path, archive.get("sha256"), retries=retries,
                               trust_new_hashes=trust_new_hashes, progress=progress))
        if archive.get("extract", True):
            extract(path, tmp)
        else:
            tmp.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, tmp / filename)
    (tmp / ".complete").write_text(json.dumps({"sha256": hashes, "urls": [a["url"] for a in spec["archives"]]}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target
