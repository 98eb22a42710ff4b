"""Local settings (agent.toml): validated at start, one clear message naming key and file, exit 2."""
from __future__ import annotations

import dataclasses
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
    assert s.keys.cloud_sign_pubs == (tmp_path / "cloud_sign.pub",)
    assert s.mqtt.host_port == ("broker.example.com", 8884)
    assert s.topic_prefix == "dongle/v1/car-0001/"
    assert s.mqtt.protocol == "5" and s.obd.enabled is True
    assert s.power is None and s.update is None         # off unless enabled
    assert s.control.socket == Path("/run/dongle/agent.sock") and s.gpio.pins["button"] == 26


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


def test_several_brokers_are_a_list_of_urls_tried_in_order(tmp_path):
    urls = 'urls = ["mqtts://mq1.example.com", "mqtts://mq2.example.com:8884", "mqtts://10.0.0.3:1883"]'
    s = settings.load(_write(tmp_path, GOOD.replace('url = "mqtts://broker.example.com:8884"', urls)))
    assert s.mqtt.endpoints == [("mq1.example.com", 8883), ("mq2.example.com", 8884), ("10.0.0.3", 1883)]
    assert s.mqtt.host_port == ("mq1.example.com", 8883)
    assert settings.load(_write(tmp_path, GOOD)).mqtt.endpoints == [("broker.example.com", 8884)]


@pytest.mark.parametrize("patch, expected", [
    (GOOD.replace('url = "mqtts://broker.example.com:8884"\n', ""), "missing key 'mqtt.url' (or 'mqtt.urls'"),
    (GOOD.replace('url = "mqtts://broker.example.com:8884"', 'url = "mqtts://a.example.com"\nurls = ["mqtts://b.example.com"]'),
     "key 'mqtt.urls': give mqtt.url or mqtt.urls, not both"),
    (GOOD.replace('url = "mqtts://broker.example.com:8884"', 'urls = []'), "key 'mqtt.urls'"),
    (GOOD.replace('url = "mqtts://broker.example.com:8884"', 'urls = ["mqtts://a.example.com", "mqtt://b:1883"]'),
     "key 'mqtt.urls[1]'"),
    (GOOD.replace('url = "mqtts://broker.example.com:8884"', 'urls = ["mqtts://a.example.com", "mqtts://b:0"]'),
     "key 'mqtt.urls[1]': port must be 1-65535"),
    (GOOD.replace('url = "mqtts://broker.example.com:8884"', 'urls = ["mqtts://a.example.com", "mqtts://a.example.com:8883"]'),
     "key 'mqtt.urls': names one broker twice"),
])
def test_bad_broker_lists_are_refused(tmp_path, patch, expected):
    with pytest.raises(settings.SettingsError) as e:
        settings.load(_write(tmp_path, patch))
    assert expected in str(e.value), str(e.value)


def test_mqtt_settings_that_would_break_protocol_section_2(tmp_path):
    text = GOOD.replace('key_file = "tls.key"', 'key_file = "tls.key"\nsession_expiry_s = 0')
    with pytest.raises(settings.SettingsError, match="session_expiry_s"):
        settings.load(_write(tmp_path, text))
    text = GOOD.replace('key_file = "tls.key"', 'key_file = "tls.key"\ntopic_prefix = "fleet/"')
    with pytest.raises(settings.SettingsError, match="topic_prefix"):
        settings.load(_write(tmp_path, text))


def test_schema_and_dataclasses_name_the_same_keys():
    """One schema validates, the dataclasses type and default: they must not drift apart."""
    props = settings.schema()["properties"]
    assert list(props) == list(settings.SECTIONS)
    for name, cls in settings.SECTIONS.items():
        keys = set(props[name].get("properties", {})) - {settings.SWITCHES.get(name)}
        assert keys == {f.name for f in dataclasses.fields(cls)}, name


@pytest.mark.parametrize("section, expected", [
    ('[power]\nenabled = true\nsleep_s = 1\n', "unknown key 'power.sleep_s'"),
    ('[power]\nenabled = true\ngrace_s = "60"\n', "key 'power.grace_s'"),
    ('[power]\nenabled = true\nwatchdog_s = 1.5\n', "key 'power.watchdog_s'"),
    ('[power]\nenabled = true\nhalt_without_mcu = 1\n', "key 'power.halt_without_mcu'"),
    ('[power]\nenabled = true\nwatchdog_s = 70000\n', "key 'power.watchdog_s'"),
    ('[power]\nenabled = true\nwatchdog_s = 30\nkick_s = 20\n', "key 'power.kick_s'"),
    ('[power]\nenabled = true\nlow_voltage_v = 12.5\n', "low_voltage_v < warn_voltage_v"),
    ('[power]\nenabled = true\ngrace_s = -1\n', "key 'power.grace_s'"),
    ('[power]\nenabled = true\ngrace_s = inf\n', "key 'power.grace_s': must be a finite number"),
    ('[update]\nenabled = true\nmax_starts = 0\n', "key 'update.max_starts'"),
])
def test_bad_sections_are_refused_in_the_one_format(tmp_path, section, expected):
    p = _write(tmp_path, GOOD + section)
    with pytest.raises(settings.SettingsError) as e:
        settings.load(p)
    assert str(e.value).startswith(f"{p}: ") and expected in str(e.value)


def test_power_and_update_sections_are_typed(tmp_path):
    s = settings.load(_write(tmp_path, GOOD + """
[power]
enabled = true
mcu_port = "/dev/serial0"
low_voltage_v = 11
sleep_check_in_s = 3600
[update]
enabled = true
max_rate_kib_s = 0
"""))
    assert s.power.low_voltage_v == 11.0 and isinstance(s.power.low_voltage_v, float)
    assert s.power.sleep_check_in_s == 3600 and s.power.grace_s == 60.0     # the dataclass default
    assert s.update.rate_bps is None and s.update.max_bundle_bytes == 256 * 2**20
    assert s.update.tuf_root == tmp_path / "tuf_root.json"                 # next to keys.sign_key
    assert s.update.metadata_dir == tmp_path / "data" / "tuf"


def test_the_cli_reads_the_same_file_without_the_keys(tmp_path):
    """A technician may not read the keys: check_files=False, same checks otherwise."""
    p = tmp_path / "agent.toml"
    p.write_text('[device]\nid = "car-0001"\ndata_dir = "data"\n[control]\nsocket = "s.sock"\n')
    s = settings.load(p, check_files=False)
    assert s.keys is None and s.control.socket == tmp_path / "s.sock" and s.db_path == tmp_path / "data" / "agent.db"
    p.write_text('[device]\nid = "car-0001"\ndata_dir = "data"\n[control]\nsokket = 1\n')
    with pytest.raises(settings.SettingsError, match="unknown key 'control.sokket'"):
        settings.load(p, check_files=False)
