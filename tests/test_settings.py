"""Local settings (agent.toml): validated at start, one clear message naming key and file, exit 2."""
from __future__ import annotations

from pathlib import Path

import pytest

from agent import settings
from agent.daemon import main as daemon_main

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "agent.example.toml"
FILE_KEYS = ["device_sign.key", "device_enc.key", "cloud_enc.pub", "cloud_sign.pub", "ca.pem",
             "tls.crt", "tls.key"]


def _write(tmp_path: Path, body: str) -> Path:
    for name in FILE_KEYS:
        (tmp_path / name).write_text("x")
    p = tmp_path / "agent.toml"
    p.write_text(body)
    return p


GOOD = """
[device]
id = "car-0001"
data_dir = "data"
[keys]
sign_key = "device_sign.key"
enc_key = "device_enc.key"
cloud_enc_pub = "cloud_enc.pub"
cloud_sign_pubs = ["cloud_sign.pub"]
[mqtt]
url = "mqtts://broker.example.com:8884"
ca_file = "ca.pem"
cert_file = "tls.crt"
key_file = "tls.key"
"""


def test_good_settings_resolve_paths_and_defaults(tmp_path):
    s = settings.load(_write(tmp_path, GOOD))
    assert s.device_id == "car-0001"
    assert s.data_dir == tmp_path / "data"
    assert s.data["keys"]["cloud_sign_pubs"] == [str(tmp_path / "cloud_sign.pub")]
    assert s.mqtt_host_port == ("broker.example.com", 8884)
    assert s.topic_prefix == "dongle/v1/car-0001/"
    assert s.data["mqtt"]["protocol"] == "5" and s.data["obd"]["enabled"] is True


def test_example_file_documents_only_valid_keys(tmp_path):
    """The shipped example must pass the schema (only its files are missing here)."""
    text = EXAMPLE.read_text()
    with pytest.raises(settings.SettingsError) as e:
        settings.load(_write(tmp_path, text))
    assert "file not found" in str(e.value), str(e.value)


@pytest.mark.parametrize("patch, expected", [
    (GOOD + "[mqtt.extra]\n", "unknown key 'mqtt.extra'"),
    (GOOD.replace('[device]', '[device]\ncolour = "red"'), "unknown key 'device.colour'"),
    (GOOD + "[obd]\nport = 7\n", "key 'obd.port'"),
    (GOOD + "[obd]\nbaudrate = \"fast\"\n", "key 'obd.baudrate'"),
    (GOOD.replace('id = "car-0001"', 'id = "Car 1"'), "key 'device.id'"),
    (GOOD.replace('url = "mqtts://broker.example.com:8884"', 'url = "mqtt://plain:1883"'), "key 'mqtt.url'"),
    (GOOD.replace('cloud_enc_pub = "cloud_enc.pub"\n', ""), "missing key 'keys.cloud_enc_pub'"),
    (GOOD.replace('"tls.key"', '"nope.key"'), "key 'mqtt.key_file': file not found"),
    (GOOD.replace('["cloud_sign.pub"]', '["cloud_sign.pub", "old.pub"]'), "key 'keys.cloud_sign_pubs[1]': file not found"),
    ("[device\nid=", "not valid TOML"),
])
def test_bad_settings_name_key_and_file(tmp_path, patch, expected):
    p = _write(tmp_path, patch)
    with pytest.raises(settings.SettingsError) as e:
        settings.load(p)
    assert str(p) in str(e.value)
    assert expected in str(e.value)


def test_daemon_exits_2_with_one_message_and_starts_nothing(tmp_path, capsys):
    p = _write(tmp_path, GOOD + "[uplink]\nbogus = 1\n")
    assert daemon_main(["--config", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'uplink.bogus'" in err[0] and str(p) in err[0]
    assert not (tmp_path / "data").exists()  # nothing started: no store created


def test_missing_settings_file(tmp_path, capsys):
    assert daemon_main(["--config", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml" in capsys.readouterr().err


def test_corrupt_key_file_is_named_and_exits_2(tmp_path, capsys):
    """A key file that exists but is not a key: one clear line naming it, exit 2, no store."""
    p = _write(tmp_path, GOOD)
    (tmp_path / "device_sign.key").write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    assert daemon_main(["--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "device_sign.key" in err and str(p) in err
    assert not (tmp_path / "data" / "agent.db").exists()


@pytest.mark.parametrize("patch, expected", [
    (GOOD.replace(":8884", ":99999"), "key 'mqtt.url'"),
    (GOOD.replace(":8884", ":0"), "key 'mqtt.url'"),
    (GOOD + '[mqtt.x]\n', "unknown key"),
])
def test_url_ports_out_of_range_are_refused(tmp_path, patch, expected):
    with pytest.raises(settings.SettingsError) as e:
        settings.load(_write(tmp_path, patch))
    assert expected in str(e.value)


def test_mqtt_settings_that_would_break_protocol_section_2(tmp_path):
    text = GOOD.replace('key_file = "tls.key"', 'key_file = "tls.key"\nsession_expiry_s = 0')
    with pytest.raises(settings.SettingsError, match="session_expiry_s"):
        settings.load(_write(tmp_path, text))
    text = GOOD.replace('key_file = "tls.key"', 'key_file = "tls.key"\ntopic_prefix = "fleet/"')
    with pytest.raises(settings.SettingsError, match="topic_prefix"):
        settings.load(_write(tmp_path, text))
