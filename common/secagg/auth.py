"""Who is speaking: site identities for secure aggregation (ECDSA P-256 under the federation's CA).

Against a coordinator that deviates from the protocol, a site must know that every key advert and
every survivor list it acts on comes from a real, distinct site: otherwise the coordinator
advertises keys of its own and plays every other party (issue 13: two fake adverts against one
real site at t = 2 of 3 recovered its update exactly). Bonawitz et al. 2017 (§6, "active
adversary") give every user a signing key certified by a trusted party; so does fedtune:

* :class:`Identity`: a site's ECDSA P-256 key and its X.509 certificate, issued by the federation's
  identity CA (``fedtune certs site``; the CA is held by the consortium, not by the coordinator).
* :class:`TrustAnchor`: the CA certificate a site trusts. :meth:`TrustAnchor.peer` accepts a
  certificate only if the CA signed it, it is valid now, it is a P-256 end-entity certificate for
  client authentication (so the SuperLink's TLS server certificate, also issued by a fedtune CA,
  is not a site identity), and returns the :class:`Peer` whose key verifies that site's statements.
* :func:`statement`: the exact bytes that are signed: a domain-separated, length-prefixed encoding
  of the protocol version, the purpose and every field, so no signature can be replayed for
  another purpose, round, run or field split.

Only ``cryptography`` primitives; no Flower.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.core.errors import SecAggError
from common.secagg.crypto import VERSION

logger = logging.getLogger(__name__)

_HASH = hashes.SHA256()


def statement(purpose: bytes, *fields: bytes | int) -> bytes:
    """Canonical bytes to sign: version, purpose, then each field length-prefixed (ints as 8 bytes,
    so no two field lists encode alike)."""
    parts = [VERSION, b" sig ", purpose]
    for value in fields:
        raw = value.to_bytes(8, "big", signed=True) if isinstance(value, int) else bytes(value)
        parts += [len(raw).to_bytes(4, "big"), raw]
    return b"".join(parts)


def _p256(key: object, what: str) -> None:
    curve = getattr(key, "curve", None)
    if not isinstance(curve, ec.SECP256R1):
        raise SecAggError(f"{what} must be an ECDSA P-256 key, got {type(key).__name__}")


@dataclass(frozen=True)
class Peer:
    """A verified site identity: its name (certificate CN) and the key that signs for it."""

    name: str
    public_key: ec.EllipticCurvePublicKey

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of the public key (SubjectPublicKeyInfo): one value per identity."""
        der = self.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(der).digest()

    def verify(self, message: bytes, signature: bytes, what: str) -> None:
        """Raise :class:`SecAggError` naming ``what`` unless ``signature`` is this peer's."""
        try:
            self.public_key.verify(signature, message, ec.ECDSA(_HASH))
        except (InvalidSignature, ValueError) as exc:
            raise SecAggError(f"{what} is not signed by `{self.name}`'s identity key") from exc


class Identity:
    """A site's signing key and its certificate; the key never leaves the site."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        _p256(key, "the site identity key")
        if cert.public_key() != key.public_key():
            raise SecAggError("the identity certificate is not for the identity key")
        self._key, self.cert = key, cert

    @classmethod
    def from_pem(cls, key_pem: bytes, cert_pem: bytes) -> Identity:
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
            cert = x509.load_pem_x509_certificate(cert_pem)
        except (ValueError, TypeError) as exc:
            raise SecAggError(f"unreadable site identity key or certificate: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SecAggError(f"the identity key must be an EC key, got {type(key).__name__}")
        return cls(key, cert)

    def to_pem(self) -> tuple[bytes, bytes]:
        """(key, certificate) as PEM, for the site's own state between stages."""
        key = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key, self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def sign(self, message: bytes) -> bytes:
        """DER-encoded ECDSA P-256 / SHA-256 signature of ``message`` (see :func:`statement`)."""
        return self._key.sign(message, ec.ECDSA(_HASH))


class TrustAnchor:
    """The federation's identity CA, as a site trusts it (its own copy, never the coordinator's)."""

    def __init__(self, ca: x509.Certificate) -> None:
        try:
            is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise SecAggError("the trusted CA certificate is not a CA (basicConstraints)")
        self.ca = ca

    @classmethod
    def from_pem(cls, ca_pem: bytes) -> TrustAnchor:
        try:
            return cls(x509.load_pem_x509_certificate(ca_pem))
        except ValueError as exc:
            raise SecAggError(f"unreadable CA certificate: {exc}") from exc

    def to_pem(self) -> bytes:
        return self.ca.public_bytes(serialization.Encoding.PEM)

    def peer(self, cert_der: bytes, who: str) -> Peer:
        """The identity in ``cert_der`` if this CA issued it for a site; else SecAggError."""
        try:
            cert = x509.load_der_x509_certificate(cert_der)
        except ValueError as exc:
            raise SecAggError(f"{who}: unreadable identity certificate ({exc})") from exc
        try:
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise SecAggError(
                f"{who}: identity certificate not issued by the federation's CA"
            ) from exc
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise SecAggError(f"{who}: identity certificate is not valid now")
        _check_site_certificate(cert, who)
        key = cert.public_key()
        _p256(key, f"{who}: the certified key")
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names:
            raise SecAggError(f"{who}: identity certificate names no site (no common name)")
        return Peer(str(names[0].value), key)  # type: ignore[arg-type]


def uncertified_peer(cert_der: bytes, who: str) -> Peer:
    """The key in ``cert_der`` without asking who issued it: for the coordinator's sanity check
    only (is the signature the certificate's key's?). Sites always use :meth:`TrustAnchor.peer`."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        raise SecAggError(f"{who}: unreadable identity certificate ({exc})") from exc
    key = cert.public_key()
    _p256(key, f"{who}: the certified key")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return Peer(str(names[0].value) if names else "?", key)  # type: ignore[arg-type]


def _check_site_certificate(cert: x509.Certificate, who: str) -> None:
    """An end-entity certificate for client authentication: a CA's or a TLS server's is not."""
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        signs = cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    except x509.ExtensionNotFound as exc:
        raise SecAggError(f"{who}: identity certificate lacks {exc.oid._name}") from exc
    if is_ca or not signs or ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise SecAggError(
            f"{who}: not a site identity certificate (needs an end-entity certificate with "
            "digitalSignature and clientAuth)"
        )


@dataclass(frozen=True)
class Credentials:
    """What a site brings to a round: its identity and the CA it trusts."""

    identity: Identity
    anchor: TrustAnchor
