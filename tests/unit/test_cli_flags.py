"""The node's flags are generated from its settings: every setting but the secret one is a
flag, and each flag lands on its own setting (the real parser, the real loader)."""

from __future__ import annotations

import dataclasses

import pytest

from homenet.cli.main import _given, _parser
from homenet.node.settings import CliOption, Settings, cli_options, load_settings

EXAMPLES = {
    "bind": "127.0.0.1", "rl": "hn://127.0.0.1:7000", "allow": "127.0.0.1/32", "listen_id": "home1",
    "mdns_interface": "127.0.0.1", "mdns_types": "_ssh._tcp", "log_level": "debug", "log_format": "json",
    "rl_auth": "open", "connect_auth": "all", "query_auth": "open", "advertise": "198.51.100.1:6969",
    "tls_ca": "/x/ca.pem", "peers": "127.0.0.2:7000", "peers_dns": "relays.example", "keys_file": "/x/keys.toml",
    "state_dir": "/x/state", "name": "n1", "health_bind": "127.0.0.2", "worker_accept": "shared",
    "metrics_bind": "127.0.0.1:9469", "metrics_auth": "none", "http_domain": "relay.example.net",
}  # fmt: skip


def test_every_setting_but_the_key_is_a_flag() -> None:
    names = {o.name for o in cli_options()}
    assert names == {f.name for f in dataclasses.fields(Settings)} - {"key"}


@pytest.mark.parametrize("opt", cli_options(), ids=lambda o: o.flag)
def test_each_flag_lands_on_its_setting(opt: CliOption) -> None:
    field = next(f for f in dataclasses.fields(Settings) if f.name == opt.name)
    kind = str(field.type)
    want: object
    if kind == "bool":
        argv, want = [opt.flag], False
    elif opt.name in EXAMPLES:
        argv, want = [opt.flag, EXAMPLES[opt.name]], EXAMPLES[opt.name]
    elif "int" in kind:
        argv, want = [opt.flag, "7"], 7
    elif "float" in kind:
        argv, want = [opt.flag, "7.5"], 7.5
    else:
        argv, want = [opt.flag, "/x/file.pem"], "/x/file.pem"
    if opt.name in ("tls_cert", "tls_key"):  # they go together
        argv += ["--tls-key" if opt.name == "tls_cert" else "--tls-cert", "/x/other.pem"]
    if opt.name in ("peers", "peers_dns"):  # peering needs the fleet key
        argv += ["--fleet-key-file", "/x/fleet.key"]
    args = _parser().parse_args(["node", *argv])
    settings = load_settings(_given(args), env={})
    got = getattr(settings, opt.name)
    assert got == ((want,) if kind.startswith("tuple") else want)


def test_rl_offers_only_its_own_settings() -> None:
    args = _parser().parse_args(["rl", "hn://127.0.0.1", "--to", "127.0.0.1:22", "--pool-size", "2"])
    assert set(_given(args, rl_only=True)) == {o.name for o in cli_options() if o.rl}
    with pytest.raises(SystemExit):
        _parser().parse_args(["rl", "hn://127.0.0.1", "--to", "127.0.0.1:22", "--allow", "lan"])
