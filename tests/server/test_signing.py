"""Ed25519 keys, manifests and folder verification."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from common import __version__
from common.core.errors import IntegrityError
from common.identity.signing import (
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


def test_private_key_is_0600_and_encrypted_with_passphrase(tmp_path: Path) -> None:
    priv, pub = generate_keys(tmp_path, passphrase="s3cret")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in priv.read_bytes()
    assert b"PUBLIC KEY" in pub.read_bytes()
    key = load_private_key(priv, "s3cret")
    assert key.public_key().public_bytes_raw() == load_public_key(pub).public_bytes_raw()


def test_wrong_or_missing_passphrase_is_a_key_error(tmp_path: Path) -> None:
    priv, _ = generate_keys(tmp_path, passphrase="s3cret")
    with pytest.raises(KeyFileError, match=r"wrong passphrase"):
        load_private_key(priv, "nope")
    with pytest.raises(KeyFileError):
        load_private_key(priv, None)


def test_plain_key_and_no_overwrite(tmp_path: Path) -> None:
    priv, _ = generate_keys(tmp_path)
    assert b"BEGIN PRIVATE KEY" in priv.read_bytes()
    before = priv.read_bytes()
    with pytest.raises(KeyFileError, match=r"already exists"):
        generate_keys(tmp_path)
    assert priv.read_bytes() == before
    with pytest.raises(KeyFileError, match=r"not Ed25519|not a PEM"):
        load_public_key(priv)


def test_manifest_lists_sorted_files_with_hashes(folder: Path) -> None:
    manifest = build_manifest(folder, {"run_id": "r1", "config_hash": "abc", "round": 3})
    paths = [f["path"] for f in manifest["files"]]
    assert paths == ["adapter/adapter_config.json", "config.json", "model.safetensors"]
    assert manifest["files"][2]["size"] == 1024
    assert manifest["fedtune_version"] == __version__
    assert (manifest["run_id"], manifest["round"]) == ("r1", 3)
    with pytest.raises(IntegrityError, match=r"reserved"):
        build_manifest(folder, {"files": []})


def test_canonical_json_is_key_order_independent() -> None:
    assert canonical_json({"b": 1, "a": [1, "é"]}) == canonical_json({"a": [1, "é"], "b": 1})
    assert canonical_json({"a": 1}) == b'{"a":1}'


def test_sign_then_verify(folder: Path, tmp_path: Path) -> None:
    priv, pub = generate_keys(tmp_path / "k")
    sign_folder(folder, load_private_key(priv), {"round": 1})
    manifest = verify_folder(folder, load_public_key(pub))
    assert manifest["round"] == 1
    assert len(manifest["files"]) == 3


@pytest.fixture()
def signed(folder: Path, tmp_path: Path) -> tuple[Path, object]:
    priv, pub = generate_keys(tmp_path / "k")
    sign_folder(folder, load_private_key(priv), {"round": 1})
    return folder, load_public_key(pub)


def test_flipped_byte_names_the_file(signed: tuple[Path, object]) -> None:
    folder, pub = signed
    _flip(folder / "model.safetensors")
    with pytest.raises(IntegrityError, match=r"`model\.safetensors` does not match its sha256"):
        verify_folder(folder, pub)  # type: ignore[arg-type]


def test_changed_size_extra_and_missing_files(signed: tuple[Path, object]) -> None:
    folder, pub = signed
    (folder / "notes.txt").write_text("added later")
    with pytest.raises(IntegrityError, match=r"`notes.txt` is not listed"):
        verify_folder(folder, pub)  # type: ignore[arg-type]
    (folder / "notes.txt").unlink()
    with (folder / "config.json").open("a") as fh:
        fh.write(" ")
    with pytest.raises(IntegrityError, match=r"`config.json` has size"):
        verify_folder(folder, pub)  # type: ignore[arg-type]
    (folder / "config.json").unlink()
    with pytest.raises(IntegrityError, match=r"`config.json` is listed .* missing"):
        verify_folder(folder, pub)  # type: ignore[arg-type]


def test_tampered_manifest_or_wrong_key_fails_on_signature(
    signed: tuple[Path, object], tmp_path: Path
) -> None:
    folder, pub = signed
    _, other_pub = generate_keys(tmp_path / "other")
    with pytest.raises(IntegrityError, match=r"manifest.sig"):
        verify_folder(folder, load_public_key(other_pub))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["round"] = 2
    (folder / "manifest.json").write_bytes(canonical_json(manifest))
    with pytest.raises(IntegrityError, match=r"manifest.sig"):
        verify_folder(folder, pub)  # type: ignore[arg-type]
    (folder / "manifest.sig").unlink()
    with pytest.raises(IntegrityError, match=r"`manifest.sig` is missing"):
        verify_folder(folder, pub)  # type: ignore[arg-type]


def test_symlinks_are_refused(folder: Path, tmp_path: Path) -> None:
    (folder / "link.json").symlink_to(folder / "config.json")
    priv, _ = generate_keys(tmp_path / "k")
    with pytest.raises(IntegrityError, match=r"symbolic link"):
        sign_folder(folder, load_private_key(priv))
