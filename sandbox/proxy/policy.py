"""Outbound policy: target parsing, matching and the decision (SPEC §5, §10).

Pure: no sockets, no clocks, no logging. The proxy builds `Facts` for every request (or
every TLS ClientHello), reads the sandbox's current `Policy` and calls `decide`; policy
changes therefore apply to the next request on a live connection.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

__all__ = [
    "Target", "Route", "Policy", "Facts", "Decision", "BadHost",
    "parse_target", "parse_host", "parse_authority", "host_from_header", "decide", "match",
]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Scheme = Literal["http", "https"]
DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443}

# A hostname label (letters, digits, '-', '_' — underscores appear in real service names)
# where a glob may put '*' anywhere.
_LABEL = re.compile(r"[a-z0-9_*-]{1,63}")
_HOST_LABEL = re.compile(r"[a-z0-9_-]{1,63}")  # a label of a name the sandbox sent: no '*'
_PORT = re.compile(r"[0-9]{1,5}")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


@dataclass(frozen=True)
class Target:
    """One parsed `<hostname|glob|IP|CIDR>[:port]`.

    `kind` is "host" (exact name), "glob" (name with '*'), "ip" or "cidr" (an "ip" is a
    /32 or /128 `network`). `port=None` means "any port" in host lists and "the scheme's
    default port" for interception routes (see `match`).
    """

    kind: Literal["host", "glob", "ip", "cidr"]
    pattern: str  # normalized: lower-case host/glob, or the network's text
    port: Optional[int] = None
    network: Optional[IPNetwork] = field(default=None, compare=False)
    _regex: Optional[re.Pattern[str]] = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        if self.port is None:
            return self.pattern
        if ":" in self.pattern:
            return f"[{self.pattern}]:{self.port}"
        return f"{self.pattern}:{self.port}"

    @property
    def rank(self) -> tuple[int, int]:
        """Sort key: more specific first. Exact names and single IPs beat globs and
        CIDRs at the same level (SPEC §5); among globs, the one with more literal
        characters wins; among CIDRs, the longer prefix; the bare '*' comes last."""
        if self.kind in ("host", "ip"):
            return (0, 0)
        if self.kind == "cidr":
            assert self.network is not None
            return (1, -self.network.prefixlen)
        if self.pattern == "*":
            return (3, 0)
        return (2, -len(self.pattern.replace("*", "")))


def _parse_port(text: str, whole: str) -> int:
    if not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"bad port in target {whole!r}")
    return int(text)


def parse_host(text: str) -> Target:
    """Parse a hostname, glob, IP or CIDR with no port."""
    return _parse_address(text, text)


def _parse_address(text: str, whole: str) -> Target:
    if "/" in text:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"bad CIDR in target {whole!r}") from None
        return Target("cidr", str(net), network=net)
    if text.endswith(".") and text != ".":
        text = text[:-1]  # "example.com." and "10.0.0.1." are the same as without the dot
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        net = ipaddress.ip_network(ip)
        return Target("ip", str(ip), network=net)
    name = text.lower()
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"bad hostname in target {whole!r}")
    if "*" not in name:
        return Target("host", name)
    # '*' matches any run of characters, dots included (SPEC §5).
    regex = re.compile(".*".join(re.escape(part) for part in name.split("*")))
    return Target("glob", name, _regex=regex)


def parse_target(text: str) -> Target:
    """Parse `<hostname|hostname glob|IP|CIDR>[:port]`; ValueError when malformed.

    IPv6 takes a port only in brackets (`[2001:db8::1]:8080`); bare IPv6 has no port,
    so `::1:80` is the address ::1:80, not port 80 of ::1.
    """
    if not isinstance(text, str):
        raise TypeError(f"target must be a str, not {type(text).__name__}")
    s = text.strip()
    if not s or s != text or any(c.isspace() for c in s):
        raise ValueError(f"bad target {text!r}")
    port: Optional[int] = None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in target {text!r}")
        inner, rest = s[1:end], s[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"junk after ']' in target {text!r}")
            port = _parse_port(rest[1:], text)
        target = _parse_address(inner, text)
        if target.kind not in ("ip", "cidr") or target.network is None or target.network.version != 6:
            raise ValueError(f"only IPv6 goes in brackets: {text!r}")
    elif s.count(":") == 1:
        host, _, port_text = s.partition(":")
        port = _parse_port(port_text, text)
        target = _parse_address(host, text)
    else:  # no colon, or a bare IPv6 address/CIDR
        target = _parse_address(s, text)
        if s.count(":") > 1 and target.kind not in ("ip", "cidr"):
            raise ValueError(f"bad target {text!r}")
    if port is None:
        return target
    return Target(target.kind, target.pattern, port, target.network, target._regex)


def host_from_header(value: Optional[str]) -> Optional[str]:
    """The host part of a Host header or SNI: lower-case, no port, no brackets, no
    trailing dot. None when absent or unparsable (then only IP rules can match)."""
    if not value:
        return None
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            return None
        v = v[1:end]
    elif v.count(":") == 1:
        v = v.partition(":")[0]
    if v.endswith("."):
        v = v[:-1]
    return v or None


@functools.lru_cache(maxsize=1024)
def _ip_or_none(text: str) -> Optional[IPAddress]:
    """ip_address or None, cached: the same few destinations and hosts come back on
    every request (and a name is not worth an exception each time)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _ip(text: str) -> IPAddress:
    ip = _ip_or_none(text)
    if ip is None:
        raise ValueError(f"not an IP address: {text!r}")
    return ip


class BadHost(ValueError):
    """A Host header / SNI the proxy refuses outright (400, or a closed TLS connection):
    malformed, or an IP literal that is not the destination the kernel saw."""


@functools.lru_cache(maxsize=1024)
def parse_authority(value: str) -> tuple[str, Optional[int]]:
    """Strictly parse a Host header value (or an SNI): `(host, port or None)`.

    The host comes back normalised: lower-case, no trailing dot, IPv6 without brackets,
    and an IPv4 literal in any spelling `inet_aton` (and so curl, browsers, libc) accepts
    — `0x7f.1`, `2130706433`, `017.0.0.1` — as its dotted quad, so that it is compared
    as the IP it is. Anything else that is not a plain DNS name is `BadHost`: the name
    is later resolved by the runtime, and must mean the same thing to every parser.
    """
    if not isinstance(value, str):
        raise BadHost(f"host must be a str, not {type(value).__name__}")
    v = value.strip(" \t").lower()
    if not v or len(v) > 262 or any(c in v for c in " \t@/\\?#%"):
        raise BadHost(f"malformed host {value!r}")
    port_text: Optional[str] = None
    if v.startswith("["):
        end = v.find("]")
        rest = v[end + 1:] if end > 0 else "x"
        if rest and not rest.startswith(":"):
            raise BadHost(f"malformed host {value!r}")
        try:
            host = str(ipaddress.IPv6Address(v[1:end]))
        except ValueError:
            raise BadHost(f"malformed IPv6 host {value!r}") from None
        port_text = rest[1:] if rest else None
    else:
        if v.count(":") > 1:
            raise BadHost(f"IPv6 host without brackets: {value!r}")
        host, sep, text = v.partition(":")
        port_text = text if sep else None
        if host.endswith("."):
            host = host[:-1]
        host = _normal_name(host, value)
    port: Optional[int] = None
    if port_text:  # "host:" (empty port) is allowed by RFC 3986 and means no port
        if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise BadHost(f"bad port in host {value!r}")
        port = int(port_text)
    return host, port


def _normal_name(host: str, whole: str) -> str:
    if not host:
        raise BadHost(f"empty host in {whole!r}")
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        # A name that ends in a number is an IPv4 literal to URL parsers (WHATWG) and
        # libc: take it as one when inet_aton agrees, refuse it otherwise.
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            raise BadHost(f"malformed numeric host {whole!r}") from None
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise BadHost(f"malformed host name {whole!r}")
    return host


@dataclass(frozen=True)
class Facts:
    """What the proxy knows about one request or TLS connection.

    `host`: from the Host header (HTTP) or SNI (HTTPS), normalised by `parse_authority`,
    or None. `host_port`: the port written in the Host header, if any. `dst_ip`/
    `dst_port`: the original destination as the kernel saw it (TPROXY). `scheme`:
    "https" for TLS connections (terminated or not).
    """

    host: Optional[str]
    dst_ip: IPAddress
    dst_port: int
    scheme: Scheme = "http"
    host_port: Optional[int] = None

    @classmethod
    def make(cls, host: Optional[str], dst_ip: Union[str, IPAddress], dst_port: int,
             scheme: Scheme = "http") -> Facts:
        """`host` is the raw Host header / SNI (or None). `BadHost` (a ValueError) when it
        is malformed, or is an IP literal other than the destination (SPEC §10: 400 /
        closed): an IP in Host is matched as the destination, so it must *be* it."""
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"scheme must be http or https: {scheme!r}")
        dst = _ip(dst_ip) if isinstance(dst_ip, str) else dst_ip
        name, port = parse_authority(host) if host else (None, None)
        facts = cls(name, dst, int(dst_port), scheme, port)
        literal = facts.host_ip
        if literal is not None:
            if literal != dst:
                raise BadHost(f"IP literal host {name} is not the destination {dst}")
            if port is not None and port != facts.dst_port:
                raise BadHost(f"IP literal host port {port} is not the destination port {facts.dst_port}")
        return facts

    @functools.cached_property
    def host_ip(self) -> Optional[IPAddress]:
        """The Host/SNI as an IP when it is an IP literal."""
        return None if self.host is None else _ip_or_none(self.host)

    @property
    def host_name(self) -> Optional[str]:
        """The Host/SNI when it is a name (not an IP literal): what name egress resolves."""
        return self.host if self.host is not None and self.host_ip is None else None

    @property
    def name_port(self) -> int:
        """The port name rules match and name egress connects to: the Host header's port,
        or the original destination port when the Host has none. (A sandbox that sends
        `Host: a.test:8080` to some IP on port 80 asks for a.test:8080, and the decision,
        the egress and the Host the upstream sees all agree on that.)"""
        return self.host_port if self.host_port is not None else self.dst_port

    @property
    def display_host(self) -> str:
        return self.host or str(self.dst_ip)


def match(target: Target, facts: Facts, default_port: Optional[int] = None) -> bool:
    """Does `target` match? `default_port` is the port a port-less target stands for
    (80/443 for interception routes); None means a port-less target matches any port."""
    port = target.port if target.port is not None else default_port
    if target.kind in ("ip", "cidr"):
        # IP rules look only at the destination the kernel saw (an IP literal in Host is
        # that same address, or Facts.make refused it).
        assert target.network is not None
        return (port is None or port == facts.dst_port) and facts.dst_ip in target.network
    if port is not None and port != facts.name_port:
        return False
    if target.pattern == "*":
        return True  # "all": also connections without a Host/SNI or with an IP literal
    if facts.host is None or facts.host_ip is not None:
        return False  # name rules never match an IP literal
    if target.kind == "host":
        return facts.host == target.pattern
    assert target._regex is not None
    return target._regex.fullmatch(facts.host) is not None


@dataclass(frozen=True)
class Route:
    """A handler registered for a target. `schemes`: where the registration applies
    ({"http"} for intercept_outbound_http / outbound_by_host, {"https"} for
    intercept_outbound_https). With `Policy.intercept_https` on, HTTP routes apply to
    intercepted HTTPS too (at 443 when port-less)."""

    target: Target
    handler: object
    schemes: frozenset[str] = frozenset({"http"})


def _applies(route: Route, facts: Facts, intercept_https: bool) -> bool:
    if facts.scheme in route.schemes:
        return match(route.target, facts, DEFAULT_PORTS[facts.scheme])
    if facts.scheme == "https" and intercept_https:
        return match(route.target, facts, DEFAULT_PORTS["https"])
    return False


def _best(routes: tuple[Route, ...], facts: Facts, intercept_https: bool) -> Optional[Route]:
    found = [r for r in routes if _applies(r, facts, intercept_https)]
    if not found:
        return None
    # min() is stable: among equally specific routes the first registered wins.
    return min(found, key=lambda r: r.target.rank)


@dataclass(frozen=True)
class Policy:
    """A sandbox's outbound policy at one instant. Frozen: changing policy means
    publishing a new Policy, which in-flight decisions never observe half-made."""

    denied_hosts: tuple[Target, ...] = ()
    allowed_hosts: Optional[tuple[Target, ...]] = None
    routes: tuple[Route, ...] = ()            # instance per-host (set_outbound_by_host, intercept_*)
    class_routes: tuple[Route, ...] = ()      # class outbound_by_host
    catch_all: object = None                  # instance (set_outbound_handler, intercept_all_outbound_http)
    class_catch_all: object = None            # class outbound
    enable_internet: bool = True
    intercept_https: bool = False

    def __post_init__(self) -> None:
        for name in ("denied_hosts", "allowed_hosts", "routes", "class_routes"):
            value = getattr(self, name)
            if value is None and name == "allowed_hosts":
                continue
            if not isinstance(value, tuple):
                raise TypeError(f"Policy.{name} must be a tuple")
            kind = Route if "routes" in name else Target
            if not all(isinstance(v, kind) for v in value):
                raise TypeError(f"Policy.{name} must hold {kind.__name__} objects")

    @property
    def https_routes(self) -> bool:
        """Whether any registration can need TLS termination (so a CA is needed)."""
        return self.intercept_https or any(
            "https" in r.schemes for r in self.routes + self.class_routes
        )


DecisionKind = Literal["deny", "handler", "egress"]


@dataclass(frozen=True)
class Decision:
    """What to do with one request / TLS connection.

    `rule`: for "deny", the rule named in the 403 body ("denied_hosts", "allowed_hosts",
    "no internet"); otherwise the level that decided ("routes", "class_routes",
    "catch_all", "class_catch_all", "allowed_hosts", "internet"), for logs.
    `terminate_tls`: only meaningful for HTTPS — True when the proxy must terminate TLS
    with the sandbox CA (a handler must see the request, or intercept_https is on so
    that policy is decided per request); False means splice the bytes untouched.

    For "egress", where to (SPEC §10 "Where egress goes"): `upstream` is `(name, port)`
    with `by_name` True — the runtime resolves the name through its pinned resolver and
    never uses the address the sandbox dialled — or the original destination `(ip, port)`
    with `by_name` False, only when an IP/CIDR rule allowed it or there is no name (no
    Host/SNI, or an IP literal that is the destination). `denied_networks`: the IP/CIDR
    entries of denied_hosts at decision time, which a resolved address must not be in.
    """

    kind: DecisionKind
    rule: str
    host: str
    handler: object = None
    terminate_tls: bool = False
    upstream: Optional[tuple[str, int]] = None
    by_name: bool = False
    denied_networks: tuple[Target, ...] = field(default=(), compare=False, repr=False)

    @property
    def deny_message(self) -> str:
        return f"denied by {self.rule}: {self.host}"

    def refuses_address(self, ip: Union[str, IPAddress], port: int) -> bool:
        """Whether denied_hosts forbids a resolved address (name egress): a name must
        not lead where the sandbox could not go by dialling the address itself."""
        addr = ipaddress.ip_address(ip)
        return any(t.network is not None and addr in t.network and (t.port is None or t.port == port)
                   for t in self.denied_networks)


def _egress(facts: Facts, policy: Policy, rule: str, ip_rule: bool, terminate: bool) -> Decision:
    name = facts.host_name
    if name is not None and not ip_rule:
        denied_ips = tuple(t for t in policy.denied_hosts if t.kind in ("ip", "cidr"))
        return Decision("egress", rule, facts.display_host, terminate_tls=terminate,
                        upstream=(name, facts.name_port), by_name=True, denied_networks=denied_ips)
    return Decision("egress", rule, facts.display_host, terminate_tls=terminate,
                    upstream=(str(facts.dst_ip), facts.dst_port), by_name=False)


def decide(facts: Facts, policy: Policy) -> Decision:
    """The precedence of SPEC §5, in order; the first step that applies decides."""
    host = facts.display_host
    https = facts.scheme == "https"
    # 1. denied_hosts: always denied, whatever else matches.
    if any(match(t, facts) for t in policy.denied_hosts):
        return Decision("deny", "denied_hosts", host)
    # 2. allowed_hosts (when set): deny by default. Handlers do not imply allowed.
    allowed = policy.allowed_hosts is not None and any(match(t, facts) for t in policy.allowed_hosts)
    if policy.allowed_hosts is not None and not allowed:
        return Decision("deny", "allowed_hosts", host)
    # 3. per-host handlers: instance, then class.
    for rule, routes in (("routes", policy.routes), ("class_routes", policy.class_routes)):
        route = _best(routes, facts, policy.intercept_https)
        if route is not None:
            return Decision("handler", rule, host, route.handler, terminate_tls=https)
    # 4. catch-all handlers: instance, then class. They see HTTPS only when it is
    #    intercepted (otherwise HTTPS passes through untouched, SPEC §5).
    if not https or policy.intercept_https:
        for rule, handler in (("catch_all", policy.catch_all), ("class_catch_all", policy.class_catch_all)):
            if handler is not None:
                return Decision("handler", rule, host, handler, terminate_tls=https)
    # 5. egress: to the name when a name allowed it, to the destination IP only when an
    #    IP/CIDR rule did (or there is no name at all).
    # With intercept_https on, even egress is terminated so that a handler registered
    # later applies to the next request on this connection.
    terminate = https and policy.intercept_https
    if allowed:
        assert policy.allowed_hosts is not None
        ip_rule = any(t.kind in ("ip", "cidr") and match(t, facts) for t in policy.allowed_hosts)
        return _egress(facts, policy, "allowed_hosts", ip_rule, terminate)
    if policy.enable_internet:
        return _egress(facts, policy, "internet", False, terminate)
    return Decision("deny", "no internet", host)
