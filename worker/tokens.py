"""Sealing Hub tokens for their short stay in Redis. Stdlib only, torch-free.

A token arrives in the ``X-HF-Token`` header and must never rest in plaintext in Redis, in job
arguments, results, logs or error messages. The API seals it under ``CBD_SECRET_KEY`` (shared by
the API and the workers; ``cbd serve`` generates one per process group), stores the ciphertext
under a Redis key with a short TTL and passes only that key name to the job.

``cryptography`` is not a dependency, so the scheme is built from HMAC-SHA256 alone:
encrypt-then-MAC with HMAC-SHA256 as the PRF of a counter-mode keystream (NIST SP 800-108
style key separation; SP 800-38A CTR construction with a PRF in place of the block cipher).
The MAC covers the version, the random 128-bit nonce, the ciphertext and the associated data
(the Redis key name), so a sealed value cannot be moved to another key or altered.

>>> box = seal("hf_abc", "k" * 32, aad="cbd:token:1")
>>> unseal(box, "k" * 32, aad="cbd:token:1")
'hf_abc'
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

VERSION = b"c1"
NONCE_BYTES = 16
TAG_BYTES = 32
MIN_KEY_CHARS = 16


class SealError(ValueError):
    """A sealed value that does not authenticate under this key (tampered, moved or wrong key)."""


def secret_key_from_env() -> str | None:
    key = os.environ.get("CBD_SECRET_KEY") or None
    return key if key and len(key) >= MIN_KEY_CHARS else None


def seal(plaintext: str, key: str, *, aad: str = "") -> str:
    nonce = os.urandom(NONCE_BYTES)
    enc, mac = _subkeys(key)
    data = plaintext.encode()
    body = bytes(a ^ b for a, b in zip(data, _keystream(enc, nonce, len(data)), strict=True))
    tag = hmac.new(mac, VERSION + nonce + body + aad.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(VERSION + nonce + body + tag).decode()


def unseal(sealed: str, key: str, *, aad: str = "") -> str:
    try:
        raw = base64.urlsafe_b64decode(sealed.encode())
    except (ValueError, TypeError):
        raise SealError("sealed value is not base64") from None
    if len(raw) < len(VERSION) + NONCE_BYTES + TAG_BYTES or not raw.startswith(VERSION):
        raise SealError("sealed value has the wrong format")
    nonce = raw[len(VERSION):len(VERSION) + NONCE_BYTES]
    body, tag = raw[len(VERSION) + NONCE_BYTES:-TAG_BYTES], raw[-TAG_BYTES:]
    enc, mac = _subkeys(key)
    want = hmac.new(mac, VERSION + nonce + body + aad.encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(tag, want):
        raise SealError("sealed value does not authenticate (wrong CBD_SECRET_KEY or tampered)")
    return bytes(a ^ b for a, b in zip(body, _keystream(enc, nonce, len(body)), strict=True)).decode()


def _subkeys(key: str) -> tuple[bytes, bytes]:
    """Independent encryption and MAC keys derived from the shared secret."""
    root = key.encode()
    return (hmac.new(root, b"cbd-token-seal/enc", hashlib.sha256).digest(),
            hmac.new(root, b"cbd-token-seal/mac", hashlib.sha256).digest())


def _keystream(enc: bytes, nonce: bytes, n: int) -> bytes:
    blocks = (hmac.new(enc, nonce + i.to_bytes(4, "big"), hashlib.sha256).digest()
              for i in range((n + 31) // 32))
    return b"".join(blocks)[:n]
