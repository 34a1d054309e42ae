"""worker/vllm/backend.py + vllm_checks.py end to end against the fake vLLM server (127.0.0.1 only)."""

from __future__ import annotations

import time

import pytest

from bus.schema import Completion, Dispatch, ErrorCode, ErrorReply, Hello, TokenChunk, WorkerLoad
from tests.conftest import free_port
from tests.fakes.fake_vllm import FakeVllm, fake_output_token
from tests.waiting import eventually
from worker.vllm.backend import VllmBackend, VllmBackendConfig
from worker.vllm.checks import StartupError, router_endpoints

PROMPT = list(range(200, 250))  # 50 tokens: 3 full blocks of 16


def config(fake: FakeVllm, **kw) -> VllmBackendConfig:
    base = dict(worker_id="vllm-0", vllm_url=fake.url, kv_events_endpoint="tcp://*:5557",
                replay_endpoint="tcp://*:5558", topic="kv@vllm-0@m", block_size=fake.block_size,
                metrics_interval_s=0.05, startup_timeout_s=5, watch_block_size=False)
    base.update(kw)
    return VllmBackendConfig(**base)


def wait_terminal(backend: VllmBackend, n: int = 1, timeout_s: float = 10.0) -> list:
    """Drain until ``n`` terminal messages arrived; every message in order."""
    out = []
    eventually(lambda: sum(isinstance(m, (Completion, ErrorReply)) for m in out) >= n, timeout_s=timeout_s,
               what=lambda: f"{n} terminal messages (got {out})", pump=lambda: out.extend(backend.drain()),
               interval_s=0.005)
    return out


@pytest.fixture
def fake():
    with FakeVllm(lora_adapters=("sql-lora",), num_gpu_blocks=101) as server:
        yield server


@pytest.fixture
def backend(fake):
    b = VllmBackend(config=config(fake))
    b.start()
    yield b
    b.close()


def test_router_endpoint_convention():
    # vLLM binds (pod discovery): the router dials vLLM's host.
    assert router_endpoints("tcp://*:5557", "tcp://*:5558", vllm_host="10.0.0.7") == (
        "tcp://10.0.0.7:5557", "tcp://10.0.0.7:5558")
    assert router_endpoints("tcp://[::]:5557", None, vllm_host="fd00::7") == ("tcp://[fd00::7]:5557", None)
    # vLLM dials the router (central): the router binds that port on every interface.
    assert router_endpoints("tcp://kvr-router:5557", "tcp://*:5558", vllm_host="vllm-a") == (
        "tcp://*:5557", "tcp://vllm-a:5558")
    assert router_endpoints("ipc:///tmp/kv", None, vllm_host="h") == ("ipc:///tmp/kv", None)


def test_hello_describes_the_server(fake, backend):
    hello = backend.hello(epoch=7, profile="h100")
    assert hello == Hello(worker_id="vllm-0", epoch=7, model=fake.model, block_size=16, num_gpu_blocks=101,
                          events_endpoint="tcp://127.0.0.1:5557", replay_endpoint="tcp://127.0.0.1:5558",
                          topic="kv@vllm-0@m", dp_size=1, http_url=fake.url, profile="h100", engine="vllm",
                          max_model_len=fake.max_model_len)  # from /v1/models: the router refuses longer prompts
    assert backend.info.lora_adapters == ("sql-lora",)
    assert fake.requests[0]["prompt"] == [0] and fake.requests[0]["max_tokens"] == 1  # the start-up probe


def test_dispatch_streams_tokens_and_reports_the_servers_cached_tokens(fake, backend):
    backend.submit(Dispatch("r1", PROMPT, max_tokens=3))
    first = wait_terminal(backend)
    assert first[:-1] == [TokenChunk("r1", [fake_output_token(PROMPT, i)], f" t{fake_output_token(PROMPT, i)}")
                          for i in range(3)]
    done = first[-1]
    assert (done.request_id, done.worker_id, done.prompt_tokens, done.cached_tokens, done.output_tokens,
            done.finish_reason, done.dp_rank) == ("r1", "vllm-0", 50, 0, 3, "length", 0)
    assert 0 <= done.stats.ttft_s <= done.stats.e2e_s
    backend.submit(Dispatch("r2", PROMPT + [7, 7], max_tokens=1))
    assert wait_terminal(backend)[-1].cached_tokens == 48  # 3 blocks of the first prompt
    assert backend.num_in_flight == 0


def test_lora_and_cache_salt_reach_the_server_and_isolate_the_cache(fake, backend):
    backend.submit(Dispatch("a", PROMPT, max_tokens=1, lora_name="sql-lora", cache_salt="tenant-1"))
    wait_terminal(backend)
    assert (fake.requests[-1]["model"], fake.requests[-1]["cache_salt"]) == ("sql-lora", "tenant-1")
    for rid, lora, salt, cached in (("b", None, None, 0), ("c", "sql-lora", None, 0), ("d", "sql-lora", "tenant-2", 0),
                                    ("e", "sql-lora", "tenant-1", 48)):
        backend.submit(Dispatch(rid, PROMPT, max_tokens=1, lora_name=lora, cache_salt=salt))
        assert wait_terminal(backend)[-1].cached_tokens == cached, rid


def test_errors_map_to_codes_and_every_request_ends_once(fake, backend):
    fake.fail_next = (400, "This model's maximum context length is 4096 tokens. However, you requested 9000")
    backend.submit(Dispatch("long", PROMPT, max_tokens=1))
    msgs = wait_terminal(backend)  # one at a time: fail_next hits whichever request arrives first
    backend.submit(Dispatch("lora?", PROMPT, max_tokens=1, lora_name="no-such-adapter"))
    msgs += wait_terminal(backend)
    codes = {m.request_id: m.code for m in msgs if isinstance(m, ErrorReply)}
    assert codes == {"long": ErrorCode.PROMPT_TOO_LONG, "lora?": ErrorCode.UNKNOWN_MODEL}


def test_cancel_aborts_on_the_server_and_ends_with_cancelled():
    with FakeVllm(token_delay_s=0.05) as fake:
        backend = VllmBackend(config=config(fake))
        backend.start(probe=False)
        try:
            backend.submit(Dispatch("slow", PROMPT, max_tokens=500))
            seen = []
            eventually(lambda: any(isinstance(m, TokenChunk) for m in seen), what="a first token",
                       pump=lambda: seen.extend(backend.drain()), interval_s=0.005)
            assert backend.cancel("slow") and not backend.cancel("unknown")
            msgs = seen + wait_terminal(backend)
            assert msgs[-1] == ErrorReply("slow", ErrorCode.CANCELLED, "cancelled", "vllm-0")
            assert sum(isinstance(m, (Completion, ErrorReply)) for m in msgs) == 1
            eventually(lambda: fake.aborted, what="the server saw the abort")
            assert len(fake.aborted) == 1
        finally:
            backend.close()


def test_load_comes_from_metrics_plus_queued_prefill():
    with FakeVllm(token_delay_s=0.3, num_gpu_blocks=101) as fake:
        backend = VllmBackend(config=config(fake))
        backend.start(probe=False)
        try:
            backend.submit(Dispatch("q", PROMPT, max_tokens=1))
            assert backend.load(0).queued_prefill_tokens == 50  # no first token yet
            eventually(lambda: backend.load(0).running == 1, what="the metrics thread sees the running request")
            # 101 blocks less the null block; 50 prompt + 1 output tokens = 4 blocks
            assert backend.load(0).num_free_blocks == 100 - 4
            wait_terminal(backend)
            backend.refresh_load()
            assert backend.loads() == {0: WorkerLoad(running=0, waiting=0, queued_prefill_tokens=0, kv_usage=0.0,
                                                     num_free_blocks=100, num_gpu_blocks=101)}
        finally:
            backend.close()


def test_dp_rank_pins_the_request_to_that_engine():
    with FakeVllm(dp_size=2) as fake:
        backend = VllmBackend(config=config(fake, dp_size=2))
        backend.start(probe=False)
        try:
            backend.submit(Dispatch("r", PROMPT, max_tokens=1, dp_rank=1))
            done = wait_terminal(backend)[-1]
            assert done.dp_rank == 1 and fake.request_headers[-1]["X-data-parallel-rank"] == "1"
            assert fake.engines[1].pool.stats.queries_tokens == 50 and fake.engines[0].pool.stats.queries_tokens == 0
            assert backend.hello(epoch=1).dp_size == 2 and set(backend.loads()) == {0, 1}
        finally:
            backend.close()


def test_close_answers_everything_in_flight():
    with FakeVllm(token_delay_s=0.05) as fake:
        backend = VllmBackend(config=config(fake, max_concurrency=1))
        backend.start(probe=False)
        backend.submit(Dispatch("x", PROMPT, max_tokens=500))
        backend.submit(Dispatch("y", PROMPT, max_tokens=500))  # queued behind x
        time.sleep(0.1)
        backend.close()
        msgs = backend.drain()
        assert sorted((m.request_id, m.code) for m in msgs if isinstance(m, ErrorReply)) == [
            ("x", ErrorCode.CANCELLED), ("y", ErrorCode.CANCELLED)]


# ----------------------------------------------------------------------------- start-up checks


def test_startup_refuses_another_model(fake):
    with pytest.raises(StartupError, match="vLLM serves \\['fake/model-1b'\\] but the router was told model 'llama'"):
        VllmBackend(config=config(fake, model="llama")).start()


def test_startup_refuses_another_block_size(fake):
    with pytest.raises(StartupError, match="vLLM block size is 16 .* kvr was told 32"):
        VllmBackend(config=config(fake, block_size=32)).start()


def test_startup_needs_prompt_tokens_details():
    with FakeVllm(report_cached_tokens=False) as fake:
        with pytest.raises(StartupError, match="--enable-prompt-tokens-details"):
            VllmBackend(config=config(fake)).start()


def test_startup_needs_gpu_blocks_when_the_server_hides_them():
    with FakeVllm(expose_cache_config=False) as fake:
        with pytest.raises(StartupError, match="--num-gpu-blocks"):
            VllmBackend(config=config(fake)).start()
        backend = VllmBackend(config=config(fake, num_gpu_blocks=500))
        try:
            assert backend.start().num_gpu_blocks == 500
        finally:
            backend.close()


def test_startup_times_out_on_a_dead_server():
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = VllmBackendConfig(worker_id="w", vllm_url=dead, kv_events_endpoint="tcp://*:5557", startup_timeout_s=0.3)
    with pytest.raises(StartupError, match="not healthy after"):
        VllmBackend(config=cfg).start()


def test_startup_refuses_a_router_tokenizer_that_disagrees_with_the_server(fake):
    with pytest.raises(StartupError, match="tokenizer mismatch"):
        VllmBackend(config=config(fake, tokenizer="builtin")).start()
