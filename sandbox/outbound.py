"""The policy half of a Sandbox (SPEC §3 intercept_*, §5): every change
publishes a new frozen Policy that the proxy reads on its next request, so
changes apply to live connections without touching nft."""
from __future__ import annotations

import dataclasses

from . import certdir
from .proxy.handlers import as_handler
from .proxy.policy import Policy, Route, parse_target
from .proxy.tls import CertificateAuthority

# Inside: /etc/sandbox/certs/sandbox-ca.crt and /etc/cloudflare/certs/... (rootfs.CERT_MOUNTS).
CA_FILES = ("sandbox/sandbox-ca.crt", "cloudflare/cloudflare-containers-ca.crt")


def parse_hosts(hosts, what: str):
    if hosts is None:
        return None
    if isinstance(hosts, (str, bytes)) or not hasattr(hosts, "__iter__"):
        raise TypeError(f"{what} must be a list of hosts")
    out = []
    for h in hosts:
        if not isinstance(h, str):
            raise TypeError(f"{what} entries must be str, got {type(h).__name__}")
        out.append(parse_target(h))
    return tuple(out)


class OutboundMixin:
    """Mixed into Sandbox; needs self.policy, self.ca, self.id, self._rt, self._pid."""

    # -- publication ---------------------------------------------------------
    def _publish(self, **changes) -> None:
        old = self.policy
        new = dataclasses.replace(old, **changes)
        self._sync_names(old, new)
        self.policy = new
        if new.https_routes and self.ca is None:
            self.ca = CertificateAuthority(name=f"sandbox {self.name}")
            self._write_ca()   # no-op until start made the sandbox's cert dir

    def _sync_names(self, old: Policy, new: Policy) -> None:
        """Handler hostnames resolve inside the sandbox (SPEC §5)."""
        names = self._rt._names
        if names is None:
            return
        before = [r.target.pattern for r in old.routes + old.class_routes if r.target.kind in ("host", "glob")]
        after = [r.target.pattern for r in new.routes + new.class_routes if r.target.kind in ("host", "glob")]
        for p in after:
            names.add(p)
        for p in before:
            names.remove(p)

    def _ca_files(self) -> list[tuple[str, bytes]]:
        """(path relative to the sandbox's cert dir on the host, PEM)."""
        return [(p, self.ca.ca_pem) for p in CA_FILES] if self.ca is not None else []

    def _write_ca(self) -> None:
        """Into the sandbox's cert dir on the host (sandbox/certdir.py), bound
        read-only inside: visible at once, and no path inside the sandbox is
        ever resolved (SPEC §9). A no-op while no cert dir exists: the next
        start writes it."""
        path = getattr(self, "_cert_dir", None)
        if path is not None and self.ca is not None:
            certdir.write(path, self._ca_files())

    # -- SPEC §3 ------------------------------------------------------------
    async def intercept_outbound_http(self, target: str, handler) -> None:
        self._add_route(target, handler, "http")

    async def intercept_outbound_https(self, target: str, handler) -> None:
        self._add_route(target, handler, "https")

    async def intercept_all_outbound_http(self, handler) -> None:
        as_handler(handler)   # TypeError for something that is not a handler
        self._publish(catch_all=handler)

    def _add_route(self, target: str, handler, scheme: str) -> None:
        if not isinstance(target, str):
            raise TypeError("target must be a str")
        t = parse_target(target)
        as_handler(handler)   # TypeError for something that is not a handler
        routes = tuple(r for r in self.policy.routes
                       if not (r.target == t and scheme in r.schemes)) + (Route(t, handler, frozenset({scheme})),)
        self._publish(routes=routes)

    def remove_outbound_route(self, target: str) -> None:
        t = parse_target(target)
        self._publish(routes=tuple(r for r in self.policy.routes if r.target != t))

    # -- host lists and internet (used by Container, the CLI and serve) ---------
    def set_allowed_hosts(self, hosts) -> None:
        self._publish(allowed_hosts=parse_hosts(hosts, "allowed_hosts"))

    def set_denied_hosts(self, hosts) -> None:
        self._publish(denied_hosts=parse_hosts(hosts or [], "denied_hosts"))

    def _set_host_lists(self, allowed=None, denied=()) -> None:
        self.set_allowed_hosts(allowed)
        self.set_denied_hosts(list(denied))

    def set_intercept_https(self, on: bool) -> None:
        self._publish(intercept_https=bool(on))

    def set_internet(self, on: bool) -> None:
        """Live: membership of the nft set, and the policy's last step."""
        if not isinstance(on, bool):
            raise TypeError("enable_internet must be a bool")
        self.enable_internet = on
        self._publish(enable_internet=on)
        res = self._res
        if res is not None and res.net is not None and self._rt._net is not None:
            self._rt._net.set_internet(res.net, on)

    async def fetch(self, request_or_url, *, method: str = "GET", headers=None, body=None):
        """A request from the runtime, outside every sandbox (credential injection)."""
        from .proxy.client import fetch
        return await fetch(request_or_url, method=method, headers=headers, body=body)
