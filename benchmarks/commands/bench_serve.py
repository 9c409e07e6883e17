"""`clipfuse bench-serve`: load test of `clipfuse serve` (N concurrent clients x M requests)."""
from __future__ import annotations

import argparse

from clipfuse.runtime import limits as L


ORDER = 150  # place in `clipfuse --help`
HELP = "load-test clipfuse serve: concurrent clients, throughput and p50/p99 latency"

DESCRIPTION = """\
Start `clipfuse serve` on 127.0.0.1 (in this process, free ports) for ARTIFACT, then run --clients
concurrent clients (threads, each with its own tritonclient connection over --protocol), each
sending --requests requests of one smooth RGB image of --size H W, after one warm-up request
per client. Reports throughput (requests/s), per-request latency p50/p90/p99/mean, how Triton
batched them (images per model execution, windows per backend call, from the server's own
counters), and, as the baseline, the same image through Segmenter in this process one request
at a time (no server). Checks that every response equals the local labels.

Writes OUT.json (all samples and the machine) and OUT.md (a table) when --out is given.

examples:
  clipfuse bench-serve engines/sclip.onnx --clients 8 --requests 25 --out benchmarks/results/serve-cpu
  clipfuse bench-serve engines/sclip.onnx --protocol grpc --instances 2 --max-batch-size 8
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="exported .onnx or built .engine (its .json beside it)")
    parser.add_argument("--clients", type=L.BENCH_CLIENTS.option_type(), default=8, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--requests", type=L.BENCH_REQUESTS.option_type(), default=25, help="requests per client (default: %(default)s)")
    parser.add_argument("--size", type=L.BENCH_SIDE.option_type(), nargs=2, default=[480, 640], metavar=("H", "W"),
                        help="image size (default: 480 640)")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--instances", type=L.INSTANCES.option_type(), default=1, help="model instances (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=L.MAX_BATCH_SIZE.option_type(), default=8, help="(default: %(default)s)")
    parser.add_argument("--queue-delay-us", type=L.QUEUE_DELAY_US.option_type(0), default=2000, help="(default: %(default)s)")
    parser.add_argument("--window-batch", type=L.WINDOW_BATCH.option_type(), default=None)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=L.THREADS.option_type(), default=None, help="ort-cpu intra-op threads")
    parser.add_argument("--baseline-requests", type=L.BENCH_REQUESTS.option_type(0), default=5,
                        help="requests for the no-server baseline (default: %(default)s)")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")


def run(args: argparse.Namespace) -> int:
    from ..serve_load import LoadConfig, run_load_test, write_report

    config = LoadConfig(artifact=args.artifact, clients=args.clients, requests=args.requests,
                        size=tuple(args.size), protocol=args.protocol, instances=args.instances,
                        max_batch_size=args.max_batch_size, queue_delay_us=args.queue_delay_us,
                        window_batch=args.window_batch, backend=args.backend, threads=args.threads,
                        baseline_requests=args.baseline_requests)
    doc = run_load_test(config)
    print(write_report(doc, args.out), end="")
    return 0
