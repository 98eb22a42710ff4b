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
  that fails is deleted, so the next try starts clean. The caller names the ``.part`` after
  the target's signed hash (:func:`part_name`), so a target re-published under the same path
  between two attempts starts afresh instead of resuming onto the old bytes.
* Time: every read waits at most ``timeout_s``, and a whole attempt at most
  :func:`deadline_s` (a floor plus twice the time the signed length takes at the rate cap):
  a slow-drip server cannot hold an update. An attempt cut at the deadline keeps its bytes and
  the next one resumes (``download_failed``, retried).

Repository layout (scripts/refcloud/release.py): ``<repository>/metadata/`` and
``<repository>/targets/``. Target URLs follow the trusted root's ``consistent_snapshot``, as
ngclient's own ``Updater.download_target`` does: ``<dir>/<sha256>.<name>`` when it is true,
``<dir>/<name>`` when false.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile
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


#: A download attempt may take ``DEADLINE_FLOOR_S + DEADLINE_MARGIN * length / rate`` seconds,
#: ``rate`` being the rate cap or, without one, ``REFERENCE_BPS``.
DEADLINE_FLOOR_S = 60.0
DEADLINE_MARGIN = 2.0
REFERENCE_BPS = 256 * 1024


def deadline_s(length: int, rate_bps: float | None, *, floor_s: float = DEADLINE_FLOOR_S,
               margin: float = DEADLINE_MARGIN) -> float:
    """How long one attempt at downloading ``length`` signed bytes may take."""
    return floor_s + margin * length / (rate_bps or REFERENCE_BPS)


def part_name(info: TargetFile) -> str:
    """The resumable download's file name: the target's signed hash (never its path)."""
    algo, digest = ("sha256", info.hashes["sha256"]) if "sha256" in info.hashes \
        else next(iter(sorted(info.hashes.items())))
    return f"{algo}-{digest}.part"


def _reads(r: urllib3.BaseHTTPResponse, chunk: int, deadline: float, url: str) -> Iterator[bytes]:
    """The body in pieces as they arrive (``read1``: a slow sender cannot make one read wait
    for a whole chunk), raising ``SlowRetrievalError`` once ``deadline`` (monotonic) passed."""
    while True:
        if time.monotonic() > deadline:
            raise tuf_exc.SlowRetrievalError(f"{url}: deadline passed (slow server)")
        data = r.read1(chunk)
        if not data:
            return
        yield data


class _Fetcher(FetcherInterface):
    """HTTPS only, verified against the given CA bundle (the system's if None). Metadata files
    are small: each fetch gets ``DEADLINE_FLOOR_S``."""

    def __init__(self, pool: urllib3.PoolManager, timeout_s: float, chunk: int = 64 * 1024,
                 deadline_floor_s: float = DEADLINE_FLOOR_S):
        self._pool = pool
        self._timeout = timeout_s
        self._chunk = chunk
        self._deadline_s = deadline_floor_s

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
        return self._chunks(r, url, time.monotonic() + self._deadline_s)

    def _chunks(self, r: urllib3.BaseHTTPResponse, url: str, deadline: float) -> Iterator[bytes]:
        try:
            yield from _reads(r, self._chunk, deadline, url)
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exc.SlowRetrievalError(str(e)) from e
        finally:
            r.release_conn()


Progress = Callable[[int, int], None]


def target_url(repository: str, info: TargetFile, root: Root) -> str:
    """Where the target's bytes are: the root's ``consistent_snapshot`` decides whether the
    file name carries the hash (TUF specification §5.7.3, ngclient's ``download_target``)."""
    path = info.path
    if root.consistent_snapshot:
        digest = info.hashes.get("sha256") or next(iter(info.hashes.values()))
        dirname, sep, base = path.rpartition("/")
        path = f"{dirname}{sep}{digest}.{base}"
    return f"{repository.rstrip('/')}/targets/{path}"


class TufClient:
    def __init__(self, metadata_dir: Path, pinned_root: Path, *, ca_file: Path | None = None,
                 timeout_s: float = 30, rate_bps: float | None = None,
                 chunk: int = 16 * 1024, deadline_floor_s: float = DEADLINE_FLOOR_S):
        self.metadata_dir = Path(metadata_dir)
        self.pinned_root = Path(pinned_root)
        self.rate_bps = rate_bps
        self.chunk = chunk
        self._timeout = timeout_s
        self.deadline_floor_s = deadline_floor_s
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
                           fetcher=_Fetcher(self._pool, self._timeout,
                                            deadline_floor_s=self.deadline_floor_s),
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
        return info, target_url(repository, info, self.trusted_root())

    def trusted_root(self) -> Root:
        """The root ngclient trusts now (it keeps it as ``root.json`` in the metadata dir)."""
        try:
            return Metadata[Root].from_bytes((self.metadata_dir / "root.json").read_bytes()).signed
        except (OSError, ValueError) as e:
            raise TufError(BAD_METADATA, f"no trusted root in {self.metadata_dir}: {e}") from e

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
            deadline = start + deadline_s(length - have, self.rate_bps,
                                          floor_s=self.deadline_floor_s)
            got = 0
            mode = "r+b" if have else "wb"
            if not part.exists():
                part.touch()
            with open(part, mode) as f:
                f.seek(have)
                f.truncate()
                try:
                    for chunk in _reads(r, self.chunk, deadline, url):
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
