"""worker/vllm/metrics.py: vLLM's /metrics text → per-rank stats → WorkerLoad."""

from __future__ import annotations

from bus.schema import WorkerLoad
from tests.fakes.fake_vllm import FakeVllm
from worker.vllm.metrics import CacheConfig, EngineStats, cache_config, engine_stats, parse_prometheus_text
from worker.vllm.openai_client import CompletionRequest, OpenAIClient

# Shaped like vLLM 0.33 with two DP engines (histograms, info gauge, HELP/TYPE lines).
V1_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-8B"} 3.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen3-8B"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-8B"} 2.0
vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen3-8B"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-8B"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="Qwen/Qwen3-8B"} 0.5
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="Qwen/Qwen3-8B"} 4096.0
vllm:prefix_cache_queries_created{engine="0",model_name="Qwen/Qwen3-8B"} 1.7672256e+09
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="Qwen/Qwen3-8B"} 1024.0
vllm:num_preemptions_total{engine="0",model_name="Qwen/Qwen3-8B"} 7.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="Qwen/Qwen3-8B"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="Qwen/Qwen3-8B"} 12.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="27000",prefix_caching_hash_algo="sha256"} 1.0
"""  # noqa: E501 - a Prometheus sample is one line, and vLLM's cache_config_info is this long


def test_engine_stats_per_rank():
    stats = engine_stats(parse_prometheus_text(V1_TEXT))
    assert stats == {
        0: EngineStats(dp_rank=0, running=3, waiting=2, kv_usage=0.25, prefix_queries_tokens=4096,
                       prefix_hits_tokens=1024, preemptions=7),
        1: EngineStats(dp_rank=1, running=1, waiting=0, kv_usage=0.5),
    }
    assert cache_config(parse_prometheus_text(V1_TEXT)) == CacheConfig(block_size=16, num_gpu_blocks=27000,
                                                                        enable_prefix_caching=True)


def test_to_load_derives_free_blocks_and_clamps_usage():
    stats = engine_stats(parse_prometheus_text(V1_TEXT))
    assert stats[1].to_load(num_gpu_blocks=1001, queued_prefill_tokens=77) == WorkerLoad(
        running=1, waiting=0, queued_prefill_tokens=77, kv_usage=0.5, num_free_blocks=500, num_gpu_blocks=1001)
    assert EngineStats(dp_rank=0, kv_usage=1.7).to_load(num_gpu_blocks=10).kv_usage == 1.0


def test_older_names_no_engine_label_and_escaped_labels():
    text = (
        'vllm:num_requests_running{model_name="a \\"quoted\\" name"} 4\n'
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.125\n'
        'vllm:gpu_prefix_cache_queries_total{model_name="m"} 10\n'
        'vllm:gpu_prefix_cache_hits_total{model_name="m"} 5 1767225600000\n'
    )
    parsed = parse_prometheus_text(text)
    assert parsed.samples["vllm:num_requests_running"] == [({"model_name": 'a "quoted" name'}, 4.0)]
    assert engine_stats(parsed) == {0: EngineStats(dp_rank=0, running=4, kv_usage=0.125,
                                                   prefix_queries_tokens=10, prefix_hits_tokens=5)}
    assert cache_config(parsed) == CacheConfig()


def test_newest_name_wins_when_both_are_exported():
    text = 'vllm:gpu_cache_usage_perc{engine="0"} 0.9\nvllm:kv_cache_usage_perc{engine="0"} 0.1\n'
    assert engine_stats(parse_prometheus_text(text))[0].kv_usage == 0.1


def test_malformed_lines_are_counted_not_fatal():
    text = 'vllm:num_requests_running{engine="0"} 2\ngarbage line here\nvllm:x{engine="0} 1\nvllm:y{a="b"} NaNx\n'
    parsed = parse_prometheus_text(text)
    assert parsed.malformed_lines == 3
    assert engine_stats(parsed) == {0: EngineStats(dp_rank=0, running=2)}


def test_unprofiled_cache_config_gives_none():
    text = 'vllm:cache_config_info{block_size="32",num_gpu_blocks="None",enable_prefix_caching="False"} 1.0\n'
    assert cache_config(parse_prometheus_text(text)) == CacheConfig(block_size=32, num_gpu_blocks=None,
                                                                   enable_prefix_caching=False)


def test_fake_server_metrics_follow_its_prefix_cache():
    with FakeVllm(num_gpu_blocks=65, dp_size=2) as fake:
        client = OpenAIClient(base_url=fake.url)
        prompt = list(range(1, 49))  # 3 full blocks
        req = CompletionRequest(model=fake.model, prompt_token_ids=prompt, max_tokens=1)
        client.complete(req)
        client.complete(req)
        stats = engine_stats(parse_prometheus_text(client.metrics_text()))
        # Second request reuses (48 - 1) // 16 = 2 blocks = 32 tokens.
        assert stats[0] == EngineStats(dp_rank=0, running=0, waiting=0, kv_usage=0.0,
                                       prefix_queries_tokens=96, prefix_hits_tokens=32)
        assert stats[1] == EngineStats(dp_rank=1)
        assert cache_config(parse_prometheus_text(client.metrics_text())) == CacheConfig(16, 65, True)
