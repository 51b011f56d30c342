"""The runtime's outbound proxy: policy, handlers, HTTP relay, TLS interception, DNS.

Importable on its own (no C extension): `sandbox/__init__.py` re-exports `Request`,
`Response` and `fetch` from here.
"""

from .client import fetch
from .dns import DNSForwarder, SyntheticNames
from .handlers import Context, as_handler, call_handler
from .http import serve_connection
from .models import Headers, Request, Response
from .policy import Decision, Facts, Policy, Route, Target, decide, parse_target
from .tls import NEED_MORE, CertificateAuthority, parse_sni

__all__ = [
    "fetch", "DNSForwarder", "SyntheticNames", "Context", "as_handler", "call_handler",
    "serve_connection", "Headers", "Request", "Response", "Decision", "Facts", "Policy",
    "Route", "Target", "decide", "parse_target", "NEED_MORE", "CertificateAuthority", "parse_sni",
]
