"""TUF client: python-tuf's ngclient verifies the metadata; we add HTTPS with a pinned CA,
resumable target downloads and named rejection reasons.

* Metadata: ``ngclient.Updater`` with the device's pinned root (``tuf_root.json`` from
  provisioning) as bootstrap and a persistent metadata directory, so the versions it has seen
  are remembered (rollback and freeze protection across restarts). One ``Updater`` per check
  (ngclient refreshes once per instance).
* Targets: ``Updater.get_targetinfo`` gives the verified :class:`TargetFile`; the bytes are
  fetched with ``Range`` into a ``.part`` file that survives restarts, never reading more than
  the signed length (the length is checked before the hash: an endless response is cut at
  ``length + 1`` bytes), then ``TargetFile.verify_length_and_hashes`` checks them. A ``.part``
  that fails is deleted, so the next try starts clean.

Repository layout (scripts/refcloud/release.py): ``<repository>/metadata/`` and ``<repository>/targets/``,
consistent snapshots (targets are fetched as ``<sha256>.<name>``, immutable, which also makes a
resumed ``Range`` download safe while a new release is published).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from agent.update.tuf_errors import (BAD_METADATA, DOWNLOAD_FAILED, EXPIRED, HASH_MISMATCH,
                                     METADATA_MISMATCH, OVERSIZE, TARGET_MISSING, UNTRUSTED, TufError)

log = logging.getLogger(__name__)


def classify(e: BaseException) -> TufError:
    """Maps a python-tuf (or network) exception to a named reason."""
    if isinstance(e, TufError):
        return e
    if isinstance(e, tuf_exc.DownloadLengthMismatchError):
        return TufError(OVERSIZE, str(e))
    if isinstance(e, tuf_exc.LengthOrHashMismatchError):
        return TufError(HASH_MISMATCH, str(e))
    if isinstance(e, tuf_exc.ExpiredMetadataError):
        return TufError(EXPIRED, str(e))
    if isinstance(e, tuf_exc.UnsignedMetadataError):
        return TufError(UNTRUSTED, str(e))
    if isinstance(e, tuf_exc.BadVersionNumberError):
        return TufError(METADATA_MISMATCH, str(e))
    if isinstance(e, tuf_exc.RepositoryError):
        return TufError(BAD_METADATA, f"{type(e).__name__}: {e}")
    return TufError(DOWNLOAD_FAILED, f"{type(e).__name__}: {e}")


class _Fetcher(FetcherInterface):
    """HTTPS only, verified against the given CA bundle (the system's if None)."""

    def __init__(self, pool: urllib3.PoolManager, timeout_s: float, chunk: int = 64 * 1024):
        self._pool = pool
        self._timeout = timeout_s
        self._chunk = chunk

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith("https://"):
            raise tuf_exc.DownloadError(f"refusing a non-HTTPS URL {url}")
        try:
            r = self._pool.request("GET", url, preload_content=False,
                                   timeout=urllib3.Timeout(self._timeout))
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exc.DownloadError(f"{url}: {e}") from e
        if r.status != 200:
            r.release_conn()
            raise tuf_exc.DownloadHTTPError(f"HTTP {r.status} for {url}", r.status)
        return self._chunks(r)

    def _chunks(self, r: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            yield from r.stream(self._chunk)
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exc.SlowRetrievalError(str(e)) from e
        finally:
            r.release_conn()


Progress = Callable[[int, int], None]


class TufClient:
    def __init__(self, metadata_dir: Path, pinned_root: Path, *, ca_file: Path | None = None,
                 timeout_s: float = 30, rate_bps: float | None = None,
                 chunk: int = 16 * 1024):
        self.metadata_dir = Path(metadata_dir)
        self.pinned_root = Path(pinned_root)
        self.rate_bps = rate_bps
        self.chunk = chunk
        self._timeout = timeout_s
        self._pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED",
                                         ca_certs=str(ca_file) if ca_file else None,
                                         retries=urllib3.Retry(0, redirect=0))
        self.bytes_downloaded = 0   # target bytes over the wire, for status and the bench

    def _updater(self, repository: str) -> Updater:
        if not repository.startswith("https://"):
            raise TufError(BAD_METADATA, f"repository {repository!r} is not an https URL")
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        repo = repository.rstrip("/")
        try:
            bootstrap = self.pinned_root.read_bytes()
        except OSError as e:
            raise TufError(UNTRUSTED, f"no pinned TUF root: {e}") from e
        try:
            return Updater(str(self.metadata_dir), f"{repo}/metadata/", None, f"{repo}/targets/",
                           fetcher=_Fetcher(self._pool, self._timeout),
                           config=UpdaterConfig(app_user_agent="dongle-agent"),
                           bootstrap=bootstrap)
        except (tuf_exc.RepositoryError, ValueError) as e:
            raise TufError(UNTRUSTED, f"pinned TUF root is not usable: {e}") from e

    def target_info(self, repository: str, target: str) -> tuple[TargetFile, str]:
        """Refreshes the metadata and returns (verified target info, its download URL)."""
        try:
            up = self._updater(repository)
            up.refresh()
            info = up.get_targetinfo(target)
        except tuf_exc.LengthOrHashMismatchError as e:
            # a metadata file that is not the one the newer role names: mixed versions
            raise TufError(METADATA_MISMATCH, str(e)) from e
        except Exception as e:  # noqa: BLE001 - every failure gets a named reason
            raise classify(e) from e
        if info is None:
            raise TufError(TARGET_MISSING, f"{target!r} is not in the repository's targets")
        digest = info.hashes.get("sha256") or next(iter(info.hashes.values()))
        dirname, sep, base = info.path.rpartition("/")
        url = f"{repository.rstrip('/')}/targets/{dirname}{sep}{digest}.{base}"
        return info, url

    def download(self, info: TargetFile, url: str, part: Path,
                 progress: Progress | None = None) -> bytes:
        """Fetches the target into ``part`` (resuming what is there); returns the verified bytes."""
        part.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._fetch_into(info.length, url, part, progress)
            with open(part, "rb") as f:
                info.verify_length_and_hashes(f)
            return part.read_bytes()
        except Exception as e:  # noqa: BLE001
            err = classify(e)
            if not err.retryable:
                part.unlink(missing_ok=True)  # bad bytes: never resume from them
            raise err from e

    def _fetch_into(self, length: int, url: str, part: Path, progress: Progress | None) -> None:
        have = part.stat().st_size if part.exists() else 0
        if have > length:
            raise tuf_exc.DownloadLengthMismatchError(
                f"{part} holds {have} bytes, more than the signed {length}")
        if have == length:
            return
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            r = self._pool.request("GET", url, headers=headers, preload_content=False,
                                   timeout=urllib3.Timeout(self._timeout))
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exc.DownloadError(f"{url}: {e}") from e
        ok = False
        try:
            if r.status == 200:
                have = 0          # the server ignored the range: start over
            elif r.status != 206:
                raise tuf_exc.DownloadHTTPError(f"HTTP {r.status} for {url}", r.status)
            start = time.monotonic()
            got = 0
            mode = "r+b" if have else "wb"
            if not part.exists():
                part.touch()
            with open(part, mode) as f:
                f.seek(have)
                f.truncate()
                try:
                    for chunk in r.stream(self.chunk):
                        if have + len(chunk) > length:
                            raise tuf_exc.DownloadLengthMismatchError(
                                f"{url} sends more than the signed {length} bytes")
                        f.write(chunk)
                        f.flush()
                        have += len(chunk)
                        got += len(chunk)
                        self.bytes_downloaded += len(chunk)
                        if progress is not None:
                            progress(have, length)
                        self._throttle(start, got)
                except urllib3.exceptions.HTTPError as e:
                    raise tuf_exc.SlowRetrievalError(f"{url}: {e}") from e
                os.fsync(f.fileno())
            ok = True
        finally:
            if ok:
                r.release_conn()
            else:
                r.close()   # do not drain (or reuse) a connection we stopped reading

    def _throttle(self, start: float, got: int) -> None:
        if not self.rate_bps:
            return
        ahead = got / self.rate_bps - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
