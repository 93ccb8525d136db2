"""KV-cache capacity counted in tokens: GPT-2 124M fp32 with `--kv_cache_memory 600MiB` (eight
full-context sequences' worth) and 24 concurrent requests of 260 tokens. Prints the most
sequences that ran at once and the most of the cache they held, read from /metrics.

    python bench/capacity.py [--budget 600MiB] [--requests 24] [--length 260]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import threading
import time

import httpx

from common import gpt2_124m, host_isa, prompts

PORT = 8421


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M).group(1))


def main() -> None:
    from gpt2serve.tokenizer import Tokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="600MiB")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--length", type=int, default=260, help="prompt + new tokens")
    args = p.parse_args()
    folder = gpt2_124m()
    texts = [Tokenizer.from_dir(folder).decode(ids) for ids in prompts(args.requests)]
    proc = subprocess.Popen([sys.executable, "-m", "gpt2serve.cli", "serve", "--model_dir",
                             str(folder), "--http_port", str(PORT), "--enable_grpc", "false",
                             "--kv_cache_memory", args.budget, "--max_batch_size", "32"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{PORT}"
    try:
        while True:
            try:
                if httpx.get(f"{base}/v1/models/aitextgen", timeout=1).is_success:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        peak = {"running": 0.0, "usage": 0.0}
        done = threading.Event()

        def watch():
            while not done.is_set():
                text = httpx.get(f"{base}/metrics").text
                peak["running"] = max(peak["running"],
                                      metric(text, "gpt2serve_running_sequences"))
                peak["usage"] = max(peak["usage"], metric(text, "gpt2serve_kv_cache_usage_ratio"))
                time.sleep(0.1)

        async def crowd():
            async with httpx.AsyncClient(timeout=3600) as client:
                return await asyncio.gather(*(client.post(
                    f"{base}/v1/models/aitextgen:predict", json={"instances": [
                        {"prompt": t, "max_length": args.length, "ignore_eos": True}]})
                    for t in texts))

        watcher = threading.Thread(target=watch)
        watcher.start()
        t0 = time.perf_counter()
        answers = asyncio.run(crowd())
        took = time.perf_counter() - t0
        done.set()
        watcher.join()
        capacity = metric(httpx.get(f"{base}/metrics").text, "gpt2serve_kv_cache_capacity_tokens")
        ok = sum(r.status_code == 200 for r in answers)
        print(f"{host_isa()}; GPT-2 124M fp32, --kv_cache_memory {args.budget} = "
              f"{capacity:.0f} tokens ({capacity / 1024:.1f} full-context sequences); "
              f"{args.requests} requests of {args.length} tokens: {ok} answered 200 in "
              f"{took:.1f} s, at most {peak['running']:.0f} sequences running at once, "
              f"cache at most {peak['usage']:.0%} used")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
