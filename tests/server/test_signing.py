"""EC P-256 keys; OpenSSF model signing of a folder, checked by fedtune and by the upstream CLI."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common import __version__
from common.core.errors import IntegrityError
from common.identity.signing import (
    MANIFEST_FORMAT,
    KeyFileError,
    build_manifest,
    canonical_json,
    generate_keys,
    load_private_key,
    load_public_key,
    sign_folder,
    verify_folder,
)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "adapter").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (root / "config.json").write_text('{"a": 1}')
    (root / "adapter" / "adapter_config.json").write_text("{}")
    return root


def _flip(path: Path, offset: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _upstream_verify(folder: Path, pub: Path) -> subprocess.CompletedProcess[str]:
    """The OpenSSF tool itself: `model_signing verify key MODEL --signature SIG --public_key K`."""
    exe = shutil.which("model_signing") or str(Path(sys.executable).parent / "model_signing")
    cmd = [exe, "verify", "key", str(folder), "--signature", str(folder / "model.sig"),
           "--public_key", str(pub)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_keys_are_p256_private_0600_and_encrypted_with_passphrase(tmp_path: Path) -> None:
    priv, pub = generate_keys(tmp_path, passphrase="s3cret")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in priv.read_bytes()
    key = load_private_key(priv, "s3cret")
    assert key.curve.name == "secp256r1"
    assert key.public_key().public_numbers() == load_public_key(pub).public_numbers()


def test_wrong_or_missing_passphrase_is_a_key_error(tmp_path: Path) -> None:
    priv, _ = generate_keys(tmp_path, passphrase="s3cret")
    with pytest.raises(KeyFileError, match=r"wrong passphrase"):
        load_private_key(priv, "nope")
    with pytest.raises(KeyFileError):
        load_private_key(priv, None)


def test_plain_key_no_overwrite_and_no_ed25519(tmp_path: Path) -> None:
    priv, _ = generate_keys(tmp_path)
    assert b"BEGIN PRIVATE KEY" in priv.read_bytes()
    before = priv.read_bytes()
    with pytest.raises(KeyFileError, match=r"already exists"):
        generate_keys(tmp_path)
    assert priv.read_bytes() == before
    with pytest.raises(KeyFileError, match=r"not a PEM public key"):
        load_public_key(priv)
    old = tmp_path / "ed25519.pem"  # a key of fedtune before OpenSSF signing
    old.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    with pytest.raises(KeyFileError, match=r"not an EC P-256 or P-384 key .*keys generate"):
        load_private_key(old)


def test_manifest_carries_provenance_not_reserved_keys() -> None:
    manifest = build_manifest({"run_id": "r1", "config_hash": "abc", "round": 3})
    assert manifest["fedtune_version"] == __version__ and manifest["format"] == MANIFEST_FORMAT
    assert (manifest["run_id"], manifest["round"]) == ("r1", 3)
    assert manifest["signature"]["file"] == "model.sig"
    with pytest.raises(IntegrityError, match=r"reserved"):
        build_manifest({"format": "x"})


def test_canonical_json_is_key_order_independent() -> None:
    assert canonical_json({"b": 1, "a": [1, "é"]}) == canonical_json({"a": [1, "é"], "b": 1})
    assert canonical_json({"a": 1}) == b'{"a":1}'


@pytest.fixture()
def signed(folder: Path, tmp_path: Path) -> tuple[Path, Path]:
    priv, pub = generate_keys(tmp_path / "k", passphrase="pw")
    sign_folder(folder, priv, {"round": 1, "privacy": "No guarantee."}, passphrase="pw")
    return folder, pub


def test_sign_then_verify_here_and_upstream(signed: tuple[Path, Path]) -> None:
    folder, pub = signed
    verified = verify_folder(folder, pub)
    assert verified.manifest["round"] == 1 and verified.manifest["privacy"] == "No guarantee."
    # The manifest is one of the signed files; the signature file itself is not.
    assert verified.files == ["adapter/adapter_config.json", "config.json", "manifest.json",
                              "model.safetensors"]  # fmt: skip
    bundle = json.loads((folder / "model.sig").read_text())
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    proc = _upstream_verify(folder, pub)
    assert proc.returncode == 0 and "Verification succeeded" in proc.stdout, proc.stderr


def test_flipped_byte_fails_here_and_upstream(signed: tuple[Path, Path]) -> None:
    folder, pub = signed
    _flip(folder / "model.safetensors")
    with pytest.raises(IntegrityError, match=r"`model\.safetensors` does not match its digest"):
        verify_folder(folder, pub)
    proc = _upstream_verify(folder, pub)
    assert proc.returncode != 0 and "model.safetensors" in proc.stderr


def test_changed_manifest_extra_and_missing_files(signed: tuple[Path, Path]) -> None:
    folder, pub = signed
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_bytes(canonical_json({**manifest, "round": 2}))
    with pytest.raises(IntegrityError, match=r"`manifest\.json` does not match"):
        verify_folder(folder, pub)
    assert _upstream_verify(folder, pub).returncode != 0
    (folder / "manifest.json").write_bytes(canonical_json(manifest))
    verify_folder(folder, pub)  # restored byte for byte: valid again
    (folder / "notes.txt").write_text("added later")
    with pytest.raises(IntegrityError, match=r"`notes\.txt` is not signed"):
        verify_folder(folder, pub)
    (folder / "notes.txt").unlink()
    (folder / "config.json").unlink()
    with pytest.raises(IntegrityError, match=r"`config\.json` is signed but missing"):
        verify_folder(folder, pub)


def test_wrong_key_or_missing_signature(signed: tuple[Path, Path], tmp_path: Path) -> None:
    folder, _ = signed
    _, other_pub = generate_keys(tmp_path / "other")
    with pytest.raises(IntegrityError, match=r"not made with this public key"):
        verify_folder(folder, other_pub)
    assert _upstream_verify(folder, other_pub).returncode != 0
    (folder / "model.sig").unlink()
    with pytest.raises(IntegrityError, match=r"`model\.sig` is missing"):
        verify_folder(folder, other_pub)


def test_symlinks_are_refused(folder: Path, tmp_path: Path) -> None:
    (folder / "link.json").symlink_to(folder / "config.json")
    priv, _ = generate_keys(tmp_path / "k")
    with pytest.raises(IntegrityError, match=r"symbolic link"):
        sign_folder(folder, priv)
