"""The Noise Protocol Framework (revision 34), 25519 + ChaChaPoly + BLAKE2s/SHA256, on `cryptography`.

Theory of operation. The three objects are the spec's own (§5): a CipherState (k, n) encrypts with
a 64-bit counter nonce; a SymmetricState (ck, h) owns the chaining key and the transcript hash;
a HandshakeState walks a *pattern table* (§7) token by token. Nothing here is specific to
Flatnet: the tunnel (`flatnet.proto.handshake`) drives a HandshakeState for Noise_IX and takes
the two CipherStates that `split()` returns. Every primitive comes from `cryptography`; this
module only composes them the way the spec says, and is checked against the cacophony vectors and
the independent `noiseprotocol` package in tests/proto.

Supported: every fundamental (§7.4) and deferred (§7.5) pattern with any `pskN` modifiers (§9),
DH 25519, cipher ChaChaPoly, hash BLAKE2s or SHA256. Errors are `NoiseError` (a message that does
not authenticate, a misuse such as writing out of turn).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from flatnet.proto.errors import NoiseError

DHLEN = 32
KEYLEN = 32
TAGLEN = 16
MAX_NONCE = 2**64 - 1  # reserved for rekey (§5.1); never used for a message

# --- pattern tables (§7.4 fundamental, §7.5 deferred) -----------------------------------------------
# Each entry: (initiator pre-message tokens, responder pre-message tokens, message token lists).
# Messages alternate initiator -> responder, responder -> initiator, ...

_PATTERN_TEXT = {
    # one-way (§7.4)
    "N": ("", "s", ["e, es"]),
    "K": ("s", "s", ["e, es, ss"]),
    "X": ("", "s", ["e, es, s, ss"]),
    # interactive fundamental (§7.4)
    "NN": ("", "", ["e", "e, ee"]),
    "NK": ("", "s", ["e, es", "e, ee"]),
    "NX": ("", "", ["e", "e, ee, s, es"]),
    "KN": ("s", "", ["e", "e, ee, se"]),
    "KK": ("s", "s", ["e, es, ss", "e, ee, se"]),
    "KX": ("s", "", ["e", "e, ee, se, s, es"]),
    "XN": ("", "", ["e", "e, ee", "s, se"]),
    "XK": ("", "s", ["e, es", "e, ee", "s, se"]),
    "XX": ("", "", ["e", "e, ee, s, es", "s, se"]),
    "IN": ("", "", ["e, s", "e, ee, se"]),
    "IK": ("", "s", ["e, es, s, ss", "e, ee, se"]),
    "IX": ("", "", ["e, s", "e, ee, se, s, es"]),
    # deferred (§7.5)
    "NK1": ("", "s", ["e", "e, ee, es"]),
    "NX1": ("", "", ["e", "e, ee, s", "es"]),
    "X1N": ("", "", ["e", "e, ee", "s", "se"]),
    "X1K": ("", "s", ["e, es", "e, ee", "s", "se"]),
    "XK1": ("", "s", ["e", "e, ee, es", "s, se"]),
    "X1K1": ("", "s", ["e", "e, ee, es", "s", "se"]),
    "X1X": ("", "", ["e", "e, ee, s, es", "s", "se"]),
    "XX1": ("", "", ["e", "e, ee, s", "es, s, se"]),
    "X1X1": ("", "", ["e", "e, ee, s", "es, s", "se"]),
    "K1N": ("s", "", ["e", "e, ee", "se"]),
    "K1K": ("s", "s", ["e, es", "e, ee", "se"]),
    "KK1": ("s", "s", ["e", "e, ee, se, es"]),
    "K1K1": ("s", "s", ["e", "e, ee, es", "se"]),
    "K1X": ("s", "", ["e", "e, ee, s, es", "se"]),
    "KX1": ("s", "", ["e", "e, ee, se, s", "es"]),
    "K1X1": ("s", "", ["e", "e, ee, s", "se, es"]),
    "I1N": ("", "", ["e, s", "e, ee", "se"]),
    "I1K": ("", "s", ["e, es, s", "e, ee", "se"]),
    "IK1": ("", "s", ["e, s", "e, ee, se, es"]),
    "I1K1": ("", "s", ["e, s", "e, ee, es", "se"]),
    "I1X": ("", "", ["e, s", "e, ee, s, es", "se"]),
    "IX1": ("", "", ["e, s", "e, ee, se, s", "es"]),
    "I1X1": ("", "", ["e, s", "e, ee, s", "se, es"]),
}


def _tokens(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


@dataclass(frozen=True)
class HandshakePattern:
    name: str  # e.g. "IXpsk2"
    initiator_pre: tuple[str, ...]
    responder_pre: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]

    @property
    def one_way(self) -> bool:
        return len(self.messages) == 1

    @property
    def has_psk(self) -> bool:
        return any("psk" in m for m in self.messages)


_PATTERN_NAME = re.compile(r"^([A-Z0-9]+?)((?:psk\d)(?:\+psk\d)*)?$")


def pattern(name: str) -> HandshakePattern:
    """The pattern `name` (a base pattern plus optional pskN modifiers, §9.2)."""
    m = _PATTERN_NAME.match(name)
    if not m or m.group(1) not in _PATTERN_TEXT:
        raise NoiseError(f"unsupported handshake pattern {name!r}")
    base = m.group(1)
    ipre, rpre, msgs = _PATTERN_TEXT[base]
    messages = [list(_tokens(t)) for t in msgs]
    for mod in filter(None, (m.group(2) or "").split("+")):
        n = int(mod[3:])
        if n > len(messages):
            raise NoiseError(f"psk modifier {mod} beyond the pattern's messages")
        if n == 0:
            messages[0].insert(0, "psk")
        else:
            messages[n - 1].append("psk")
    return HandshakePattern(name, _tokens(ipre), _tokens(rpre), tuple(tuple(t) for t in messages))


@dataclass(frozen=True)
class ProtocolName:
    pattern: HandshakePattern
    hash_name: str  # "BLAKE2s" | "SHA256"

    @classmethod
    def parse(cls, name: str | bytes) -> ProtocolName:
        if isinstance(name, bytes):
            name = name.decode("ascii")
        parts = name.split("_")
        if len(parts) != 5 or parts[0] != "Noise":
            raise NoiseError(f"not a Noise protocol name: {name!r}")
        _, pat, dh, cipher, hash_name = parts
        if dh != "25519" or cipher != "ChaChaPoly" or hash_name not in ("BLAKE2s", "SHA256"):
            raise NoiseError(f"unsupported primitives in {name!r}")
        return cls(pattern(pat), hash_name)

    def __str__(self) -> str:
        return f"Noise_{self.pattern.name}_25519_ChaChaPoly_{self.hash_name}"


# --- primitives (§4) ---------------------------------------------------------------------------------


def _hash_algorithm(hash_name: str) -> hashes.HashAlgorithm:
    return hashes.BLAKE2s(32) if hash_name == "BLAKE2s" else hashes.SHA256()


def _hash(hash_name: str, data: bytes) -> bytes:
    h = hashes.Hash(_hash_algorithm(hash_name))
    h.update(data)
    return h.finalize()


def _hmac(hash_name: str, key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(key, _hash_algorithm(hash_name))
    h.update(data)
    return h.finalize()


def hkdf(hash_name: str, chaining_key: bytes, ikm: bytes, outputs: int) -> tuple[bytes, ...]:
    """HKDF exactly as Noise §4.3 defines it (HMAC-based, 2 or 3 outputs, empty info)."""
    temp_key = _hmac(hash_name, chaining_key, ikm)
    out1 = _hmac(hash_name, temp_key, b"\x01")
    out2 = _hmac(hash_name, temp_key, out1 + b"\x02")
    if outputs == 2:
        return out1, out2
    out3 = _hmac(hash_name, temp_key, out2 + b"\x03")
    return out1, out2, out3


def nonce_bytes(n: int) -> bytes:
    """ChaChaPoly nonce (§12.3): 32 bits of zeros then the 64-bit counter little-endian."""
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")


def dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as e:  # low-order point: all-zero shared secret, refused by OpenSSL
        raise NoiseError("invalid DH public key") from e


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


# --- §5.1 CipherState ---------------------------------------------------------------------------------


class CipherState:
    __slots__ = ("k", "n", "_aead")

    def __init__(self, k: bytes | None = None):
        self.initialize_key(k)

    def initialize_key(self, k: bytes | None) -> None:
        self.k = k
        self.n = 0
        self._aead = ChaCha20Poly1305(k) if k is not None else None

    def has_key(self) -> bool:
        return self.k is not None

    def set_nonce(self, n: int) -> None:
        self.n = n

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        if self.n >= MAX_NONCE:
            raise NoiseError("nonce exhausted")
        ct = self._aead.encrypt(nonce_bytes(self.n), plaintext, ad)
        self.n += 1
        return ct

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None:
            return ciphertext
        if self.n >= MAX_NONCE:
            raise NoiseError("nonce exhausted")
        try:
            pt = self._aead.decrypt(nonce_bytes(self.n), ciphertext, ad)
        except InvalidTag as e:
            raise NoiseError("decryption failed") from e
        self.n += 1  # only after authentication (§5.1)
        return pt

    def rekey(self) -> None:
        """REKEY(k) (§4.2): the first 32 bytes of ENCRYPT(k, maxnonce, zerolen, zeros)."""
        assert self._aead is not None
        self.initialize_key_keep_nonce(self._aead.encrypt(nonce_bytes(MAX_NONCE), bytes(32), b"")[:32])

    def initialize_key_keep_nonce(self, k: bytes) -> None:
        n = self.n
        self.initialize_key(k)
        self.n = n


# --- §5.2 SymmetricState ------------------------------------------------------------------------------


class SymmetricState:
    def __init__(self, protocol_name: bytes, hash_name: str):
        self.hash_name = hash_name
        hashlen = 32
        if len(protocol_name) <= hashlen:
            self.h = protocol_name.ljust(hashlen, b"\x00")
        else:
            self.h = _hash(hash_name, protocol_name)
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = hkdf(self.hash_name, self.ck, ikm, 2)
        self.cipher.initialize_key(temp_k[:KEYLEN])

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.hash_name, self.h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = hkdf(self.hash_name, self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cipher.initialize_key(temp_k[:KEYLEN])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ct = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        pt = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[CipherState, CipherState]:
        temp_k1, temp_k2 = hkdf(self.hash_name, self.ck, b"", 2)
        return CipherState(temp_k1[:KEYLEN]), CipherState(temp_k2[:KEYLEN])


# --- §5.3 HandshakeState ------------------------------------------------------------------------------


class HandshakeState:
    """One side of one handshake. `write_message`/`read_message` until `finished`, then `split()`.

    `e` may be pinned (test vectors); otherwise `generate_ephemeral` (default: a fresh X25519 key)
    makes it when the pattern first sends "e".
    """

    def __init__(
        self,
        protocol: ProtocolName | str,
        initiator: bool,
        prologue: bytes = b"",
        s: X25519PrivateKey | None = None,
        e: X25519PrivateKey | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: list[bytes] | tuple[bytes, ...] = (),
        generate_ephemeral=X25519PrivateKey.generate,
    ):
        if not isinstance(protocol, ProtocolName):
            protocol = ProtocolName.parse(protocol)
        self.protocol = protocol
        self.initiator = initiator
        self.s, self.e, self.rs, self.re = s, e, rs, re
        self.psks = list(psks)
        self._generate_ephemeral = generate_ephemeral
        pat = protocol.pattern
        if pat.has_psk and not self.psks:
            raise NoiseError("pattern needs a pre-shared key")
        for p in self.psks:
            if len(p) != 32:
                raise NoiseError("pre-shared keys are 32 bytes")
        self.symmetric = SymmetricState(str(protocol).encode("ascii"), protocol.hash_name)
        self.symmetric.mix_hash(prologue)
        # Pre-messages (§7.1): initiator's first, then responder's.
        for owner_is_initiator, tokens in ((True, pat.initiator_pre), (False, pat.responder_pre)):
            mine = owner_is_initiator == initiator
            for token in tokens:
                if token == "s":
                    key = public_bytes(self.s) if mine and self.s else self.rs if not mine else None
                elif token == "e":
                    key = public_bytes(self.e) if mine and self.e else self.re if not mine else None
                else:
                    raise NoiseError(f"bad pre-message token {token}")
                if key is None:
                    raise NoiseError(f"pre-message needs a known '{token}' key")
                self.symmetric.mix_hash(key)
        self._messages = list(pat.messages)
        self._index = 0
        self._psk_index = 0
        self._split: tuple[CipherState, CipherState] | None = None

    # -- state ------------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._index >= len(self._messages)

    @property
    def handshake_hash(self) -> bytes:
        return self.symmetric.h

    def my_turn(self) -> bool:
        return not self.finished and (self._index % 2 == 0) == self.initiator

    def clone(self) -> HandshakeState:
        """An independent copy, to try a message without committing (a bad one leaves us as we were)."""
        other = object.__new__(HandshakeState)
        other.__dict__.update(self.__dict__)
        other.psks = list(self.psks)
        sym = object.__new__(SymmetricState)
        sym.__dict__.update(self.symmetric.__dict__)
        cipher = CipherState(self.symmetric.cipher.k)
        cipher.n = self.symmetric.cipher.n
        sym.cipher = cipher
        other.symmetric = sym
        return other

    def split(self) -> tuple[CipherState, CipherState]:
        """(initiator->responder, responder->initiator) cipher states, once finished."""
        if not self.finished:
            raise NoiseError("handshake not finished")
        if self._split is None:
            self._split = self.symmetric.split()
        return self._split

    # -- tokens -----------------------------------------------------------------------------------

    def _dh_token(self, token: str) -> bytes:
        # "es": initiator's ephemeral with responder's static; roles swap on the responder side.
        first, second = token[0], token[1]
        if self.initiator:
            local, remote = (self.e if first == "e" else self.s), (self.re if second == "e" else self.rs)
        else:
            local, remote = (self.e if second == "e" else self.s), (self.re if first == "e" else self.rs)
        if local is None or remote is None:
            raise NoiseError(f"missing key for '{token}'")
        return dh(local, remote)

    def _next_psk(self) -> bytes:
        if self._psk_index >= len(self.psks):
            raise NoiseError("not enough pre-shared keys")
        psk = self.psks[self._psk_index]
        self._psk_index += 1
        return psk

    def write_message(self, payload: bytes = b"") -> bytes:
        if not self.my_turn():
            raise NoiseError("not this side's turn to write")
        sym = self.symmetric
        out = bytearray()
        for token in self._messages[self._index]:
            if token == "e":
                if self.e is None:
                    self.e = self._generate_ephemeral()
                pub = public_bytes(self.e)
                out += pub
                sym.mix_hash(pub)
                if self.protocol.pattern.has_psk:
                    sym.mix_key(pub)
            elif token == "s":
                if self.s is None:
                    raise NoiseError("no static key to send")
                out += sym.encrypt_and_hash(public_bytes(self.s))
            elif token == "psk":
                sym.mix_key_and_hash(self._next_psk())
            else:
                sym.mix_key(self._dh_token(token))
        out += sym.encrypt_and_hash(payload)
        self._index += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """The payload of `message`; raises NoiseError (state then undefined: discard this object)."""
        if self.finished or self.my_turn():
            raise NoiseError("not this side's turn to read")
        sym = self.symmetric
        view = memoryview(message)
        pos = 0
        for token in self._messages[self._index]:
            if token == "e":
                if len(view) - pos < DHLEN:
                    raise NoiseError("message too short")
                self.re = bytes(view[pos : pos + DHLEN])
                pos += DHLEN
                sym.mix_hash(self.re)
                if self.protocol.pattern.has_psk:
                    sym.mix_key(self.re)
            elif token == "s":
                n = DHLEN + (TAGLEN if sym.cipher.has_key() else 0)
                if len(view) - pos < n:
                    raise NoiseError("message too short")
                self.rs = sym.decrypt_and_hash(bytes(view[pos : pos + n]))
                pos += n
            elif token == "psk":
                sym.mix_key_and_hash(self._next_psk())
            else:
                sym.mix_key(self._dh_token(token))
        rest = bytes(view[pos:])
        if sym.cipher.has_key() and len(rest) < TAGLEN:
            raise NoiseError("message too short")
        payload = sym.decrypt_and_hash(rest)
        self._index += 1
        return payload
