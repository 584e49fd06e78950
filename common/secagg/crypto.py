"""Cryptographic primitives of fedtune's secure aggregation, all from ``cryptography``.

* X25519 key agreement (Bonawitz et al. 2017, §4 "KA"): two key pairs per site and round, ``c``
  for encrypting shares and ``s`` for pairwise masks, so that revealing one never helps with the
  other.
* HKDF-SHA256 turns every raw X25519 secret into a 256-bit key bound to a purpose, the round and
  the (unordered) pair of sites: a key is never reused across rounds or purposes.
* AES-256-GCM encrypts shares; the associated data binds version, round, sender and receiver, so a
  share replayed from another round or re-routed to another site fails authentication.
* AES-256-CTR over zero bytes is the mask generator (the PRG of §4), keyed with the full 256-bit
  HKDF output: unlike a 32-bit seeded MT19937 it is a cryptographic PRG, and with AES-NI it fills
  8 MB in about 1 ms.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from common.core.errors import SecAggError

logger = logging.getLogger(__name__)

VERSION = b"fedtune-secagg/v1"
KEY_BYTES = 32
NONCE_BYTES = 12
_CTR_ZERO_IV = bytes(16)


def new_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw ``(secret, public)`` bytes, 32 bytes each."""
    secret = X25519PrivateKey.generate()
    return secret.private_bytes_raw(), secret.public_key().public_bytes_raw()


def public_of(secret: bytes) -> bytes:
    """The raw X25519 public key of a raw secret key."""
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()


def _ids(*values: int) -> bytes:
    return b"".join(v.to_bytes(8, "big") for v in values)


def agree(
    secret: bytes, peer_public: bytes, purpose: bytes, round_id: int, a: int, b: int
) -> bytes:
    """256-bit key shared by sites ``a`` and ``b`` for ``purpose`` in ``round_id``.

    The pair is ordered (low id first) so both ends derive the same key.
    """
    try:
        raw = X25519PrivateKey.from_private_bytes(secret).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as exc:  # all-zero shared secret: a low-order (malicious) public key
        raise SecAggError(f"key agreement between sites {a} and {b} failed: {exc}") from exc
    info = VERSION + b" " + purpose + _ids(round_id, min(a, b), max(a, b))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(raw)


def derive(seed: bytes, purpose: bytes, round_id: int, site: int) -> bytes:
    """A 256-bit key for one site's own use (e.g. its self mask) from a 256-bit seed."""
    info = VERSION + b" " + purpose + _ids(round_id, site)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(seed)


def _share_ad(round_id: int, sender: int, receiver: int, view: bytes) -> bytes:
    return VERSION + b" share" + _ids(round_id, sender, receiver) + view


def seal(
    key: bytes, plaintext: bytes, round_id: int, sender: int, receiver: int, view: bytes = b""
) -> bytes:
    """AES-GCM ciphertext ``nonce || ct || tag``; both directions share the key, so the nonce
    is random (96 bits, a handful of messages per key). ``view``: the digest of the round as
    the sender saw it (messages.view_digest); a receiver shown another round cannot open it."""
    nonce = os.urandom(NONCE_BYTES)
    ad = _share_ad(round_id, sender, receiver, view)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def open_sealed(
    key: bytes, blob: bytes, round_id: int, sender: int, receiver: int, view: bytes = b""
) -> bytes:
    """Decrypt a share sealed by :func:`seal`; tampering or replay raises :class:`SecAggError`."""
    if len(blob) < NONCE_BYTES + 16:
        raise SecAggError(f"encrypted share from site {sender} is truncated ({len(blob)} bytes)")
    try:
        return AESGCM(key).decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], _share_ad(round_id, sender, receiver, view)
        )
    except InvalidTag as exc:
        raise SecAggError(
            f"encrypted share from site {sender} to site {receiver} in round {round_id} failed "
            "authentication (tampered, replayed, re-routed, or sealed under another view of "
            "the round)"
        ) from exc


def prg(key: bytes, size: int, dtype: type[np.unsignedinteger]) -> NDArray[np.unsignedinteger]:
    """``size`` uniform words of ``dtype`` from AES-256-CTR keyed with the full ``key``.

    Every key is used for exactly one stream (HKDF binds purpose, round and pair), so the fixed
    zero IV is safe.
    """
    if len(key) != KEY_BYTES:
        raise SecAggError(f"mask key must be {KEY_BYTES} bytes, got {len(key)}")
    nbytes = size * np.dtype(dtype).itemsize
    # update_into needs block_size - 1 spare bytes; it avoids a second 8 MB copy.
    out = bytearray(nbytes + 15)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_CTR_ZERO_IV)).encryptor()
    encryptor.update_into(bytes(nbytes), out)
    return np.frombuffer(out, dtype=dtype, count=size)


def commit(purpose: bytes, secret: bytes) -> bytes:
    """SHA-256 commitment to a uniform 256-bit secret, used to check reconstructions."""
    return hashlib.sha256(VERSION + b" commit " + purpose + secret).digest()
