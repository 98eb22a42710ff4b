"""Update cost: wire bytes and apply time for a code-only release, a dependency bump and a full
bundle, through the real pipeline (scripts/refcloud/release.py repository, HTTPS scripts/testbed/tuf_server.py,
python-tuf verification, zstd delta, two-slot install with bytecode compilation and fsync).

The environment is the real agent: its packages (agent, drivers, firmware_bridge, config) plus
the locked dependencies of requirements.lock for this machine's architecture
(scripts.refcloud.release.stage_deps: downloads the locked wheels, needs the package index).

Scenarios, each from the installed base version:

1. ``code-only``: a few agent modules change (target: <= 50 KB on the wire);
2. ``dep-bump``: one dependency with a C extension is swapped for another release (cbor2 from a
   wheel: ``--dep-wheel FILE``, else ``pip download cbor2==5.6.5`` is tried);
3. ``full``: the full bundle (a device without the base, or the delta fallback).

Wire bytes count every byte the server sent: TUF metadata plus the target. Apply time is the
device side: refresh + download + verify + patch + install (extract, compile, fsync) + flip.

    .venv/bin/python bench/bench_update.py [--markdown] [--dep-wheel FILE]
"""
from __future__ import annotations

import argparse
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.update import updater  # noqa: E402
from agent.update.slots import Layout  # noqa: E402
from agent.update.tuf_client import NetworkSource, TufClient  # noqa: E402
from scripts.testbed.devca import DevCA  # noqa: E402
from scripts.refcloud.release import PYVER, ReleaseRepo, release_body, stage_agent, stage_deps  # noqa: E402
from scripts.testbed.tuf_server import TufServer  # noqa: E402

TARGET_CODE_ONLY = 50 * 1024


def _code_change(tree: Path) -> None:
    site = tree / "lib" / PYVER / "site-packages"
    for rel in ("agent/update/updater.py", "agent/compose.py", "drivers/obd/reader.py"):
        p = site / rel
        text = p.read_text()
        p.write_text(text.replace("log = logging.getLogger(__name__)",
                                  "log = logging.getLogger(__name__)\n_RELEASE_NOTE = 'bugfix'", 1)
                     + "\n\ndef _added_in_this_release() -> int:\n    return 42\n")
    (site / "agent" / "__init__.py").write_text((site / "agent" / "__init__.py").read_text()
                                               + "\n# 1.0.1\n")


def _get_wheel(given: Path | None, tmp: Path) -> Path | None:
    if given:
        return given
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "cbor2==5.6.5", "--no-deps",
                        "--only-binary=:all:", "-d", str(tmp / "wheels"), "-q"],
                       check=True, timeout=120)
    except (subprocess.SubprocessError, OSError) as e:
        print(f"dep-bump skipped: no wheel ({e})", file=sys.stderr)
        return None
    return next((tmp / "wheels").glob("cbor2-*.whl"), None)


def _dep_bump(tree: Path, wheel: Path) -> str:
    site = tree / "lib" / PYVER / "site-packages"
    name = wheel.name.split("-")[0]
    for p in list(site.iterdir()):
        if p.name == name or p.name.startswith((f"{name}-", f"_{name}")):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return wheel.name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--dep-wheel", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-update-"))
    rows = []
    try:
        base = tmp / "tree-1.0.0"
        stage_agent(base)
        deps = stage_deps(base)
        code = tmp / "tree-1.0.1"
        shutil.copytree(base, code)
        _code_change(code)
        wheel = _get_wheel(args.dep_wheel, tmp)
        bump = None
        if wheel:
            bump = tmp / "tree-1.1.0"
            shutil.copytree(base, bump)
            bumped = _dep_bump(bump, wheel)
        repo = ReleaseRepo.init(tmp / "repo", tmp / "keys")
        t0 = time.perf_counter()
        repo.add_agent_release("1.0.0", 1, base)
        repo.publish()
        build_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        repo.add_agent_release("1.0.1", 2, code, delta_from=["1.0.0"])
        repo.publish()
        build_code = time.perf_counter() - t0
        if bump:
            repo.add_agent_release("1.1.0", 3, bump, delta_from=["1.0.0"])
            repo.publish()
        ca = DevCA(tmp / "pki")
        with TufServer(repo.repo, ca) as srv:
            def apply(name: str, version: str, counter: int, delta_from: str | None) -> None:
                layout = Layout(tmp / f"device-{name}", sys.executable)
                meta = tmp / f"meta-{name}"
                tuf = TufClient(meta, repo.root_path, ca_file=ca.ca_cert_path)
                if delta_from:  # the device runs the base version already
                    rel0 = release_body("agent", "1.0.0", 1, srv.url, "agent/1.0.0/bundle.tar.zst")
                    tar, comp, _ = updater.fetch_agent(NetworkSource(tuf, srv.url, layout), layout,
                                                       rel0, "dongle-pi-v1", max_bytes=1 << 30)
                    updater.install_slot(layout, rel0, tar, comp)
                    updater.activate_on_trial(layout, rel0)
                    # A new release brings new targets, snapshot and timestamp metadata: make the
                    # device fetch all three, as it would (the base was installed from a repository
                    # that already listed the later releases).
                    for role in ("timestamp", "snapshot", "targets"):
                        (meta / f"{role}.json").unlink(missing_ok=True)
                    tuf = TufClient(meta, repo.root_path, ca_file=ca.ca_cert_path)
                srv.reset_counters()
                rel = release_body("agent", version, counter, srv.url,
                                   f"agent/{version}/bundle.tar.zst", delta_from=delta_from,
                                   delta_target=delta_from and f"agent/{version}/delta-from-{delta_from}.zst")
                t0 = time.perf_counter()
                tar, comp, how = updater.fetch_agent(NetworkSource(tuf, srv.url, layout), layout,
                                                     rel, "dongle-pi-v1", max_bytes=1 << 30)
                t1 = time.perf_counter()
                updater.install_slot(layout, rel, tar, comp)
                updater.activate_on_trial(layout, rel)
                t2 = time.perf_counter()
                assert layout.current_version() == version and how == ("delta" if delta_from else "full")
                meta_bytes = sum(n for p, _, n, _ in srv.requests if p.startswith("/metadata/"))
                rows.append((name, how, srv.bytes_sent, meta_bytes, len(tar), t1 - t0, t2 - t1))

            apply("code-only", "1.0.1", 2, "1.0.0")
            if bump:
                apply("dep-bump", "1.1.0", 3, "1.0.0")
            apply("full", "1.0.1", 2, None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{platform.machine()} {platform.processor() or ''} Python {platform.python_version()}, "
          f"{len(deps)} distributions in the environment"
          + (f"; dep-bump: cbor2 6.3.0 -> {bumped}" if bump else ""))
    print(f"release build: base {build_base:.1f} s, code-only release with delta {build_code:.1f} s")
    hdr = ("scenario", "via", "wire bytes", "of which metadata", "tar bytes", "fetch+verify+patch s",
           "install+flip s")
    print(" | ".join(hdr))
    for r in rows:
        print(f"{r[0]} | {r[1]} | {r[2]:,} | {r[3]:,} | {r[4]:,} | {r[5]:.2f} | {r[6]:.2f}")
    code_row = rows[0]
    print(f"code-only on the wire: {code_row[2]:,} bytes (target <= {TARGET_CODE_ONLY:,}: "
          f"{'met' if code_row[2] <= TARGET_CODE_ONLY else 'MISSED'})")
    if args.markdown:
        print("\n| " + " | ".join(hdr) + " |\n|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]:,} | {r[3]:,} | {r[4]:,} | {r[5]:.2f} | {r[6]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
