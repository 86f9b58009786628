"""fedseg-pki: a CA, the SuperLink certificate and site keys that a real TLS handshake accepts."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.errors import ConfigError
from common.pki import PkiPaths, check_private_file, init_pki, main, site_keys


def _serve_once(paths: PkiPaths) -> tuple[int, threading.Thread, list[str]]:
    """A TLS server on 127.0.0.1 with the SuperLink certificate; accepts one connection."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(paths.server_cert, paths.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    outcome: list[str] = []

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
                    outcome.append("handshake")
            except (ssl.SSLError, OSError) as exc:
                outcome.append(f"refused: {exc}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread, outcome


def test_a_client_trusting_the_ca_completes_a_real_tls_handshake(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "pki")
    port, thread, outcome = _serve_once(paths)
    client = ssl.create_default_context(cafile=str(paths.ca_cert))
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.recv(2) == b"ok"
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    thread.join(5)
    assert outcome == ["handshake"]


def test_a_client_without_the_ca_is_refused(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "pki")
    port, thread, outcome = _serve_once(paths)
    client = ssl.create_default_context()  # system roots only: the dev CA is unknown
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):
        client.wrap_socket(raw, server_hostname="127.0.0.1")
    thread.join(5)
    assert outcome and outcome[0].startswith("refused")


def test_certificate_names_chain_and_permissions(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "pki", sans=("superlink.example", "10.0.0.5"), days=30)
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # the SuperLink's own processes reach it at 127.0.0.1: always named
    assert [str(v.value) for v in names] == ["superlink.example", "10.0.0.5", "localhost",
                                             "127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (paths.ca_key, paths.server_key):
        assert key.stat().st_mode & 0o077 == 0
        check_private_file(key)
    assert (server.not_valid_after_utc - server.not_valid_before_utc).days in (29, 30)


def test_site_key_pair_formats_and_refusals(tmp_path: Path) -> None:
    directory = site_keys(tmp_path / "pki", "north")
    private = serialization.load_ssh_private_key((directory / "auth.key").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    openssh = serialization.load_ssh_public_key((directory / "auth.pub").read_bytes())
    assert openssh.public_numbers() == private.public_key().public_numbers()
    assert (directory / "auth.key").stat().st_mode & 0o077 == 0
    with pytest.raises(ConfigError, match="--force"):
        site_keys(tmp_path / "pki", "north")
    with pytest.raises(ConfigError, match="site name"):
        site_keys(tmp_path / "pki", "../escape")
    (directory / "auth.key").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        check_private_file(directory / "auth.key")


def test_cli_refuses_to_overwrite_and_shows(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "pki")
    assert main(["--dir", root, "init"]) == 0
    assert main(["--dir", root, "init"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["--dir", root, "site", "south"]) == 0
    assert main(["--dir", root, "show"]) == 0
    shown = capsys.readouterr().out
    assert "names localhost, 127.0.0.1" in shown and "site south" in shown
