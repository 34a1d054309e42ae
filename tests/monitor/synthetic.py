"""A synthetic but plausible monitor dump (for plot, report and dash tests)."""

from __future__ import annotations

import random

from bus.schema import ErrorCode
from monitor.state import MonitorState
from tests.monitor.records import request, sample


def synthetic_dump(label: str, *, aware: bool, n: int = 200, seed: int = 7, t0: float = 1000.0) -> dict:
    rng = random.Random(seed)
    st = MonitorState(block_size=16, bucket_s=2.0, sample_interval_s=1.0, label=label)
    workers = ["w0", "w1", "w2"]
    gaps = {w: 0 for w in workers}
    st.tick(t0)
    for i in range(n):
        t = t0 + i * 0.1
        w = workers[(i // 7) % 3] if aware else workers[i % 3]
        warm = aware and i % 7 != 0 or (not aware and rng.random() < 0.3)
        prompt = 512
        cached = (rng.choice([496, 480, 256]) if warm else 0)
        ttft = (0.03 if cached >= 480 else 0.08 if cached else 0.2) * rng.uniform(0.8, 1.3)
        st.add(request(f"r{i}", worker=w, t=t, prompt=prompt, cached=cached, predicted=cached if aware else 0,
                       ttft=ttft, e2e=ttft + 0.2))
        if i == 120:
            st.add(request("bad", worker=None, t=t, error=ErrorCode.WORKER_DIED))
        if i % 5 == 0:
            for k, wid in enumerate(workers):
                if i == 100 and wid == "w1":
                    gaps[wid] += 1
                st.add(sample(wid, t=t, kv=min(1.0, 0.1 + i / n * 0.6 + 0.05 * k), indexed=10 + i // 2,
                              confidence="resyncing" if (wid == "w1" and 100 <= i < 110) else "fresh",
                              gaps=gaps[wid], replays=gaps[wid], evictions=i // 10))
        st.tick(t)
    return st.dump(now_s=t0 + n * 0.1)
