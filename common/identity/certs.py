"""Certificates and keys for a real deployment: TLS for the SuperLink, node keys for the sites.

Two kinds of material, both made with `cryptography` only:

* ``init_ca``: a certificate authority (``ca.key``, ``ca.crt``) and the SuperLink's TLS certificate
  (``server.key``, ``server.crt``) signed by it, valid for the given DNS names and IP addresses.
  The SuperLink starts with ``--ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile
  server.key``; SuperNodes and the ``flwr`` CLI trust ``ca.crt`` (``--root-certificates``,
  ``root-certificates`` in ``$FLWR_HOME/config.toml``).
* ``site_keys``: a site's node-authentication key pair as Flower 1.41 reads it: an EC key on a NIST
  curve (P-384), the private key in OpenSSH format (``flower-supernode
  --auth-supernode-private-key NAME.key``), the public key as one OpenSSH line (``flwr supernode
  register NAME.pub <federation>`` on the coordinator's side, with the SuperLink started with
  ``--enable-supernode-auth``). Registered public keys are the SuperLink's allow-list.

* ``site_keys`` also writes the site's **identity** key for secure aggregation
  (``NAME.identity.key``, ECDSA P-256, PKCS8, 0600) and a certificate signing request for it
  (``NAME.identity.csr``); given the identity CA it issues ``NAME.identity.crt`` at once. A site
  signs its key adverts and the survivor lists it saw with this key; peers verify against the
  identity CA (common/secagg/auth.py). It is a key of its own, not the node key: the node key
  signs Flower's requests, this one fedtune's statements, and each can be renewed alone.
* ``init_identity_ca`` / ``issue_identity``: the identity CA and what its holder runs on a site's
  CSR. The identity CA must be held by the consortium, never by the coordinator alone: whoever
  holds its key can mint site identities and play every site in a round (deploy/README.md).
* ``ephemeral_federation``: an in-memory identity CA and identities for simulation and tests only.

Private keys are created with mode 0600 and never overwritten; their contents are never logged.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.core.errors import FedtuneError

logger = logging.getLogger(__name__)

DEFAULT_NAMES = ("localhost",)
DEFAULT_IPS = ("127.0.0.1",)
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest server-certificate lifetime common TLS clients accept
IDENTITY_DAYS = 825
EPHEMERAL_DAYS = 2  # simulation identities: one run
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DNS_NAME = re.compile(
    r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$"
)


class CertificateError(FedtuneError):
    """Certificates or keys cannot be created (bad name or address, file already there)."""


@dataclass(frozen=True)
class CaPaths:
    """Files written by :func:`init_ca`."""

    ca_key: Path
    ca_cert: Path
    server_key: Path
    server_cert: Path


@dataclass(frozen=True)
class SiteKeyPaths:
    """Files written by :func:`site_keys` (``identity_cert`` only when given the identity CA)."""

    private_key: Path
    public_key: Path
    exec_secret: Path
    identity_key: Path
    identity_csr: Path
    identity_cert: Path | None = None


@dataclass(frozen=True)
class IdentityCaPaths:
    """Files written by :func:`init_identity_ca`."""

    key: Path
    cert: Path


@dataclass(frozen=True)
class EphemeralFederation:
    """An identity CA and one identity per site, in memory only (PEM bytes): simulation, tests."""

    ca_cert: bytes
    identities: dict[str, tuple[bytes, bytes]]  # site name -> (identity key, certificate)


# -- public API ------------------------------------------------------------------------------
def init_ca(
    out_dir: str | Path,
    names: list[str] | None = None,
    ips: list[str] | None = None,
    *,
    common_name: str = "fedtune SuperLink",
) -> CaPaths:
    """Create a CA and the SuperLink's TLS certificate signed by it, in ``out_dir``.

    ``names`` (DNS) and ``ips`` become the certificate's subject alternative names, always with
    ``localhost`` and ``127.0.0.1`` added: the SuperLink's own ServerApp runner connects to it on
    loopback and verifies this certificate. Refuses to overwrite existing files.
    """
    out = Path(out_dir)
    dns = _check_names(_unique([*DEFAULT_NAMES, *(n.strip() for n in names or [])]))
    addrs = _check_ips(_unique([*DEFAULT_IPS, *(i.strip() for i in ips or [])]))
    paths = CaPaths(out / "ca.key", out / "ca.crt", out / "server.key", out / "server.crt")
    _refuse_existing(list(vars(paths).values()))
    out.mkdir(parents=True, exist_ok=True)

    now = _now()
    ca_key, ca_cert = _new_ca("fedtune CA", ec.SECP384R1(), CA_DAYS)
    ca_name = ca_cert.subject
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())

    server_key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(a) for a in addrs]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )

    _write_private(paths.ca_key, _pem_private(ca_key))
    _write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.server_key, _pem_private(server_key))
    _write_public(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    logger.info(
        "CA and SuperLink certificate written to %s (names: %s; IPs: %s)",
        out,
        ", ".join(dns) or "-",
        ", ".join(str(a) for a in addrs) or "-",
    )
    return paths


def init_identity_ca(out_dir: str | Path) -> IdentityCaPaths:
    """Create the federation's identity CA: ``identity-ca.key`` (0600) and ``identity-ca.crt``.

    It certifies the sites' identity keys for secure aggregation. Its holder can mint site
    identities, so it belongs to the consortium (kept offline), not to the coordinator.
    """
    out = Path(out_dir)
    paths = IdentityCaPaths(out / "identity-ca.key", out / "identity-ca.crt")
    _refuse_existing([paths.key, paths.cert])
    out.mkdir(parents=True, exist_ok=True)
    key, cert = _new_ca("fedtune identity CA", ec.SECP384R1(), CA_DAYS)
    _write_private(paths.key, _pem_private(key))
    _write_public(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    logger.info("identity CA written to %s", out)
    return paths


def site_keys(
    out_dir: str | Path,
    name: str,
    ca_key: str | Path | None = None,
    ca_cert: str | Path | None = None,
) -> SiteKeyPaths:
    """Create site ``name``'s node-authentication key pair: ``NAME.key`` (0600) and ``NAME.pub``.

    Also ``NAME.superexec`` (0600), the secret the site's SuperNode and `fedtune site-exec` share.
    The private key stays at the site (``flower-supernode --auth-supernode-private-key``); the
    public key goes to the coordinator, who puts it on the allow-list with ``flwr supernode
    register NAME.pub <federation>``. And the identity key for secure aggregation,
    ``NAME.identity.key`` (0600), with its CSR ``NAME.identity.csr`` for the identity CA's holder
    (:func:`issue_identity`); given that CA (``ca_key``, ``ca_cert``), ``NAME.identity.crt`` too.
    Refuses to overwrite existing files.
    """
    _check_site_name(name)
    out = Path(out_dir)
    paths = SiteKeyPaths(
        out / f"{name}.key",
        out / f"{name}.pub",
        out / f"{name}.superexec",
        out / f"{name}.identity.key",
        out / f"{name}.identity.csr",
        out / f"{name}.identity.crt" if ca_key is not None else None,
    )
    ca = _load_ca(ca_key, ca_cert) if ca_key is not None or ca_cert is not None else None
    _refuse_existing([p for p in vars(paths).values() if p is not None])
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_private(paths.private_key, private)
    _write_public(paths.public_key, public + f" fedtune-{name}\n".encode())
    # Shared by the site's SuperNode and `fedtune site-exec` (--superexec-auth-secret-file): only
    # a holder may take the site's ClientApp tasks from the local Runtime API.
    _write_private(paths.exec_secret, secrets.token_hex(32).encode())
    identity = ec.generate_private_key(ec.SECP256R1())
    _write_private(paths.identity_key, _pem_private(identity))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_site_subject(name))
        .sign(identity, hashes.SHA256())
    )
    _write_public(paths.identity_csr, csr.public_bytes(serialization.Encoding.PEM))
    if ca is not None and paths.identity_cert is not None:
        cert = _identity_cert(ca[0], ca[1], name, identity.public_key(), IDENTITY_DAYS)
        _write_public(paths.identity_cert, cert.public_bytes(serialization.Encoding.PEM))
    logger.info("node key pair and identity key for site %s written to %s", name, out)
    return paths


def issue_identity(
    csr_path: str | Path, ca_key: str | Path, ca_cert: str | Path, out_dir: str | Path
) -> Path:
    """The identity CA's holder signs a site's CSR: writes ``NAME.identity.crt`` in ``out_dir``.

    The CSR must be self-signed by a P-256 key and name a valid site; check its fingerprint with
    the site over a second channel before issuing (who holds this key speaks for NAME).
    """
    try:
        csr = x509.load_pem_x509_csr(Path(csr_path).read_bytes())
    except (OSError, ValueError) as err:
        raise CertificateError(
            f"`{csr_path}` is not a certificate signing request: {err}"
        ) from None
    key = csr.public_key()
    if not csr.is_signature_valid or not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertificateError(f"`{csr_path}`: not a valid self-signed EC request")
    if not isinstance(key.curve, ec.SECP256R1):
        raise CertificateError(f"`{csr_path}`: the identity key must be P-256")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else ""
    _check_site_name(name)
    out = Path(out_dir) / f"{name}.identity.crt"
    _refuse_existing([out])
    signer, ca = _load_ca(ca_key, ca_cert)
    cert = _identity_cert(signer, ca, name, key, IDENTITY_DAYS)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    _write_public(out, cert.public_bytes(serialization.Encoding.PEM))
    logger.info("identity certificate for site %s written to %s", name, out)
    return out


def ephemeral_federation(names: list[str]) -> EphemeralFederation:
    """An identity CA and one identity per site name, in memory, valid for two days.

    For simulation and tests only: whoever calls this holds the CA, so these identities protect
    nothing against that party (in a simulation, the coordinator). Nothing is written to disk.
    """
    ca_key, ca_cert = _new_ca("fedtune ephemeral identity CA", ec.SECP256R1(), EPHEMERAL_DAYS)
    identities: dict[str, tuple[bytes, bytes]] = {}
    for name in names:  # a label only (nothing is written): any site name will do
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _identity_cert(ca_key, ca_cert, name, key.public_key(), EPHEMERAL_DAYS)
        identities[name] = (_pem_private(key), cert.public_bytes(serialization.Encoding.PEM))
    return EphemeralFederation(ca_cert.public_bytes(serialization.Encoding.PEM), identities)


def fingerprint(public_key_path: str | Path) -> str:
    """SHA-256 fingerprint of an OpenSSH public key file (as ``ssh-keygen -l`` prints it)."""
    import base64
    import hashlib

    try:
        fields = Path(public_key_path).read_text(encoding="ascii").split()
        blob = base64.b64decode(fields[1], validate=True)
    except (OSError, UnicodeError, IndexError, ValueError) as err:
        raise CertificateError(f"`{public_key_path}` is not an OpenSSH public key: {err}") from None
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


# -- CLI-facing functions (wired as `fedtune certs init` / `fedtune certs site`) --------------
def certs_init(out: Path, names: list[str], ips: list[str]) -> None:
    """Create the CA and the SuperLink's TLS certificate in ``out``; print what was written."""
    paths = init_ca(out, names, ips)
    print(f"CA certificate (give to every site and `flwr` user): {paths.ca_cert}")
    print(f"CA private key (keep offline, 0600):                 {paths.ca_key}")
    print(f"SuperLink certificate:                               {paths.server_cert}")
    print(f"SuperLink private key (0600):                        {paths.server_key}")


def certs_site(
    name: str, out: Path, ca_key: Path | None = None, ca_cert: Path | None = None
) -> None:
    """Create site ``name``'s node key pair and identity key in ``out`` (with the identity CA, its
    certificate too); print what was written and what's next."""
    paths = site_keys(out, name, ca_key, ca_cert)
    print(f"private key (stays at the site, 0600): {paths.private_key}")
    print(f"public key (send to the coordinator):  {paths.public_key}")
    print(f"fingerprint (confirm out of band):     {fingerprint(paths.public_key)}")
    print(f"SuperExec secret (stays at the site):  {paths.exec_secret}")
    print(f"identity key (stays at the site, 0600): {paths.identity_key}")
    if paths.identity_cert is not None:
        print(f"identity certificate:                   {paths.identity_cert}")
    else:
        print(f"identity CSR (send to the identity CA): {paths.identity_csr}")
    print(f"coordinator: flwr supernode register {paths.public_key.name} <federation>")


def certs_identity_ca(out: Path) -> None:
    """Create the identity CA in ``out``; print what was written."""
    paths = init_identity_ca(out)
    print(f"identity CA certificate (give to every site): {paths.cert}")
    print(f"identity CA private key (consortium, offline, 0600): {paths.key}")


def certs_issue(csr: Path, ca_key: Path, ca_cert: Path, out: Path) -> None:
    """Issue a site's identity certificate from its CSR; print where it was written."""
    print(
        f"identity certificate (send back to the site): {issue_identity(csr, ca_key, ca_cert, out)}"
    )


# -- helpers ---------------------------------------------------------------------------------
def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate small clock skew


def _new_ca(
    common_name: str, curve: ec.EllipticCurve, days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    now = _now()
    key = ec.generate_private_key(curve)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _identity_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    public_key: ec.EllipticCurvePublicKey,
    days: int,
) -> x509.Certificate:
    """A site identity: end entity, digitalSignature only, clientAuth (never serverAuth), so a
    TLS server certificate from the same CA can never pass as a site (common/secagg/auth.py)."""
    now = _now()
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(_site_subject(name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )


def _site_subject(name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "fedtune site"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )


def _load_ca(
    key_path: str | Path | None, cert_path: str | Path | None
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if key_path is None or cert_path is None:
        raise CertificateError("issuing an identity needs both the CA key and the CA certificate")
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError, TypeError) as err:
        raise CertificateError(f"cannot load the CA `{key_path}` / `{cert_path}`: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertificateError(f"`{key_path}` is not the EC key of `{cert_path}`")
    return key, cert


def _check_site_name(name: str) -> None:
    if not _SITE_NAME.match(name):
        raise CertificateError(
            f"site name `{name}` must be 1-64 characters of letters, digits, `.`, `_`, `-` "
            "and start with a letter or digit"
        )


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def _check_names(names: list[str]) -> list[str]:
    bad = [n for n in names if not _DNS_NAME.match(n) or len(n) > 253]
    if bad:
        raise CertificateError(f"not valid DNS names: {', '.join(repr(b) for b in bad)}")
    return names


def _check_ips(ips: list[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    bad: list[str] = []
    for ip in ips:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            bad.append(ip)
            continue
        if addr not in out:
            out.append(addr)
    if bad:
        raise CertificateError(f"not valid IP addresses: {', '.join(repr(b) for b in bad)}")
    return out


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _refuse_existing(paths: list[Path]) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise CertificateError(
            f"refusing to overwrite {', '.join(existing)}: move them away or choose another folder"
        )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never overwrite) with ``mode`` from the start: a private key is never
    world-readable, even briefly (fchmod as well, since the umask may narrow the open mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CertificateError(f"refusing to overwrite {path}") from None
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    _write_new(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_new(path, data, 0o644)
