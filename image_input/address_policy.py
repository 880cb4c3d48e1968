"""Which IP addresses a `url=` download may connect to (the SSRF policy).

Never link-local (cloud metadata), multicast, reserved or unspecified addresses; loopback and
private ranges only when ALLOW_PRIVATE_URLS is on; IPv6 forms that embed an IPv4 address are
judged by that address too.
"""

from __future__ import annotations

import ipaddress

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_ALWAYS_BLOCKED = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"; Linux connects 0.0.0.0 to the local host
        "255.255.255.255/32",
        "100.100.100.200/32",  # Alibaba Cloud metadata (inside the shared 100.64/10 range)
        "fd00:ec2::254/128",  # AWS IMDS over IPv6 (inside the private fc00::/7 range)
    )
)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_address_allowed(address: str | IPAddress, *, allow_private: bool) -> bool:
    """May we connect to this IP? Never to link-local, multicast, reserved or unspecified ones.

    Loopback and private (LAN) addresses are allowed only with `allow_private`. IPv6 forms that
    embed an IPv4 address (mapped, NAT64, 6to4, Teredo) are judged by that IPv4 address too.
    Anything that does not parse as an IP address is refused.
    """
    if isinstance(address, str):
        try:
            ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0].strip("[]"))
        except ValueError:
            return False
    else:
        ip = address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_address_allowed(ip.ipv4_mapped, allow_private=allow_private)
        if ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            return is_address_allowed(embedded, allow_private=allow_private)
        if ip.sixtofour is not None and not is_address_allowed(
            ip.sixtofour, allow_private=allow_private
        ):
            return False
        if ip.teredo is not None and not is_address_allowed(
            ip.teredo[1], allow_private=allow_private
        ):
            return False
    if ip.is_unspecified or ip.is_link_local or ip.is_multicast:
        return False
    if any(ip in net for net in _ALWAYS_BLOCKED if net.version == ip.version):
        return False
    if ip.is_loopback:
        return allow_private
    if ip.is_reserved:
        return False
    if ip.is_global:
        return True
    return allow_private  # RFC 1918, ULA, shared/CGNAT, site-local, documentation ranges
