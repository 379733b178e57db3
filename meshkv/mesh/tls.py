"""Mutual TLS for peer TCP connections, from certificate files.

Every agent has a certificate and key signed by the mesh's CA; both ends of a connection
present theirs and check the other's against the CA (``CERT_REQUIRED`` both ways). The
mesh-secret handshake still runs inside the TLS session: TLS adds encryption and a
per-record integrity check against tampering on the wire, the secret keeps proving
membership. Host names are not checked (peers are addressed by IP and membership moves
them); the CA is what says who belongs.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from meshkv.errors import ConfigError
from meshkv.paths import check_private_file


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """``--tls-cert``, ``--tls-key`` and ``--tls-ca``: PEM files, given together."""

    cert: str
    key: str
    ca: str

    def __post_init__(self) -> None:
        for what, path in (("--tls-cert", self.cert), ("--tls-ca", self.ca)):
            if not Path(path).is_file():
                raise ConfigError(f"{what} {path!r} does not exist")
        try:
            check_private_file(Path(self.key), "--tls-key")
        except FileNotFoundError:
            raise ConfigError(f"--tls-key {self.key!r} does not exist") from None

    def contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        """(server, client) contexts; a clear ``ConfigError`` for unusable files."""
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        for ctx in (server, client):
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(
                    f"--tls-cert {self.cert!r} / --tls-key {self.key!r} unusable: {exc}"
                ) from exc
            try:
                ctx.load_verify_locations(cafile=self.ca)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(f"--tls-ca {self.ca!r} unusable: {exc}") from exc
            ctx.verify_mode = ssl.CERT_REQUIRED
        client.check_hostname = False  # the CA decides who belongs, not the address
        return server, client
