"""common.identity.certs: the CA, the SuperLink TLS certificate and site node keys."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from common.core.errors import FedtuneError, SecAggError
from common.identity.certs import (
    CertificateError,
    certs_init,
    certs_site,
    ephemeral_federation,
    fingerprint,
    init_ca,
    init_identity_ca,
    issue_identity,
    site_keys,
)
from common.secagg.auth import Identity, TrustAnchor, statement


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_ca_writes_a_ca_and_a_server_certificate_it_signed(tmp_path: Path) -> None:
    paths = init_ca(tmp_path / "certs", ["link.example.org"], ["10.1.2.3", "::1"])
    assert _mode(paths.ca_key) == 0o600 and _mode(paths.server_key) == 0o600
    ca, server = _cert(paths.ca_cert), _cert(paths.server_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # localhost / 127.0.0.1 always: the SuperLink's own ServerApp runner connects on loopback.
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "link.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(a) for a in ("127.0.0.1", "10.1.2.3", "::1")
    ]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    key = serialization.load_pem_private_key(paths.server_key.read_bytes(), None)
    assert key.public_key() == server.public_key()


def test_init_ca_defaults_to_localhost(tmp_path: Path) -> None:
    san = (
        _cert(init_ca(tmp_path, [], []).server_cert)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_init_ca_names_every_bad_name_and_address(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="not valid IP addresses: '300.1.1.1', 'x'"):
        init_ca(tmp_path, [], ["300.1.1.1", "x"])
    with pytest.raises(CertificateError, match="'bad name'"):
        init_ca(tmp_path, ["bad name"], [])
    assert not list(tmp_path.iterdir())


def test_nothing_is_overwritten(tmp_path: Path) -> None:
    init_ca(tmp_path, [], [])
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(CertificateError, match="refusing to overwrite"):
        init_ca(tmp_path, [], [])
    assert (tmp_path / "ca.key").read_bytes() == before
    site_keys(tmp_path, "bank-a")
    with pytest.raises(FedtuneError, match="refusing to overwrite"):
        site_keys(tmp_path, "bank-a")


def test_site_keys_are_what_flower_node_auth_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    paths = site_keys(tmp_path / "keys", "hospital-1")
    assert _mode(paths.private_key) == 0o600
    # the SuperExec secret shared by the SuperNode and `fedtune site-exec`: private and random
    assert _mode(paths.exec_secret) == 0o600 and len(paths.exec_secret.read_bytes()) == 64
    other = site_keys(tmp_path / "other", "hospital-b").exec_secret.read_bytes()
    assert other != paths.exec_secret.read_bytes()
    assert paths.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    # flower-supernode --auth-supernode-private-key: load_ssh_private_key, an EC key
    private = serialization.load_ssh_private_key(paths.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    # flwr supernode register NAME.pub: OpenSSH public key on a NIST curve
    public = serialization.load_ssh_public_key(paths.public_key.read_bytes())
    assert public == private.public_key()
    assert try_load_public_key(paths.public_key)
    assert fingerprint(paths.public_key).startswith("SHA256:")


@pytest.mark.parametrize("name", ["", "../escape", "a b", "-flag", "x" * 65, "site/1"])
def test_site_names_that_are_not_plain_file_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(CertificateError, match="site name"):
        site_keys(tmp_path, name)
    assert not list(tmp_path.iterdir())


def test_cli_functions_print_paths_never_key_material(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs_init(tmp_path / "certs", ["coordinator.local"], [])
    certs_site("bank-b", tmp_path / "keys")
    out = capsys.readouterr().out
    assert "ca.crt" in out and "bank-b.pub" in out and "flwr supernode register" in out
    assert "bank-b.identity.csr" in out
    assert "PRIVATE KEY" not in out and "BEGIN" not in out


def _tls_server(cert: Path, key: Path) -> tuple[int, threading.Thread, socket.socket]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)

    def serve() -> None:
        for _ in range(3):
            try:
                conn, _addr = sock.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return int(sock.getsockname()[1]), thread, sock


def test_tls_handshake_succeeds_with_the_ca_and_fails_without(tmp_path: Path) -> None:
    paths = init_ca(tmp_path, [], [])
    port, thread, sock = _tls_server(paths.server_cert, paths.server_key)
    try:
        trusting = ssl.create_default_context(cafile=str(paths.ca_cert))
        for host in ("localhost", "127.0.0.1"):
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                trusting.wrap_socket(raw, server_hostname=host) as tls,
            ):
                assert tls.recv(2) == b"ok"
        untrusting = ssl.create_default_context()  # system trust store only
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            untrusting.wrap_socket(raw, server_hostname="localhost")
    finally:
        sock.close()
        thread.join(timeout=5)


def test_site_keys_write_an_identity_key_and_csr_and_with_the_ca_its_certificate(
    tmp_path: Path,
) -> None:
    ca = init_identity_ca(tmp_path / "consortium")
    assert _mode(ca.key) == 0o600
    paths = site_keys(tmp_path / "keys", "clinic-1", ca.key, ca.cert)
    assert _mode(paths.identity_key) == 0o600 and paths.identity_cert is not None
    key = serialization.load_pem_private_key(paths.identity_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    identity = Identity.from_pem(paths.identity_key.read_bytes(), paths.identity_cert.read_bytes())
    peer = TrustAnchor.from_pem(ca.cert.read_bytes()).peer(identity.cert_der, "clinic-1")
    assert peer.name == "clinic-1"
    message = statement(b"test", 7, b"payload")
    peer.verify(message, identity.sign(message), "a test statement")
    with pytest.raises(SecAggError, match="not signed"):
        peer.verify(statement(b"test", 8, b"payload"), identity.sign(message), "a replay")


def test_the_consortium_issues_an_identity_from_the_sites_csr(tmp_path: Path) -> None:
    paths = site_keys(tmp_path / "site", "bank-c")  # no CA at the site: a CSR only
    assert paths.identity_cert is None and paths.identity_csr.is_file()
    ca = init_identity_ca(tmp_path / "consortium")
    cert = issue_identity(paths.identity_csr, ca.key, ca.cert, tmp_path / "issued")
    assert cert.name == "bank-c.identity.crt"
    identity = Identity.from_pem(paths.identity_key.read_bytes(), cert.read_bytes())
    TrustAnchor.from_pem(ca.cert.read_bytes()).peer(identity.cert_der, "bank-c")
    with pytest.raises(CertificateError, match="refusing to overwrite"):
        issue_identity(paths.identity_csr, ca.key, ca.cert, tmp_path / "issued")


def test_only_site_identities_of_the_ca_pass(tmp_path: Path) -> None:
    tls = init_ca(tmp_path / "tls", [], [])
    anchor = TrustAnchor.from_pem(tls.ca_cert.read_bytes())
    # The SuperLink's TLS certificate is issued by the same CA and its key is the coordinator's:
    # it must never pass as a site (serverAuth, not clientAuth; and P-384).
    server = _cert(tls.server_cert).public_bytes(serialization.Encoding.DER)
    with pytest.raises(SecAggError, match="site identity|P-256"):
        anchor.peer(server, "the SuperLink's certificate")
    site = site_keys(tmp_path / "keys", "site-a", tls.ca_key, tls.ca_cert)
    assert site.identity_cert is not None
    anchor.peer(_cert(site.identity_cert).public_bytes(serialization.Encoding.DER), "site-a")
    foreign = ephemeral_federation(["site-a"])  # same name, another CA
    other = Identity.from_pem(*foreign.identities["site-a"])
    with pytest.raises(SecAggError, match="not issued by the federation's CA"):
        anchor.peer(other.cert_der, "site-a")
    with pytest.raises(SecAggError, match="not a CA"):
        TrustAnchor.from_pem(tls.server_cert.read_bytes())


def test_ephemeral_federation_lives_in_memory(tmp_path: Path) -> None:
    fed = ephemeral_federation(["site-0", "site-1"])
    anchor = TrustAnchor.from_pem(fed.ca_cert)
    peers = [
        anchor.peer(Identity.from_pem(*fed.identities[n]).cert_der, n) for n in ("site-0", "site-1")
    ]
    assert [p.name for p in peers] == ["site-0", "site-1"]
    assert peers[0].fingerprint != peers[1].fingerprint
