"""The service turned by an asyncio loop (router/loop_driver.py): sockets watched, deadlines kept."""

from __future__ import annotations

import asyncio

import pytest
import zmq

from bus.codec import encode, reply_decoder
from bus.schema import ErrorCode, ErrorReply, GenerateRequest
from router.loop_driver import LoopDriver
from router.service import RouterService
from tests.router.test_service import _config

pytestmark = pytest.mark.timeout(30)


def test_a_client_socket_message_is_answered_without_any_kick() -> None:
    """Only the FD watch can wake the loop here: a DEALER's request (no worker: NO_WORKERS after
    the restart grace, which a fresh router does not have) is answered."""
    svc = RouterService(_config())
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(svc.clients_endpoint.replace("*", "127.0.0.1"))

    async def main() -> object:
        driver = LoopDriver(service=svc, loop=asyncio.get_running_loop())
        driver.start()
        try:
            await asyncio.sleep(0.05)
            dealer.send(encode(GenerateRequest("r1", prompt="hello there", max_tokens=1)))
            for _ in range(200):
                if dealer.poll(0):
                    return reply_decoder().decode(dealer.recv())
                await asyncio.sleep(0.01)
            return None
        finally:
            driver.stop()

    try:
        reply = asyncio.run(main())
    finally:
        dealer.close(0)
        ctx.term()
        svc.close()
    assert isinstance(reply, ErrorReply) and reply.request_id == "r1" and reply.code is ErrorCode.NO_WORKERS


def test_deadlines_turn_the_loop_with_no_socket_readable() -> None:
    """Upkeep is due every ``housekeeping_s``: the timer alone keeps pumping an idle service."""
    svc = RouterService(_config())

    async def main() -> int:
        driver = LoopDriver(service=svc, loop=asyncio.get_running_loop())
        driver.start()
        await asyncio.sleep(0.5)
        driver.stop()
        return driver.pumps

    try:
        pumps = asyncio.run(main())
    finally:
        svc.close()
    # At least one pump per upkeep period over the half second (and not a busy loop).
    assert 0.5 / svc.config.housekeeping_s * 0.5 <= pumps <= 0.5 / svc.config.housekeeping_s * 4 + 5


def test_local_clients_get_replies_as_objects() -> None:
    svc = RouterService(_config())
    got: list[object] = []
    try:
        me = svc.attach_local_client(got.append)
        svc.submit_local(me, GenerateRequest("r2", prompt="hi", max_tokens=1))
        assert len(got) == 1 and isinstance(got[0], ErrorReply) and got[0].request_id == "r2"
        svc.detach_local_client(me)
        svc.submit_local(me, GenerateRequest("r3", prompt="hi", max_tokens=1))
        assert len(got) == 1  # detached: its replies go nowhere (a gone client)
    finally:
        svc.close()


def test_the_loop_watches_the_event_sockets_of_workers_as_they_come_and_go() -> None:
    """A worker's KV-event subscriber is created after the driver started and closed when it
    leaves: the FDs the loop watches follow the service's sockets (``VersionedPoller.version``)."""
    from bus.schema import Goodbye
    from tests.router.test_service import FakeWorker

    svc = RouterService(_config())
    ctx = zmq.Context()
    worker = FakeWorker(ctx, svc.workers_endpoint.replace("*", "127.0.0.1"), "w1")

    async def until(pred) -> bool:
        for _ in range(300):
            worker.pump()
            if pred():
                return True
            await asyncio.sleep(0.01)
        return False

    async def main() -> tuple[int, bool, bool]:
        driver = LoopDriver(service=svc, loop=asyncio.get_running_loop())
        driver.start()
        try:
            before = len(driver._fds)
            worker.hello()
            joined = await until(lambda: "w1" in svc.workers and set(driver._fds.values()) == set(svc.poll_sockets())
                                 and len(driver._fds) > before)
            worker.send(Goodbye("w1", 1))
            left = await until(lambda: "w1" not in svc.workers and len(driver._fds) == before)
            return before, joined, left
        finally:
            driver.stop()

    try:
        before, joined, left = asyncio.run(main())
    finally:
        worker.close()
        svc.close()
        ctx.term()
    assert before == 2 and joined and left  # clients and workers sockets, then + the worker's subscriber


def test_a_versioned_poller_counts_every_change_to_its_sockets() -> None:
    from bus.sockets import VersionedPoller

    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PULL), ctx.socket(zmq.PULL)
    poller = VersionedPoller()
    poller.register(a, zmq.POLLIN)
    poller.register(b, zmq.POLLIN)
    poller.unregister(a)
    assert poller.version == 3 and [s for s, _ in poller.sockets] == [b]
    a.close(0)
    b.close(0)
    ctx.term()
