"""Keys and sealed frames (the crypto layer): scrypt, HKDF, HMAC and AES-256-GCM from
`cryptography`; nothing here is a home-made primitive.

* `stretch`: the shared secret, stretched once per process with scrypt (salted with the
  cluster id), so one captured handshake does not allow cheap offline guessing.
* `Transcript`: an unambiguous hash of the handshake's messages as they were sent (each
  length-prefixed), which both proofs and the session keys are bound to.
* `proof`: HMAC-SHA256 over a role and the transcript, with a key derived from the stretched
  secret: a node proves it knows the secret, for exactly this handshake.
* `session_keys`: one AES-256-GCM key per direction, from the stretched secret and the whole
  transcript (HKDF-SHA256), as TLS 1.3 and WireGuard derive theirs.
* `Sealer` / `Opener`: one direction of a link. Frame i's header and payload are two AEAD
  records with nonces (0, i) and (1, i), and the frame's plaintext prefix as associated
  data; a changed, dropped, replayed or reordered frame fails to open.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from p2pdl.errors import ProtocolError

__all__ = [
    "NONCE_BYTES",
    "TAG_BYTES",
    "Opener",
    "Sealer",
    "Transcript",
    "proof",
    "proofs_match",
    "session_keys",
    "stretch",
]

TAG_BYTES = 16
"""What AES-GCM adds to each record."""
NONCE_BYTES = 32
"""Length of each side's handshake nonce."""

SCRYPT_N = 1 << 14
"""scrypt cost: 16 MiB of memory and ~40 ms once per process and secret (the secret is at
least 16 bytes; this makes each offline guess cost what an online one does)."""

_NONCE = struct.Struct(">IQ")  # record kind (0 header, 1 payload), frame number


@functools.lru_cache(maxsize=8)
def stretch(secret: bytes, cluster_id: str) -> bytes:
    """The stretched secret of a cluster (scrypt, cached for the life of the process)."""
    kdf = Scrypt(salt=b"p2pdl/v2/" + cluster_id.encode(), length=32, n=SCRYPT_N, r=8, p=1)
    return kdf.derive(secret)


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


class Transcript:
    """SHA-256 over the handshake messages in order, each prefixed by its length."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256(b"p2pdl handshake v2")

    def add(self, message: bytes) -> None:
        self._hash.update(struct.pack(">Q", len(message)))
        self._hash.update(message)

    def digest(self) -> bytes:
        return self._hash.copy().digest()


def proof(stretched: bytes, role: bytes, transcript: bytes) -> bytes:
    """HMAC-SHA256 of `role` and the transcript hash, keyed by the stretched secret."""
    key = _hkdf(stretched, b"", b"p2pdl proof key")
    return hmac.new(key, role + b"\x00" + transcript, hashlib.sha256).digest()


def proofs_match(want: bytes, got: object) -> bool:
    """Constant-time comparison that treats a non-bytes claim as a mismatch."""
    return isinstance(got, bytes) and hmac.compare_digest(want, got)


def session_keys(stretched: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(client → server key, server → client key), bound to the whole transcript."""
    return (
        _hkdf(stretched, transcript, b"p2pdl client to server"),
        _hkdf(stretched, transcript, b"p2pdl server to client"),
    )


class Sealer:
    """The sending direction of a link: numbers frames and seals their two records."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._next = 0

    def number(self) -> int:
        """The next frame's number (frames must then go out in this order)."""
        seq = self._next
        self._next += 1
        return seq

    def seal_header(self, seq: int, prefix: bytes, header: bytes) -> bytes:
        return self._aead.encrypt(_NONCE.pack(0, seq), header, prefix)

    def seal_payload_into(
        self, seq: int, prefix: bytes, payload: memoryview, out: memoryview
    ) -> None:
        """Encrypt `payload` into `out` (its length plus the tag); `payload` is untouched."""
        self._aead.encrypt_into(_NONCE.pack(1, seq), payload, prefix, out)


class Opener:
    """The receiving direction of a link: opens frames in the order they arrive."""

    def __init__(self, key: bytes, peer: str) -> None:
        self._key = key
        self._aead = AESGCM(key)
        self._next = 0
        self.peer = peer

    def number(self) -> int:
        seq = self._next
        self._next += 1
        return seq

    def _failed(self, what: str) -> ProtocolError:
        return ProtocolError(
            f"a frame {what} from {self.peer} failed authentication: it was changed, "
            "dropped, replayed or reordered on the way"
        )

    def open_header(self, seq: int, prefix: bytes, sealed: memoryview) -> bytes:
        try:
            return self._aead.decrypt(_NONCE.pack(0, seq), sealed, prefix)
        except InvalidTag:
            raise self._failed("header") from None

    def open_payload_into(
        self, seq: int, prefix: bytes, sealed: memoryview, out: memoryview
    ) -> None:
        """Decrypt `sealed` (ciphertext and tag) straight into `out`."""
        try:
            self._aead.decrypt_into(_NONCE.pack(1, seq), sealed, prefix, out)
        except InvalidTag:
            raise self._failed("payload") from None

    def open_payload_in_place(
        self, seq: int, prefix: bytes, buffer: memoryview, tag: bytes
    ) -> None:
        """Decrypt the ciphertext in `buffer` where it lies (the posted buffer: the record's
        tag arrived separately), then check the tag. If the check fails the buffer holds
        garbage and ProtocolError says so: the receive fails, it never yields a result."""
        decryptor = Cipher(
            algorithms.AES(self._key), modes.GCM(_NONCE.pack(1, seq), tag)
        ).decryptor()
        decryptor.authenticate_additional_data(prefix)
        n = buffer.nbytes
        # update_into wants room for a block beyond its input: in place up to the last 15
        # bytes, which go through a small scratch.
        head = max(0, n - 15)
        if head:
            decryptor.update_into(buffer[:head], buffer[:n])
        if head < n:
            scratch = bytearray(32)
            done = decryptor.update_into(buffer[head:n], scratch)
            buffer[head : head + done] = scratch[:done]
        try:
            decryptor.finalize()
        except InvalidTag:
            raise self._failed("payload") from None
