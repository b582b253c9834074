"""TLS and mutual-TLS credentials from PEM files, for listening ports and for client channels."""

from __future__ import annotations

import grpc


def read_pem(path: str) -> bytes | None:
    """The bytes of a PEM file; None for an empty path (the option is not used)."""
    if not path:
        return None
    with open(path, "rb") as pem:
        return pem.read()


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials | None:
    """TLS for a listening port from PEM files, or None (plaintext) when no certificate is given.
    With `client_ca_file`, clients must present a certificate that CA signed (mutual TLS); a
    client without one fails the handshake and its calls end UNAVAILABLE."""
    if not cert_file and not key_file:
        if client_ca_file:
            raise ValueError("a client CA (--tls-client-ca-file) needs the server's own --tls-cert-file and --tls-key-file")
        return None
    if not (cert_file and key_file):
        raise ValueError("--tls-cert-file and --tls-key-file go together")
    return grpc.ssl_server_credentials(
        [(read_pem(key_file), read_pem(cert_file))],
        root_certificates=read_pem(client_ca_file),
        require_client_auth=bool(client_ca_file),
    )


def channel_credentials(ca_file: str, cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """TLS for a client channel from PEM files: the CA that signed the server's certificate (empty:
    the system's roots), and the client's own certificate and key for mutual TLS."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate and its key go together")
    return grpc.ssl_channel_credentials(read_pem(ca_file), read_pem(key_file), read_pem(cert_file))
