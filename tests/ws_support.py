"""Test support for the WebSocket transport: throwaway certificates, and a raw WebSocket
client that writes its handshake and frames by hand (also the bytes a well-behaved client
would never send) and parses the server's, independent of homenet's tunnel code and of
wsproto.

Everything here talks only to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import os
import ssl
import struct
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TIMEOUT = 10.0
SUBPROTOCOL = "homenet.v1"
TUNNEL_PATH = "/.hn/tunnel"

# opcodes (RFC 6455 section 5.2)
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


# -- certificates --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Certs:
    """A CA, a node certificate for 127.0.0.1 signed by it, its key, and an unrelated CA."""

    ca: Path
    cert: Path
    key: Path
    other_ca: Path

    def client(self, ca: Path | None = None) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(ca or self.ca))

    def server(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    ca = issuer is None
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0] if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        )  # fmt: skip
        builder = builder.add_extension(usage, critical=True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_certs(directory: Path) -> Certs:
    """Write a CA, a node certificate (IP SAN 127.0.0.1) and its key, and another CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, node_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("HomeNet WS test CA", ca_key, None)
    node = _cert("127.0.0.1", node_key, (ca.subject, ca_key))
    other = _cert("Some other CA", other_key, None)
    key_pem = node_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    paths = Certs(directory / "ca.pem", directory / "node.pem", directory / "node.key", directory / "other-ca.pem")
    paths.ca.write_bytes(_pem(ca))
    paths.cert.write_bytes(_pem(node))
    paths.key.write_bytes(key_pem)
    paths.other_ca.write_bytes(_pem(other))
    return paths


# -- a raw WebSocket client ----------------------------------------------------------------------
def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    """One WebSocket frame, masked as a client's must be (unless ``mask`` is False)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@dataclass
class Frame:
    opcode: int
    payload: bytes


@dataclass
class RawWs:
    """A client connection past its WebSocket handshake; reads server frames by hand."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    buf: bytearray = field(default_factory=bytearray)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(TIMEOUT):
            await self.writer.drain()

    async def next_frame(self, timeout: float = TIMEOUT) -> Frame | None:
        """The server's next frame (unmasked, as a server's must be); None at EOF."""
        async with asyncio.timeout(timeout):
            while True:
                parsed = _parse(self.buf)
                if parsed is not None:
                    return parsed
                chunk = await self.reader.read(65536)
                if not chunk:
                    return None
                self.buf += chunk

    async def until_close(self, timeout: float = TIMEOUT) -> tuple[bytes, Frame | None]:
        """Binary payloads until the server's Close frame (or EOF); and that frame."""
        data = bytearray()
        while (f := await self.next_frame(timeout)) is not None:
            if f.opcode == CLOSE:
                return bytes(data), f
            if f.opcode in (BINARY, 0):
                data += f.payload
        return bytes(data), None

    async def eof(self, timeout: float = TIMEOUT) -> bool:
        """True once the server closed the TCP connection (what follows a Close is dropped)."""
        async with asyncio.timeout(timeout):
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionError:
                pass
        return True

    def close(self) -> None:
        self.writer.transport.abort()


def close_code(f: Frame | None) -> int | None:
    if f is None or f.opcode != CLOSE or len(f.payload) < 2:
        return None
    return int(struct.unpack("!H", f.payload[:2])[0])


def _parse(buf: bytearray) -> Frame | None:
    if len(buf) < 2:
        return None
    assert not buf[1] & 0x80, "a server frame must not be masked"
    n, at = buf[1] & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, at = struct.unpack("!H", buf[2:4])[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, at = struct.unpack("!Q", buf[2:10])[0], 10
    if len(buf) < at + n:
        return None
    f = Frame(buf[0] & 0x0F, bytes(buf[at : at + n]))
    del buf[: at + n]
    return f


_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def upgrade_bytes(
    target: str = TUNNEL_PATH,
    subprotocols: tuple[str, ...] = (SUBPROTOCOL,),
    key: bytes = b"dGhlIHNhbXBsZSBub25jZQ==",
    method: str = "GET",
    version: str = "13",
    extra: tuple[str, ...] = (),
) -> bytes:
    """A client's upgrade request, written out by hand."""
    lines = [
        f"{method} {target} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        f"Sec-WebSocket-Version: {version}",
        *([f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}"] if subprotocols else []),
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def accept_token(key: bytes) -> str:
    return base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()


def head_of(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers by lower-case name, what followed the head) of an HTTP response."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status), headers, rest


async def raw_upgrade(port: int, after: bytes = b"", key: bytes = b"dGhlIHNhbXBsZSBub25jZQ==") -> RawWs:
    """Open a tunnel by hand on ``127.0.0.1:port``; ``after`` goes out with the request."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(upgrade_bytes(key=key) + after)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await reader.read(65536)
            assert chunk, f"the server closed during the handshake: {data!r}"
            data += chunk
    status, headers, rest = head_of(data)
    assert status == 101, data
    assert headers["upgrade"].lower() == "websocket"
    assert headers["sec-websocket-accept"] == accept_token(key)
    assert headers["sec-websocket-protocol"] == SUBPROTOCOL
    return RawWs(reader, writer, bytearray(rest))


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` to ``127.0.0.1:port``; everything the server answered until it closed."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            await writer.drain()
            return await reader.read(-1)
        finally:
            writer.close()
