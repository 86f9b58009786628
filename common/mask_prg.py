"""Full-strength SecAgg+ masks: a ChaCha20 keystream keyed by the whole mask key.

Flower 1.42 expands every SecAgg+ mask key (a 32-byte seed or a 44-byte encoded shared key)
with ``numpy.random.RandomState`` seeded by the XOR of the key's 32-bit words
(``flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen``): a mask then carries at
most 32 bits of entropy, and any two keys with the same fold give the same mask. This module
replaces that function, on both sides of the protocol, with :func:`keystream_masks`:

* key   = SHA-256(mask key): every bit of the key matters;
* masks = ChaCha20(key, nonce 0) keystream read as little-endian uint32 words, taken modulo a
  power-of-two ``num_range`` (uniform), or by rejection sampling for any other range.

ChaCha20 is a stream cipher with a 256-bit key (RFC 8439); its keystream is indistinguishable
from uniform for an adversary who does not know the key. Each mask key is used for one vector
only (Flower draws fresh keys every round), so the fixed nonce is never reused with one key.

:func:`install` patches the function into the Flower modules given to it; ``client`` and
``server`` call it at import with the modules they use, and it refuses to run if a module no
longer has the function it replaces (a Flower upgrade must not silently restore weak masks).
"""

from __future__ import annotations

import hashlib
from types import ModuleType
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from numpy.typing import NDArray

from common.errors import ConfigError

PATCHED_NAME = "pseudo_rand_gen"
"""The Flower function that is replaced (module attribute name)."""

PRG_ID = "chacha20-sha256/1"
"""Identifier of this mask generator, announced by the server and verified by every site."""

FLOWER_PRG_ID = "flower-randomstate-fold32"
"""What a side without the replacement masks with (never accepted by a fedseg site)."""

SUPPORTED_FLOWER = ("1.42.0",)
"""Flower versions whose SecAgg+ code this replacement was checked against."""

CALLERS = {
    "flwr.client.mod.secure_aggregation.secaggplus_mod": ("_collect_masked_vectors",),
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow": ("SecAggPlusWorkflow",),
}
"""Flower functions (or classes whose methods) must call the generator by its module name."""

_REPLACED: dict[str, object] = {}  # module name -> Flower's original function (for uninstall)
_NONCE = bytes(16)  # ChaCha20 in `cryptography`: 4-byte block counter + 12-byte nonce, all zero.


def _keystream_words(key: bytes, count: int, offset_words: int = 0) -> NDArray[np.uint32]:
    """``count`` little-endian uint32 words of the ChaCha20 keystream after ``offset_words``."""
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    raw = encryptor.update(bytes(4 * (offset_words + count)))
    return np.frombuffer(raw, dtype="<u4")[offset_words:].copy()


def keystream_masks(
    seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]
) -> list[NDArray[np.int64]]:
    """Draw uniform masks in ``[0, num_range)`` from a ChaCha20 keystream keyed by ``seed``.

    Drop-in replacement for Flower's ``pseudo_rand_gen`` (same signature and output types).

    Parameters
    ----------
    seed : bytes
        A mask key (private seed or pairwise shared key), any length.
    num_range : int
        Exclusive upper bound, ``2 <= num_range <= 2**32``.
    dimensions_list : list of tuple of int
        Shapes of the arrays to mask, in order.

    Returns
    -------
    list of ndarray of int64
        One mask per shape (a 0-d array for an empty shape).
    """
    if not isinstance(num_range, int) or not 2 <= num_range <= 2**32:
        raise ConfigError(f"num_range={num_range!r} should be an integer in [2, 2**32].")
    key = hashlib.sha256(seed).digest()
    sizes = [int(np.prod(shape)) if shape else 1 for shape in dimensions_list]
    total = sum(sizes)
    if num_range & (num_range - 1) == 0:
        # A power of two: the low bits (a bitwise AND, not numpy's int64 modulo, which cost
        # two thirds of a mask's time). For 2**32 every word is already in range.
        values = _keystream_words(key, total).astype(np.int64)
        if num_range < 2**32:
            values &= num_range - 1
    else:
        # Rejection sampling: accept words below the largest multiple of num_range.
        limit = (2**32 // num_range) * num_range
        accepted: list[NDArray[np.int64]] = []
        have, offset = 0, 0
        while have < total:
            want = int((total - have) * 2**32 / limit) + 16
            words = _keystream_words(key, want, offset).astype(np.int64)
            offset += want
            keep = words[words < limit] % num_range
            accepted.append(keep)
            have += keep.size
        values = np.concatenate(accepted)[:total]
    out: list[NDArray[np.int64]] = []
    start = 0
    for shape, size in zip(dimensions_list, sizes, strict=True):
        chunk = values[start:start + size]
        start += size
        out.append(np.array(chunk[0], dtype=np.int64) if not shape else chunk.reshape(shape))
    return out


def calls_by_global_name(obj: object, module: ModuleType, name: str = PATCHED_NAME) -> bool:
    """Whether ``obj`` (a function, or a class's methods) looks ``name`` up in ``module``.

    Only then does replacing the module attribute change what Flower calls: a function that
    had bound the original under another name, or a default argument, would keep the original.
    """
    functions = ([obj] if callable(obj) and hasattr(obj, "__code__")
                 else [v for v in vars(obj).values() if hasattr(v, "__code__")])
    uses: list[Any] = [f for f in functions if name in _names_used(f.__code__)]
    return bool(uses) and all(f.__globals__ is vars(module) for f in uses)


def _names_used(code: Any) -> set[str]:
    """Return the global and attribute names ``code`` looks up, with its nested code.

    Comprehensions and inner functions share the enclosing function's globals.
    """
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _names_used(const)
    return names


def require_supported_flower(flower_version: str | None, what: str) -> None:
    """Refuse to patch a Flower version whose SecAgg+ code ``what`` was not checked against."""
    if flower_version is None:
        import importlib.metadata

        flower_version = importlib.metadata.version("flwr")
    if flower_version not in SUPPORTED_FLOWER:
        raise RuntimeError(
            f"flwr=={flower_version} is installed; fedseg's {what} was checked against flwr "
            f"{', '.join(SUPPORTED_FLOWER)} only. Refusing to run with SecAgg+ primitives of "
            "unknown strength (install the pinned version: pip install -e .)."
        )


def install(*modules: ModuleType, flower_version: str | None = None) -> None:
    """Replace ``pseudo_rand_gen`` with :func:`keystream_masks` in each given module.

    Parameters
    ----------
    *modules : module
        Flower modules that imported ``pseudo_rand_gen`` by name (the SecAgg+ client mod,
        the SecAgg+ server workflow, and the utilities module that defines it).
    flower_version : str, optional
        The installed Flower version (default: ``flwr.__version__``); checked against
        :data:`SUPPORTED_FLOWER`.

    Raises
    ------
    RuntimeError
        If Flower is not a supported version, a module does not have ``pseudo_rand_gen``, or
        Flower's masking code would not call the replacement: continuing could silently fall
        back to 32-bit masks or to masks the other side cannot remove.
    """
    require_supported_flower(flower_version, "SecAgg+ mask hardening")
    for module in modules:
        current = getattr(module, PATCHED_NAME, None)
        if current is not keystream_masks and not callable(current):
            raise RuntimeError(
                f"{module.__name__} has no callable {PATCHED_NAME!r}: this Flower version is not "
                "the one fedseg's SecAgg+ mask hardening was written for (flwr==1.42.0). "
                "Refusing to run with masks of unknown strength."
            )
        for name in CALLERS.get(module.__name__, ()):
            caller = getattr(module, name, None)
            if caller is None or not calls_by_global_name(caller, module):
                raise RuntimeError(
                    f"{module.__name__}.{name} does not call {PATCHED_NAME} through its module: "
                    "replacing it would not change the masks Flower computes. Refusing to run."
                )
        if current is keystream_masks:
            continue
        _REPLACED[module.__name__] = current
        setattr(module, PATCHED_NAME, keystream_masks)


def active_prg_id(*modules: ModuleType) -> str:
    """Return the mask generator these modules use now: :data:`PRG_ID` or :data:`FLOWER_PRG_ID`."""
    return PRG_ID if is_installed(*modules) else FLOWER_PRG_ID


def uninstall(*modules: ModuleType) -> None:
    """Put Flower's own function back (benchmarks compare both; never call it in a deployment)."""
    for module in modules:
        if module.__name__ in _REPLACED:
            setattr(module, PATCHED_NAME, _REPLACED[module.__name__])


def is_installed(*modules: ModuleType) -> bool:
    """Whether every given module uses :func:`keystream_masks`."""
    return all(getattr(module, PATCHED_NAME, None) is keystream_masks for module in modules)
