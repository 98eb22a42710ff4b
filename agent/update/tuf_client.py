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
  that fails is deleted, so the next try starts clean. :class:`NetworkSource` names the
  ``.part`` after the target's signed hash (``Layout.part_file``), so a target re-published
  under the same path between two attempts starts afresh instead of resuming onto the old bytes.
* Time: every read waits at most ``timeout_s``, and a whole attempt at most
  :func:`deadline_s` (a floor plus twice the time the signed length takes at the rate cap):
  a slow-drip server cannot hold an update. An attempt cut at the deadline keeps its bytes and
  the next one resumes (``download_failed``, retried).

Repository layout (scripts/refcloud/release.py): ``<repository>/metadata/`` and
``<repository>/targets/``. Target URLs follow the trusted root's ``consistent_snapshot``, as
ngclient's own ``Updater.download_target`` does: ``<dir>/<sha256>.<name>`` when it is true,
``<dir>/<name>`` when false.

Two sources of verified targets, one interface (``target_info(path)``, ``fetch(info)``) for
:func:`agent.update.updater.fetch_agent`:

* :class:`NetworkSource` (the agent): the repository over HTTPS; verified bytes are kept in the
  staging area as ``<algo>-<hash>``.
* :class:`StagedSource` (the installer, as root, without network): ngclient again, bootstrapped
  from the pinned root and the installer's own trusted metadata, reading the metadata the agent
  staged (:class:`_StagedFetcher`) and the staged bytes (agent.update.request.read_staged).
"""
from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from agent.update import request
from agent.update.slots import Layout, fsync_dir
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
#: A download in progress is fsynced every this many bytes: after a power cut it resumes from
#: there (the page cache is lost), not from the start.
SYNC_EVERY = 1 << 20
DEADLINE_MARGIN = 2.0
REFERENCE_BPS = 256 * 1024


def deadline_s(length: int, rate_bps: float | None, *, floor_s: float = DEADLINE_FLOOR_S,
               margin: float = DEADLINE_MARGIN) -> float:
    """How long one attempt at downloading ``length`` signed bytes may take."""
    return floor_s + margin * length / (rate_bps or REFERENCE_BPS)


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


def refreshed_target_info(make_updater: Callable[[], Updater], target: str) -> TargetFile:
    """A fresh ngclient ``Updater`` refreshed and asked for ``target``; every failure named."""
    try:
        up = make_updater()
        up.refresh()
        info = up.get_targetinfo(target)
    except tuf_exc.LengthOrHashMismatchError as e:
        # a metadata file that is not the one the newer role names: mixed versions
        raise TufError(METADATA_MISMATCH, str(e)) from e
    except Exception as e:  # noqa: BLE001 - every failure gets a named reason
        raise classify(e) from e
    if info is None:
        raise TufError(TARGET_MISSING, f"{target!r} is not in the repository's targets")
    return info


def trusted_root(metadata_dir: Path) -> Root:
    """The root ngclient trusts now (it keeps it as ``root.json`` in its metadata dir)."""
    try:
        return Metadata[Root].from_bytes((Path(metadata_dir) / "root.json").read_bytes()).signed
    except (OSError, ValueError) as e:
        raise TufError(BAD_METADATA, f"no trusted root in {metadata_dir}: {e}") from e


def _bootstrap(pinned_root: Path) -> bytes:
    try:
        return Path(pinned_root).read_bytes()
    except OSError as e:
        raise TufError(UNTRUSTED, f"no pinned TUF root: {e}") from e


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
        bootstrap = _bootstrap(self.pinned_root)
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
        info = refreshed_target_info(lambda: self._updater(repository), target)
        return info, target_url(repository, info, trusted_root(self.metadata_dir))

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
                    synced = have
                    for chunk in _reads(r, self.chunk, deadline, url):
                        if have + len(chunk) > length:
                            raise tuf_exc.DownloadLengthMismatchError(
                                f"{url} sends more than the signed {length} bytes")
                        f.write(chunk)
                        f.flush()
                        have += len(chunk)
                        if have - synced >= SYNC_EVERY:   # what a power cut cannot take back
                            os.fsync(f.fileno())
                            synced = have
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


# --- the two sources of verified targets -----------------------------------------------------------

class NetworkSource:
    """The agent's: targets from the repository over HTTPS, verified, kept in the staging area
    (``Layout.staged_file``) for the installer. A target already staged (a restart while a
    release waited for its conditions) is verified again, not fetched again."""

    def __init__(self, tuf: TufClient, repository: str, layout: Layout):
        self.tuf, self.repository, self.layout = tuf, repository, layout
        self._urls: dict[str, str] = {}

    def target_info(self, target: str) -> TargetFile:
        info, url = self.tuf.target_info(self.repository, target)
        self._urls[info.path] = url
        return info

    def fetch(self, info: TargetFile, progress: Progress | None = None) -> bytes:
        staged = self.layout.staged_file(info.hashes)
        try:
            data = staged.read_bytes()
            info.verify_length_and_hashes(data)
            return data
        except FileNotFoundError:
            pass
        except tuf_exc.LengthOrHashMismatchError:
            staged.unlink()
        self.layout.staging.mkdir(parents=True, exist_ok=True)
        part = self.layout.part_file(info.hashes)
        data = self.tuf.download(info, self._urls[info.path], part, progress)
        os.replace(part, staged)
        fsync_dir(staged.parent)
        return data


class _StagedFetcher(FetcherInterface):
    """ngclient's fetcher for the installer: the metadata files the agent staged, by the names a
    repository serves them under (``N.root.json``; ``timestamp.json``; ``snapshot.json`` and
    ``targets.json``, also when asked for as ``N.snapshot.json``...). A missing file is a 404."""

    _VERSIONED = re.compile(r"^(\d+)\.(.+\.json)$")

    def __init__(self, layout: Layout):
        self.layout = layout

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = url.rsplit("/", 1)[-1]
        m = self._VERSIONED.match(name)
        if m and m.group(2) != "root.json":
            name = m.group(2)
        try:
            data = request.read_staged(self.layout, f"staging/metadata/{name}",
                                       request.MAX_METADATA)
        except FileNotFoundError:
            raise tuf_exc.DownloadHTTPError(f"{name} is not staged", 404) from None
        except (OSError, request.RequestError) as e:
            raise tuf_exc.DownloadError(f"staged {name}: {e}") from e
        return iter([data])


class StagedSource:
    """The installer's: the targets the agent staged, believed only through TUF metadata that
    verifies from the pinned root against the installer's own trusted copies
    (``Layout.installer_metadata``: its rollback and freeze memory, root's)."""

    def __init__(self, layout: Layout, pinned_root: Path):
        self.layout = layout
        self.pinned_root = Path(pinned_root)

    def _updater(self) -> Updater:
        meta = self.layout.installer_metadata
        meta.mkdir(parents=True, exist_ok=True)
        bootstrap = _bootstrap(self.pinned_root)
        try:
            return Updater(str(meta), "https://staged.invalid/metadata/", None, None,
                           fetcher=_StagedFetcher(self.layout),
                           config=UpdaterConfig(app_user_agent="dongle-update"),
                           bootstrap=bootstrap)
        except (tuf_exc.RepositoryError, ValueError) as e:
            raise TufError(UNTRUSTED, f"pinned TUF root is not usable: {e}") from e

    def target_info(self, target: str) -> TargetFile:
        return refreshed_target_info(self._updater, target)

    def fetch(self, info: TargetFile, progress: Progress | None = None) -> bytes:
        rel = "staging/" + self.layout.staged_name(info.hashes)
        try:
            data = request.read_staged(self.layout, rel, info.length)
        except FileNotFoundError:
            raise TufError(DOWNLOAD_FAILED, f"{info.path} is not staged ({rel})") from None
        except request.RequestError as e:
            raise TufError(HASH_MISMATCH, f"staged {info.path}: {e}") from e
        try:
            info.verify_length_and_hashes(data)
        except tuf_exc.LengthOrHashMismatchError as e:
            raise TufError(HASH_MISMATCH, f"staged {info.path}: {e}") from e
        return data
