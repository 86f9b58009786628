"""The site secret: one 32-byte key file from which every local key is derived.

The key never leaves the site and is never printed. From it, HKDF-SHA256 (RFC 5869) derives
one subkey per use, each under its own ``info`` label, so that no two uses share key material:

==============================  ===============================================================
``info`` label                  use
==============================  ===============================================================
``fedseg key id``               :attr:`SiteKey.key_id`, a public fingerprint (first 8 bytes)
``fedseg pseudonym v1``         HMAC-SHA256 pseudonyms of customer ids (:meth:`SiteKey.pseudonym`)
``fedseg store v1``             AES-256-GCM key of the site store (:meth:`SiteKey.aead`)
==============================  ===============================================================

The key file is JSON (``{"format": "fedseg.site-key/1", "key": <base64>, "created_at": <ISO
8601 UTC>}``), created owner-only (``0o600``) and refused when group or others may read it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import json
import os
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from client import pseudonyms
from common.errors import ConfigError

KEY_FORMAT = "fedseg.site-key/1"
"""Value of the ``format`` field of a key file."""

KEY_BYTES = 32
"""Length of the site key: 256 bits, the AES-256 and HMAC-SHA256 key size."""

KEY_ID_LABEL = "fedseg key id"
PSEUDONYM_LABEL = "fedseg pseudonym v1"


def _hkdf(master: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 of ``master`` with no salt (the master is already uniformly random)."""
    return HKDF(algorithm=SHA256(), length=length, salt=None, info=info).derive(master)


@dataclass(frozen=True)
class SiteKey:
    """The site's secret key and the keys derived from it.

    Build one with :meth:`load` or :func:`generate_key_file`. Its ``repr`` shows the path,
    creation time and public fingerprint, never key bytes.

    Attributes
    ----------
    path : Path
        The key file.
    created_at : datetime
        When the key was generated (timezone-aware, UTC).
    key_id : str
        Public fingerprint: 16 hex characters, HKDF-derived (label ``fedseg key id``), so it
        reveals nothing about the key or any subkey. Stable across loads.
    """

    path: Path
    created_at: datetime
    _master: bytes = field(repr=False, compare=False)
    key_id: str = field(init=False)

    def __post_init__(self) -> None:
        if len(self._master) != KEY_BYTES:
            raise ValueError(f"a site key is {KEY_BYTES} bytes, got {len(self._master)}")
        key_id = _hkdf(self._master, KEY_ID_LABEL.encode(), 8).hex()
        object.__setattr__(self, "key_id", key_id)

    @classmethod
    def load(cls, path: Path | str) -> SiteKey:
        """Read a key file, refusing one that group or others may read or write.

        Parameters
        ----------
        path : Path or str
            The key file written by :func:`generate_key_file`.

        Returns
        -------
        SiteKey
            The key.

        Raises
        ------
        ConfigError
            The file is missing, readable or writable by group/others, not JSON, not of format
            ``fedseg.site-key/1``, or its key is not 32 bytes of base64. The message names the
            file and what was expected, never the key.
        """
        path = Path(path)
        try:
            st = path.stat()
        except FileNotFoundError as exc:
            raise ConfigError(
                f"site key file {path} does not exist: create one with generate_key_file "
                f"(fedseg-site keygen)"
            ) from exc
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"site key file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"site key file {path} has mode {mode:#o}: group or others may access it; "
                f"expected owner-only (0o600). Fix: chmod 600 {path}"
            )
        try:
            doc = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"site key file {path} is not readable JSON ({type(exc).__name__}): expected "
                f'{{"format": "{KEY_FORMAT}", "key": <base64>, "created_at": <ISO 8601>}}'
            ) from None
        return cls._from_document(doc, path)

    @classmethod
    def _from_document(cls, doc: Any, path: Path) -> SiteKey:
        """Validate a parsed key file; messages name the field, never its value for ``key``."""
        if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ConfigError(
                f"site key file {path} has format {found!r}, expected {KEY_FORMAT!r}"
            )
        encoded = doc.get("key")
        try:
            master = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
        except (binascii.Error, ValueError):
            master = b""
        if len(master) != KEY_BYTES:
            raise ConfigError(
                f"site key file {path}: field 'key' must be the base64 of {KEY_BYTES} bytes"
            )
        created = doc.get("created_at")
        try:
            created_at = datetime.fromisoformat(created) if isinstance(created, str) else None
        except ValueError:
            created_at = None
        if created_at is None or created_at.tzinfo is None:
            raise ConfigError(
                f"site key file {path}: field 'created_at' is {created!r}, expected an ISO 8601 "
                f"timestamp with a UTC offset"
            )
        return cls(path=path, created_at=created_at.astimezone(UTC), _master=master)

    def derive(self, label: str, *, length: int = KEY_BYTES) -> bytes:
        """Derive a subkey with HKDF-SHA256 under ``info=label`` (UTF-8).

        Parameters
        ----------
        label : str
            The use of the subkey, e.g. ``"fedseg store v1"``; one label per use.
        length : int, default=32
            Subkey length in bytes.

        Returns
        -------
        bytes
            The subkey; equal labels give equal subkeys for the same site key.
        """
        if not label:
            raise ValueError("derive: label must be a non-empty string")
        return _hkdf(self._master, label.encode("utf-8"), length)

    @functools.cached_property
    def _pseudonym_key(self) -> bytes:
        """HMAC key of the pseudonyms."""
        return self.derive(PSEUDONYM_LABEL)

    def pseudonym(self, raw_id: str) -> str:
        """Return the pseudonym of one customer id.

        Parameters
        ----------
        raw_id : str
            The id as the source holds it.

        Returns
        -------
        str
            64 hex characters: HMAC-SHA256 of the UTF-8 id under the pseudonym subkey.
            Deterministic for one site key, unrelated across keys.
        """
        if not isinstance(raw_id, str):
            raise TypeError(f"pseudonym: raw_id must be str, got {type(raw_id).__name__}")
        return hmac.digest(self._pseudonym_key, raw_id.encode("utf-8"), "sha256").hex()

    def pseudonymise(self, ids: Iterable[str]) -> list[str]:
        """Return the pseudonyms of many ids, in order (same values as :meth:`pseudonym`).

        Parameters
        ----------
        ids : iterable of str
            Customer ids.

        Returns
        -------
        list of str
            One pseudonym per id.

        Notes
        -----
        One batch call (:func:`client.pseudonyms.digests`: C and OpenSSL where built, the GIL
        released); a property test checks it agrees with :meth:`pseudonym`.
        """
        items = ids if isinstance(ids, list) else list(ids)
        try:
            d, _ = pseudonyms.digests(self._pseudonym_key, items)
        except TypeError:
            bad = next(i for i, v in enumerate(items) if not isinstance(v, str))
            raise TypeError(
                f"pseudonymise: ids[{bad}] must be str, got {type(items[bad]).__name__}"
            ) from None
        return pseudonyms.to_hex(d).tolist()

    def digests(self, ids: list[Any], *, strip: bool = False) -> tuple[Any, Any]:
        """Return pseudonyms as 32-byte digests, and a status per id.

        See :func:`client.pseudonyms.digests` (``strip=True``: ids normalised as the readers do;
        ``None`` and blank ids are reported missing instead of hashed).
        """
        return pseudonyms.digests(self._pseudonym_key, ids, strip=strip)

    def column_digests(self, column: Any) -> tuple[Any, Any]:
        """:meth:`digests` (``strip=True``) of a pyarrow string column (nulls are missing)."""
        return pseudonyms.column_digests(self._pseudonym_key, column)

    @functools.cached_property
    def _aeads(self) -> dict[str, AESGCM]:
        """AES-GCM ciphers built so far, by purpose."""
        return {}

    def aead(self, purpose: str = "store") -> AESGCM:
        """Return the AES-256-GCM cipher of one purpose.

        Parameters
        ----------
        purpose : str, default="store"
            The purpose; its key is derived under ``info=f"fedseg {purpose} v1"``.

        Returns
        -------
        cryptography.hazmat.primitives.ciphers.aead.AESGCM
            The cipher (callers supply a fresh random 12-byte nonce per message).
        """
        if not purpose or not isinstance(purpose, str):
            raise ValueError(f"aead: purpose must be a non-empty string, got {purpose!r}")
        cipher = self._aeads.get(purpose)
        if cipher is None:
            cipher = self._aeads[purpose] = AESGCM(self.derive(f"fedseg {purpose} v1"))
        return cipher


def _key_document(master: bytes, created_at: datetime) -> bytes:
    """Serialise a key file."""
    doc = {
        "format": KEY_FORMAT,
        "key": base64.b64encode(master).decode("ascii"),
        "created_at": created_at.isoformat(),
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def generate_key_file(path: Path | str, *, force: bool = False) -> SiteKey:
    """Generate a new site key and write it owner-only (``0o600``).

    Parameters
    ----------
    path : Path or str
        Where to write the key file; parent directories are created.
    force : bool, default=False
        Replace an existing file (atomically: a ``0o600`` temporary file in the same directory,
        then ``os.replace``). Data encrypted or pseudonymised under the old key becomes
        unreadable, so this is never the default.

    Returns
    -------
    SiteKey
        The new key.

    Raises
    ------
    ConfigError
        The file exists and ``force`` is false.
    """
    path = Path(path)
    master = os.urandom(KEY_BYTES)
    created_at = datetime.now(UTC)
    data = _key_document(master, created_at)
    path.parent.mkdir(parents=True, exist_ok=True)
    if force:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    else:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise ConfigError(
                f"site key file {path} already exists; refusing to overwrite it (data under the "
                f"old key would become unreadable). Use --force (force=True) to replace it."
            ) from exc
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return SiteKey(path=path, created_at=created_at, _master=master)
