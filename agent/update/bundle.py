"""Agent bundles: a deterministic tar of the agent's environment, zstd-compressed.

A bundle holds one slot's tree relative to the slot directory (``lib/python3.X/site-packages/...``,
``bin/dongle-agent``, ``bin/dongle-update``, ``MANIFEST.json``) without bytecode: ``.pyc`` files and
``__pycache__`` directories are left out and compiled on the device at install time. The same tree
always gives the same bytes (sorted names, mtime 0, uid/gid 0, no user names, modes normalised to
0644/0755), so a delta between two bundles only carries what changed.

The tar carries no links and no absolute paths; :func:`extract` checks that anyway (defence in
depth behind TUF) and refuses anything else.
"""
from __future__ import annotations

import io
import json
import logging
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import zstandard

log = logging.getLogger(__name__)


class FrameParams:
    """Frame parameters with ``content_size`` None when the frame does not say."""

    def __init__(self, content_size: int | None):
        self.content_size = content_size

    @classmethod
    def of(cls, data: bytes) -> FrameParams:
        size = zstandard.get_frame_parameters(data).content_size
        return cls(None if size >= zstandard.CONTENTSIZE_ERROR else size)

MANIFEST = "MANIFEST.json"
SKIP_DIRS = frozenset({"__pycache__"})
SKIP_SUFFIXES = (".pyc", ".pyo")
LEVEL = 19
MAX_TAR = 512 * 1024 * 1024  # the largest uncompressed bundle a device accepts


def decompress_bounded(dctx: zstandard.ZstdDecompressor, data: bytes, max_size: int,
                       content_size: int | None, error: type[Exception], what: str) -> bytes:
    """Streams ``data`` through ``dctx``, stopping (``error``) as soon as the output passes
    ``max_size`` (the frame's own size claim is not trusted), and checks it against
    ``content_size`` when the frame states one (a truncated frame is an ``error`` too)."""
    out = io.BytesIO()
    with dctx.stream_reader(io.BytesIO(data)) as r:
        while chunk := r.read(1 << 20):
            out.write(chunk)
            if out.tell() > max_size:
                raise error(f"{what} grows beyond {max_size} bytes")
    if content_size and out.tell() != content_size:
        raise error(f"truncated: {out.tell()} of {content_size} bytes")
    return out.getvalue()


class BundleError(Exception):
    """A bundle that cannot be built, read or extracted."""


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        base = Path(dirpath)
        if base != root:
            yield base
        for name in sorted(filenames):
            if not name.endswith(SKIP_SUFFIXES):
                yield base / name


def build_tar(tree: Path, manifest: dict | None = None) -> bytes:
    """The deterministic tar of ``tree``; ``manifest`` (if given) is written as MANIFEST.json."""
    tree = Path(tree)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        entries: list[tuple[str, Path | bytes]] = []
        for path in _walk(tree):
            rel = path.relative_to(tree).as_posix()
            if rel == MANIFEST and manifest is not None:
                continue
            entries.append((rel, path))
        if manifest is not None:
            entries.append((MANIFEST, json.dumps(manifest, sort_keys=True, indent=1).encode()))
        for rel, src in sorted(entries, key=lambda e: e[0]):
            info = tarfile.TarInfo(rel)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if isinstance(src, bytes):
                info.size, info.mode = len(src), 0o644
                tar.addfile(info, io.BytesIO(src))
                continue
            st = src.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise BundleError(f"{src}: symbolic links are not allowed in a bundle")
            if stat.S_ISDIR(st.st_mode):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                info.size = st.st_size
                info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                with open(src, "rb") as f:
                    tar.addfile(info, f)
            else:
                raise BundleError(f"{src}: not a regular file or directory")
    return buf.getvalue()


def compress(tar: bytes, level: int = LEVEL) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(tar)


def decompress(data: bytes, max_size: int = MAX_TAR) -> bytes:
    """Decompresses one bundle; refuses one that claims or grows beyond ``max_size``."""
    try:
        params = FrameParams.of(data)
        if params.content_size and params.content_size > max_size:
            raise BundleError(f"bundle claims {params.content_size} bytes, over {max_size}")
        return decompress_bounded(zstandard.ZstdDecompressor(), data, max_size, params.content_size,
                                  BundleError, "bundle")
    except zstandard.ZstdError as e:
        raise BundleError(f"not a zstd bundle: {e}") from e


def read_manifest(tar: bytes) -> dict:
    try:
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as t:
            f = t.extractfile(MANIFEST)
            if f is None:
                raise BundleError("MANIFEST.json is not a file")
            return json.loads(f.read())
    except (tarfile.TarError, KeyError, ValueError) as e:
        raise BundleError(f"bundle has no readable {MANIFEST}: {e}") from e


def read_manifest_file(slot: Path) -> dict:
    """The MANIFEST.json of an installed slot."""
    try:
        doc = json.loads((Path(slot) / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{slot}: no readable {MANIFEST}: {e}") from e
    if not isinstance(doc, dict):
        raise BundleError(f"{slot}: {MANIFEST} is not an object")
    return doc


def _same_file(old: Path, data: bytes, mode: int) -> bool:
    try:
        st = os.lstat(old)
        if not stat.S_ISREG(st.st_mode) or st.st_size != len(data) or stat.S_IMODE(st.st_mode) != mode:
            return False
        with open(old, "rb") as f:
            return f.read() == data
    except OSError:
        return False


def _link_bytecode(old_src: Path, new_src: Path) -> None:
    """The installed slot's ``__pycache__`` entries of an unchanged module, linked beside the
    new slot's link to the same source (same inode, same mtime: the bytecode is valid for it)."""
    cache = old_src.parent / "__pycache__"
    try:
        pycs = [p for p in cache.iterdir() if p.name.startswith(old_src.stem + ".")
                and p.name.endswith(".pyc") and p.name.count(".") == 2]
    except OSError:
        return
    if pycs:
        (new_src.parent / "__pycache__").mkdir(exist_ok=True)
        for pyc in pycs:
            try:
                os.link(pyc, new_src.parent / "__pycache__" / pyc.name)
            except OSError:
                pass   # compiled again instead


def extract(tar: bytes, dest: Path, reuse: Path | None = None) -> int:
    """Extracts into ``dest`` (which must exist): regular files and directories only, names
    relative and without ``..``, modes 0644/0755, owned by whoever extracts. Done member by
    member rather than with tarfile's ``data`` filter, which Debian 12's Python (3.11.2, the
    Pi's) does not have: ``extractall(filter=...)`` came with 3.11.4.

    ``reuse``: an installed slot; a file it has with the same bytes and mode is hard-linked
    instead of written (with the bytecode compiled for it), so a release that changes a few
    modules writes a few files. Slots are never modified in place, so sharing inodes is safe.
    Returns how many files were linked."""
    dest = Path(dest)
    linked = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as t:
            members = t.getmembers()
            for m in members:
                if not (m.isfile() or m.isdir()):
                    raise BundleError(f"bundle member {m.name!r} is not a file or directory")
                rel = PurePosixPath(m.name)
                if rel.is_absolute() or not rel.parts or ".." in rel.parts or "" in rel.parts:
                    raise BundleError(f"bundle member {m.name!r} is not a relative path inside it")
            for m in members:
                parts = PurePosixPath(m.name).parts
                target = dest.joinpath(*parts)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    target.chmod(0o755)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = t.extractfile(m)
                if src is None:
                    raise BundleError(f"bundle member {m.name!r} has no data")
                with src:
                    data = src.read()
                mode = 0o755 if m.mode & 0o111 else 0o644
                old = Path(reuse).joinpath(*parts) if reuse is not None else None
                if old is not None and _same_file(old, data, mode):
                    os.link(old, target)
                    linked += 1
                    if target.suffix == ".py":
                        _link_bytecode(old, target)
                    continue
                with open(target, "wb") as out:
                    out.write(data)
                target.chmod(mode)
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"extracting the bundle: {e}") from e
    return linked
