"""Load on ``medsam3 serve``: N concurrent clients segmenting phantoms on 127.0.0.1 for T seconds.

    python benchmarks/bench_serve.py                          # nano, 1/2/4 clients, 60 s each
    python benchmarks/bench_serve.py --clients 4 --seconds 20 --model tiny

Starts the real server (``medsam3 serve``, one process), drives it with the clients of
``medsam3.serve.loadtest`` (each uploads a 128 px phantom, then segments it by one of its concepts,
half the time with a box, re-uploads every 40 requests and sends a bad request every 15, which must
be refused with a 4xx) and prints one Markdown row per client count: requests/s, p50/p95 latency
of the segment calls, 5xx count and the server's peak RSS. Needs httpx (the test extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from medsam3.serve.live import LiveServer  # noqa: E402
from medsam3.serve.loadtest import run_load  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nano")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server (OMP_NUM_THREADS)")
    parser.add_argument("--max-sessions", type=int, default=32)
    args = parser.parse_args()
    env = {} if args.threads is None else {"OMP_NUM_THREADS": str(args.threads)}
    rows = []
    with LiveServer(args.model, args=("--max-sessions", str(args.max_sessions)), env=env) as server:
        for clients in args.clients:
            report = run_load(server.url, clients=clients, seconds=args.seconds)
            report.peak_rss_bytes = server.rss_now()
            rows.append(report.table().splitlines())
            if report.failures:
                print(
                    f"{clients} clients: {len(report.failures)} failures, e.g. {report.failures[:3]}", file=sys.stderr
                )
    log = server.log_text()
    print(f"model {args.model}; server threads {args.threads or 'default'}; {machine()}")
    print("\n".join(rows[0][:2] + [row[2] for row in rows]))
    print(f"server log: {'no' if 'Traceback' not in log else 'SOME'} tracebacks")
    return 0 if all(r[2].split("|")[7].strip() == "0" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
