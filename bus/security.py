"""Optional ZMQ CURVE authentication and encryption for kvr's sockets.

Threat model: docs/security.md. Without keys, anyone who can reach the
router's ports can register as a worker, publish into the index or send
requests; run kvr on a private network or loopback only. With keys
(``kvr keys DIR``):

* every socket pair is encrypted (CURVE25519);
* the router's ROUTER sockets are CURVE servers and accept only clients whose
  public key is in the authorised directory of their role (ZAP: :class:`ZapHandler`,
  one per context, domains ``kvr-workers`` / ``kvr-clients``);
* the router's SUB and replay DEALER to a worker's KV-event PUB and replay ROUTER
  are CURVE *clients* of the key the worker's ``Hello`` names, so a process without
  that key's secret cannot publish into the index under its name; the worker's
  sockets admit only the router's key (domain ``kvr-events``), so nobody else reads
  the events (token ids: prompt content);
* real vLLM's event sockets cannot do CURVE: they stay plain (network isolation).

Keys are pyzmq certificate files: ``NAME.key`` (public) and ``NAME.key_secret``.
A key directory (``kvr keys DIR``, ``--curve-dir DIR``) looks like::

    DIR/router.key  router.key_secret     the router's pair (every router replica may share it)
    DIR/worker.key  worker.key_secret     a worker's pair (``--curve-key NAME`` picks another)
    DIR/client.key  client.key_secret     a client's pair (kvr send, benchmarks)
    DIR/workers/*.key                     public keys the router lets register as workers
    DIR/clients/*.key                     public keys the router takes requests from

A process needs only its own secret and the public keys it checks; ``kvr keys`` writes
everything into one directory for a local cluster.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

logger = logging.getLogger(__name__)

#: ZAP domains: which key set a CURVE server socket checks its clients against.
WORKERS_DOMAIN = "kvr-workers"  # the router's worker ROUTER
CLIENTS_DOMAIN = "kvr-clients"  # the router's client ROUTER
EVENTS_DOMAIN = "kvr-events"  # a worker's KV-event PUB and replay ROUTER (clients: routers)
ROLES = ("router", "worker", "client")


class SecurityError(RuntimeError):
    """Keys missing or unreadable, or CURVE unavailable in this libzmq."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes


def role_of(name: str) -> str | None:
    """The role a key name implies: ``router``, ``worker*``, ``client*``; else None."""
    if name == "router":
        return "router"
    for role in ("worker", "client"):
        if name.startswith(role):
            return role
    return None


def generate_keys(directory: str | Path, names: tuple[str, ...] = ROLES, *,
                  role: str | None = None) -> dict[str, Path]:
    """Create one CURVE key pair per name in ``directory`` (mode 0700); return the secret files.

    A worker's public key is also copied into ``workers/``, a client's into ``clients/`` (the
    router's authorised sets). ``role`` applies to every name; by default it follows the name.
    """
    if not zmq.has("curve"):
        raise SecurityError("this libzmq was built without CURVE support")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    out = {}
    for name in names:
        kind = role or role_of(name)
        if kind not in ROLES:
            raise SecurityError(f"key {name!r}: say whether it is a worker's or a client's (--role)")
        public, secret = zmq.auth.create_certificates(str(folder), name)
        Path(secret).chmod(0o600)
        if kind != "router":
            authorised = folder / f"{kind}s"
            authorised.mkdir(exist_ok=True)
            (authorised / f"{name}.key").write_bytes(Path(public).read_bytes())
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


def load_public_keys(directory: str | Path) -> frozenset[bytes]:
    """Every public key (``*.key``) in ``directory``; an absent directory holds none."""
    folder = Path(directory)
    if not folder.is_dir():
        return frozenset()
    return frozenset(load_public_key(folder, p.stem) for p in sorted(folder.glob("*.key")))


def is_public_key(text: str) -> bool:
    """Whether ``text`` is a z85 CURVE public key (40 characters, 32 bytes)."""
    if len(text) != 40:
        return False
    try:
        return len(z85.decode(text.encode("ascii"))) == 32
    except (ValueError, UnicodeEncodeError, KeyError):
        return False


def make_server(sock: zmq.Socket[Any], keys: KeyPair) -> None:
    """Make ``sock`` a CURVE server (call before bind/connect)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def make_client(sock: zmq.Socket[Any], keys: KeyPair, server_public: bytes) -> None:
    """Make ``sock`` a CURVE client of the server with ``server_public`` (before connect)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_public


class ZapHandler:
    """The ZAP handler of one context: per-domain sets of client keys allowed in.

    libzmq asks ``inproc://zeromq.zap.01`` of a socket's own context about every CURVE
    handshake, so there is one handler per context (:meth:`for_context`), shared by every
    server socket in it (a router and a worker in one test process). A thread answers the
    requests; it ends when the context is terminated (its blocking recv raises), so owners
    of a context need no extra shutdown step. Refusals are counted per domain and logged.
    """

    _lock = threading.Lock()
    _by_context: weakref.WeakKeyDictionary[zmq.Context[Any], ZapHandler] = weakref.WeakKeyDictionary()

    @classmethod
    def for_context(cls, ctx: zmq.Context[Any]) -> ZapHandler:
        with cls._lock:
            handler = cls._by_context.get(ctx)
            if handler is None:
                handler = cls._by_context[ctx] = cls(ctx=ctx)
            return handler

    def __init__(self, *, ctx: zmq.Context[Any]) -> None:
        self._keys: dict[str, set[bytes]] = {}
        self._keys_lock = threading.Lock()
        self.denied: Counter[str] = Counter()
        self.allowed: Counter[str] = Counter()
        # Bound here, before any server socket can handshake; then handed to the thread.
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind("inproc://zeromq.zap.01")
        self._thread = threading.Thread(target=self._run, name="kvr-zap", daemon=True)
        self._thread.start()

    def allow(self, domain: str, keys: Iterable[bytes]) -> None:
        """Let these client public keys (z85, as key files hold them) in on ``domain``."""
        with self._keys_lock:
            self._keys.setdefault(domain, set()).update(k if len(k) == 40 else z85.encode(k) for k in keys)

    def _run(self) -> None:
        sock = self._sock
        try:
            while True:
                msg = sock.recv_multipart()
                sock.send_multipart(self._answer(msg))
        except zmq.ContextTerminated:
            pass
        finally:
            sock.close(linger=0)

    def _answer(self, msg: list[bytes]) -> list[bytes]:
        if len(msg) < 6:
            return [b"1.0", msg[1] if len(msg) > 1 else b"", b"400", b"malformed ZAP request", b"", b""]
        _version, request_id, domain_b, address, _identity, mechanism = msg[:6]
        domain = domain_b.decode(errors="replace")
        key = z85.encode(msg[6]) if mechanism == b"CURVE" and len(msg) == 7 and len(msg[6]) == 32 else None
        with self._keys_lock:
            keys = self._keys.get(domain)
            # keys are z85 (as key files hold them); a plain socket of this context that named
            # no kvr domain is not ours to judge
            ok = key in keys if keys is not None else mechanism != b"CURVE"
        if ok:
            self.allowed[domain] += 1
            # The user id is the client's z85 key: libzmq attaches it to every message of the
            # connection ("User-Id"), which is how the router binds a worker id to its key.
            return [b"1.0", request_id, b"200", b"OK", key or b"anonymous", b""]
        self.denied[domain] += 1
        n = self.denied[domain]
        if n <= 10 or n % 1000 == 0:  # a scanning peer must not flood the log
            logger.warning("refused a %s handshake on %s from %s (key %s; %d refused so far)",
                           mechanism.decode(errors="replace"), domain, address.decode(errors="replace"),
                           key.decode() if key else "-", n)
        return [b"1.0", request_id, b"400", b"key not authorised", b"", b""]


@dataclass(frozen=True)
class Curve:
    """One process's CURVE identity and the keys it checks (see the module docstring)."""

    keys: KeyPair
    router_public: bytes
    workers: frozenset[bytes] = frozenset()  # router: keys allowed to register as workers
    clients: frozenset[bytes] = frozenset()  # router: keys allowed to send requests

    @property
    def public_z85(self) -> str:
        return self.keys.public.decode("ascii")

    def serve(self, sock: zmq.Socket[Any], *, domain: str, allow: Iterable[bytes]) -> None:
        """Make ``sock`` a CURVE server admitting only ``allow`` (before bind/connect)."""
        ZapHandler.for_context(sock.context).allow(domain, allow)
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        make_server(sock, self.keys)

    def dial(self, sock: zmq.Socket[Any], server_public: bytes | str | None = None) -> None:
        """Make ``sock`` a CURVE client of ``server_public`` (default: the router) before connecting."""
        server = self.router_public if server_public is None else server_public
        make_client(sock, self.keys, server.encode("ascii") if isinstance(server, str) else server)


def load_curve(directory: str | Path, *, name: str) -> Curve:
    """``name``'s key pair and the router's public key from ``directory``.

    For the router (``name == "router"``) also the authorised sets ``workers/`` and
    ``clients/``; the router's own key is a client too (a ``kvr front`` may dial with the router's
    key pair; the router's own HTTP front runs in its process and dials nothing).
    """
    if not zmq.has("curve"):
        raise SecurityError("this libzmq was built without CURVE support")
    folder = Path(directory)
    keys = load_key_pair(folder, name)
    router_public = keys.public if name == "router" else load_public_key(folder, "router")
    if name != "router":
        return Curve(keys, router_public)
    workers = load_public_keys(folder / "workers")
    clients = load_public_keys(folder / "clients") | {keys.public}
    if not workers:
        logger.warning("CURVE: no worker keys in %s: no worker can register", folder / "workers")
    return Curve(keys, router_public, workers=workers, clients=clients)


class Authenticator:
    """ZAP handler accepting only CURVE clients whose public key is in ``directory``.

    One per context; must be started before any CURVE server socket binds.
    """

    def __init__(self, *, ctx: zmq.Context[Any], directory: str | Path) -> None:
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

    def __exit__(self, *exc: object) -> None:
        self.stop()
