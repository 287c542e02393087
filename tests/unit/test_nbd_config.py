"""NBD URIs as a namespace's image: parsing, the config's checks, the size default."""

from __future__ import annotations

import re

import pytest
import yaml

from appliance import config
from appliance.errors import ConfigError
from appliance.nbd.uri import NbdUri, is_nbd_uri, parse


@pytest.mark.parametrize(("text", "uri"), [
    ("nbd+unix:///disk?socket=/run/nbd.sock", NbdUri("disk", socket="/run/nbd.sock")),
    ("nbd+unix:///?socket=/s", NbdUri("", socket="/s")),
    ("nbd://10.0.0.2/vol%201", NbdUri("vol 1", host="10.0.0.2", port=10809)),
    ("nbd://[::1]:1234/x", NbdUri("x", host="::1", port=1234)),
])
def test_uris_parse_and_print_back(text: str, uri: NbdUri) -> None:
    assert parse(text) == uri and parse(str(uri)) == uri and is_nbd_uri(text)


@pytest.mark.parametrize(("text", "why"), [
    ("nbds://host/x", "no TLS"),
    ("nbd+unix:///x", "needs one ?socket=PATH"),
    ("nbd+unix:///x?socket=/a&socket=/b", "needs one ?socket=PATH"),
    ("nbd+unix://host/x?socket=/a", "takes no host"),
    ("nbd+unix:///x?socket=/a&tls=on", "unknown query parameter 'tls'"),
    ("nbd://host/x?socket=/a", "takes none"),
    ("nbd:///x", "needs a host"),
    ("nbd://u:p@host/x", "no user name"),
    ("nbd://host:99999/x", "not an NBD URI"),
    ("nbd://host/x#frag", "no #fragment"),
    ("nbd://host/" + "e" * 4097, "longer than 4096"),
])
def test_bad_uris_say_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        parse(text)


def load(namespaces: list[dict[str, object]]) -> config.Config:
    return config.load(overrides={"storage": {"namespaces": namespaces}})


def test_an_nbd_image_takes_the_exports_size_a_file_1g() -> None:
    cfg = load([{"image": "nbd+unix:///d?socket={run_dir}/n.sock"}, {"image": "/tmp/a.img"},
                {"image": "nbd://127.0.0.1/d", "size": "64M"}])
    nbd, local, sized = cfg.storage.namespaces
    assert (nbd.size, nbd.remote) == (0, True)
    assert nbd.image == "nbd+unix:///d?socket={run_dir}/n.sock"  # a URI is kept as written
    assert (local.size, local.remote) == (1 << 30, False)
    assert sized.size == 64 << 20
    raw = cfg.to_dict()
    assert raw["storage"]["namespaces"][0]["size"] is None
    assert config.Config.from_dict(yaml.safe_load(yaml.safe_dump(raw))) == cfg


def test_a_bad_uri_is_one_line_naming_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        load([{"image": "/tmp/a.img"}, {"image": "nbds+unix:///d?socket=/s"}])
    assert str(err.value) == ("storage.namespaces[1].image: scheme 'nbds+unix' not one of nbd, "
                              "nbd+unix (no TLS) (got 'nbds+unix:///d?socket=/s')")
