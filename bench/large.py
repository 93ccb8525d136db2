"""GPT-2 1.5B on this machine with no sizing flags: start-up time, peak memory while loading
against the steady state, and 8 concurrent requests, for fp32, int8 and int4.

The model is the `gpt2-xl` shape (1600 wide, 48 layers, 25 heads, the real vocabulary) with
random weights, written once (6.2 GB) to bench/results/cache. Each server is started twice:
the first start warms the page cache, the second is timed.

    python bench/large.py [--variants fp32 int8] [--tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from common import gpt2_random, host_isa

PORT = 8411


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def mem_total_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def start(folder: Path, flags: list[str]) -> tuple[subprocess.Popen, list[str]]:
    """The server, and the list its log lines are collected into."""
    proc = subprocess.Popen([sys.executable, "-m", "gpt2serve.cli", "serve", "--model_dir",
                             str(folder), "--http_port", str(PORT), "--enable_grpc", "false",
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def wait_ready(proc: subprocess.Popen, lines: list[str]) -> None:
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/v1/models/aitextgen", timeout=1).is_success:
                return
        except httpx.TransportError:
            if proc.poll() is not None:
                raise RuntimeError("".join(lines)[-2000:]) from None
        time.sleep(0.1)


async def crowd(n: int, tokens: int) -> float:
    url = f"http://127.0.0.1:{PORT}/v1/models/aitextgen:predict"
    async with httpx.AsyncClient(timeout=3600) as client:
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(client.post(url, json={"instances": [
            {"prompt": f"Request {i}:", "max_new_tokens": tokens, "ignore_eos": True,
             "seed": i}]}) for i in range(n)))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        return n * tokens / (time.perf_counter() - t0)


def run(folder: Path, name: str, flags: list[str], tokens: int) -> dict:
    proc, lines = start(folder, flags)  # warms the page cache
    wait_ready(proc, lines)
    proc.terminate()
    proc.wait()
    t0 = time.perf_counter()
    proc, lines = start(folder, flags)
    peak_loading = 0
    ready = threading.Thread(target=wait_ready, args=(proc, lines))
    ready.start()
    while ready.is_alive():  # VmRSS sampled while loading (VmHWM would count serving too)
        peak_loading = max(peak_loading, status_kib(proc.pid, "VmRSS"))
        time.sleep(0.05)
    startup = time.perf_counter() - t0
    try:
        ready_rss = status_kib(proc.pid, "VmRSS")
        one = asyncio.run(crowd(1, tokens))
        eight = asyncio.run(crowd(8, tokens))
        steady = status_kib(proc.pid, "VmRSS")
        peak = status_kib(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait()
    kv_line = next((ln.split(" INFO ", 1)[-1].strip() for ln in lines if "KV cache:" in ln), "")
    total = mem_total_kib()
    return {"variant": name, "startup_s": round(startup, 1),
            "peak_rss_loading_gib": round(peak_loading / 2**20, 2),
            "rss_ready_gib": round(ready_rss / 2**20, 2),
            "rss_after_8_requests_gib": round(steady / 2**20, 2),
            "peak_rss_gib": round(peak / 2**20, 2), "peak_share_of_ram": round(peak / total, 3),
            "loading_peak_over_ready": round(peak_loading / ready_rss, 3),
            "batch1_tok_s": round(one, 2), "batch8_tok_s": round(eight, 2), "kv_cache": kv_line}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["fp32", "int8", "int4"])
    p.add_argument("--tokens", type=int, default=16)
    args = p.parse_args()
    folder = gpt2_random("1.5b")
    print(f"{host_isa()}; RAM {mem_total_kib() / 2**20:.1f} GiB; GPT-2 1.5B (random weights), "
          f"no sizing flags, {args.tokens} new tokens a request", flush=True)
    flags = {"fp32": [], "int8": ["--quantize", "int8"], "int4": ["--quantize", "int4"]}
    for name in args.variants:
        print(json.dumps(run(folder, name, flags[name], args.tokens)), flush=True)


if __name__ == "__main__":
    main()
