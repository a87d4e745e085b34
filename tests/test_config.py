"""Config loading and `kzpool check`: pure logic, no broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kzpool.cli import example_consumer_section, example_pool_section
from kzpool.common import config
from kzpool.common.errors import ConfigError
from kzpool.common.settings import CONSUMER_SETTINGS, SETTINGS

ROOT = Path(__file__).resolve().parent.parent
A = "amqp://guest:s3cret@127.0.0.1:5672/%2F"
B = "amqp://guest:s3cret@127.0.0.1:5701/%2F"
OK = f"[amqp]\nuri = {A}\n"


def problems(text: str, **env: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.loads(text, "c.ini", environ=env)
    return info.value.problems


def test_amqp_section_is_the_local_zone_in_config_order() -> None:
    # config order, not string order: "5701" < "5672" is false, but put it first anyway
    cfg = config.loads(f"[amqp]\nuri = {B}\namqp_uri = \"{A}\"\n", environ={})
    assert cfg.local_zone == "local"
    assert [b.uri.port for b in cfg.brokers] == [5701, 5672]
    assert all(b.local for b in cfg.brokers)


def test_zones_name_the_local_one_from_pool_or_env() -> None:
    text = f"[zone:east]\nuri = {B}\n[zone:west]\nuri = {A}\n"
    cfg = config.loads(text + "[pool]\nzone = west\n", environ={})
    assert cfg.local_zone == "west"
    assert [(b.zone, b.local) for b in cfg.brokers] == [("east", False), ("west", True)]
    assert config.loads(text, environ={"KZPOOL_ZONE": "east"}).local_zone == "east"


def test_kazoo_zone_sections_with_name_key() -> None:
    cfg = config.loads(f'[zone]\nname = "dc1"\namqp_uri = "{A}"\n', environ={})
    assert cfg.local_zone == "dc1"
    assert cfg.brokers[0].uri.port == 5672


def test_settings_defaults_and_units() -> None:
    cfg = config.loads(f"[pool]\nworker_max_rss = 64M\nconnect_timeout = 2.5s\n[amqp]\nuri = {A}\n",
                       environ={})
    assert cfg.settings.prechannels == 10
    assert cfg.settings.connections_per_broker == 1
    assert cfg.settings.worker_max_rss == 64 << 20
    assert cfg.settings.connect_timeout == 2.5


def test_cli_override_beats_the_file() -> None:
    cfg = config.loads(f"[pool]\nprechannels = 3\n[amqp]\nuri = {A}\n",
                       overrides={"prechannels": "7"}, environ={})
    assert cfg.settings.prechannels == 7


@pytest.mark.parametrize(("text", "expected"), [
    ("[pool]\nprechannels = many\n" + OK,
     "c.ini:2: [pool] prechannels = 'many': not a whole number"),
    ("[pool]\nheartbeat = -1\n" + OK, "c.ini:2: [pool] heartbeat = '-1': must be at least 0"),
    ("[pool]\nconnect_timeout = 0\n" + OK, "c.ini:2: [pool] connect_timeout = '0': must be more"),
    ("[pool]\nworker_max_rss = lots\n" + OK, "c.ini:2: [pool] worker_max_rss = 'lots': not a size"),
    ("[pool]\nlog_level = loud\n" + OK, "c.ini:2: [pool] log_level = 'loud': not one of"),
    ("[pool]\nprechanels = 3\n" + OK, "c.ini:2: [pool] unknown key 'prechanels'"),
    ("[pool]\ntls_key = /k.pem\n" + OK,
     "c.ini:2: [pool] tls_key = '/k.pem': tls_key needs tls_cert"),
    ("[pool]\ntls_verify = maybe\n" + OK, "c.ini:2: [pool] tls_verify = 'maybe': not verify_peer"),
    ("[pool]\nprechannels = 3\nprechannels = 4\n" + OK, "c.ini:3: [pool] prechannels given twice"),
    ("[amqp]\nuri = http://guest:pw@host/\n", "c.ini:2: [amqp] uri = 'http://guest:***@host/':"
     " scheme 'http' is not amqp or amqps"),
    ("[amqp]\nuri = amqp://guest:pw@host:99999/\n", "c.ini:2: [amqp] uri = "
     "'amqp://guest:***@host:99999/': Port out of range"),
    ("[amqp]\nuri = amqp://guest:pw@host:5672/a/b\n", "vhost 'a/b' must be one path segment"),
    ("[amqp]\nuri = amqp://:5672/\n", "no host"),
    ("[amqp]\nhost = x\n", "c.ini:2: [amqp] host: unknown key"),
    ("[amqp]\n", "c.ini: zone 'local' lists no broker"),
    ("[pool]\n", "c.ini: no brokers"),
    ("[bogus]\n" + OK, "c.ini:1: unknown section [bogus]"),
    ("[pool\n" + OK, "c.ini:1: bad section header '[pool'"),
    ("prechannels = 1\n" + OK, "c.ini:1: 'prechannels = 1' stands before any [section]"),
    ("[pool]\njust words\n" + OK, "c.ini:2: expected 'key = value'"),
    (f"[amqp]\nuri = {A}\nuri = {A}\n", "c.ini:3: [amqp] uri = 'amqp://guest:***@127.0.0.1:5672"
     "/%2F': broker already listed in c.ini:2"),
    (f"[amqp]\nuri = {A}\n[zone:x]\nuri = {B}\n", "[amqp] and [zone] sections together"),
    (f"[zone:x]\nuri = {A}\n[zone:y]\nuri = {B}\n", "several zones (x, y): name the local one"),
    (f"[zone:x]\nuri = {A}\n[pool]\nzone = y\n", "local zone 'y'"),
    (f"[zone]\nuri = {A}\n", "c.ini:1: [zone] has no zone name"),
])
def test_each_bad_config_is_named(text: str, expected: str) -> None:
    found = problems(text)
    assert any(expected in p for p in found), found
    assert not any("s3cret" in p or ":pw@" in p for p in found)


@pytest.mark.parametrize(("section", "expected"), [
    ("processes = 2\n", "handler is required"),
    ("handler = nocolon\n", "handler = 'nocolon': not module.path:callable"),
    ("handler = m:f\nprocesses = 0\n", "processes = '0': must be at least 1"),
    ("handler = m:f\nlease = wobbly\n", "lease = 'wobbly': not float or sticky"),
    ("handler = m:f\nlease = sticky\n", "a sticky consumer needs broker = URI"),
    ("handler = m:f\nbroker = amqp://h/\n", "a float one none"),
    ("handler = m:f\nlease = sticky\nbroker = ftp://h/\n", "scheme 'ftp'"),
    ("handler = m:f\nfederate = maybe\n", "federate = 'maybe': not true or false"),
    ("handler = m:f\nfederate = true\n", "federate = true needs an exchange and bindings"),
    ("handler = m:f\nmax_rss = lots\n", "max_rss = 'lots': not a size"),
    ("handler = m:f\nqueue_name = q\n", "unknown key 'queue_name'"),
    ("handler = m:f\nlease = sticky\nbroker = amqps://h/?cacertfile=/ca.pem\n",
     "a lease's broker URI takes no options (cacertfile)"),
])
def test_each_bad_consumer_section_is_named(section: str, expected: str) -> None:
    found = problems(OK + "[consumer:billing]\n" + section)
    assert any(expected in p and p.startswith("c.ini") for p in found), found


def test_consumer_sections_load() -> None:
    cfg = config.loads(OK + "[consumer:billing]\nhandler = app.billing:handle\nprocesses = 3\n"
                       "bindings = billing.*, audit.#\n  more.keys\nrequeue_on_error = yes\n",
                       environ={})
    (billing,) = cfg.consumers
    assert billing.name == "billing" and billing.settings.queue == "billing"
    assert billing.settings.processes == 3 and billing.settings.requeue_on_error
    assert billing.settings.bindings == ("billing.*", "audit.#", "more.keys")


def test_all_problems_reported_at_once_in_line_order() -> None:
    found = problems(f"[pool]\nprechannels = x\nheartbeat = y\n[amqp]\nuri = ftp://h/\nuri = {A}\n")
    assert [p.split(":")[1] for p in found] == ["2", "3", "5"]


def test_bad_environment_value_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        config.loads(f"[zone:x]\nuri = {A}\n", environ={"KZPOOL_ZONE": "nowhere"})
    assert "'nowhere'" in str(info.value)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kzpool", *args], capture_output=True,
                          text=True, timeout=60)


def test_check_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.ini"
    good.write_text(f"[amqp]\nuri = {A}\n")
    result = run_cli("check", "-c", str(good))
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.ini"
    bad.write_text(f"[pool]\nprechannels = x\nsocket =\n[amqp]\nuri = {A}\nuri = bogus://h\n")
    result = run_cli("check", "-c", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{bad}:2: [pool] prechannels = 'x'")
    assert lines[1].startswith(f"{bad}:3: [pool] socket = '': empty path")
    assert lines[2].startswith(f"{bad}:6: [amqp] uri = 'bogus://h'")
    missing = run_cli("check", "-c", str(tmp_path / "nope.ini"))
    assert missing.returncode == 2
    assert "nope.ini: cannot read: No such file or directory" in missing.stderr


def test_example_config_is_valid_and_documents_every_setting() -> None:
    example = (ROOT / "config.ini.example").read_text()
    assert run_cli("check", "-c", str(ROOT / "config.ini.example")).returncode == 0
    assert example_consumer_section() in example
    for setting in CONSUMER_SETTINGS:
        assert f"; {setting.name} = " in example, setting.name
    generated = example_pool_section()
    assert generated.replace(";socket = /run/kzpool/kzpool.sock",
                             "socket = /tmp/kzpool/kzpool.sock") in example
    for setting in SETTINGS:
        assert f"{setting.name} = " in generated and setting.flag in generated


def test_serve_flags_derive_from_the_settings_table() -> None:
    help_text = run_cli("serve", "--help").stdout
    for setting in SETTINGS:
        assert setting.flag in help_text


def test_uri_options_kazoo_and_pika_users_write_are_kept() -> None:
    cfg = config.loads("[amqp]\nuri = amqp://u:pw@h/%2F?heartbeat=5&channel_max=64"
                       "&frame_max=65536\nuri = amqps://u:pw@h2/?verify=verify_none"
                       "&server_name_indication=rabbit.example&depth=3\n", environ={})
    plain, secure = (b.uri for b in cfg.brokers)
    assert plain.options == (("heartbeat", "5"), ("channel_max", "64"), ("frame_max", "65536"))
    assert (secure.port, secure.option("verify"), secure.option("depth")) == (
        5671, "verify_none", "3")
    assert secure.masked == "amqps://u:***@h2:5671/%2F"  # options are not shown
