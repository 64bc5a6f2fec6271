"""TargetPolicy decisions on values: what a node may dial for a direct ``ip:port`` hop."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import pytest

from homenet.node.policy import (
    GUARDED,
    METADATA,
    IPAddress,
    IPNetwork,
    PolicyError,
    TargetPolicy,
    normalise,
    parse_rule,
)

LAN = (ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("fd12:3456::/64"))


def fake_lan() -> Iterable[IPNetwork]:
    """Stands in for interface enumeration: fixed networks, no host state."""
    return LAN


def no_lan() -> Iterable[IPNetwork]:
    raise AssertionError("the lan callable must only be called for the 'lan' rule")


def policy(*specs: str) -> TargetPolicy:
    return TargetPolicy.from_specs(specs, lan=fake_lan)


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def verdict(specs: tuple[str, ...], addr: str, port: int = 22) -> str:
    """'allow', or the refusal message."""
    try:
        policy(*specs).check(ip(addr), port)
    except PolicyError as exc:
        return str(exc)
    return "allow"


ANY4 = ("0.0.0.0/0",)
ANY6 = ("::/0",)
ANY = ("0.0.0.0/0", "::/0")

# (allow rules, address, expected: "allow" or a fragment of the refusal)
MATRIX: list[tuple[tuple[str, ...], str, str]] = [
    # default deny
    ((), "192.168.1.20", "not allowed here"),
    ((), "8.8.8.8", "not allowed here"),
    ((), "2001:db8::1", "not allowed here"),
    ((), "127.0.0.1", "loopback"),
    ((), "169.254.169.254", "cloud metadata"),
    # plain CIDR rules
    (("192.168.1.0/24",), "192.168.1.20", "allow"),
    (("192.168.1.0/24",), "192.168.1.0", "allow"),
    (("192.168.1.0/24",), "192.168.1.255", "allow"),
    (("192.168.1.0/24",), "192.168.2.1", "not allowed here"),
    (("192.168.1.20",), "192.168.1.20", "allow"),
    (("192.168.1.20",), "192.168.1.21", "not allowed here"),
    (("192.168.1.7/24",), "192.168.1.99", "allow"),  # host bits are ignored
    (("10.0.0.0/8", "172.16.0.0/12"), "172.31.255.1", "allow"),
    (("2001:db8::/32",), "2001:db8:1::1", "allow"),
    (("2001:db8::/32",), "2001:db9::1", "not allowed here"),
    (ANY4, "8.8.8.8", "allow"),
    (ANY4, "2001:db8::1", "not allowed here"),  # an IPv4 rule never opens IPv6
    (ANY6, "2001:db8::1", "allow"),
    (ANY6, "8.8.8.8", "not allowed here"),
    (ANY6, "::ffff:8.8.8.8", "not allowed here"),  # mapped is IPv4: judged by IPv4 rules
    (ANY4, "::ffff:8.8.8.8", "allow"),
    # guarded ranges under the broadest rules
    (ANY, "127.0.0.1", "loopback"),
    (ANY, "127.255.255.254", "loopback"),
    (ANY, "::1", "loopback"),
    (ANY, "169.254.1.1", "link-local"),
    (ANY, "fe80::1", "link-local"),
    (ANY, "febf:ffff::1", "link-local"),
    (ANY, "0.0.0.0", "unspecified"),
    (ANY, "0.1.2.3", "unspecified"),
    (ANY, "::", "unspecified"),
    (ANY, "224.0.0.251", "multicast"),
    (ANY, "239.255.255.250", "multicast"),
    (ANY, "ff02::fb", "multicast"),
    (ANY, "255.255.255.255", "broadcast"),
    (ANY, "169.254.169.254", "cloud metadata"),
    (ANY, "fd00:ec2::254", "cloud metadata"),
    (ANY, "100.100.100.200", "cloud metadata"),
    (ANY, "168.63.129.16", "cloud metadata"),
    # ... while their neighbours are ordinary
    (ANY, "168.63.129.17", "allow"),
    (ANY, "100.100.100.201", "allow"),
    (ANY, "fd00:ec2::253", "allow"),
    (ANY, "128.0.0.1", "allow"),
    (ANY, "254.255.255.255", "allow"),
    (ANY, "fec0::1", "allow"),
    # broad private rules do not open guarded addresses inside them
    (("100.64.0.0/10",), "100.100.100.200", "cloud metadata"),
    (("100.64.0.0/10",), "100.100.100.199", "allow"),
    (("fd00::/8",), "fd00:ec2::254", "cloud metadata"),
    (("fd00::/8",), "fd00:ec2::1", "allow"),
    (("168.63.0.0/16",), "168.63.129.16", "cloud metadata"),
    # guarded ranges open only when a rule names them (a rule inside the guarded range)
    (("127.0.0.1/32",), "127.0.0.1", "allow"),
    (("127.0.0.1",), "127.0.0.1", "allow"),
    (("127.0.0.1/32",), "127.0.0.2", "loopback"),
    (("127.0.0.0/8",), "127.3.2.1", "allow"),
    (("127.0.0.0/7",), "127.0.0.1", "loopback"),  # wider than loopback: not naming it
    (("::1/128",), "::1", "allow"),
    (("169.254.0.0/16",), "169.254.1.1", "allow"),
    (("fe80::/10",), "fe80::1", "allow"),
    (("fe80::/64",), "fe80::1", "allow"),
    (("224.0.0.0/4",), "224.0.0.251", "allow"),
    (("255.255.255.255/32",), "255.255.255.255", "allow"),
    (("0.0.0.0/8",), "0.0.0.0", "allow"),
    # metadata endpoints only when named exactly
    (("169.254.0.0/16",), "169.254.169.254", "cloud metadata"),
    (("169.254.169.0/24",), "169.254.169.254", "cloud metadata"),
    (("169.254.169.254/32",), "169.254.169.254", "allow"),
    (("169.254.169.254",), "169.254.169.254", "allow"),
    (("fd00:ec2::254/128",), "fd00:ec2::254", "allow"),
    (("fd00:ec2::/64",), "fd00:ec2::254", "cloud metadata"),
    (("100.100.100.200/32",), "100.100.100.200", "allow"),
    (("168.63.129.16/32",), "168.63.129.16", "allow"),
    # IPv4 hidden in IPv6 spellings is judged as the IPv4 it carries
    (ANY, "::ffff:127.0.0.1", "loopback"),
    (ANY, "::ffff:169.254.169.254", "cloud metadata"),
    (ANY, "::127.0.0.1", "loopback"),  # IPv4-compatible
    (ANY, "::7f00:1", "loopback"),
    (ANY, "::a9fe:a9fe", "cloud metadata"),
    (ANY, "64:ff9b::7f00:1", "loopback"),  # NAT64
    (ANY, "64:ff9b::169.254.169.254", "cloud metadata"),
    (ANY, "64:ff9b::0.0.0.0", "unspecified"),
    (ANY, "::ffff:0.0.0.0", "unspecified"),
    (("127.0.0.1/32",), "::ffff:127.0.0.1", "allow"),
    (("127.0.0.1/32",), "64:ff9b::7f00:1", "allow"),
    (("::ffff:127.0.0.1/128",), "127.0.0.1", "allow"),
    (("::ffff:127.0.0.0/104",), "127.9.9.9", "allow"),
    (("::ffff:0:0/96",), "8.8.8.8", "allow"),
    (("::ffff:0:0/96",), "127.0.0.1", "loopback"),
    (("64:ff9b::/96",), "127.0.0.1", "loopback"),
    (("192.168.1.0/24",), "::ffff:192.168.1.20", "allow"),
    (("192.168.1.0/24",), "64:ff9b::192.168.1.20", "allow"),
    (("fe80::1/128",), "fe80::1%eth0", "allow"),  # zone ids are dropped
    # lan
    (("lan",), "192.168.1.20", "allow"),
    (("lan",), "fd12:3456::9", "allow"),
    (("lan",), "192.168.2.20", "not allowed here"),
    (("LAN",), "192.168.1.20", "allow"),
    ((" lan ",), "192.168.1.20", "allow"),
    (("lan", "127.0.0.1/32"), "127.0.0.1", "allow"),
]


@pytest.mark.parametrize(("specs", "addr", "want"), MATRIX, ids=[f"{'+'.join(s) or 'none'}->{a}" for s, a, _ in MATRIX])
def test_policy_matrix(specs: tuple[str, ...], addr: str, want: str) -> None:
    got = verdict(specs, addr)
    if want == "allow":
        assert got == "allow"
    else:
        assert got != "allow"
        assert want in got


def test_guarded_refusal_names_the_range_to_allow() -> None:
    assert (
        verdict(ANY, "127.0.0.1", 22)
        == "127.0.0.1:22 is loopback; allowed only if named explicitly (--allow 127.0.0.0/8)"
    )
    assert "--allow 169.254.169.254/32" in verdict(ANY, "169.254.169.254", 80)
    assert verdict((), "10.0.0.1", 80) == "10.0.0.1:80 is not allowed here (the node operator can add --allow CIDR)"
    assert verdict((), "2001:db8::1", 80).startswith("[2001:db8::1]:80 ")


def test_refusal_names_the_normalised_address() -> None:
    assert verdict(ANY, "::ffff:127.0.0.1", 22).startswith("127.0.0.1:22 is loopback")


@pytest.mark.parametrize(("net", "kind"), [(n, k) for n, k in GUARDED], ids=[str(n) for n, _ in GUARDED])
def test_every_guarded_range_is_closed_to_any_and_opened_by_itself(net: IPNetwork, kind: str) -> None:
    addr = net.network_address if net.num_addresses == 1 else net.network_address + 1
    port = 8080
    broad = TargetPolicy.from_specs(["0.0.0.0/0", "::/0"], lan=no_lan)
    with pytest.raises(PolicyError, match=kind):
        broad.check(addr, port)
    TargetPolicy.from_specs([str(net)], lan=no_lan).check(addr, port)


def test_metadata_endpoints_are_guarded_first() -> None:
    kinds = dict(GUARDED)
    assert all(kinds[n] == "cloud metadata" for n in METADATA)
    assert [n for n, _ in GUARDED[: len(METADATA)]] == list(METADATA)


# -- normalise -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::ffff:7f00:1", "127.0.0.1"),
        ("::127.0.0.1", "127.0.0.1"),
        ("::2", "0.0.0.2"),
        ("64:ff9b::7f00:1", "127.0.0.1"),
        ("64:ff9b::808:808", "8.8.8.8"),
        ("::", "::"),
        ("::1", "::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("64:ff9b:1::7f00:1", "64:ff9b:1::7f00:1"),  # not the well-known /96
        ("fe80::1%eth0", "fe80::1"),
    ],
)
def test_normalise(text: str, want: str) -> None:
    got = normalise(ip(text))
    assert got == ip(want)
    assert str(got) == want


# -- parse_rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "nets"),
    [
        ("192.168.1.0/24", ["192.168.1.0/24"]),
        (" 10.0.0.0/8 ", ["10.0.0.0/8"]),
        ("10.1.2.3", ["10.1.2.3/32"]),
        ("10.1.2.3/8", ["10.0.0.0/8"]),
        ("::1", ["::1/128"]),
        ("2001:db8::/32", ["2001:db8::/32"]),
        ("::ffff:10.0.0.0/104", ["10.0.0.0/8"]),
        ("::ffff:10.1.2.3", ["10.1.2.3/32"]),
        ("64:ff9b::a00:0/104", ["10.0.0.0/8"]),
        ("lan", ["192.168.1.0/24", "fd12:3456::/64"]),
        ("Lan", ["192.168.1.0/24", "fd12:3456::/64"]),
    ],
)
def test_parse_rule(spec: str, nets: list[str]) -> None:
    assert parse_rule(spec, fake_lan) == [ipaddress.ip_network(n) for n in nets]


@pytest.mark.parametrize(
    "spec",
    ["", " ", "lan2", "local", "10.0.0.0/33", "::/129", "10.0.0", "10.0.0.0/8/8", "300.0.0.1", "host.example", "*"],
)
def test_bad_rules(spec: str) -> None:
    with pytest.raises(ValueError, match="bad --allow"):
        parse_rule(spec, no_lan)


def test_from_specs_collects_every_rule_in_order() -> None:
    pol = TargetPolicy.from_specs(["10.0.0.0/8", "lan", "::1"], lan=fake_lan)
    assert pol.allow == (
        ipaddress.ip_network("10.0.0.0/8"),
        *LAN,
        ipaddress.ip_network("::1/128"),
    )
    assert pol.own == ()


def test_from_specs_rejects_a_bad_spec() -> None:
    with pytest.raises(ValueError, match="'nope'"):
        TargetPolicy.from_specs(["10.0.0.0/8", "nope"], lan=no_lan)


def test_lan_callable_is_only_consulted_for_lan() -> None:
    calls: list[int] = []

    def counting() -> Iterable[IPNetwork]:
        calls.append(1)
        return LAN

    TargetPolicy.from_specs(["10.0.0.0/8", "::/0"], lan=counting)
    assert calls == []
    TargetPolicy.from_specs(["lan"], lan=counting)
    assert calls == [1]


def test_empty_lan_allows_nothing() -> None:
    pol = TargetPolicy.from_specs(["lan"], lan=list)
    assert pol.allow == ()
    with pytest.raises(PolicyError):
        pol.check(ip("192.168.1.1"), 22)


# -- the node's own endpoint -----------------------------------------------------------------


OWN: list[tuple[str, int, str, int, bool]] = [
    # own addr, own port, target, target port, refused as own
    ("192.168.1.5", 6969, "192.168.1.5", 6969, True),
    ("192.168.1.5", 6969, "::ffff:192.168.1.5", 6969, True),
    ("192.168.1.5", 6969, "192.168.1.5", 22, False),
    ("192.168.1.5", 6969, "192.168.1.6", 6969, False),
    ("127.0.0.1", 6969, "127.0.0.1", 6969, True),
    ("127.0.0.1", 6969, "127.0.0.2", 6969, False),
    ("0.0.0.0", 6969, "127.0.0.1", 6969, True),
    ("0.0.0.0", 6969, "127.8.9.10", 6969, True),
    ("0.0.0.0", 6969, "::1", 6969, True),
    ("0.0.0.0", 6969, "0.0.0.0", 6969, True),
    ("0.0.0.0", 6969, "::ffff:127.0.0.1", 6969, True),
    ("0.0.0.0", 6969, "127.0.0.1", 6970, False),
    ("::", 6969, "127.0.0.1", 6969, True),
    ("::", 6969, "::1", 6969, True),
    ("::ffff:127.0.0.1", 6969, "127.0.0.1", 6969, True),
    ("::1", 7000, "::1", 7000, True),
]


@pytest.mark.parametrize(("own", "own_port", "addr", "port", "refused"), OWN)
def test_with_own(own: str, own_port: int, addr: str, port: int, refused: bool) -> None:
    # every address in the table is allowed by these rules, so only "own" can refuse
    pol = policy("127.0.0.0/8", "::1/128", "0.0.0.0/8", "192.168.1.0/24").with_own(ip(own), own_port)
    if refused:
        with pytest.raises(PolicyError, match="this node's own listener"):
            pol.check(ip(addr), port)
    else:
        pol.check(ip(addr), port)


def test_with_own_keeps_rules_and_stacks() -> None:
    base = policy("10.0.0.0/8")
    pol = base.with_own(ip("10.0.0.1"), 1).with_own(ip("::ffff:10.0.0.2"), 2)
    assert pol.allow == base.allow
    assert pol.own == ((ip("10.0.0.1"), 1), (ip("10.0.0.2"), 2))
    assert base.own == ()  # the original is unchanged
    for addr, port in (("10.0.0.1", 1), ("10.0.0.2", 2)):
        with pytest.raises(PolicyError, match="own listener"):
            pol.check(ip(addr), port)
    pol.check(ip("10.0.0.1"), 2)


def test_own_check_applies_even_without_allow_rules() -> None:
    pol = TargetPolicy().with_own(ip("0.0.0.0"), 6969)
    with pytest.raises(PolicyError, match="own listener"):
        pol.check(ip("127.0.0.1"), 6969)
    with pytest.raises(PolicyError, match="loopback"):
        pol.check(ip("127.0.0.1"), 22)


def test_a_wildcard_listener_is_reached_by_any_address_the_host_has_now() -> None:
    """The host's addresses are asked at check time: one added after start counts too."""
    addresses = {ip("192.168.1.5")}
    pol = TargetPolicy.from_specs(["10.0.0.0/8", "192.168.0.0/16"])
    pol = TargetPolicy(pol.allow, pol.own, lambda: frozenset(addresses)).with_own(ip("0.0.0.0"), 6969)
    with pytest.raises(PolicyError, match="own listener"):
        pol.check(ip("192.168.1.5"), 6969)
    pol.check(ip("10.1.2.3"), 6969)  # not ours (yet)
    addresses.add(ip("10.1.2.3"))  # a new address (DHCP, a VPN coming up)
    with pytest.raises(PolicyError, match="own listener"):
        pol.check(ip("10.1.2.3"), 6969)
    pol.check(ip("10.1.2.3"), 22)  # another port of the host is the operator's business
