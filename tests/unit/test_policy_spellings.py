"""Policy matrix, continued: one address has one verdict however it is spelled or resolved.

* legacy IPv4 spellings (decimal, hex, octal, short forms) are refused as host names by the
  address parser, before any resolver could read them as addresses;
* IPv4 carried in IPv6 (mapped, compatible, NAT64) gets exactly the verdict of the IPv4 address,
  under every set of allow rules;
* host names that resolve to guarded addresses (through an injected resolver: no real DNS) are
  refused, and only checked addresses reach the connect step (replaced here: nothing is dialed).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homenet.node import dialer as dialer_mod
from homenet.node.address import AddressError, Endpoint, parse_hop
from homenet.node.dialer import Dialer, DialError
from homenet.node.errors import Code
from homenet.node.policy import IPAddress, IPNetwork, PolicyError, TargetPolicy, normalise

LAN = (ipaddress.ip_network("10.0.0.0/8"),)


def lan() -> Iterable[IPNetwork]:
    return LAN


def verdict(rules: tuple[str, ...], addr: IPAddress, port: int = 80) -> str:
    """'allow', or the refusal with the address part cut off (it names the normalised address)."""
    try:
        TargetPolicy.from_specs(rules, lan=lan).check(addr, port)
    except PolicyError as exc:
        return str(exc).split(" ", 1)[1]
    return "allow"


# -- legacy IPv4 spellings never pass as host names -------------------------------------------------


def legacy_spellings(v4: str) -> list[str]:
    """Spellings that inet_aton (and so many resolvers) read as ``v4``; never the dotted quad."""
    a, b, c, d = (int(x) for x in v4.split("."))
    n = int(ipaddress.IPv4Address(v4))
    out = {
        str(n),  # decimal: 2130706433
        hex(n),  # 0x7f000001
        "0X" + f"{n:X}",
        "0" + f"{n:o}",  # 017700000001
        f"0{a:o}.0{b:o}.0{c:o}.0{d:o}",  # 0177.00.00.01
        f"{hex(a)}.{hex(b)}.{hex(c)}.{hex(d)}",  # 0x7f.0x0.0x0.0x1
        f"{a}.{b}.{(c << 8) | d}",  # 127.0.1
        f"{a}.{(b << 16) | (c << 8) | d}",  # 127.1
        f"{hex(a)}.{(b << 16) | (c << 8) | d}",  # 0x7f.1
        f"0{a:o}.{b}.{c}.{d}",  # 0177.0.0.1
    }
    out.discard(v4)
    return sorted(out)


GUARDED_V4 = ["127.0.0.1", "169.254.169.254", "0.0.0.0", "100.100.100.200", "168.63.129.16", "10.0.0.1"]
LEGACY = [(v4, s) for v4 in GUARDED_V4 for s in legacy_spellings(v4)]


@pytest.mark.parametrize(("v4", "spelling"), LEGACY, ids=[f"{v}={s}" for v, s in LEGACY])
def test_legacy_ipv4_spellings_are_refused_as_hosts(v4: str, spelling: str) -> None:
    # the spelling really is that address to a resolver: refusing it matters
    assert socket.inet_aton(spelling) == ipaddress.IPv4Address(v4).packed, spelling
    for hop in (f"{spelling}:80", f"{spelling}.:80", f"{spelling.upper()}:80"):
        with pytest.raises(AddressError):
            parse_hop(hop)


@pytest.mark.parametrize("spelling", ["127.000.000.001", "010.0.0.1", "0100.0.0.1", "00.0.0.0"])
def test_zero_padded_quads_are_refused(spelling: str) -> None:
    """Zero-padded parts are octal to inet_aton: an address other than the one a person reads."""
    socket.inet_aton(spelling)
    with pytest.raises(AddressError):
        parse_hop(f"{spelling}:80")


# -- IPv4 inside IPv6: one verdict per address ---------------------------------------------------------

RULE_SETS: list[tuple[str, ...]] = [
    (),
    ("0.0.0.0/0",),
    ("::/0",),
    ("0.0.0.0/0", "::/0"),
    ("lan",),
    ("10.0.0.0/8",),
    ("127.0.0.1/32",),
    ("127.0.0.0/8",),
    ("::ffff:127.0.0.1/128",),
    ("::ffff:0:0/96",),
    ("64:ff9b::/96",),
    ("::/96",),
    ("169.254.0.0/16",),
    ("169.254.169.254/32",),
    ("::ffff:169.254.169.254/128",),
    ("64:ff9b::a9fe:a9fe/128",),
    ("0.0.0.0/8",),
    ("224.0.0.0/4",),
    ("100.64.0.0/10",),
    ("100.100.100.200/32",),
]

TARGETS = [
    "127.0.0.1",
    "127.8.9.10",
    "169.254.169.254",
    "169.254.1.1",
    "10.0.0.1",
    "10.255.0.7",
    "192.0.2.1",
    "0.0.0.0",
    "0.1.2.3",
    "224.0.0.251",
    "255.255.255.255",
    "100.100.100.200",
    "100.100.100.201",
    "168.63.129.16",
]


def v6_spellings(v4: str) -> list[str]:
    """IPv6 literals that carry ``v4``: mapped, compatible and NAT64, in several notations."""
    n = int(ipaddress.IPv4Address(v4))
    hi, lo = n >> 16, n & 0xFFFF
    out = [
        f"::ffff:{v4}",
        f"::ffff:{hi:x}:{lo:x}",
        f"0:0:0:0:0:ffff:{hi:x}:{lo:x}",
        f"0000:0000:0000:0000:0000:FFFF:{hi:04X}:{lo:04X}",
        f"64:ff9b::{v4}",
        f"64:ff9b::{hi:x}:{lo:x}",
        f"0064:ff9b:0000:0000:0000:0000:{hi:04x}:{lo:04x}",
    ]
    if n > 1:  # ::, ::1 are IPv6's own unspecified and loopback, not IPv4-compatible
        out += [f"::{v4}", f"::{hi:x}:{lo:x}"]
    return out


def test_v6_spellings_carry_the_address() -> None:
    for v4 in TARGETS:
        for text in v6_spellings(v4):
            six = ipaddress.IPv6Address(text)
            assert six.packed[-4:] == ipaddress.IPv4Address(v4).packed, text


# expected verdicts of the plain IPv4 forms under a few rule sets (the rest of the matrix is
# checked for agreement below, and the plain forms by tests/unit/test_policy.py)
EXPECTED: dict[tuple[tuple[str, ...], str], str] = {
    ((), "10.0.0.1"): "is not allowed here",
    (("0.0.0.0/0", "::/0"), "127.0.0.1"): "is loopback",
    (("0.0.0.0/0", "::/0"), "169.254.169.254"): "is cloud metadata",
    (("0.0.0.0/0", "::/0"), "192.0.2.1"): "allow",
    (("::/0",), "192.0.2.1"): "is not allowed here",
    (("::ffff:127.0.0.1/128",), "127.0.0.1"): "allow",
    (("::ffff:0:0/96",), "127.0.0.1"): "is loopback",
    (("::ffff:0:0/96",), "192.0.2.1"): "allow",
    (("64:ff9b::/96",), "192.0.2.1"): "allow",
    (("64:ff9b::/96",), "169.254.169.254"): "is cloud metadata",
    (("::ffff:169.254.169.254/128",), "169.254.169.254"): "allow",
    (("64:ff9b::a9fe:a9fe/128",), "169.254.169.254"): "allow",
    (("169.254.0.0/16",), "169.254.169.254"): "is cloud metadata",
    (("lan",), "10.255.0.7"): "allow",
    (("lan",), "127.0.0.1"): "is loopback",
    (("100.64.0.0/10",), "100.100.100.200"): "is cloud metadata",
}


@pytest.mark.parametrize(("rules", "v4"), list(EXPECTED), ids=[f"{'+'.join(r) or 'none'}->{a}" for r, a in EXPECTED])
def test_plain_ipv4_verdicts(rules: tuple[str, ...], v4: str) -> None:
    got = verdict(rules, ipaddress.IPv4Address(v4))
    want = EXPECTED[(rules, v4)]
    assert got == want if want == "allow" else got.startswith(want), got


@pytest.mark.parametrize("rules", RULE_SETS, ids=["+".join(r) or "none" for r in RULE_SETS])
@pytest.mark.parametrize("v4", TARGETS)
def test_every_ipv6_spelling_gets_the_ipv4_verdict(rules: tuple[str, ...], v4: str) -> None:
    want = verdict(rules, ipaddress.IPv4Address(v4))
    for text in v6_spellings(v4):
        assert verdict(rules, ipaddress.IPv6Address(text)) == want, (text, rules)
        hop = parse_hop(f"[{text}]:80")  # and the wire spelling parses to that address
        assert isinstance(hop, Endpoint)
        assert verdict(rules, ipaddress.ip_address(hop.host)) == want, (hop, rules)


@settings(max_examples=1000, deadline=None)
@given(n=st.integers(0, 2**32 - 1), rules=st.lists(st.sampled_from(RULE_SETS), max_size=3))
def test_fuzz_spellings_agree(n: int, rules: list[tuple[str, ...]]) -> None:
    specs = tuple(spec for r in rules for spec in r)
    v4 = str(ipaddress.IPv4Address(n))
    want = verdict(specs, ipaddress.IPv4Address(n))
    for text in v6_spellings(v4):
        assert verdict(specs, ipaddress.IPv6Address(text)) == want, (text, specs)


# -- host names that resolve to guarded addresses ---------------------------------------------------


class Resolver:
    """Answers every name with fixed addresses; counts lookups (DNS is asked once, never twice)."""

    def __init__(self, *answer: str) -> None:
        self.answer = [ipaddress.ip_address(a) for a in answer]
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.calls.append(host)
        return list(self.answer)


@pytest.fixture
def dialed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[IPAddress, int]]]:
    """Replaces the connect step: records what would be dialed, dials nothing (a socketpair end)."""
    calls: list[tuple[IPAddress, int]] = []
    pairs: list[socket.socket] = []

    async def fake_connect(addr: IPAddress, port: int, timeout: float) -> socket.socket:
        calls.append((addr, port))
        a, b = socket.socketpair()
        pairs.extend((a, b))
        return a

    monkeypatch.setattr(dialer_mod, "connect", fake_connect)
    yield calls
    for s in pairs:
        s.close()


ALL = ("0.0.0.0/0", "::/0")
RESOLVED_GUARDED = [
    "127.0.0.1",
    "127.53.0.1",
    "::1",
    "169.254.169.254",
    "169.254.10.10",
    "fe80::1",
    "0.0.0.0",
    "::",
    "224.0.0.251",
    "ff02::1",
    "255.255.255.255",
    "100.100.100.200",
    "168.63.129.16",
    "fd00:ec2::254",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe",
    "::127.0.0.1",
]


@pytest.mark.parametrize("answer", RESOLVED_GUARDED)
@pytest.mark.parametrize("rules", [ALL, ("lan", "0.0.0.0/0"), ("::/0",), ("10.0.0.0/8",)], ids=str)
async def test_name_resolving_to_a_guarded_address_is_refused(
    dialed: list[tuple[IPAddress, int]], answer: str, rules: tuple[str, ...]
) -> None:
    resolver = Resolver(answer)
    d = Dialer(TargetPolicy.from_specs(rules, lan=lan), timeout=1.0, resolve=resolver)
    with pytest.raises(DialError) as info:
        await d.dial(Endpoint("innocent.example", 80))
    assert info.value.code is Code.FORBIDDEN
    assert dialed == []
    assert resolver.calls == ["innocent.example"]


@pytest.mark.parametrize(
    ("rules", "answer", "want"),
    [
        (("lan",), ["10.1.2.3"], "10.1.2.3"),
        (("lan",), ["127.0.0.1", "10.1.2.3"], "10.1.2.3"),
        (("lan",), ["169.254.169.254", "::ffff:10.9.9.9"], "10.9.9.9"),
        (ALL, ["::ffff:169.254.169.254", "fe80::1", "192.0.2.8"], "192.0.2.8"),
        (ALL, ["64:ff9b::7f00:1", "64:ff9b::c000:208"], "192.0.2.8"),
        (("127.0.0.1/32",), ["169.254.169.254", "127.0.0.1"], "127.0.0.1"),  # named explicitly
    ],
)
async def test_only_checked_addresses_are_dialed(
    dialed: list[tuple[IPAddress, int]], rules: tuple[str, ...], answer: list[str], want: str
) -> None:
    resolver = Resolver(*answer)
    d = Dialer(TargetPolicy.from_specs(rules, lan=lan), timeout=1.0, resolve=resolver)
    result = await d.dial(Endpoint("mixed.example", 443))
    assert len(resolver.calls) == 1
    assert len(dialed) == 1
    addr, port = dialed[0]
    assert port == 443
    assert normalise(addr) == ipaddress.ip_address(want)
    assert result.addr == addr
    TargetPolicy.from_specs(rules, lan=lan).check(addr, port)  # what was dialed passed the policy


@pytest.mark.parametrize("answer", ["10.1.2.3", "172.16.0.9", "192.168.1.20", "fd12:3456::9", "::ffff:192.168.1.20"])
async def test_name_resolving_to_a_private_address_outside_the_rules_is_refused(
    dialed: list[tuple[IPAddress, int]], answer: str
) -> None:
    """Private ranges are not guarded, but still closed unless a rule holds them (rebinding to a LAN host)."""
    d = Dialer(
        TargetPolicy.from_specs(["192.0.2.0/24", "2001:db8::/32"], lan=lan), timeout=1.0, resolve=Resolver(answer)
    )
    with pytest.raises(DialError, match="not allowed here") as info:
        await d.dial(Endpoint("public-looking.example", 80))
    assert info.value.code is Code.FORBIDDEN
    assert dialed == []


async def test_no_rules_means_no_dns_lookup(dialed: list[tuple[IPAddress, int]]) -> None:
    resolver = Resolver("192.0.2.1")
    d = Dialer(TargetPolicy(), timeout=1.0, resolve=resolver)
    with pytest.raises(DialError) as info:
        await d.dial(Endpoint("anything.example", 80))
    assert info.value.code is Code.FORBIDDEN
    assert resolver.calls == []
    assert dialed == []


async def test_own_listener_by_name_is_refused(dialed: list[tuple[IPAddress, int]]) -> None:
    pol = TargetPolicy.from_specs(["127.0.0.0/8"], lan=lan).with_own(ipaddress.ip_address("0.0.0.0"), 6969)
    d = Dialer(pol, timeout=1.0, resolve=Resolver("127.0.0.1", "::ffff:127.0.0.1"))
    with pytest.raises(DialError, match="own listener"):
        await d.dial(Endpoint("localhost", 6969))
    assert dialed == []
