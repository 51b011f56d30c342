"""The policy half of a Sandbox (SPEC §3 intercept_*, §5): every change
publishes a new frozen Policy that the proxy reads on its next request, so
changes apply to live connections without touching nft."""
from __future__ import annotations

import dataclasses
import os

from .proxy.handlers import as_handler
from .proxy.policy import Policy, Route, parse_target
from .proxy.tls import CertificateAuthority

CA_PATHS = ("etc/sandbox/certs/sandbox-ca.crt", "etc/cloudflare/certs/cloudflare-containers-ca.crt")


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
            if self.running:
                self._write_ca()

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
        return [(p, self.ca.ca_pem) for p in CA_PATHS] if self.ca is not None else []

    def _write_ca(self) -> None:
        """Into the running sandbox's cert tmpfs, through its mount namespace."""
        root = f"/proc/{self._pid}/root"
        for rel, data in self._ca_files():
            path = os.path.join(root, rel)
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.rename(tmp, path)

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
