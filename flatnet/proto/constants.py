"""Every protocol constant, in one place, named as the WireGuard paper (§6.1) and our wire spec name them.

Times are seconds on the engine's clock (`now`, Unix time: certificates are checked against it).
"""

from __future__ import annotations

# --- wire --------------------------------------------------------------------------------------------
PROTOCOL_VERSION = 1  # first byte of every datagram; a node drops versions it does not speak
NOISE_PROTOCOL_NAME = "Noise_IX_25519_ChaChaPoly_BLAKE2s"
NOISE_PROLOGUE = b"flatnet tunnel v1"  # binds the handshake to this protocol version (Noise §6)

# --- WireGuard timers (whitepaper §6.1, wireguard-go device/constants.go) ----------------------------
REKEY_AFTER_MESSAGES = 2**60
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX = 0.333  # drawn from the engine's injected rng on each retry
KEEPALIVE_TIMEOUT = 10.0
# The initiator of a session renews it on receive when it is this old (so it never reaches REJECT).
REKEY_ON_RECEIVE_AGE = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
# Sent data but heard nothing back for this long: the peer may be gone, start a new handshake.
NEW_HANDSHAKE_AFTER_SILENCE = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
# Flatnet's own: a simultaneous initiation shows the peer is there now; the lower key, which keeps
# initiating, retries this soon if its own initiation (maybe sent before the peer listened) goes
# unanswered, rather than at REKEY_TIMEOUT. Far above any LAN or relay round trip.
SIMULTANEOUS_INITIATION_RETRY = 1.0

# --- replay window (RFC 6479 style; WireGuard uses 2048 - 64) -----------------------------------------
REPLAY_WINDOW_SIZE = 4096

# --- queueing while handshaking -------------------------------------------------------------------------
MAX_QUEUED_PACKETS = 256  # per peer; the oldest is dropped ("queue-full") beyond this
# A packet with no route while a peer's certificate (and so its subnets) is still being learned
# waits this long, at most MAX_QUEUED_PACKETS of them in all, then is dropped as "no-route".
UNROUTED_HOLD_TIME = REKEY_TIMEOUT

# --- denial of service (WireGuard whitepaper §5.3) -----------------------------------------------------
COOKIE_SECRET_MAX_AGE = 120.0  # the responder's cookie secret rotates this often
COOKIE_MAX_AGE = COOKIE_SECRET_MAX_AGE - 5.0  # an initiator stops using a cookie after this
MAC_SIZE = 16
COOKIE_SIZE = 16
# Handshakes the responder does without asking for a cookie (token bucket, whole node): above this
# rate it is "under load" and requires mac2 (proof the source address is real).
HANDSHAKES_PER_SECOND = 50.0
HANDSHAKE_BURST = 50.0
# Under load, the rate each proven source address may still have handshakes processed.
HANDSHAKES_PER_SECOND_PER_SOURCE = 2.0
HANDSHAKE_BURST_PER_SOURCE = 5.0
MAX_RATE_LIMITED_SOURCES = 4096  # bounded memory for the per-source table
