"""Test certificates made at run time: a CA, a certificate for 127.0.0.1 (the brokers' and
Redis's) and a client certificate for mTLS, plus a second CA that trusts none of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization

from workers.dev.redis_server import TLSFiles

KEY_PASSWORD = "client-key-secret"


@dataclass(frozen=True)
class Certificates:
    """PEM files in one directory."""

    ca: Path
    server_cert: Path  # 127.0.0.1, with its chain
    server_key: Path  # PKCS#8, unencrypted
    server_keystore: Path  # key and chain in one file: what Kafka's PEM keystore reads
    client_cert: Path
    client_key: Path  # unencrypted
    client_key_encrypted: Path  # the same key, encrypted with KEY_PASSWORD
    other_ca: Path  # signed none of the above

    def redis(self, client_cert: bool = False) -> TLSFiles:
        """The files of a TLS Redis server; with ``client_cert`` it requires one (mTLS)."""
        if not client_cert:
            return TLSFiles(self.ca, self.server_cert, self.server_key)
        return TLSFiles(
            self.ca, self.server_cert, self.server_key, self.client_cert, self.client_key
        )


def make_certificates(directory: Path) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("stream-lstm-client")
    paths = Certificates(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        server_keystore=directory / "server-keystore.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
        client_key_encrypted=directory / "client-key-encrypted.pem",
        other_ca=directory / "other-ca.pem",
    )
    ca.cert_pem.write_to_path(str(paths.ca))
    chain = b"".join(blob.bytes() for blob in server.cert_chain_pems)
    paths.server_cert.write_bytes(chain)
    paths.server_key.write_bytes(_pkcs8(server.private_key_pem.bytes()))
    paths.server_keystore.write_bytes(paths.server_key.read_bytes() + chain)
    paths.client_cert.write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
    paths.client_key.write_bytes(_pkcs8(client.private_key_pem.bytes()))
    paths.client_key_encrypted.write_bytes(
        _pkcs8(client.private_key_pem.bytes(), KEY_PASSWORD.encode())
    )
    trustme.CA().cert_pem.write_to_path(str(paths.other_ca))
    return paths


def _pkcs8(pem: bytes, password: bytes | None = None) -> bytes:
    key = serialization.load_pem_private_key(pem, password=None)
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password is not None
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
