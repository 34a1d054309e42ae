"""Optional ZMQ CURVE authentication and encryption for kvr's sockets.

Threat model (see README "Security"): without keys, anyone who can reach the
router's ports can register as a worker, publish into the index or send
requests; run kvr on a private network or loopback only. With keys
(``kvr keys DIR``):

* every socket pair is encrypted (CURVE25519);
* the router's ROUTER sockets are CURVE servers and accept only clients whose
  public key is in the authorised directory (ZAP, via pyzmq's authenticator);
* the router's SUB to a worker's KV-event PUB is a CURVE *client* of the worker,
  so a process without the worker's key cannot publish into the index under
  its name: the worker's PUB is the CURVE server and knows the router's key.

Keys are pyzmq certificate files: ``NAME.key`` (public) and ``NAME.key_secret``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)


class SecurityError(RuntimeError):
    """Keys missing or unreadable, or CURVE unavailable in this libzmq."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes


def generate_keys(directory: str | Path, names: tuple[str, ...] = ("router", "worker", "client")) -> dict[str, Path]:
    """Create one CURVE key pair per name in ``directory`` (mode 0700); return the secret files."""
    if not zmq.has("curve"):
        raise SecurityError("this libzmq was built without CURVE support")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    out = {}
    for name in names:
        _public, secret = zmq.auth.create_certificates(str(folder), name)
        Path(secret).chmod(0o600)
        out[name] = Path(secret)
    return out


def load_key_pair(directory: str | Path, name: str) -> KeyPair:
    path = Path(directory) / f"{name}.key_secret"
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot load CURVE key {path}: {exc}") from exc
    if secret is None:
        raise SecurityError(f"{path} holds no secret key")
    return KeyPair(public, secret)


def load_public_key(directory: str | Path, name: str) -> bytes:
    path = Path(directory) / f"{name}.key"
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot load CURVE public key {path}: {exc}") from exc
    return public


def make_server(sock: zmq.Socket, keys: KeyPair) -> None:
    """Make ``sock`` a CURVE server (call before bind/connect)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def make_client(sock: zmq.Socket, keys: KeyPair, server_public: bytes) -> None:
    """Make ``sock`` a CURVE client of the server with ``server_public`` (before connect)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_public


class Authenticator:
    """ZAP handler accepting only CURVE clients whose public key is in ``directory``.

    One per context; must be started before any CURVE server socket binds.
    """

    def __init__(self, *, ctx: zmq.Context, directory: str | Path) -> None:
        self._auth = ThreadAuthenticator(ctx)
        self._directory = str(directory)

    def start(self) -> None:
        self._auth.start()
        self._auth.configure_curve(domain="*", location=self._directory)
        logger.info("CURVE authentication on; authorised keys from %s", self._directory)

    def stop(self) -> None:
        self._auth.stop()

    def __enter__(self) -> Authenticator:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
