"""Model signing in the OpenSSF Model Signing format, with EC P-256 keys.

A published folder carries ``model.sig``: a Sigstore bundle around an in-toto statement that lists
the sha256 of every other file in the folder, signed with the coordinator's key pair through the
``model_signing`` package (OpenSSF, 1.1.x). ``manifest.json`` (run id, config hash, round,
evaluation, privacy statement) is one of those files, so the signature covers it. Anyone can check
a folder with the upstream tool as well as with fedtune::

    model_signing verify key MODEL --signature MODEL/model.sig --public_key signing_key.pub.pem

Verification checks the signature, then every file's digest, and refuses missing, changed or
added files; only then is the manifest read.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common import __version__
from common.core.errors import FedtuneError, IntegrityError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "model.sig"
PRIVATE_KEY_NAME = "signing_key.pem"
PUBLIC_KEY_NAME = "signing_key.pub.pem"
MANIFEST_FORMAT = "fedtune-manifest/2"
SIGNATURE_FORMAT = "OpenSSF Model Signing v1 (Sigstore bundle, in-toto statement), sha256 per file"
# model_signing's key-pair signer takes these curves (Sigstore's list); P-256 is the default.
CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}


class KeyFileError(FedtuneError):
    """A key file is missing, unreadable, of the wrong type, or its passphrase is wrong."""


@dataclass(frozen=True)
class Verified:
    """What a verified folder attests: its manifest and every file the signature covers."""

    manifest: dict[str, Any]
    files: list[str]


# --------------------------------------------------------------------------------------- keys


def generate_keys(out_dir: str | Path, passphrase: str | None = None) -> tuple[Path, Path]:
    """Write a new EC P-256 key pair into ``out_dir``; return (private key path, public key path).

    The private key is PKCS8 PEM, encrypted when a passphrase is given, created with mode 0600 from
    the start (no window where another user could read it). Existing key files are never replaced.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    for path in (priv_path, pub_path):
        if path.exists():
            raise KeyFileError(f"`{path}` already exists; refusing to overwrite a key")
    key = ec.generate_private_key(ec.SECP256R1())
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
    logger.info("wrote EC P-256 key pair to %s", out)
    return priv_path, pub_path


def load_private_key(path: str | Path, passphrase: str | None = None) -> ec.EllipticCurvePrivateKey:
    """Load a PEM EC private key; a wrong or missing passphrase is a :class:`KeyFileError`."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, passphrase.encode() if passphrase else None)
    except TypeError as err:  # encrypted without passphrase, or passphrase on a plain key
        raise KeyFileError(f"private key `{path}`: {err}") from None
    except ValueError:
        raise KeyFileError(
            f"private key `{path}` could not be decrypted or parsed (wrong passphrase?)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in CURVES:
        raise KeyFileError(f"private key `{path}` is not an EC P-256 or P-384 key (got "
                           f"{_describe(key)}); make one with `fedtune keys generate`")  # fmt: skip
    return key


def load_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """Load a PEM EC P-256/P-384 public key."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyFileError(f"public key `{path}` is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in CURVES:
        raise KeyFileError(f"public key `{path}` is not an EC P-256 or P-384 key (got "
                           f"{_describe(key)})")  # fmt: skip
    return key


def _describe(key: Any) -> str:
    curve = getattr(key, "curve", None)
    return f"curve {curve.name}" if curve is not None else type(key).__name__


def _read_key_file(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise KeyFileError(f"cannot read key file `{path}`: {err.strerror}") from None


# ----------------------------------------------------------------------------------- manifest


def canonical_json(obj: Any) -> bytes:
    """One byte form of a JSON value: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def build_manifest(extra: dict[str, Any]) -> dict[str, Any]:
    """Provenance to attest: ``extra`` (run id, config hash, round, privacy statement...) plus
    the format tags and fedtune's version, which ``extra`` may not override."""
    reserved = {"format", "fedtune_version", "signature"}
    clash = sorted(reserved & set(extra))
    if clash:
        raise IntegrityError(f"manifest extra may not set reserved key(s) {clash}")
    signature = {"file": SIGNATURE_NAME, "format": SIGNATURE_FORMAT}
    return {**extra, "format": MANIFEST_FORMAT, "fedtune_version": __version__,
            "signature": signature}  # fmt: skip


def _check_plain_files(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_symlink():
            # A link could point anywhere at verify time; published folders hold plain files only.
            rel = path.relative_to(root).as_posix()
            raise IntegrityError(f"`{rel}` is a symbolic link; published folders hold plain files")


# -------------------------------------------------------------------------------- signing


def _hashing() -> Any:
    """sha256 per file, the signature file left out: the upstream CLI's defaults, so its
    ``verify key`` checks a fedtune folder as it is."""
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME])


def sign_folder(
    folder: str | Path,
    private_key: str | Path,
    extra: dict[str, Any] | None = None,
    passphrase: str | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json``, then sign every file of ``folder`` into ``model.sig``."""
    from model_signing import signing

    root = Path(folder)
    load_private_key(private_key, passphrase)  # a wrong key or passphrase as a fedtune error
    _check_plain_files(root)
    manifest = build_manifest(extra or {})
    (root / MANIFEST_NAME).write_bytes(canonical_json(manifest))
    # model-signing 1.1.1 hands `password` straight to cryptography, which wants bytes.
    password: Any = passphrase.encode() if passphrase else None
    config = signing.Config().use_elliptic_key_signer(private_key=private_key, password=password)
    config.set_hashing_config(_hashing()).sign(root, root / SIGNATURE_NAME)
    logger.info("signed %s (OpenSSF model signing, %s)", root, SIGNATURE_NAME)
    return manifest


# ---------------------------------------------------------------------------------- verifying


def verify_folder(folder: str | Path, public_key: str | Path) -> Verified:
    """Check ``model.sig`` against the public key and every file; then read the manifest.

    Raises :class:`IntegrityError` naming what does not match (a file's digest, a missing or
    added file, the key, the signature itself).
    """
    from model_signing import verifying

    root = Path(folder)
    load_public_key(public_key)  # a wrong key file as a fedtune error, not model_signing's
    if not root.is_dir():
        raise IntegrityError(f"`{root}` is not a folder")
    signature = root / SIGNATURE_NAME
    if not signature.is_file():
        raise IntegrityError(f"`{SIGNATURE_NAME}` is missing in `{root}`: the folder is not signed")
    _check_plain_files(root)
    config = verifying.Config().use_elliptic_key_verifier(public_key=public_key)
    try:
        config.set_hashing_config(_hashing()).verify(root, signature)
    except Exception as err:  # model_signing raises ValueError, InvalidSignature, JSON errors...
        raise IntegrityError(f"`{root}` does not match its signature `{SIGNATURE_NAME}`: "
                             f"{_explain(err)}") from None  # fmt: skip
    manifest = _read_manifest(root)
    files = _signed_files(signature)
    logger.info("verified %s (%d files)", root, len(files))
    return Verified(manifest, files)


def _explain(err: Exception) -> str:
    """model_signing's finding in a few words, naming the files (its own message prints raw
    digest bytes)."""
    text = str(err)
    # The findings come as the repr of a list of strings: quotes may be escaped.
    changed = re.findall(r"Hash mismatch for \\?'([^'\\]+)\\?'", text)
    added = re.search(r"Extra files found in model \\?'[^']*': ([^'\\\]\"]+)", text)
    missing = re.search(r"Missing files in model \\?'[^']*': ([^'\\\]\"]+)", text)
    found = [f"`{name}` does not match its digest" for name in changed]
    found += [f"`{name.strip()}` is not signed (added)" for name in (added[1] if added else "")
              .split(",") if name.strip()]  # fmt: skip
    found += [f"`{name.strip()}` is signed but missing" for name in (missing[1] if missing else "")
              .split(",") if name.strip()]  # fmt: skip
    if found:
        return "; ".join(found)
    if "Key mismatch" in text or type(err).__name__ == "InvalidSignature":
        return "the signature was not made with this public key (or the statement was changed)"
    return f"{type(err).__name__}: {text[:300]}"


def _read_manifest(root: Path) -> dict[str, Any]:
    """The manifest, read only after the signature has covered it."""
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_bytes())
    except FileNotFoundError:
        raise IntegrityError(f"`{MANIFEST_NAME}` is missing in `{root}`") from None
    except json.JSONDecodeError as err:
        raise IntegrityError(f"`{MANIFEST_NAME}` in `{root}` is not JSON ({err.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise IntegrityError(f"`{MANIFEST_NAME}` in `{root}` is not a {MANIFEST_FORMAT} manifest")
    return manifest


def _signed_files(signature: Path) -> list[str]:
    """The file names in the (already verified) in-toto statement of ``model.sig``."""
    bundle = json.loads(signature.read_text(encoding="utf-8"))
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    resources = statement.get("predicate", {}).get("resources", [])
    return sorted(str(r["name"]) for r in resources)
