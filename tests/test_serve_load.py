"""A bounded load on a real ``medsam3 serve`` (nano) on 127.0.0.1: concurrent clients, zero 5xx.

4 clients segment phantoms for 15 s (re-uploading now and then, with only 6 sessions kept, so the
LRU evicts while they work) and send deliberate bad requests; every bad one must be a 4xx, every
good one a 2xx. p50/p95 latency and the server's peak RSS are printed (``-s`` shows them);
``benchmarks/bench_serve.py`` runs the same load for longer and prints the README's table.
"""

from __future__ import annotations

import pytest

pytest.importorskip("httpx", reason="needs httpx (the test extra)")

from medsam3.serve.live import LiveServer  # noqa: E402
from medsam3.serve.loadtest import run_load  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
CLIENTS, SECONDS = 4, 15.0


def test_concurrent_clients_get_no_5xx(tmp_path):
    server = LiveServer("nano", args=("--max-sessions", "6"), log_path=tmp_path / "server.log",
                        tmpdir=tmp_path / "server_tmp", env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    with server:
        report = run_load(server.url, clients=CLIENTS, seconds=SECONDS, max_requests=20_000)
        report.peak_rss_bytes = server.rss_now()
    print("\n" + report.table())
    assert report.server_errors == 0, report.statuses + report.bad_statuses
    assert not report.failures, report.failures[:10]
    assert len(report.latencies) >= 20 and report.percentile(95) < 10.0
    assert sum(report.bad_statuses.values()) >= CLIENTS  # the bad requests were sent, and refused with 4xx
    log = server.log_text()
    assert "Traceback" not in log and '" 500' not in log and '" 503' not in log, log[-3000:]
    assert not list((tmp_path / "server_tmp").glob("medsam3-serve-*"))
