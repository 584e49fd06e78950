"""Artifact signing: Ed25519 keys, a manifest of file hashes, and its signature.

A published folder carries ``manifest.json`` (sha256 and size of every other file, plus provenance)
and ``manifest.sig`` (a raw 64-byte Ed25519 signature over the exact bytes of ``manifest.json``).
The manifest is written as canonical JSON (sorted keys, no whitespace, UTF-8) so that the bytes that
are signed do not depend on who wrote them. Verification checks the signature *before* trusting
anything the manifest says, then every hash and size, then that no unlisted file was added.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common import __version__
from common.core.errors import FedtuneError, IntegrityError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
PRIVATE_KEY_NAME = "signing_key.pem"
PUBLIC_KEY_NAME = "signing_key.pub.pem"
MANIFEST_FORMAT = "fedtune-manifest/1"
_CHUNK = 1 << 20


class KeyFileError(FedtuneError):
    """A key file is missing, unreadable, of the wrong type, or its passphrase is wrong."""


# --------------------------------------------------------------------------------------- keys


def generate_keys(out_dir: str | Path, passphrase: str | None = None) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair into ``out_dir``; return (private key path, public key path).

    The private key is PKCS8 PEM, encrypted when a passphrase is given, created with mode 0600 from
    the start (no window where another user could read it). Existing key files are never replaced.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    for path in (priv_path, pub_path):
        if path.exists():
            raise KeyFileError(f"`{path}` already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode())
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_path.write_bytes(pub)
    logger.info("wrote Ed25519 key pair to %s", out)
    return priv_path, pub_path


def load_private_key(path: str | Path, passphrase: str | None = None) -> Ed25519PrivateKey:
    """Load a PEM Ed25519 private key; a wrong or missing passphrase is a :class:`KeyFileError`."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, passphrase.encode() if passphrase else None)
    except TypeError as err:  # encrypted without passphrase, or passphrase on a plain key
        raise KeyFileError(f"private key `{path}`: {err}") from None
    except ValueError:
        raise KeyFileError(
            f"private key `{path}` could not be decrypted or parsed (wrong passphrase?)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"private key `{path}` is not Ed25519 (got {type(key).__name__})")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Load a PEM Ed25519 public key."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyFileError(f"public key `{path}` is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"public key `{path}` is not Ed25519 (got {type(key).__name__})")
    return key


def _read_key_file(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise KeyFileError(f"cannot read key file `{path}`: {err.strerror}") from None


# ----------------------------------------------------------------------------------- manifest


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON value that gets signed: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of one file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _content_files(folder: Path) -> list[str]:
    """Relative POSIX paths of every file except the manifest and signature, sorted."""
    found: list[str] = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if rel in (MANIFEST_NAME, SIGNATURE_NAME):
            continue
        if path.is_symlink():
            # A link could point anywhere at verify time; published folders hold plain files only.
            raise IntegrityError(f"`{rel}` is a symbolic link; published folders hold plain files")
        if path.is_file():
            found.append(rel)
    return sorted(found)


def build_manifest(folder: str | Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Manifest of ``folder``: sha256 and size of every file (sorted) plus provenance.

    ``extra`` carries ``run_id``, ``config_hash`` and ``round`` (and anything else to attest);
    it cannot override the file list, the format tag, or the fedtune version.
    """
    root = Path(folder)
    files = []
    for rel in _content_files(root):
        sha, size = file_digest(root / rel)
        files.append({"path": rel, "sha256": sha, "size": size})
    reserved = {"files", "format", "fedtune_version"}
    clash = sorted(reserved & set(extra))
    if clash:
        raise IntegrityError(f"manifest extra may not set reserved key(s) {clash}")
    return {**extra, "format": MANIFEST_FORMAT, "fedtune_version": __version__, "files": files}


def sign_folder(
    folder: str | Path, private_key: Ed25519PrivateKey, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``manifest.json`` and ``manifest.sig`` into ``folder``; return the manifest."""
    root = Path(folder)
    manifest = build_manifest(root, extra or {})
    blob = canonical_json(manifest)
    (root / MANIFEST_NAME).write_bytes(blob)
    (root / SIGNATURE_NAME).write_bytes(private_key.sign(blob))
    logger.info("signed %s (%d files)", root, len(manifest["files"]))
    return manifest


# ---------------------------------------------------------------------------------- verifying


def verify_folder(folder: str | Path, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """Check signature, then every listed file's size and hash, then for unlisted files.

    Returns the manifest. Raises :class:`IntegrityError` naming the first file that does not match.
    """
    root = Path(folder)
    manifest = _verified_manifest(root, public_key)
    listed: set[str] = set()
    for entry in manifest["files"]:
        rel = _check_entry(root, entry)
        listed.add(rel)
    extra = [rel for rel in _content_files(root) if rel not in listed]
    if extra:
        raise IntegrityError(f"`{extra[0]}` is not listed in the manifest of `{root}`")
    logger.info("verified %s (%d files)", root, len(listed))
    return manifest


def _verified_manifest(root: Path, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """Read the manifest; trust nothing in it until the signature over its bytes checks out."""
    if not root.is_dir():
        raise IntegrityError(f"`{root}` is not a folder")
    try:
        blob = (root / MANIFEST_NAME).read_bytes()
        sig = (root / SIGNATURE_NAME).read_bytes()
    except FileNotFoundError as err:
        raise IntegrityError(f"`{Path(str(err.filename)).name}` is missing in `{root}`") from None
    try:
        public_key.verify(sig, blob)
    except InvalidSignature:
        raise IntegrityError(
            f"`{SIGNATURE_NAME}` does not match `{MANIFEST_NAME}` in `{root}` "
            "(tampered manifest or wrong public key)"
        ) from None
    manifest = json.loads(blob)
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), list):
        raise IntegrityError(f"`{MANIFEST_NAME}` in `{root}` is not a {MANIFEST_FORMAT} manifest")
    return dict(manifest)


def _check_entry(root: Path, entry: dict[str, Any]) -> str:
    rel = str(entry.get("path", ""))
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts:
        raise IntegrityError(f"manifest lists an unsafe path `{rel}`")
    path = root / rel
    if path.is_symlink() or not path.is_file():
        raise IntegrityError(f"`{rel}` is listed in the manifest but missing (or not a file)")
    sha, size = file_digest(path)
    if size != entry.get("size"):
        raise IntegrityError(f"`{rel}` has size {size}, manifest says {entry.get('size')}")
    if sha != entry.get("sha256"):
        raise IntegrityError(f"`{rel}` does not match its sha256 in the manifest")
    return rel


def verify_published(folder: str | Path, public_key_path: str | Path) -> dict[str, Any]:
    """Verify a published folder against the public key file at ``public_key_path``."""
    return verify_folder(folder, load_public_key(public_key_path))
