"""The host side of a runtime's network: one static nft table + policy routing.

One table per runtime covers every sandbox of that runtime: its rules match
the host-end interface *prefix*, so adding a sandbox never touches nft, and
``enable_internet`` is one element of the ``inet_on`` set.  Policy (allowed
hosts, handlers...) lives in the proxy, never here.

TPROXY needs two pieces of policy routing besides the nft rule: packets that
nft marked must be routed to the local stack although their destination is
not local, hence ``ip rule fwmark <mark> lookup <table>`` and a
``local 0.0.0.0/0 dev lo`` route in that table.  Mark and table are derived
from the runtime tag so two runtimes on one machine do not collide (a
collision is detected and refused in ``setup()``).
"""

from __future__ import annotations

import re

import errno
import zlib

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ._sys import netlink_errors
from ._threads import run_in_thread
from .link import LOOPBACK_IFINDEX, check_ifname
from .nft import Nft, check_identifier

TABLE_PREFIX = "sandbox_"
DNS_FLOWS = 512          # tracked DNS flows per sandbox (see the ruleset)
_RT_SCOPE_HOST = 254
_MARK_BASE = 0x5B000000  # high byte constant, low 20 bits from the tag


def table_name(tag: str) -> str:
    """nft table name of the runtime ``tag``."""
    check_identifier(tag, "tag")
    return TABLE_PREFIX + tag


def derive_mark_table(tag: str) -> tuple[int, int]:
    """Firewall mark and routing table id for ``tag`` (same number, two spaces).

    20 bits of CRC32 under a fixed high byte: stays clear of the kernel's
    reserved tables (253-255) and of the low mark bits other tools favour
    (kube-proxy 0x4000/0x8000, Docker/Cilium low bytes).
    """
    check_identifier(tag, "tag")
    value = _MARK_BASE | (zlib.crc32(tag.encode()) & 0xFFFFF)
    return value, value


def build_ruleset(name: str, prefix: str, proxy_port: int, dns_port: int, mark: int,
                  comment: str | None = None) -> str:
    """The table as nft text: created (fails if it exists) and filled in one batch.

    ``create table`` instead of ``add``: a second runtime with the same tag,
    or a leftover of a dead one, must be an error (gc first), never a silent
    takeover of someone else's live table.
    """
    check_identifier(name, "table")
    check_ifname(prefix, "prefix")
    sb = f'iifname "{prefix}*"'
    if comment is not None and not re.fullmatch(r"[A-Za-z0-9_]{1,60}", comment):
        raise ValueError(f"comment: must be an nft identifier: {comment!r}")
    # Who owns the table, so a collector can judge it without any state file.
    # nft 1.0.6 does not list table comments, so it is an (empty) set's name.
    comment_line = f"set {comment} {{ type ifname; }}" if comment else ""
    to_sb = f'oifname "{prefix}*"'
    return f"""\
create table inet {name}
table inet {name} {{
    {comment_line}
    # Host ends of sandboxes whose enable_internet is on.
    set inet_on {{
        type ifname
    }}

    # DNS is the one flow a sandbox can open towards the host without the
    # proxy, and every UDP query from a fresh source port is a new conntrack
    # entry: unbounded, a sandbox fills the host's whole conntrack table
    # (5k entries in 0.3 s measured) and the host stops tracking new flows.
    # So DNS flows live 5 s instead of 30-120 s, and each sandbox may hold at
    # most {DNS_FLOWS} of them; past that its queries are refused (ICMP) until
    # its own old entries expire: it wastes only its own DNS.
    ct timeout dns_udp {{
        protocol udp; l3proto ip; policy = {{ unreplied : 5, replied : 5 }};
    }}
    set dns_flows {{
        type ifname; size 65535; flags dynamic;
    }}

    # HTTP(S) to anything that is not this host goes to the proxy's single
    # transparent listener; the mark routes it locally (ip rule + local route)
    # and lets it through "input".  Local destinations are excluded so the
    # host's own addresses are not reachable through the proxy port trick.
    chain prerouting_mangle {{
        type filter hook prerouting priority mangle; policy accept;
        # Reverse-path check: a packet from a sandbox's veth must carry the
        # address routed to that veth. The sandbox lacks NET_RAW/NET_ADMIN
        # to forge one today; this keeps it so if a capability or a kernel
        # path ever allows it (the proxy identifies sandboxes by source).
        {sb} fib saddr . iif oif missing drop
        {sb} meta l4proto tcp tcp dport {{ 80, 443 }} fib daddr type != local tproxy ip to 127.0.0.1:{proxy_port} meta mark set {mark:#x} accept
        {sb} meta l4proto udp udp dport 53 ct timeout set "dns_udp"
    }}

    # DNS is pinned: every query, UDP and TCP, to any address, lands on the
    # runtime's forwarder.  "redirect" rewrites the destination to the host
    # end's address, which is why the forwarder listens on 0.0.0.0.
    chain prerouting_nat {{
        type nat hook prerouting priority dstnat; policy accept;
        {sb} meta l4proto {{ tcp, udp }} th dport 53 redirect to :{dns_port}
    }}

    # Sandboxes may reach the host only through the proxy (marked) or the DNS
    # redirect (dnat); everything else is refused at once (RST / ICMP), never
    # dropped silently.  The forwarder's port is not for anyone else: it is
    # dropped from every interface but lo and the sandboxes'.
    chain input {{
        type filter hook input priority filter; policy accept;
        meta l4proto {{ tcp, udp }} th dport {dns_port} iifname != "lo" iifname != "{prefix}*" drop
        {sb} jump input_from_sandbox
    }}
    chain input_from_sandbox {{
        meta mark {mark:#x} accept
        ct status dnat ct state new add @dns_flows {{ iifname ct count over {DNS_FLOWS} }} reject with icmpx admin-prohibited
        ct status dnat accept
        ct state established,related accept
        meta l4proto tcp reject with tcp reset
        reject with icmpx admin-prohibited
    }}

    # Forwarding (egress to the world) only for sandboxes in inet_on.
    # Nothing new may enter a sandbox (not from another sandbox, not from the
    # LAN); replies may.  Ports 80/443 are never forwarded: if the proxy is not
    # listening, tproxy does not match and the connection must fail closed
    # here instead of bypassing the proxy.
    chain forward {{
        type filter hook forward priority filter; policy accept;
        {to_sb} jump forward_to_sandbox
        {sb} jump forward_from_sandbox
    }}
    chain forward_to_sandbox {{
        ct state established,related accept
        meta l4proto tcp reject with tcp reset
        reject with icmpx admin-prohibited
    }}
    chain forward_from_sandbox {{
        meta l4proto tcp tcp dport {{ 80, 443 }} reject with tcp reset
        iifname @inet_on accept
        ct state established,related accept
        meta l4proto tcp reject with tcp reset
        reject with icmpx admin-prohibited
    }}

    # Nothing on the host opens a connection into a sandbox either: its ports
    # are reached only from inside its own netns (get_tcp_port). Replies
    # (proxy, DNS, our own rejects) are established or related and pass.
    chain output {{
        type filter hook output priority filter; policy accept;
        oifname "{prefix}*" ct state new meta l4proto tcp reject with tcp reset
        oifname "{prefix}*" ct state new reject with icmpx admin-prohibited
    }}

    # Sandbox addresses are private: hide them behind the uplink's address.
    chain postrouting_nat {{
        type nat hook postrouting priority srcnat; policy accept;
        {sb} oifname != "{prefix}*" masquerade
    }}
}}
"""


def _check_port(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{what}: not a port number: {value!r}")


def _enable_ip_forward() -> None:
    # Only write when needed: rewriting ip_forward resets every interface's
    # forwarding flag.  This one sysctl is allowed to outlive us (as Docker).
    path = "/proc/sys/net/ipv4/ip_forward"
    with open(path) as f:
        if f.read().strip() == "1":
            return
    with open(path, "w") as f:
        f.write("1")


class HostNetwork:
    """Owns the runtime's nft table, its ip rule and its local route.

    ``setup()`` creates them (rolling back on failure), ``set_internet()``
    flips one sandbox's egress, ``close()`` removes them in reverse order,
    idempotent, keeping going past errors and raising the first.  Blocking,
    but safe to call from an asyncio loop thread (netlink work runs in a
    throwaway thread; an nft batch takes about a millisecond).
    """

    def __init__(
        self,
        tag: str,
        prefix: str,
        proxy_port: int,
        dns_port: int,
        mark: int | None = None,
        table: int | None = None,
    ) -> None:
        self.table_name = table_name(tag)
        check_ifname(prefix, "prefix")
        if len(prefix) > 12:
            raise ValueError(f"prefix: {prefix!r} leaves no room for an index (max 12 chars)")
        _check_port(proxy_port, "proxy_port")
        _check_port(dns_port, "dns_port")
        d_mark, d_table = derive_mark_table(tag)
        self.tag = tag
        self.prefix = prefix
        self.proxy_port = proxy_port
        self.dns_port = dns_port
        self.mark = d_mark if mark is None else mark
        self.table = d_table if table is None else table
        if not 0 < self.mark < 1 << 32:
            raise ValueError(f"mark: out of range: {self.mark!r}")
        if not 0 < self.table < 1 << 32 or self.table in (253, 254, 255):
            raise ValueError(f"table: reserved or out of range: {self.table!r}")
        self.comment: str | None = None
        self._nft: Nft | None = None
        self._have_table = False
        self._have_rule = False
        self._have_route = False

    def ruleset(self) -> str:
        return build_ruleset(self.table_name, self.prefix, self.proxy_port, self.dns_port, self.mark,
                             self.comment)

    def setup(self) -> None:
        if self._nft is not None:
            raise RuntimeError("HostNetwork.setup() called twice")
        _enable_ip_forward()
        self._nft = Nft()
        try:
            self._nft.run(self.ruleset())
            self._have_table = True
            with netlink_errors("add ip rule/route"):
                run_in_thread(self._add_routing, name="netns-rules")
        except BaseException:
            try:
                self.close()
            except Exception:
                pass  # report the setup error, not the rollback's
            raise

    def set_internet(self, ifname: str, on: bool) -> None:
        """Allow (``on``) or refuse egress for the sandbox behind ``ifname``. Idempotent."""
        check_ifname(ifname)
        if not ifname.startswith(self.prefix):
            raise ValueError(f"ifname: {ifname!r} does not start with prefix {self.prefix!r}")
        if self._nft is None or not self._have_table:
            raise RuntimeError("HostNetwork is not set up")
        element = f'element inet {self.table_name} inet_on {{ "{ifname}" }}'
        # "add element" is a no-op for a present element; a delete of a
        # missing one is an error, so add first in the same batch.
        cmd = f"add {element}\n" if on else f"add {element}\ndelete {element}\n"
        self._nft.run(cmd)

    def close(self) -> None:
        first: BaseException | None = None
        if self._have_rule or self._have_route:
            try:
                with netlink_errors("delete ip rule/route"):
                    run_in_thread(self._del_routing, name="netns-rules")
            except BaseException as exc:
                first = first or exc
        nft, self._nft = self._nft, None
        if self._have_table:
            self._have_table = False
            try:
                # add+delete: deletes whether or not someone removed it already.
                name = self.table_name
                if nft is None:
                    nft = Nft()
                nft.run(f"add table inet {name}\ndelete table inet {name}\n")
            except BaseException as exc:
                first = first or exc
        if nft is not None:
            nft.close()
        if first is not None:
            raise first

    def __enter__(self) -> "HostNetwork":
        self.setup()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- policy routing (runs in a throwaway thread: pyroute2 sync API) --

    def _add_routing(self) -> None:
        with IPRoute() as ipr:
            for rule in ipr.rule("dump"):
                if rule.get("FRA_FWMARK") == self.mark or rule.get("FRA_TABLE") == self.table:
                    raise FileExistsError(
                        errno.EEXIST,
                        f"ip rule with fwmark {self.mark:#x} or table {self.table} exists "
                        "(another runtime with a colliding tag, or a leftover: run gc)",
                    )
            ipr.rule("add", fwmark=self.mark, table=self.table)
            self._have_rule = True
            ipr.route(
                "add",
                dst="0.0.0.0/0",
                type="local",
                table=self.table,
                oif=LOOPBACK_IFINDEX,
                scope=_RT_SCOPE_HOST,
            )
            self._have_route = True

    def _del_routing(self) -> None:
        first: BaseException | None = None
        with IPRoute() as ipr:
            if self._have_route:
                self._have_route = False
                try:
                    delete_local_route(ipr, self.table)
                except BaseException as exc:
                    first = first or exc
            if self._have_rule:
                self._have_rule = False
                try:
                    delete_rule(ipr, self.mark, self.table)
                except BaseException as exc:
                    first = first or exc
        if first is not None:
            raise first


def delete_local_route(ipr: IPRoute, table: int) -> bool:
    """Delete ``local 0.0.0.0/0 dev lo table <table>``; False if absent."""
    try:
        ipr.route(
            "del", dst="0.0.0.0/0", type="local", table=table, oif=LOOPBACK_IFINDEX, scope=_RT_SCOPE_HOST
        )
    except NetlinkError as exc:
        if exc.code in (errno.ESRCH, errno.ENOENT):
            return False
        raise
    return True


def delete_rule(ipr: IPRoute, mark: int, table: int) -> bool:
    """Delete every ``fwmark <mark> lookup <table>`` rule; False if none."""
    deleted = False
    while True:
        try:
            ipr.rule("del", fwmark=mark, table=table)
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ESRCH):
                return deleted
            raise
        deleted = True
