"""mac1, mac2 and cookies: WireGuard's DoS defence (whitepaper §5.3), adapted to certificates.

Every handshake message ends with mac1 and mac2 (16 bytes each, HMAC-SHA256 truncated):

- mac1 = MAC(HASH("mac1----" || network key), message up to mac1). WireGuard keys it with the
  responder's static key, which an IX initiator does not know yet; Flatnet keys it with the *network
  key* (by default the fingerprint of the CA that signed this node's certificate). Checking it costs
  one HMAC, so datagrams from outside the network are dropped before any DH or signature check.
- mac2 = MAC(cookie, message up to mac2), or zeros when the initiator holds no fresh cookie.
- A responder *under load* (see flatnet.proto.ratelimit) answers an initiation whose mac2 is not
  valid with a cookie reply instead of doing DH: cookie = MAC(secret, source address), the secret
  rotating every COOKIE_SECRET_MAX_AGE. Only a sender that really receives at that address learns the
  cookie, so a spoofed flood never passes, and a real source is then rate-limited per address.

The cookie is sent encrypted under HASH("cookie--" || network key), bound to the initiation by using
its mac1 as associated data (so an off-path attacker cannot plant cookies).
"""

from __future__ import annotations

import hmac as _consttime
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from flatnet.proto.constants import COOKIE_SECRET_MAX_AGE, COOKIE_SIZE, MAC_SIZE
from flatnet.proto.cookie_reply import NONCE_SIZE, CookieReply

ZERO_MAC = bytes(MAC_SIZE)


def _sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def mac(key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()[:MAC_SIZE]


def address_bytes(addr) -> bytes:
    host, port = addr[0], addr[1]
    return f"{host}|{port}".encode()


class NetworkMacs:
    """The keys derived from one network key: mac1 and the cookie encryption key."""

    def __init__(self, network_key: bytes):
        self.mac1_key = _sha256(b"mac1----" + network_key)
        self.cookie_key = _sha256(b"cookie--" + network_key)
        self._cookie_aead = ChaCha20Poly1305(self.cookie_key)

    def mac1(self, mac1_input: bytes) -> bytes:
        return mac(self.mac1_key, mac1_input)

    def mac1_valid(self, mac1_input: bytes, mac1_value: bytes) -> bool:
        return _consttime.compare_digest(self.mac1(mac1_input), mac1_value)

    def sign(self, body: bytes, cookie: bytes | None) -> tuple[bytes, bytes]:
        """`body` with mac1 and mac2 appended, and the mac1 (kept to open a cookie reply)."""
        m1 = self.mac1(body)
        m2 = mac(cookie, body + m1) if cookie is not None else ZERO_MAC
        return body + m1 + m2, m1

    def seal_cookie(self, cookie: bytes, mac1_value: bytes, nonce: bytes) -> bytes:
        return self._cookie_aead.encrypt(nonce, cookie, mac1_value)

    def open_cookie(self, reply: CookieReply, mac1_value: bytes) -> bytes | None:
        try:
            cookie = self._cookie_aead.decrypt(reply.nonce, reply.encrypted_cookie, mac1_value)
        except InvalidTag:
            return None
        return cookie if len(cookie) == COOKIE_SIZE else None


class CookieChecker:
    """The responder's side: make cookies for source addresses and check mac2 against them."""

    def __init__(self, macs: NetworkMacs, random_bytes: Callable[[int], bytes]):
        self._macs = macs
        self._random_bytes = random_bytes
        self._secret = random_bytes(32)
        self._previous_secret: bytes | None = None
        self._secret_born: float | None = None

    def _rotate(self, now: float) -> None:
        # Lazy rotation on use: no timer of its own. Rotation is not "state" a bad packet can steer:
        # it depends on time only.
        if self._secret_born is None:
            self._secret_born = now
        elif now - self._secret_born >= COOKIE_SECRET_MAX_AGE:
            self._previous_secret, self._secret = self._secret, self._random_bytes(32)
            self._secret_born = now

    def cookie_for(self, addr, now: float) -> bytes:
        self._rotate(now)
        return mac(self._secret, address_bytes(addr))

    def mac2_valid(self, mac2_input: bytes, mac2_value: bytes, addr, now: float) -> bool:
        if mac2_value == ZERO_MAC:
            return False
        self._rotate(now)
        for secret in (self._secret, self._previous_secret):
            if secret is None:
                continue
            cookie = mac(secret, address_bytes(addr))
            if _consttime.compare_digest(mac(cookie, mac2_input), mac2_value):
                return True
        return False

    def make_reply(
        self, receiver_index: int, mac1_value: bytes, addr, now: float, macs: NetworkMacs | None = None
    ) -> CookieReply:
        """A cookie reply, sealed under `macs` (the network key the initiator's mac1 used; ours by default)."""
        nonce = self._random_bytes(NONCE_SIZE)
        sealer = macs if macs is not None else self._macs
        return CookieReply(receiver_index, nonce, sealer.seal_cookie(self.cookie_for(addr, now), mac1_value, nonce))
