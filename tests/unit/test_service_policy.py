"""Discovered services: where a record may send the node, and who makes a service public."""

from __future__ import annotations

import ipaddress

import pytest

from homenet.node.discovery import PublicServices, Service, service_policy
from homenet.node.policy import IPNetwork, PolicyError, TargetPolicy

LAN: tuple[IPNetwork, ...] = (ipaddress.IPv4Network("192.168.1.0/24"),)


def policy(*allow: str) -> TargetPolicy:
    return service_policy(TargetPolicy.from_specs(list(allow)), lambda: LAN)


@pytest.mark.parametrize(
    ("allow", "addr", "ok"),
    [
        ((), "192.168.1.20", True),  # a host on the node's own subnet
        ((), "10.20.30.40", False),  # a record naming any other address: what a direct hop gets
        ((), "8.8.8.8", False),
        (("10.0.0.0/8",), "10.20.30.40", True),  # the operator allowed it
        ((), "127.0.0.1", False),  # guarded ranges need an explicit rule
        (("0.0.0.0/0",), "169.254.169.254", False),  # metadata: only a rule naming it
        (("127.0.0.1/32",), "127.0.0.1", True),
    ],
)
def test_a_record_may_send_the_node_only_where_a_direct_hop_or_the_lan_could(
    allow: tuple[str, ...], addr: str, ok: bool
) -> None:
    check = policy(*allow)
    if ok:
        check.check(ipaddress.ip_address(addr), 80)
    else:
        with pytest.raises(PolicyError):
            check.check(ipaddress.ip_address(addr), 80)


def _svc(listen_id: str = "photos-http", name: str = "Photos", type_: str = "_http._tcp.local.") -> Service:
    return Service(listen_id, name, type_, "nas.local.", ["192.168.1.20"], 80, {"hn-public": "1"})


@pytest.mark.parametrize(
    ("specs", "public"),
    [
        ((), False),  # what the record says (hn-public=1) counts for nothing
        (("photos-http",), True),
        (("Photos",), True),
        (("_http._tcp",), True),
        (("_http._tcp.local.",), True),
        (("_ssh._tcp",), False),
        (("photos",), False),
        (("_not a type",), False),
    ],
)
def test_the_operator_names_public_services(specs: tuple[str, ...], public: bool) -> None:
    assert (_svc() in PublicServices(specs)) is public
