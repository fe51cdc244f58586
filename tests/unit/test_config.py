"""Lab YAML validation: one test per kind of mistake, each asserting the message."""

from __future__ import annotations

import textwrap

import pytest

from labmesh.config import ConfigError, load_host_config, parse_host_config

pytestmark = pytest.mark.unit

GOOD = """\
host: lab-pc-3
bind: 127.0.0.1
discovery: tcp://lab-core:5550, tcp://lab-core-2:5550
metrics_port: 9105
devices:
  - name: pm100-a
    driver: powermeter
    resource: USB0::0x1313::0x8078::P0000001::INSTR
    port: 5555
    options: {sensor_type: S155C}
  - name: daq
    driver: nidaq
    port: 5556
    sim: true
    fixed_threading: false
"""


def parse(text: str):
    return parse_host_config(textwrap.dedent(text), "host.yaml")


def test_a_good_file():
    cfg = parse(GOOD)
    assert cfg.host == "lab-pc-3" and cfg.bind == "127.0.0.1" and cfg.metrics_port == 9105
    assert cfg.discovery == ["tcp://lab-core:5550", "tcp://lab-core-2:5550"]
    pm, daq = cfg.devices
    assert (pm.name, pm.driver, pm.port, pm.options) == (
        "pm100-a",
        "powermeter",
        5555,
        {"sensor_type": "S155C"},
    )
    assert pm.fixed_threading is True and pm.sim is False and pm.where == "host.yaml:6"
    assert daq.sim is True and daq.fixed_threading is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("devices: [\n  {name: a\n", r"host.yaml:\d+: not valid YAML"),
        ("", r"host.yaml:1: expected a mapping with a 'devices' list, got an empty file"),
        ("- a\n- b\n", r"host.yaml:1: expected a mapping .* got list"),
        ("devices: []\n", r"host.yaml:1: devices: expected a non-empty list of devices"),
        ("devics: []\n", r"host.yaml:1: devics: unknown key 'devics'; did you mean 'devices'\?"),
        (
            "metrics_port: 99999\ndevices: [{name: a, driver: motor, port: 5}]\n",
            r"host.yaml:1: metrics_port: expected a TCP port number 0-65535, got 99999",
        ),
        (
            "discovery: lab-core:5550\ndevices: [{name: a, driver: motor, port: 5}]\n",
            r"host.yaml:1: discovery: 'lab-core:5550' is not tcp://HOST:PORT",
        ),
        (
            "lock_idle_limit_s: -1\ndevices: [{name: a, driver: motor, port: 5}]\n",
            r"lock_idle_limit_s: expected a positive number, got -1",
        ),
        (
            "limits: {max_waiter: 5}\ndevices: [{name: a, driver: motor, port: 5}]\n",
            r"host.yaml:1: limits.max_waiter: unknown key 'max_waiter'; did you mean 'max_waiters'",
        ),
        (
            "limits:\n  max_waiters: 2.5\ndevices: [{name: a, driver: motor, port: 5}]\n",
            r"host.yaml:2: limits.max_waiters: expected a positive whole number, got 2.5",
        ),
        (
            "limits: {max_wait_s: 0}\ndevices: [{name: a, driver: motor, port: 5}]\n",
            r"limits.max_wait_s: expected a positive number, got 0",
        ),
        (
            "limits: {max_wait_s: .nan}\ndevices: [{name: a, driver: motor, port: 5}]\n",
            r"limits.max_wait_s: expected a positive number, got nan",
        ),
        ("devices:\n  - just-a-name\n", r"host.yaml:2: devices\[0\]: expected a mapping"),
        (
            "devices:\n  - name: a\n    driver: motor\n",
            r"host.yaml:2: devices\[0\]: missing 'port' \(TCP port this device's server",
        ),
        (
            "devices:\n  - name: a\n    driver: motor\n    port: abc\n",
            r"host.yaml:4: devices\[0\].port: expected a TCP port number 1-65535, got 'abc'",
        ),
        (
            "devices:\n  - name: a\n    driver: powermetre\n    port: 5\n",
            r"host.yaml:3: devices\[0\].driver: unknown driver 'powermetre'; expected one of "
            r"\['motor', 'nidaq', 'powermeter', 'scpi'\]",
        ),
        (
            "devices:\n  - name: a b\n    driver: motor\n    port: 5\n",
            r"host.yaml:2: devices\[0\].name: expected a name of letters",
        ),
        (
            "devices:\n  - name: a\n    driver: motor\n    port: 5\n    sim: yes please\n",
            r"host.yaml:5: devices\[0\].sim: expected true or false, got 'yes please'",
        ),
        (
            "devices:\n  - name: a\n    driver: motor\n    port: 5\n    optoins: {}\n",
            r"host.yaml:5: devices\[0\].optoins: unknown key 'optoins'; did you mean 'options'\?",
        ),
        (
            "devices:\n  - name: a\n    driver: motor\n    port: 5\n    options: [1]\n",
            r"host.yaml:5: devices\[0\].options: expected a mapping of keyword arguments",
        ),
        (
            "devices:\n  - {name: a, driver: motor, port: 5}\n"
            "  - {name: a, driver: motor, port: 6}\n",
            r"host.yaml:3: devices\[1\].name: name 'a' is already used at host.yaml:2",
        ),
        (
            "devices:\n  - {name: a, driver: motor, port: 5}\n"
            "  - {name: b, driver: motor, port: 5}\n",
            r"host.yaml:3: devices\[1\].port: port 5 is already used by device a",
        ),
        (
            "metrics_port: 5\ndevices:\n  - {name: a, driver: motor, port: 5}\n",
            r"devices\[0\].port: port 5 is already used by metrics_port",
        ),
        (
            "devices:\n  - {name: a, driver: motor, port: 5, pub_port: 5}\n",
            r"devices\[0\].pub_port: port 5 is already used by device a's port",
        ),
        (
            "devices:\n  - {name: a, driver: motor, port: 5, pub_port: 7}\n"
            "  - {name: b, driver: motor, port: 7}\n",
            r"devices\[1\].port: port 7 is already used by device a \(pub_port\)",
        ),
        (
            "devices:\n  - {name: a, driver: motor, port: 5, metrics: {x/position: 0.01}}\n",
            r"devices\[0\].metrics.x/position: expected a period of at least 0.05 s",
        ),
        (
            "devices:\n  - {name: a, driver: motor, port: 5, metrics: 3}\n",
            r"devices\[0\].metrics: expected a list of parameter names",
        ),
        (
            "security: {key: h, rolse: {}}\ndevices:\n  - {name: a, driver: motor, port: 5}\n",
            r"host.yaml:1: security.rolse: unknown key 'rolse'; did you mean 'roles'\?",
        ),
        (
            "security: {clients: d}\ndevices:\n  - {name: a, driver: motor, port: 5}\n",
            r"security: missing 'key'",
        ),
        (
            "security: {key: h, roles: {alice: root}}\n"
            "devices:\n  - {name: a, driver: motor, port: 5}\n",
            r"security.roles.alice: unknown role 'root'; roles are none, observer, operator, admin",
        ),
        (
            "devices:\n  - {name: a, driver: motor, port: 5, plaintext: {port: 6}}\n",
            r"devices\[0\].plaintext: a plaintext listener is for secured hosts",
        ),
        (
            "devices:\n  - {name: a, driver: motor, port: 5, roles: {bob: admin}}\n",
            r"devices\[0\].roles: roles need a security: section",
        ),
        (
            "security: {key: h}\n"
            "devices:\n  - {name: a, driver: motor, port: 5, plaintext: {port: 5}}\n",
            r"devices\[0\].plaintext.port: port 5 is already used",
        ),
        (
            "security: {key: h}\n"
            "devices:\n  - {name: a, driver: motor, port: 5, plaintext: {port: 6, role: god}}\n",
            r"unknown role 'god'",
        ),
        (
            "audit: 3\ndevices:\n  - {name: a, driver: motor, port: 5}\n",
            r"host.yaml:1: audit: expected off, stdout, a path or a mapping",
        ),
    ],
)
def test_each_mistake_has_a_clear_message(text, message):
    with pytest.raises(ConfigError, match=message):
        parse(text)


def test_a_secured_host_file(tmp_path):
    path = tmp_path / "host.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            security:
              key: lab-pc-3
              clients: clients
              keys: {carol: "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"}
              discovery_key: lab-core
              roles: {alice: Operator, "*": observer}
            audit: {file: trail.jsonl, stdout: true}
            devices:
              - name: pm100-a
                driver: powermeter
                resource: USB0::0x1313::0x8078::P0000001::INSTR
                port: 5555
                roles: {bob: admin}
                plaintext: {port: 5565}
            """
        )
    )
    config = load_host_config(path)
    sec = config.security
    assert sec.key == "lab-pc-3" and sec.clients == [str(tmp_path / "clients")]
    assert sec.roles == {"alice": "operator", "*": "observer"} and sec.discovery_key == "lab-core"
    device = config.devices[0]
    assert device.roles == {"bob": "admin"}
    assert (device.plaintext_port, device.plaintext_role) == (5565, "observer")
    assert config.audit == {"file": "trail.jsonl", "stdout": True}


def test_custom_driver_that_cannot_be_imported():
    with pytest.raises(
        ConfigError,
        match=r"host.yaml:2: devices\[0\].driver: cannot load "
        r"'nosuch.module:Thing' \(No module named 'nosuch'\)",
    ):
        parse("devices:\n  - {name: a, driver: 'nosuch.module:Thing', port: 5}\n")


@pytest.mark.parametrize(
    ("device", "message"),
    [
        (
            "{name: a, driver: motor, port: 5, options: {sped: 3}}",
            r"devices\[0\].options.sped: driver 'motor' takes no option 'sped'; did you mean "
            r"'speed'\? \(its options: axes, limits, speed, unit, backend\)",
        ),
        (
            "{name: a, driver: powermeter, port: 5}",
            r"host.yaml:2: devices\[0\]: missing 'resource' .*`labmesh visa list`",
        ),
        (
            "{name: a, driver: powermeter, port: 5, resource: R, options: {sensor_type: S999X}}",
            r"devices\[0\].options: unknown Thorlabs sensor head 'S999X'; known: S120C",
        ),
        (
            "{name: a, driver: scpi, port: 5, resource: R}",
            r"devices\[0\].options: driver 'scpi' needs option 'parameter_map'",
        ),
        (
            "{name: a, driver: motor, port: 5, options: {name: b}}",
            r"devices\[0\].options.name: 'name' is set by the device's own name: key",
        ),
        (
            "{name: a, driver: motor, port: 5, resource: R}",
            r"devices\[0\].resource: driver 'motor' takes no resource",
        ),
    ],
)
def test_driver_options_are_checked_at_load(device, message):
    with pytest.raises(ConfigError, match=message):
        parse(f"devices:\n  - {device}\n")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read the lab file: No such file"):
        load_host_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_host_config(bad)


def test_limits_reach_the_config(tmp_path):
    path = tmp_path / "host.yaml"
    path.write_text(
        "limits: {max_queue_per_session: 7, max_wait_s: 30}\n"
        "devices: [{name: a, driver: motor, port: 5}]\n"
    )
    limits = load_host_config(path).limits
    assert (limits.max_queue_per_session, limits.max_wait_s) == (7, 30)
    assert limits.max_waiters == 1000  # the rest keep their defaults
