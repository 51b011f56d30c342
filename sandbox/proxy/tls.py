"""TLS interception: a per-sandbox ephemeral CA and a ClientHello SNI reader (SPEC §10).

The CA key lives only in this process's memory (never written to the sandbox, never to
disk: leaf keys reach OpenSSL through a memfd). Certificates are EC P-256 and short-lived,
so a leaked CA certificate is useless after the runtime stops.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import ssl
import tempfile
from collections import OrderedDict
from typing import Final, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority", "parse_sni", "NEED_MORE"]


class _NeedMore:
    """Sentinel: the bytes so far are a prefix of a TLS ClientHello; read more."""

    _instance: "_NeedMore | None" = None

    def __new__(cls) -> "_NeedMore":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_MORE"

    def __bool__(self) -> bool:
        return False


NEED_MORE: Final = _NeedMore()

# A ClientHello larger than this (post-quantum key shares make them ~1.8 KB; the limit
# leaves room for many extensions) is treated as "no SNI" instead of buffering forever.
MAX_CLIENT_HELLO = 64 * 1024


def parse_sni(data: bytes) -> Union[str, None, _NeedMore]:
    """SNI host name from the first bytes of a TLS connection.

    Returns the lower-cased name; None when the data is not a TLS ClientHello or it
    carries no (valid) server_name; NEED_MORE when `data` is a valid prefix. The
    ClientHello may span several TLS records.
    """
    handshake = bytearray()
    pos = 0
    needed: int | None = None  # full handshake message length, once known
    while needed is None or len(handshake) < needed:
        if len(data) - pos < 5:
            return NEED_MORE
        ctype, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3:pos + 5], "big")
        if ctype != 22 or major != 3 or length == 0 or length > 2 ** 14 + 2048:
            return None  # not a handshake record
        if len(data) - pos - 5 < length:
            if not handshake and len(data) - pos - 5 >= 1 and data[pos + 5] != 1:
                return None  # the first handshake byte already says "not a ClientHello"
            return NEED_MORE
        handshake += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if needed is None and len(handshake) >= 4:
            if handshake[0] != 1:  # not client_hello
                return None
            needed = 4 + int.from_bytes(handshake[1:4], "big")
            if needed > MAX_CLIENT_HELLO:
                return None
    return _sni_from_client_hello(bytes(handshake[4:needed]))


def _sni_from_client_hello(body: bytes) -> str | None:
    try:
        p = 2 + 32  # legacy_version, random
        p += 1 + body[p]  # session id
        p += 2 + int.from_bytes(body[p:p + 2], "big")  # cipher suites
        p += 1 + body[p]  # compression methods
        if p + 2 > len(body):
            return None  # no extensions at all
        end = p + 2 + int.from_bytes(body[p:p + 2], "big")
        p += 2
        if end > len(body):
            return None
        while p + 4 <= end:
            etype = int.from_bytes(body[p:p + 2], "big")
            elen = int.from_bytes(body[p + 2:p + 4], "big")
            ext = body[p + 4:p + 4 + elen]
            p += 4 + elen
            if etype != 0:  # server_name
                continue
            q = 2  # server_name_list length
            while q + 3 <= len(ext):
                ntype, nlen = ext[q], int.from_bytes(ext[q + 1:q + 3], "big")
                name = ext[q + 3:q + 3 + nlen]
                q += 3 + nlen
                if ntype == 0 and len(name) == nlen:  # host_name
                    try:
                        text = name.decode("ascii").lower().rstrip(".")
                    except UnicodeDecodeError:
                        return None
                    return text or None
            return None
    except IndexError:
        return None
    return None


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


class CertificateAuthority:
    """An ephemeral CA for one sandbox, and the leaf certificates it signs per SNI."""

    def __init__(self, name: str = "sandbox", *, validity: _dt.timedelta = _dt.timedelta(days=7),
                 cache_size: int = 256) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("CA name must be a non-empty str")
        if validity <= _dt.timedelta(0):
            raise ValueError("CA validity must be positive")
        self._validity = validity
        self._cache: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._cache_size = cache_size
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sandbox runtime"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"sandbox CA {name}"[:64]),
        ])
        now = _now()
        self._not_after = now + validity
        ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            # Backdated an hour so a sandbox whose clock is slightly behind still trusts it.
            .not_valid_before(now - _dt.timedelta(hours=1))
            .not_valid_after(self._not_after)
            # path_length=0: this CA can sign leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self._ski = ski

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate in PEM: the only thing that goes into the sandbox."""
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, server_name: str) -> tuple[bytes, bytes]:
        """(certificate chain PEM, private key PEM) for `server_name` (a DNS name or IP)."""
        if not isinstance(server_name, str) or not server_name or len(server_name) > 253:
            raise ValueError(f"bad server name: {server_name!r}")
        name = server_name.lower().rstrip(".")
        san: x509.GeneralName
        try:
            san = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            try:
                san = x509.DNSName(name.encode("idna").decode("ascii"))
            except UnicodeError:
                raise ValueError(f"bad server name: {server_name!r}") from None
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(hours=1))
            .not_valid_after(min(self._not_after, now + _dt.timedelta(days=2)))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.ca_pem
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return chain, key_pem

    def server_context(self, server_name: str) -> ssl.SSLContext:
        """A server SSLContext presenting a leaf for `server_name` (cached per name)."""
        key_name = server_name.lower().rstrip(".") if isinstance(server_name, str) else server_name
        ctx = self._cache.get(key_name)  # type: ignore[arg-type]
        if ctx is not None:
            self._cache.move_to_end(key_name)
            return ctx
        chain, key_pem = self.issue(server_name)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # HTTP/1.1 only: the proxy speaks h11. Clients offering h2 fall back.
        ctx.set_alpn_protocols(["http/1.1"])
        _load_chain(ctx, chain, key_pem)
        self._cache[key_name] = ctx
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return ctx


def _load_chain(ctx: ssl.SSLContext, chain: bytes, key_pem: bytes) -> None:
    # ssl only loads certificates from paths. A memfd keeps the key off every
    # filesystem; the tempfile fallback (0600, deleted at once) is for kernels without it.
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("sandbox-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, chain + key_pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile() as f:  # pragma: no cover - non-Linux
        f.write(chain + key_pem)
        f.flush()
        ctx.load_cert_chain(f.name)
