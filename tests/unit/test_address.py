"""``hn://`` URLs, hops and host:port endpoints: parsing is pure and strict."""

from __future__ import annotations

import re

import pytest

from homenet.node.address import (
    DEFAULT_PORT,
    MAX_HOPS,
    AddressError,
    Endpoint,
    ListenId,
    Route,
    parse_endpoint,
    parse_hop,
    parse_port,
    parse_url,
)

LABEL63 = "a" * 63
HOST253 = ".".join([LABEL63, LABEL63, LABEL63, "b" * 61])
assert len(HOST253) == 253


# -- URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "route"),
    [
        (
            "hn://relay.example.net/home1/192.168.1.20:22",
            Route(Endpoint("relay.example.net", DEFAULT_PORT), (ListenId("home1"), Endpoint("192.168.1.20", 22))),
        ),
        ("hn://relay.example.net/home1", Route(Endpoint("relay.example.net", 6969), (ListenId("home1"),))),
        ("hn://relay", Route(Endpoint("relay", 6969), ())),
        ("hn://relay/", Route(Endpoint("relay", 6969), ())),
        ("hn://relay/home1/", Route(Endpoint("relay", 6969), (ListenId("home1"),))),
        ("hn://127.0.0.1:7000/a", Route(Endpoint("127.0.0.1", 7000), (ListenId("a"),))),
        ("hns://relay:443/a", Route(Endpoint("relay", 443), (ListenId("a"),), tls=True)),
        ("hn://[::1]:7000/a", Route(Endpoint("::1", 7000), (ListenId("a"),))),
        ("hn://[::1]/a", Route(Endpoint("::1", 6969), (ListenId("a"),))),
        ("hn://[2001:DB8::1]/x", Route(Endpoint("2001:db8::1", 6969), (ListenId("x"),))),
        ("hn://Relay.Example.NET./a", Route(Endpoint("relay.example.net", 6969), (ListenId("a"),))),
        (
            "hn://r/a/b/[fe80::1]:22",
            Route(Endpoint("r", 6969), (ListenId("a"), ListenId("b"), Endpoint("fe80::1", 22))),
        ),
        ("hn://r/nas.local:445", Route(Endpoint("r", 6969), (Endpoint("nas.local", 445),))),
        ("hn://r/NAS.Local:445", Route(Endpoint("r", 6969), (Endpoint("nas.local", 445),))),
        ("hn://relay:/a", Route(Endpoint("relay", 6969), (ListenId("a"),))),  # empty port: default (RFC 3986)
        ("hn://r/" + "/".join(["x"] * MAX_HOPS), Route(Endpoint("r", 6969), (ListenId("x"),) * MAX_HOPS)),
    ],
)
def test_parse_url(url: str, route: Route) -> None:
    assert parse_url(url) == route


def test_default_port_is_the_contract() -> None:
    assert DEFAULT_PORT == 6969
    assert MAX_HOPS == 8


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("relay/home1", "expected hn://"),
        ("http://relay/home1", "expected hn://"),
        ("HN://relay/home1", "expected hn://"),
        ("hn:/relay/home1", "expected hn://"),
        ("hn:///home1", "missing host"),
        ("hn://", "missing host"),
        ("hn://relay//home1", "empty hop"),
        ("hn://relay/home1//", "empty hop"),
        ("hn://relay/a//b", "empty hop"),
        ("hn://relay/" + "/".join(["x"] * (MAX_HOPS + 1)), "more than 8 hops"),
        ("hn://relay:0/a", "1-65535"),
        ("hn://relay:65536/a", "1-65535"),
        ("hn://relay:http/a", "1-65535"),
        ("hn://relay:-1/a", "1-65535"),
        ("hn://relay: 22/a", "1-65535"),
        ("hn://relay:123456/a", "1-65535"),
        ("hn://:22/a", "bad host"),
        ("hn://user@relay/a", "bad host"),
        ("hn://relay/home 1", "bad hop"),
        ("hn://relay/home1?x=1", "bad hop"),
        ("hn://relay/home1#frag", "bad hop"),
        ("hn://relay/host.example", "bad hop"),
        ("hn://relay/a/host:0", "1-65535"),
        ("hn://[::1/a", "missing ']'"),
        ("hn://[fe80::1%eth0]:22/a", "zone ids"),
        ("hn://relay/[fe80::1%25eth0]:22", "zone ids"),
        ("hn://relay/[::1]", "expected [IPv6]:port"),
        ("hn://relay/::1:22", "[addr]:port"),
        ("hn://2130706433/a", "bad host"),
    ],
)
def test_bad_urls(url: str, why: str) -> None:
    with pytest.raises(AddressError, match=re.escape(why)):
        parse_url(url)


def test_address_error_is_a_value_error() -> None:
    assert issubclass(AddressError, ValueError)


@pytest.mark.parametrize(
    "url",
    [
        "hn://relay.example.net:6969/home1/192.168.1.20:22",
        "hns://relay:443/a/b/c",
        "hn://[::1]:7000/a/[2001:db8::5]:8080",
        "hn://10.0.0.1:1/x_y-Z/nas.local:445",
        "hn://r:6969",
    ],
)
def test_str_round_trip(url: str) -> None:
    route = parse_url(url)
    assert str(route) == url
    assert parse_url(str(route)) == route


def test_str_spells_the_default_port() -> None:
    route = parse_url("hn://relay/home1")
    assert str(route) == "hn://relay:6969/home1"
    assert parse_url(str(route)) == route


def test_route_prefix() -> None:
    route = parse_url("hns://relay.example.net/home1/192.168.1.20:22")
    assert route.prefix(1) == Route(Endpoint("relay.example.net", 6969), (ListenId("home1"),), tls=True)
    assert str(route.prefix(1)) == "hns://relay.example.net:6969/home1"
    assert route.prefix(0).hops == ()
    assert route.prefix(2) == route
    assert route.prefix(99) == route


# -- hops ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["a", "Z", "0", "home1", "a_b-C", "-", "_", "x" * 64, "22"])
def test_listen_ids(text: str) -> None:
    hop = parse_hop(text)
    assert hop == ListenId(text)
    assert str(hop) == text


@pytest.mark.parametrize("text", ["", "x" * 65, "a.b", "a b", "a+b", "hôme", "a/b", "a@b", "a\n", "é"])
def test_bad_listen_ids(text: str) -> None:
    with pytest.raises(AddressError, match="bad hop"):
        parse_hop(text)


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("192.168.1.20:22", Endpoint("192.168.1.20", 22)),
        ("[::1]:22", Endpoint("::1", 22)),
        ("[::ffff:127.0.0.1]:22", Endpoint("::ffff:7f00:1", 22)),
        ("nas.local:445", Endpoint("nas.local", 445)),
        ("a:1", Endpoint("a", 1)),
        ("a:65535", Endpoint("a", 65535)),
    ],
)
def test_endpoint_hops(text: str, endpoint: Endpoint) -> None:
    assert parse_hop(text) == endpoint


# -- endpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "default", "endpoint"),
    [
        ("1.2.3.4:5", None, Endpoint("1.2.3.4", 5)),
        ("1.2.3.4", 99, Endpoint("1.2.3.4", 99)),
        ("[::1]", 99, Endpoint("::1", 99)),
        ("[0:0::1]:8", None, Endpoint("::1", 8)),
        ("Host-1.Example.com:80", None, Endpoint("host-1.example.com", 80)),
        ("example.com.:80", None, Endpoint("example.com", 80)),
        ("localhost", 1, Endpoint("localhost", 1)),
        ("1.2.3.com:80", None, Endpoint("1.2.3.com", 80)),
        (HOST253 + ":1", None, Endpoint(HOST253, 1)),
        (LABEL63 + ".x:1", None, Endpoint(LABEL63 + ".x", 1)),
    ],
)
def test_parse_endpoint(text: str, default: int | None, endpoint: Endpoint) -> None:
    assert parse_endpoint(text, default) == endpoint


@pytest.mark.parametrize(
    "text",
    [
        "1.2.3.4",  # no port and no default
        "host",
        "[::1]",
        ":22",
        "host:",
        "host:0",
        "host:65536",
        "host:99999",
        "host:abc",
        "host:2a",
        "host:+22",
        "host:-22",
        "host:0x16",
        "host: 22",
        "host:022222",
        "[::1]22",
        "[::1]:",
        "[::1]:0",
        "[nope]:22",
        "[1.2.3.4]:22",
        "[::1:22",
        "::1:22",
        "fe80::1:22",
        "[fe80::1%eth0]:22",
        "[fe80::1%1]:22",
        "a..b:1",
        ".a:1",
        "-a.com:1",
        "a-.com:1",
        "a_b.com:1",
        "a b:1",
        "hôst:1",
        "a" * 64 + ".com:1",
        HOST253 + "c:1",  # 254 characters
        "user@host:1",
        "host/x:1",
        # alternative numeric spellings of IPv4 must not pass as host names
        "2130706433:22",
        "0177.0.0.1:22",
        "127.1:22",
        "127.0.1:22",
        "127.000.000.001:22",
        "1.2.3.4.5:22",
        "01.2.3.4:22",
        "256.0.0.1:22",
        "127.0.0.1.:22",
    ],
)
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(AddressError):
        parse_endpoint(text)


@pytest.mark.parametrize("text", ["0x7f.0.0.1:22", "0x7f000001:22", "0X7F.1:22", "017700000001:22", "0x7f.0x0.0.1:22"])
def test_hex_ipv4_spellings_are_refused(text: str) -> None:
    # resolvers (inet_aton) read these as 127.0.0.1: they are not host names
    with pytest.raises(AddressError, match="bad host"):
        parse_endpoint(text)


@pytest.mark.parametrize("text", ["0x7f.0.0.1.:22", "0x7f000001.:22", "0X7F.1.:22"])
def test_hex_ipv4_spellings_with_a_trailing_dot_are_refused(text: str) -> None:
    with pytest.raises(AddressError, match="bad host"):
        parse_endpoint(text)


@pytest.mark.parametrize("text", ["0x7f.example.com:22", "0xdead.beef:22", "a0x7f.0.0.1:22", "1.2.3.com:22"])
def test_hex_looking_names_are_still_names(text: str) -> None:
    assert parse_endpoint(text).host == text.rsplit(":", 1)[0]


@pytest.mark.parametrize(("text", "port"), [("1", 1), ("22", 22), ("6969", 6969), ("65535", 65535), ("00022", 22)])
def test_parse_port(text: str, port: int) -> None:
    assert parse_port(text) == port


@pytest.mark.parametrize("text", ["", "0", "00000", "65536", "123456", "-1", "+1", "1.0", "1e3", " 1", "x"])
def test_bad_ports(text: str) -> None:
    with pytest.raises(AddressError, match="expected a number 1-65535"):
        parse_port(text)


def test_bad_port_names_what() -> None:
    with pytest.raises(AddressError, match="bad listen port '0'"):
        parse_port("0", "listen port")


@pytest.mark.parametrize("text", ["²", "٦٩", "６９", "2²"])
def test_non_ascii_digits_are_not_ports(text: str) -> None:
    # str.isdigit() is true for these; int() refuses some and reads others
    with pytest.raises(AddressError, match="expected a number 1-65535"):
        parse_port(text)
    with pytest.raises(AddressError):
        parse_url(f"hn://relay:{text}/a")


def test_endpoint_str_and_is_ip() -> None:
    assert str(Endpoint("1.2.3.4", 5)) == "1.2.3.4:5"
    assert str(Endpoint("::1", 5)) == "[::1]:5"
    assert str(Endpoint("example.com", 5)) == "example.com:5"
    assert Endpoint("1.2.3.4", 5).is_ip
    assert Endpoint("::1", 5).is_ip
    assert not Endpoint("example.com", 5).is_ip


@pytest.mark.parametrize("text", ["1.2.3.4:5", "[::1]:5", "[2001:db8::1]:443", "example.com:5"])
def test_endpoint_str_round_trip(text: str) -> None:
    ep = parse_endpoint(text)
    assert str(ep) == text
    assert parse_endpoint(str(ep)) == ep


def test_values_are_frozen_and_hashable() -> None:
    route = parse_url("hn://r/a/1.2.3.4:5")
    assert hash(route) == hash(parse_url("hn://r/a/1.2.3.4:5"))
    with pytest.raises(AttributeError):
        route.tls = True  # type: ignore[misc]
