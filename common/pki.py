"""``fedseg-pki``: a development PKI for a fedseg deployment (TLS and SuperNode keys).

**Development grade.** It makes, with ``cryptography``:

* a certificate authority (``ca/ca.key``, ``ca/ca.crt``; ECDSA P-384, self-signed);
* the SuperLink's TLS certificate (``superlink/server.key``, ``superlink/server.crt``), signed
  by that CA, for the names and addresses given (``localhost`` and ``127.0.0.1`` by default);
* one authentication key pair per site (``sites/<name>/auth.key``, an OpenSSH private key for
  ``flower-supernode --auth-supernode-private-key``; ``auth.pub`` in OpenSSH form for
  ``flwr supernode register``, and ``auth.pub.pem``; ECDSA P-384).

Private keys are written owner-only (0600, directories 0700) and nothing is overwritten without
``--force``. In production use your organisation's CA and rotation policy instead: the SuperLink
needs a certificate from a CA every site trusts; each site generates its own key pair **at the
site** (``fedseg-pki site NAME`` on the site's machine) and sends only ``auth.pub`` to the
operator, so no private key ever travels. Rotate by issuing a new certificate / key pair,
registering the new public key, then retiring the old one (docs/DEPLOYMENT.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError

CURVE = ec.SECP384R1()
DEFAULT_SANS = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 365


@dataclass(frozen=True)
class PkiPaths:
    """Where the files of a PKI directory live."""

    root: Path

    @property
    def ca_key(self) -> Path:
        """The CA's private key (owner-only; keep it offline in real use)."""
        return self.root / "ca" / "ca.key"

    @property
    def ca_cert(self) -> Path:
        """The CA certificate every site and the ``flwr`` CLI trust."""
        return self.root / "ca" / "ca.crt"

    @property
    def server_key(self) -> Path:
        """The SuperLink's TLS private key."""
        return self.root / "superlink" / "server.key"

    @property
    def server_cert(self) -> Path:
        """The SuperLink's TLS certificate."""
        return self.root / "superlink" / "server.crt"

    def site_dir(self, name: str) -> Path:
        """Return a site's key directory."""
        return self.root / "sites" / name


def _write(path: Path, data: bytes, *, private: bool, force: bool) -> None:
    """Write a file (private: 0600 in a 0700 directory); never overwrite without ``force``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o755)
    if private:
        os.chmod(path.parent, 0o700)
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; pass --force to replace it (anything signed by or "
                          "registered with the old file stops working).")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseg development PKI"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(entries: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for entry in entries:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            names.append(x509.DNSName(entry))
    return x509.SubjectAlternativeName(names)


def init_pki(root: Path, *, sans: Sequence[str] = DEFAULT_SANS, days: int = DEFAULT_DAYS,
             force: bool = False) -> PkiPaths:
    """Create the CA and the SuperLink certificate.

    Parameters
    ----------
    root : Path
        The PKI directory.
    sans : sequence of str
        DNS names and IP addresses the SuperLink is reached at (subject alternative names).
        ``localhost`` and ``127.0.0.1`` are always added: the SuperLink's own ServerApp
        processes connect to it at ``127.0.0.1`` and check its certificate.
    days : int
        Validity of both certificates.
    force : bool
        Replace existing files.
    """
    if days < 1:
        raise ConfigError(f"--days={days} should be >= 1.")
    if not sans:
        raise ConfigError("give at least one --san (a DNS name or IP address of the SuperLink).")
    sans = tuple(dict.fromkeys([*sans, *DEFAULT_SANS]))  # given first (the subject), no repeats
    paths = PkiPaths(root)
    for existing in (paths.ca_key, paths.server_key):
        if existing.exists() and not force:
            raise ConfigError(f"{existing} exists; pass --force to replace the PKI (every "
                              "site then needs the new ca.crt).")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(CURVE)
    ca_name = _name("fedseg development CA")
    ca_cert = (x509.CertificateBuilder()
               .subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=True,
                   crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(CURVE)
    server_cert = (x509.CertificateBuilder()
                   .subject_name(_name(sans[0])).issuer_name(ca_cert.subject)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(_san(sans), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA384()))
    _write(paths.ca_key, _key_pem(ca_key), private=True, force=True)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False,
           force=True)
    _write(paths.server_key, _key_pem(server_key), private=True, force=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM),
           private=False, force=True)
    return paths


def site_keys(root: Path, name: str, *, force: bool = False) -> Path:
    """Create a site's SuperNode authentication key pair; return its directory.

    Parameters
    ----------
    root : Path
        The PKI directory (at a site: any directory of the site's).
    name : str
        The site's name (letters, digits, ``-``, ``_``, ``.``).
    force : bool
        Replace an existing key pair (register the new public key, then remove the old one).
    """
    if not name or any(not (c.isalnum() or c in "-_.") for c in name) or name.startswith("."):
        raise ConfigError(f"site name {name!r} should use letters, digits, '-', '_' or '.'.")
    directory = PkiPaths(root).site_dir(name)
    key = ec.generate_private_key(CURVE)
    public = key.public_key()
    # Flower 1.42's SuperNode reads --auth-supernode-private-key as an OpenSSH private key
    # and `flwr supernode register` an OpenSSH public key on a NIST curve.
    _write(directory / "auth.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()), private=True, force=force)
    _write(directory / "auth.pub", public.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n",
        private=False, force=force)
    _write(directory / "auth.pub.pem", public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        private=False, force=force)
    return directory


def check_private_file(path: Path) -> None:
    """Refuse a private key file that group or others can read or write."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"{path} has permissions {mode:o}: a private key must be readable by "
                          f"its owner only. Fix it with: chmod 600 {path}")


def describe(root: Path) -> list[str]:
    """One line per certificate and site key: subject, names, expiry, fingerprint."""
    paths = PkiPaths(root)
    lines = []
    for label, cert_path in (("CA", paths.ca_cert), ("SuperLink", paths.server_cert)):
        if not cert_path.is_file():
            lines.append(f"{label}: missing ({cert_path})")
            continue
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = ", ".join(str(v.value) for v in sans)
        except x509.ExtensionNotFound:
            names = "-"
        lines.append(f"{label}: {cert.subject.rfc4514_string()}; names {names}; valid until "
                     f"{cert.not_valid_after_utc:%Y-%m-%d}; sha256 "
                     f"{cert.fingerprint(hashes.SHA256()).hex()[:16]}")
    sites = paths.root / "sites"
    for site in sorted(sites.iterdir()) if sites.is_dir() else []:
        pub = site / "auth.pub"
        if pub.is_file():
            lines.append(f"site {site.name}: {pub} ({pub.read_text('utf-8').split()[0]})")
    return lines


def build_parser() -> argparse.ArgumentParser:
    """Return the ``fedseg-pki`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="fedseg-pki", description="Create a DEVELOPMENT PKI for a fedseg deployment: a CA, "
        "the SuperLink's TLS certificate and one authentication key pair per site. For "
        "production use your own CA (see docs/DEPLOYMENT.md).")
    parser.add_argument("--dir", default="pki", help="PKI directory (default: ./pki)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("init", help="create the CA and the SuperLink certificate")
    p.add_argument("--san", action="append", default=None,
                   help="a DNS name or IP address of the SuperLink (repeat; localhost and "
                   "127.0.0.1 are always included, for the SuperLink's own processes)")
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity in days")
    p.add_argument("--force", action="store_true", help="replace an existing PKI")
    p = sub.add_parser("site", help="create a site's SuperNode authentication key pair")
    p.add_argument("name", help="the site's name")
    p.add_argument("--force", action="store_true", help="replace the site's key pair")
    sub.add_parser("show", help="list certificates (names, expiry) and site keys")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fedseg-pki``; returns 0, or 2 with a one-line error."""
    args = build_parser().parse_args(argv)
    root = Path(args.dir)
    try:
        if args.command == "init":
            paths = init_pki(root, sans=tuple(args.san or DEFAULT_SANS), days=args.days,
                             force=args.force)
            print(f"CA:        {paths.ca_cert} (key {paths.ca_key}, owner-only)")
            print(f"SuperLink: {paths.server_cert} (key {paths.server_key}, owner-only)")
            print("development grade: see docs/DEPLOYMENT.md for a production CA")
        elif args.command == "site":
            directory = site_keys(root, args.name, force=args.force)
            print(f"site {args.name}: private key {directory / 'auth.key'} (owner-only, stays "
                  f"at the site); public key {directory / 'auth.pub'} (register it with the "
                  "operator: flwr supernode register)")
        else:
            print("\n".join(describe(root)))
    except ConfigError as exc:
        print(f"fedseg-pki: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fedseg-pki: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
