"""``fedlora certs``: a throwaway CA, a server certificate and client keys for a test deployment.

Layout written under the output folder:
  ca.crt, ca.key            the CA (clients get ca.crt; keep ca.key off every other machine)
  server.pem, server.key    the coordinator's TLS certificate, for --tls-dir
  auth-keys/client-N.pub    client public keys, for the coordinator's --auth-keys
  clients/client-N          client private keys (OpenSSH ECDSA P-384), one per client agent
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from fedlora.errors import UserError

VALID_DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


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


def write_certificates(out: str | Path, host: str, clients: int) -> Path:
    """Write the CA, a server certificate for ``host`` and ``clients`` client key pairs."""
    if clients < 0:
        raise UserError(f"clients must be >= 0, got {clients}")
    if not host or any(c.isspace() for c in host):
        raise UserError(f"not a host name or address: {host!r}")
    out = Path(out)
    if (out / "ca.key").exists():
        raise UserError(f"{out} already holds a CA; choose an empty folder")
    (out / "auth-keys").mkdir(parents=True, exist_ok=True)
    (out / "clients").mkdir(exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    until = now + datetime.timedelta(days=VALID_DAYS)

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedlora test CA"))
        .issuer_name(_name("fedlora test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(_san(host), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(server_key), private=True)

    for i in range(1, clients + 1):
        key = ec.generate_private_key(ec.SECP384R1())  # Flower takes ECDSA keys on NIST curves
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(out / "clients" / f"client-{i}", private, private=True)
        _write(out / "auth-keys" / f"client-{i}.pub", public + b"\n")
    return out
