"""The SecAgg+ primitives fedseg runs on both sides: X25519 key agreement, prime-field Shamir.

Flower 1.42's SecAgg+ agrees on every pairwise key with ECDH on NIST P-384, keys serialised as
PEM, and splits secrets with pycryptodome's pure-Python GF(2**128) Shamir. Per site and round
that is ``2 (s - 1)`` P-384 exchanges and as many PEM parses of the site's own private key (``s``
= neighbourhood, 27 at 100 sites), and ``2 s (t - 1)`` pure-Python field products: at 100 sites
these were most of a SecAgg+ round's CPU (docs/BENCHMARKS.md, "SecAgg+ at 100 and 1,000
sites"). This module replaces them, inside Flower's own SecAgg+ client mod and server workflow
(the protocol, its stages, checks and messages are unchanged):

* **key agreement**: X25519 (RFC 7748, the default key exchange of TLS 1.3) from
  ``cryptography``; keys travel as their raw 32 bytes; the shared secret goes through
  HKDF-SHA256 (info :data:`KDF_INFO`) to the same url-safe base64 32-byte key Flower derives,
  used as before for the share encryption (Fernet) and the pairwise masks (ChaCha20,
  :mod:`common.mask_prg`). X25519 gives ~128-bit security against P-384's ~192: the level of
  the 256-bit ChaCha20/AES keys it feeds is bounded by 128 bits either way by the Fernet
  (AES-128) share encryption. A peer's all-zero (small-order) public key is refused by
  ``cryptography`` when the key is used.
* **secret sharing**: :mod:`common.shamir` (GF(2**521 - 1)).
* **reading the masked vectors** (server only): :func:`common.npy.bytes_to_ndarray`, the same
  array as ``np.load`` without its per-array header parse (not part of the suite: the bytes
  on the wire are unchanged).

:func:`install` patches the names in Flower's SecAgg+ modules only (never Flower's key
modules, which the SuperNode's authentication also uses), after checking the Flower version and
that Flower's code looks every name up through its module. :data:`SUITE_ID` names the mask
generator, the secret sharing and the key agreement; the server announces it in the run plan
and a site whose own suite differs refuses the run before it makes any key.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common import npy, shamir
from common.mask_prg import PRG_ID, active_prg_id, calls_by_global_name, require_supported_flower

KEX_ID = "x25519-hkdf-sha256/1"
"""Identifier of this key agreement."""

KDF_INFO = b"fedseg secagg+ pairwise key v1"
"""HKDF ``info``: keys derived here are never valid for another purpose."""

PRIMITIVES_ID = f"{shamir.SCHEME_ID}+{KEX_ID}"
"""Secret sharing and key agreement of this module, as installed."""

FLOWER_PRIMITIVES_ID = "shamir-pycryptodome-gf(2^128)+ecdh-p384-pem"
"""What a side without the replacement uses (never mixed with :data:`PRIMITIVES_ID`)."""

KEY_BYTES = 32


def generate_key_pairs() -> tuple[x25519.X25519PrivateKey, x25519.X25519PublicKey]:
    """Return a fresh X25519 key pair."""
    private = x25519.X25519PrivateKey.generate()
    return private, private.public_key()


def private_key_to_bytes(private_key: x25519.X25519PrivateKey) -> bytes:
    """Serialise a private key to its raw 32 bytes."""
    return private_key.private_bytes_raw()


def public_key_to_bytes(public_key: x25519.X25519PublicKey) -> bytes:
    """Serialise a public key to its raw 32 bytes."""
    return public_key.public_bytes_raw()


def bytes_to_private_key(data: bytes) -> x25519.X25519PrivateKey:
    """Load a raw 32-byte private key; ``ValueError`` for anything else.

    Flower's SecAgg+ mod loads the site's own private key once per neighbour; the last few
    loaded keys are kept (in this process only, where the key bytes already are).
    """
    if not isinstance(data, bytes) or len(data) != KEY_BYTES:
        raise ValueError(f"an X25519 private key is {KEY_BYTES} raw bytes.")
    return _load_private_key(data)


@functools.lru_cache(maxsize=4)
def _load_private_key(data: bytes) -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.from_private_bytes(data)


def bytes_to_public_key(data: bytes) -> x25519.X25519PublicKey:
    """Load a raw 32-byte public key; ``ValueError`` for anything else."""
    if not isinstance(data, bytes) or len(data) != KEY_BYTES:
        raise ValueError(f"an X25519 public key is {KEY_BYTES} raw bytes.")
    return x25519.X25519PublicKey.from_public_bytes(data)


def generate_shared_key(private_key: x25519.X25519PrivateKey,
                        public_key: x25519.X25519PublicKey) -> bytes:
    """Agree on a pairwise key: X25519, then HKDF-SHA256 to 32 bytes, url-safe base64."""
    secret = private_key.exchange(public_key)  # raises for a small-order peer key
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KDF_INFO).derive(secret)
    return base64.urlsafe_b64encode(derived)


_KEX = {f.__name__: f for f in (generate_key_pairs, private_key_to_bytes, public_key_to_bytes,
                                 bytes_to_private_key, bytes_to_public_key, generate_shared_key)}
OURS: dict[str, Callable[..., Any]] = {
    **_KEX, "create_shares": shamir.create_shares, "combine_shares": shamir.combine_shares,
    "bytes_to_ndarray": npy.bytes_to_ndarray}
"""Every replacement, by the name Flower's modules bind it under."""

CLIENT_MOD = "flwr.client.mod.secure_aggregation.secaggplus_mod"
SERVER_WORKFLOW = "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
FLOWER_SHAMIR = "flwr.common.secure_aggregation.crypto.shamir"

PATCHED = {
    CLIENT_MOD: ("create_shares", *_KEX),
    SERVER_WORKFLOW: ("combine_shares", "bytes_to_private_key", "bytes_to_public_key",
                      "generate_shared_key", "bytes_to_ndarray"),
    FLOWER_SHAMIR: ("create_shares", "combine_shares"),
}
"""Flower module -> the names in it that are replaced."""

CALLERS = {
    CLIENT_MOD: (("_setup", ("generate_key_pairs", "private_key_to_bytes",
                             "public_key_to_bytes")),
                 ("_share_keys", ("create_shares", "generate_shared_key",
                                  "bytes_to_private_key", "bytes_to_public_key")),
                 ("_collect_masked_vectors", ("generate_shared_key", "bytes_to_private_key",
                                              "bytes_to_public_key"))),
    SERVER_WORKFLOW: (("SecAggPlusWorkflow", ("combine_shares", "generate_shared_key",
                                              "bytes_to_private_key", "bytes_to_public_key",
                                              "bytes_to_ndarray")),),
}
"""Flower module -> (function or class, names it must look up through the module)."""

_REPLACED: dict[tuple[str, str], object] = {}  # (module, name) -> Flower's original


def install(*modules: ModuleType, flower_version: str | None = None) -> None:
    """Replace Flower's key agreement and secret sharing in each given SecAgg+ module.

    Raises
    ------
    RuntimeError
        Flower is not a supported version, a module is not one of :data:`PATCHED` or lacks a
        name it should have, or Flower's SecAgg+ code would not call a replacement (one side
        would then agree or share differently from the other).
    """
    require_supported_flower(flower_version, "SecAgg+ key agreement and secret sharing")
    for module in modules:
        names = PATCHED.get(module.__name__)
        if names is None:
            raise RuntimeError(f"{module.__name__} is not a Flower module whose SecAgg+ "
                               f"primitives fedseg replaces ({', '.join(PATCHED)}).")
        for name in names:
            if not callable(getattr(module, name, None)):
                raise RuntimeError(
                    f"{module.__name__} has no callable {name!r}: this Flower version is not the "
                    "one fedseg's SecAgg+ primitives were written for. Refusing to run.")
        for caller_name, used in CALLERS.get(module.__name__, ()):
            caller = getattr(module, caller_name, None)
            for name in used:
                if caller is None or not calls_by_global_name(caller, module, name):
                    raise RuntimeError(
                        f"{module.__name__}.{caller_name} does not call {name} through its "
                        "module: replacing it would not change what Flower computes. "
                        "Refusing to run.")
        for name in names:
            current = getattr(module, name)
            if current is not OURS[name]:
                _REPLACED[(module.__name__, name)] = current
                setattr(module, name, OURS[name])


def uninstall(*modules: ModuleType) -> None:
    """Put Flower's own functions back (benchmarks compare both; never in a deployment)."""
    for module in modules:
        for name in PATCHED.get(module.__name__, ()):
            original = _REPLACED.get((module.__name__, name))
            if original is not None:
                setattr(module, name, original)


def is_installed(*modules: ModuleType) -> bool:
    """Whether every given module uses this module's functions for every replaced name."""
    for module in modules:
        names = PATCHED.get(module.__name__, ())
        if not names or any(getattr(module, name, None) is not OURS[name] for name in names):
            return False
    return True


def active_id(*modules: ModuleType) -> str:
    """Return the primitives the modules use: :data:`PRIMITIVES_ID` or the Flower one."""
    return PRIMITIVES_ID if is_installed(*modules) else FLOWER_PRIMITIVES_ID


def suite_id(prg_id: str, primitives_id: str) -> str:
    """Return a side's SecAgg+ suite (mask generator, secret sharing, key agreement) as one id.

    The run plan announces it (``RunPlan.prg``) and a site refuses a plan whose suite differs
    from its own: masks, shares or keys made one way cannot be used the other way.
    """
    return f"{prg_id}+{primitives_id}"


def suite_of(mask_modules: tuple[ModuleType, ...], primitive_modules: tuple[ModuleType, ...],
             ) -> str:
    """Return the suite in force in a side's Flower modules (masks, then the primitives)."""
    return suite_id(active_prg_id(*mask_modules), active_id(*primitive_modules))


SUITE_ID = suite_id(PRG_ID, PRIMITIVES_ID)
"""The suite both fedseg sides use once :mod:`common.mask_prg` and this module are installed."""
