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
    """Files written by :func:`site_keys`."""

    private_key: Path
    public_key: Path
    exec_secret: Path


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

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate small clock skew
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

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


def site_keys(out_dir: str | Path, name: str) -> SiteKeyPaths:
    """Create site ``name``'s node-authentication key pair: ``NAME.key`` (0600) and ``NAME.pub``.

    Also ``NAME.superexec`` (0600), the secret the site's SuperNode and `fedtune site-exec` share.
    The private key stays at the site (``flower-supernode --auth-supernode-private-key``); the
    public key goes to the coordinator, who puts it on the allow-list with ``flwr supernode
    register NAME.pub <federation>``. Refuses to overwrite existing files.
    """
    if not _SITE_NAME.match(name):
        raise CertificateError(
            f"site name `{name}` must be 1-64 characters of letters, digits, `.`, `_`, `-` "
            "and start with a letter or digit"
        )
    out = Path(out_dir)
    paths = SiteKeyPaths(out / f"{name}.key", out / f"{name}.pub", out / f"{name}.superexec")
    _refuse_existing([paths.private_key, paths.public_key, paths.exec_secret])
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
    logger.info("node key pair for site %s written to %s", name, out)
    return paths


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


def certs_site(name: str, out: Path) -> None:
    """Create site ``name``'s node key pair in ``out``; print what was written and what's next."""
    paths = site_keys(out, name)
    print(f"private key (stays at the site, 0600): {paths.private_key}")
    print(f"public key (send to the coordinator):  {paths.public_key}")
    print(f"fingerprint (confirm out of band):     {fingerprint(paths.public_key)}")
    print(f"SuperExec secret (stays at the site):  {paths.exec_secret}")
    print(f"coordinator: flwr supernode register {paths.public_key.name} <federation>")


# -- helpers ---------------------------------------------------------------------------------
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
