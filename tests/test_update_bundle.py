"""Bundles (deterministic tar, no bytecode, safe extraction) and deltas (python-zstandard with
the old bundle as raw-content dictionary; interoperable with `zstd --patch-from`)."""
from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from agent.update import bundle, delta, slots
from scripts.refcloud.release import PYVER
from tests.support.updates import layout_for, make_tree

pytestmark = pytest.mark.timeout(60)


def test_tar_is_deterministic_and_has_no_bytecode(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, "1.0.0")
    a = bundle.build_tar(tree, {"version": "1.0.0"})
    (tree / "lib").touch()                       # mtimes and atimes do not matter
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy)
    assert bundle.build_tar(copy, {"version": "1.0.0"}) == a
    with tarfile.open(fileobj=io.BytesIO(a)) as t:
        names = t.getnames()
        assert names == sorted(names)
        assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]
        assert {m.mtime for m in t.getmembers()} == {0} and {m.uid for m in t.getmembers()} == {0}
        assert t.getmember("bin/dongle-agent").mode == 0o755
    assert bundle.read_manifest(a) == {"version": "1.0.0"}


def test_bundle_with_a_link_is_refused(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, "1.0.0")
    (tree / "evil").symlink_to("/etc/passwd")
    with pytest.raises(bundle.BundleError):
        bundle.build_tar(tree)
    # and a hand-made tar with a link is refused on extraction
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("lib/escape")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc"
        t.addfile(info)
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(bundle.BundleError):
        bundle.extract(buf.getvalue(), dest)
    assert not (dest / "lib" / "escape").exists()


@pytest.mark.parametrize("name", ["../escape", "/etc/escape", "lib/../../escape", "lib//x/../../.."])
def test_a_member_outside_the_slot_is_refused_before_anything_is_written(tmp_path: Path, name) -> None:
    """Extraction does its own checks (Debian 12's Python 3.11.2 has no tarfile filters)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for member in ("lib/ok.py", name):
            info = tarfile.TarInfo(member)
            info.size = 3
            t.addfile(info, io.BytesIO(b"x=1"))
    dest = tmp_path / "slot" / "out"
    dest.mkdir(parents=True)
    with pytest.raises(bundle.BundleError, match="relative path"):
        bundle.extract(buf.getvalue(), dest)
    assert not list(tmp_path.rglob("escape")) and not (dest / "lib").exists()


def test_extracted_modes_are_0644_and_0755_whatever_the_tar_says(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for member, mode in (("bin/run", 0o4777), ("lib/x.py", 0o666)):
            info = tarfile.TarInfo(member)
            info.size, info.mode = 1, mode
            t.addfile(info, io.BytesIO(b"x"))
    bundle.extract(buf.getvalue(), tmp_path)
    assert (tmp_path / "bin/run").stat().st_mode & 0o7777 == 0o755
    assert (tmp_path / "lib/x.py").stat().st_mode & 0o7777 == 0o644


def test_decompress_refuses_a_bomb() -> None:
    data = bundle.compress(b"\0" * 5_000_000, level=3)
    with pytest.raises(bundle.BundleError):
        bundle.decompress(data, max_size=1_000_000)


def _versions(tmp: Path) -> tuple[bytes, bytes]:
    old = bundle.build_tar(make_tree(tmp, "1.0.0", filler=400_000), {"version": "1.0.0"})
    new = bundle.build_tar(make_tree(tmp, "1.0.1", filler=400_000,
                                     extra={"stubagent/feature.py": "X = 1\n" * 50}),
                           {"version": "1.0.1"})
    return old, new


def test_delta_round_trip_is_small(tmp_path: Path) -> None:
    old, new = _versions(tmp_path)
    patch = delta.make_delta(old, new)
    assert delta.apply_delta(old, patch, len(new)) == new
    assert len(patch) < 2000 < len(bundle.compress(new))
    with pytest.raises(delta.DeltaError):
        delta.apply_delta(old, patch, len(new) - 1)     # output over the cap
    with pytest.raises(delta.DeltaError):
        delta.apply_delta(old, patch[:-10], len(new))   # truncated


def test_window_log_is_at_least_25() -> None:
    assert delta.window_log_for(1000, 1000) == 25
    assert delta.window_log_for(100 << 20, 90 << 20) == 28
    with pytest.raises(delta.DeltaError):
        delta.window_log_for(2 << 30, 1)


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI not installed")
def test_patches_interoperate_with_the_zstd_cli(tmp_path: Path) -> None:
    old, new = _versions(tmp_path)
    (tmp_path / "old.tar").write_bytes(old)
    (tmp_path / "new.tar").write_bytes(new)
    subprocess.run(["zstd", "-q", "-19", "--patch-from=old.tar", "new.tar", "-o", "cli.zst"],
                   cwd=tmp_path, check=True)
    assert delta.apply_delta(old, (tmp_path / "cli.zst").read_bytes(), len(new)) == new
    (tmp_path / "ours.zst").write_bytes(delta.make_delta(old, new))
    subprocess.run(["zstd", "-q", "-d", "--patch-from=old.tar", "ours.zst", "-o", "out.tar"],
                   cwd=tmp_path, check=True)
    assert (tmp_path / "out.tar").read_bytes() == new


def test_install_makes_a_venv_slot_and_flips_atomically(tmp_path: Path) -> None:
    layout = layout_for(tmp_path)
    for v in ("1.0.0", "1.0.1"):
        tar = bundle.build_tar(make_tree(tmp_path / "t", v, modules=3), {"version": v})
        slots.install(layout, v, tar)
        slots.activate(layout, v)
    slot = layout.slot("1.0.1")
    assert (slot / "pyvenv.cfg").read_text().startswith("home = ")
    assert (slot / "bin" / "python3").is_symlink()
    assert list((slot / "lib" / PYVER / "site-packages" / "stubdep" / "__pycache__").glob("m*.pyc"))
    assert layout.current.readlink() == Path("slots/1.0.1")
    assert layout.previous.readlink() == Path("slots/1.0.0")
    assert (layout.root / "venv").readlink() == Path("current")
    # a leftover .partial from a cut is redone, a complete slot is kept as is
    (layout.slots / "1.0.2.partial").mkdir()
    (layout.slots / "1.0.2.partial" / "junk").write_text("x")
    tar = bundle.build_tar(make_tree(tmp_path / "t", "1.0.2"), {"version": "1.0.2"})
    slots.install(layout, "1.0.2", tar, compile_bytecode=False)
    assert not (layout.slot("1.0.2") / "junk").exists()
    assert slots.installed_tar(layout, "1.0.2") == tar
    assert slots.gc(layout) == ["1.0.2"] and layout.installed() == ["1.0.0", "1.0.1"]
    assert slots.roll_back(layout) == ("1.0.1", "1.0.0")
    assert layout.current_version() == "1.0.0" and layout.previous_version() is None
    with pytest.raises(slots.SlotError):
        slots.check_version("../etc")


def test_a_new_slot_shares_the_unchanged_files_and_their_bytecode_with_the_current_one(tmp_path: Path) -> None:
    """A release that changes one module writes one module: the rest (here 150 KB of
    'dependencies' and 20 modules) is hard-linked from the current slot, bytecode included,
    and stays valid when the old slot is removed."""
    layout = layout_for(tmp_path)
    site = Path("lib") / PYVER / "site-packages"
    for v in ("1.0.0", "1.0.1"):
        tar = bundle.build_tar(make_tree(tmp_path / "t", v, filler=150_000, modules=20),
                               {"version": v})
        slots.install(layout, v, tar)
        slots.activate(layout, v)
    old, new = layout.slot("1.0.0") / site, layout.slot("1.0.1") / site
    assert (new / "stubdep/blob.bin").stat().st_ino == (old / "stubdep/blob.bin").stat().st_ino
    assert (new / "stubdep/m007.py").stat().st_ino == (old / "stubdep/m007.py").stat().st_ino
    [old_pyc] = (old / "stubdep/__pycache__").glob("m007.*.pyc")
    assert (new / "stubdep/__pycache__" / old_pyc.name).stat().st_ino == old_pyc.stat().st_ino
    # the module that changed is a file of its own, compiled for this slot
    assert (new / "stubagent/__init__.py").stat().st_ino != (old / "stubagent/__init__.py").stat().st_ino
    assert "1.0.1" in (new / "stubagent/__init__.py").read_text()
    assert list((new / "stubagent/__pycache__").glob("__init__.*.pyc"))
    # (compile_dir skipped it: it judged the linked bytecode valid for the linked source)
    slots.remove_link(layout.previous)
    assert slots.gc(layout) == ["1.0.0"]    # the shared files live on in 1.0.1
    r = subprocess.run([str(layout.slot("1.0.1") / "bin/python3"), "-c",
                        "import importlib.util, stubdep.m007, stubagent; print(stubagent.VERSION)"],
                       capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(layout.slot("1.0.1") / site), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip() == "1.0.1", r.stderr
