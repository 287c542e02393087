"""Configuration: embedded defaults work; every bad key names its path."""

import dataclasses

import pytest
import yaml

from appliance import config
from appliance.config import DmaLayout, DoorbellMode, NamespaceConfig, PortMode, checkers
from appliance.errors import ConfigError


def test_defaults(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    cfg = config.load()
    assert cfg.storage.socket == str(tmp_path / "run" / "appliance" / "nvme.sock")
    ns = cfg.storage.namespaces[0]
    assert ns.image == str(tmp_path / "data" / "appliance" / "disk0.img")
    assert ns.size == 1 << 30 and ns.block_size == 512
    assert cfg.net.responder.ip == "10.0.2.2/24"
    assert cfg.storage.guest_faults is False  # the guest arms no faults unless enabled


@pytest.mark.parametrize(("text", "message"), [
    ("storage: {sockett: x}", "storage.sockett: unknown key"),
    ("storage: {namespaces: [{image: a, block_size: 1000}]}",
     "storage.namespaces[0].block_size: must be one of 512, 4096"),
    ("storage: {namespaces: [{image: a, size: -3}]}", "storage.namespaces[0].size:"),
    ("net: {ports: [{socket: a, mac: 'zz'}]}", "net.ports[0].mac: must be a MAC"),
    ("net: {responder: {ip: 300.1.1.1}}", "net.responder.ip:"),
    ("net: {responder: {udp_echo_port: 70000}}", "net.responder.udp_echo_port:"),
    ("trace: yes please", "trace: must be true or false"),
    ("[1, 2]", "config: must be a mapping"),
    ("storage: {namespaces: [{size: 1G}]}", "storage.namespaces[0].image: required"),
    ("storage: {socket: /x}\ncontrol: {socket: /x}", "control.socket: same socket path"),
    ("storage: {namespaces: [{image: '{dta_dir}/a.img'}]}",
     ("storage.namespaces[0].image: unknown placeholder {dta_dir} in '{dta_dir}/a.img' "
      "(known: {data_dir}, {run_dir})")),
    ("control: {socket: '{run_dir.x}/c.sock'}", "control.socket: unknown placeholder {run_dir.x}"),
    ("net: {ports: [{socket: '{run_dir}/a', mac: '52:54:00:00:00:01', pcap: '{run_dir'}]}",
     "net.ports[0].pcap: unbalanced brace in '{run_dir'"),
    ("run_dir: '{data_dir}/run'", "run_dir: unknown placeholder {data_dir}"),
    ("storage: {namespaces: [{image: a, grow: 1}]}", "storage.namespaces[0].grow: must be true or false"),
])
def test_errors_name_the_key(tmp_path, text: str, message: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(str(f))
    assert message in str(info.value)


def test_bad_yaml_and_missing_file(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("storage: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        config.load(str(f))
    with pytest.raises(ConfigError, match="No such file"):
        config.load(str(tmp_path / "missing.yaml"))


def test_sizes() -> None:
    assert checkers.size("x", "512M") == 512 << 20
    assert checkers.size("x", "1GiB") == 1 << 30
    assert checkers.size("x", 4096) == 4096


def test_only_paths_are_expanded(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(f"run_dir: {tmp_path}/run\nstorage: {{serial: '{{x}}~', "
                 "namespaces: [{image: '{run_dir}/{{literal}}.img', grow: true}]}")
    cfg = config.load(str(f))
    assert cfg.storage.serial == "{x}~"  # not a path: taken as written
    ns = cfg.storage.namespaces[0]
    assert ns.image == f"{tmp_path}/run/{{literal}}.img" and ns.grow is True


def test_typed_values(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("storage: {dma_layout: u32-count, doorbells: mmap, guest_faults: true, "
                 "namespaces: [{image: a}]}\n"
                 "net: {ports: [{socket: /p, mac: '52:54:00:AB:00:01', mode: client}]}")
    cfg = config.load(str(f))
    assert cfg.storage.dma_layout is DmaLayout.U32_COUNT
    assert cfg.storage.doorbells is DoorbellMode.MMAP and cfg.storage.guest_faults is True
    assert cfg.storage.namespaces == (NamespaceConfig(image="a", size=1 << 30, block_size=512,
                                                      read_only=False, grow=False),)
    port = cfg.net.ports[0]
    assert port.mode is PortMode.CLIENT and port.mac == "52:54:00:ab:00:01" and port.pcap is None
    assert cfg.net.tap.name is None and cfg.control.idle_timeout == 300


def test_the_config_is_frozen() -> None:
    cfg = config.load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run_dir = "/elsewhere"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.storage.namespaces[0].size = 4096  # type: ignore[misc]
    with pytest.raises(TypeError):  # lists are tuples
        cfg.net.ports[0] = cfg.net.ports[0]  # type: ignore[index]
    assert hash(cfg) == hash(config.load())  # a value: equal configs hash alike


def test_round_trip_through_the_raw_form(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(f"run_dir: {tmp_path}/run\n"
                 "storage: {namespaces: [{image: '{run_dir}/{{literal}}.img', size: 8M}]}\n"
                 "net: {ports: [{socket: '{run_dir}/p0.sock', mac: '52:54:00:00:00:01', "
                 "pcap: '~/p0.pcap', mode: client}], tap: {name: tap0}}")
    cfg = config.load(str(f))
    raw = cfg.to_dict()
    assert config.Config.from_dict(raw) == cfg
    assert config.Config.from_dict(yaml.safe_load(yaml.safe_dump(raw))) == cfg  # as a child reads it
    assert raw["storage"]["namespaces"][0]["image"] == f"{tmp_path}/run/{{{{literal}}}}.img"
    assert raw["storage"]["doorbells"] == "message" and raw["net"]["ports"][0]["mode"] == "client"
    # a raw form already in canonical spelling comes back unchanged
    assert config.Config.from_dict(raw).to_dict() == raw
    canonical = config.load().to_dict()
    assert config.Config.from_dict(canonical).to_dict() == canonical


@pytest.mark.parametrize(("raw", "message"), [
    ({"storage": {"io_queues": "4"}}, "storage.io_queues: must be an integer from 1 to 64 (got '4')"),
    ({"storage": {"doorbells": True}}, "storage.doorbells: must be one of message, mmap (got True)"),
    ({"storage": {"guest_faults": "yes"}}, "storage.guest_faults: must be true or false (got 'yes')"),
    ({"storage": {"dma_layout": "SPEC"}},
     "storage.dma_layout: must be one of spec, u32-count (got 'SPEC')"),
    ({"net": {"ports": [{"socket": "/p", "mac": "52:54:00:00:00:01", "mode": ["server"]}]}},
     "net.ports[0].mode: must be one of server, client (got ['server'])"),
    ({"net": {"tap": "tap0"}}, "net.tap: must be a mapping (got str)"),
    ({"net": {"ports": {"socket": "/p"}}}, "net.ports: must be a list (got dict)"),
])
def test_a_wrong_type_is_one_line_naming_the_key(tmp_path, raw, message: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(raw))
    for load in (lambda: config.load(str(f)), lambda: config.Config.from_dict(raw)):
        with pytest.raises(ConfigError) as info:
            load()
        assert str(info.value) == message


def test_null_is_the_default(tmp_path) -> None:
    """A key given as null (``key:`` with nothing after it) has its default, as an
    absent one: a value never becomes None where the key has a default."""
    f = tmp_path / "c.yaml"
    f.write_text("trace:\nstorage: {io_queues: null, doorbells: null, serial: null, namespaces: null}\n"
                 "net: {max_backlog: null, tap: null, ports: [{socket: /p, mac: '52:54:00:00:00:01', "
                 "mode: null, pcap: null}]}\ncontrol: {idle_timeout: null}")
    cfg = config.load(str(f))
    defaults = config.load()
    assert cfg.storage == defaults.storage and cfg.control == defaults.control
    assert cfg.trace is False and cfg.net.max_backlog == 1 << 20 and cfg.net.tap.name is None
    assert cfg.net.ports[0].mode is PortMode.SERVER and cfg.net.ports[0].pcap is None


def test_braces_in_data_dir_and_run_dir_are_expanded_once(tmp_path) -> None:
    """``{{`` in data_dir or run_dir is a literal brace, as in every other path,
    and such a configuration goes through its raw form unchanged."""
    cfg = config.Config.from_dict({"data_dir": f"{tmp_path}/d{{{{1}}}}",
                                   "run_dir": f"{tmp_path}/r{{{{2}}}}"})
    assert cfg.data_dir == f"{tmp_path}/d{{1}}" and cfg.run_dir == f"{tmp_path}/r{{2}}"
    assert cfg.storage.socket == f"{tmp_path}/r{{2}}/nvme.sock"
    assert config.Config.from_dict(cfg.to_dict()) == cfg
