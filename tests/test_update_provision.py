"""`dongle provision --tuf-root FILE` pins the update repository's root on the device."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from agent.cli.main import main as dongle
from agent.update.tuf_client import TufClient, TufError
from scripts.refcloud.keys import generate_cloud_keys
from scripts.testbed.devca import DevCA
from scripts.refcloud.release import ReleaseRepo
from scripts.testbed.tuf_server import TufServer
from tests.support.updates import build_repo

pytestmark = pytest.mark.timeout(60)


def _provision(tmp: Path, out: Path, *extra: str) -> int:
    cloud = generate_cloud_keys(tmp / "cloud", force=True)["paths"]
    return dongle(["provision", "--device-id", "dongle-0001", "--cloud-sign-pub",
                   str(cloud["cloud_sign.pub"]), "--cloud-enc-pub", str(cloud["cloud_enc.pub"]),
                   "--out", str(out), *extra])


def test_pinned_root_anchors_updates(tmp_path: Path, capsys) -> None:
    repo = build_repo(tmp_path, [("1.0.0", 1)])
    keys = tmp_path / "device-keys"
    assert _provision(tmp_path, keys, "--tuf-root", str(repo.root_path)) == 0
    pinned = keys / "tuf_root.json"
    assert pinned.read_bytes() == repo.root_path.read_bytes()
    assert stat.S_IMODE(pinned.stat().st_mode) == 0o644
    assert "tuf_root" in capsys.readouterr().out
    ca = DevCA(tmp_path / "pki")
    with TufServer(repo.repo, ca) as srv:
        tuf = TufClient(tmp_path / "meta", pinned, ca_file=ca.ca_cert_path)
        info, _ = tuf.target_info(srv.url, "agent/1.0.0/bundle.tar.zst")
        assert info.custom["version"] == "1.0.0"
        # A repository with other keys is not believed by this device.
        other = ReleaseRepo.init(tmp_path / "other-repo", tmp_path / "other-keys")
        with TufServer(other.repo, ca) as evil:
            with pytest.raises(TufError) as e:
                TufClient(tmp_path / "meta2", pinned, ca_file=ca.ca_cert_path).target_info(
                    evil.url, "agent/1.0.0/bundle.tar.zst")
            assert e.value.reason == "untrusted_signature"


@pytest.mark.parametrize("breakage", ["not_root", "bad_signature", "missing"])
def test_bad_root_is_refused_and_nothing_written(tmp_path: Path, breakage: str) -> None:
    repo = ReleaseRepo.init(tmp_path / "repo", tmp_path / "keys")
    bad = tmp_path / "bad.json"
    if breakage == "not_root":
        bad.write_bytes((repo.metadata_dir / "targets.json").read_bytes())
    elif breakage == "bad_signature":
        doc = json.loads(repo.root_path.read_text())
        doc["signed"]["expires"] = "2099-01-01T00:00:00Z"   # changed after signing
        bad.write_text(json.dumps(doc))
    out = tmp_path / "device-keys"
    assert _provision(tmp_path, out, "--tuf-root", str(bad)) == 2
    assert not out.exists() or not list(out.iterdir())
