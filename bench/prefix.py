"""Prefix caching on the server: 16 clients, each request a shared ~700-token prefix plus a
distinct ~20-token suffix and 32 new tokens, with caching on and with --enable_prefix_caching
false, in the same run (rounds alternate the two); then the same with no shared prefix, where
the cache can only cost (hashing each prompt's blocks). Prints throughput and time to first
token p50 per server, and the ratios.

    python bench/prefix.py [--rounds 2] [--duration 60] [--clients 16] [--isa avx2]
                           [--workloads "shared prefix" "no shared prefix"]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys

from common import gpt2_124m, host_isa, read_bandwidth
from serving import MODEL, caps, openai_stream, run_level, start

PREFIX, SUFFIX, NEW = 700, 20, 32


def workloads(vocab: int, count: int) -> dict[str, list[list[int]]]:
    """Prompts as token ids, each one used once (run_level cycles through `count`)."""
    rng = random.Random(0)
    draw = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    prefix = draw(PREFIX)
    return {"shared prefix": [prefix + draw(SUFFIX) for _ in range(count)],
            "no shared prefix": [draw(PREFIX + SUFFIX) for _ in range(count)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=60.0, help="seconds per measurement")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--isa", choices=["native", "avx2"], default="native")
    p.add_argument("--workloads", nargs="+", choices=["shared prefix", "no shared prefix"],
                   default=["shared prefix", "no shared prefix"])
    args = p.parse_args()
    folder = gpt2_124m()
    print(f"{host_isa({**os.environ, **caps(args)})}; measured read bandwidth "
          f"{read_bandwidth() / 1e9:.1f} GB/s; GPT-2 124M fp32 (random weights), "
          f"{args.clients} clients, {PREFIX} + {SUFFIX} prompt tokens, {NEW} new", flush=True)
    url = "http://127.0.0.1:8401/openai/v1/completions"
    results: dict[tuple[str, str], list[dict]] = {}
    for workload, prompts in workloads(50257, 4000).items():
        if workload not in args.workloads:
            continue
        for r in range(args.rounds):
            for caching in ("on", "off") if r % 2 == 0 else ("off", "on"):
                cmd = [sys.executable, "-m", "gpt2serve.cli", "serve", "--model_dir",
                       str(folder), "--http_port", "8401", "--enable_grpc", "false",
                       "--max_batch_size", str(args.clients),
                       "--enable_prefix_caching", "true" if caching == "on" else "false"]
                proc = start(cmd, "http://127.0.0.1:8401/v1/models/aitextgen", caps(args))
                try:
                    # One request first, never measured (the list's last): with caching, the
                    # steady state where the shared prefix has been read once.
                    asyncio.run(run_level(openai_stream, url, MODEL, 1, 0.1, 4, prompts[-1:]))
                    level = asyncio.run(run_level(openai_stream, url, MODEL, args.clients,
                                                  args.duration, NEW, prompts))
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
                row = level.row()
                results.setdefault((workload, caching), []).append(row)
                print(f"{workload:16s} caching {caching:3s} round {r} {json.dumps(row)}",
                      flush=True)
    for workload in args.workloads:
        on, off = results[(workload, "on")], results[(workload, "off")]
        tok_s = [statistics.median(x["tok_s"] for x in rows) for rows in (on, off)]
        ttft = [statistics.median(x["p50_ttft_s"] for x in rows) for rows in (on, off)]
        print(f"{workload}: median tok/s on {tok_s[0]:.1f} / off {tok_s[1]:.1f} = "
              f"{tok_s[0] / tok_s[1]:.2f}x; TTFT p50 on {ttft[0] * 1e3:.0f} ms / off "
              f"{ttft[1] * 1e3:.0f} ms = {ttft[1] / ttft[0]:.2f}x lower", flush=True)


if __name__ == "__main__":
    main()
