"""``fedlora certs``: a throwaway CA, a server certificate and client keys for a test deployment.

Layout written under the output folder, one folder per machine, so that each copies
only its own (folders 0700, private keys 0600 from the moment they exist):
  ca/ca.crt, ca/ca.key              the CA: keep ca.key on no machine of the federation
  coordinator/                      for the coordinator: --tls-dir coordinator
      ca.crt, server.pem, server.key    its TLS certificate
      auth-keys/client-N.pub            the clients' public keys: --auth-keys coordinator/auth-keys
  clients/client-N/                 for client agent N
      ca.crt, client.key                --root-cert ca.crt --auth-key client.key (OpenSSH ECDSA P-384)
Nothing is ever overwritten: a folder that already holds certificates is refused
unless ``overwrite``, which removes them first.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from fedlora.errors import UserError

VALID_DAYS = 365
LAYOUT = ("ca", "coordinator", "clients")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Created with its final mode (no moment world-readable) and never over an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # whatever the umask made of it
    return path


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(host: str) -> x509.SubjectAlternativeName:
    """The host, plus loopback: the SuperLink's own executor reaches it on 127.0.0.1."""
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        ip = ipaddress.ip_address(host)
        if str(ip) != "127.0.0.1":
            names.append(x509.IPAddress(ip))
    except ValueError:
        if host != "localhost":
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def write_certificates(out: str | Path, host: str, clients: int, overwrite: bool = False) -> Path:
    """Write the CA, a server certificate for ``host`` and ``clients`` client key pairs."""
    if clients < 0:
        raise UserError(f"clients must be >= 0, got {clients}")
    if not host or any(c.isspace() for c in host):
        raise UserError(f"not a host name or address: {host!r}")
    out = Path(out)
    _clear_for_writing(out, overwrite)
    ca_dir, coord_dir, clients_dir = (_private_dir(out / name) for name in LAYOUT)
    _private_dir(coord_dir / "auth-keys")
    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=VALID_DAYS)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = _name("fedlora test CA")
    ca_cert = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, now, until, [], ca=True)
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = _certificate(
        _name(host), ca_name, server_key.public_key(), ca_key, now, until, [_san(host)], ca=False
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(ca_dir / "ca.crt", ca_pem)
    _write(ca_dir / "ca.key", _pem_key(ca_key), private=True)
    _write(coord_dir / "ca.crt", ca_pem)
    _write(coord_dir / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM))
    _write(coord_dir / "server.key", _pem_key(server_key), private=True)
    for i in range(1, clients + 1):
        _write_client_key(i, clients_dir, coord_dir / "auth-keys", ca_pem)
    return out


def _clear_for_writing(out: Path, overwrite: bool) -> None:
    """An empty folder, or (``overwrite``) one whose earlier certificates and keys are removed."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} is not empty (it may hold keys); choose an empty folder or pass --overwrite")
        for name in LAYOUT:
            if (out / name).is_dir():
                shutil.rmtree(out / name)


def _certificate(
    subject, issuer, public_key, signing_key, now, until, extensions: list, *, ca: bool
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    constraints = (
        x509.BasicConstraints(ca=True, path_length=0) if ca else x509.BasicConstraints(ca=False, path_length=None)
    )
    return builder.add_extension(constraints, critical=True).sign(signing_key, hashes.SHA256())


def _write_client_key(i: int, clients_dir: Path, auth_keys: Path, ca_pem: bytes) -> None:
    """client-i's folder (the CA and its private key) and its public key for the coordinator."""
    key = ec.generate_private_key(ec.SECP384R1())  # Flower takes ECDSA keys on NIST curves
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    client_dir = _private_dir(clients_dir / f"client-{i}")
    _write(client_dir / "ca.crt", ca_pem)
    _write(client_dir / "client.key", private, private=True)
    _write(auth_keys / f"client-{i}.pub", public + b"\n")
