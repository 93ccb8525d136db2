"""Where the KV blocks lie, once a server has run a while: the engine of this tree against the
engine of another checkout (`--against`, e.g. a `git worktree` of an earlier commit), in
alternating subprocesses, on the same fixed schedule.

    python bench/kv_layout.py --against /tmp/before [--rounds 3] [--quantize int8] [--isa avx2]
    python bench/kv_layout.py --against /tmp/before --replay
    python bench/kv_layout.py --against /tmp/before --chat 6 [--rounds 3]

The schedule: 8 sequences at a time on GPT-2 124M (random weights), each a prompt of 500-760
distinct tokens and 64-256 greedy new tokens; a finished one is replaced at once, so blocks
are freed and taken again and again, under the default KV cache (8 full contexts) with prefix
caching on. After 400 warm-up steps, 400 steps are timed: the median decode step (no prompt
read in it), new tokens a second over all of them, and the share of neighbouring entries of
the running sequences' block tables that are consecutive blocks. Decode attention reads each
sequence's blocks in table order (docs/benchmarks.md, "Block tables in order").

`--replay` runs the block manager alone (no model, seconds) on longer schedules and more
workloads (`replay`): the share of consecutive table neighbours, and the prefix cache's hits,
which placing tables in order could cost. `--chat` times chats' turns (`run_chat`): how long
a turn's prompt takes to read when the cache holds the last answer's blocks, or not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import gpt2_124m, host_isa, read_bandwidth

HERE = Path(__file__).resolve().parent


def stepped_engine(quantize: str | None):
    """GPT-2 124M (random weights) in an engine stepped by the caller, 8 sequences at most,
    with whichever gpt2serve is on the path; and its tokenizer."""
    from gpt2serve import checkpoint
    from gpt2serve.engine import Engine, EngineConfig

    model, tokenizer = checkpoint.load(gpt2_124m(), quantize=quantize)
    return Engine(model, tokenizer, EngineConfig(max_batch_size=8), threaded=False), tokenizer


def run_engine(quantize: str | None, warm_up: int, steps: int) -> dict:
    """In this process, with whichever gpt2serve is on the path."""
    import torch

    from gpt2serve.engine import Prompt
    from gpt2serve.sampling import SamplingParams

    engine, tokenizer = stepped_engine(quantize)
    rng = random.Random(0)

    def request() -> Prompt:
        ids = [rng.randrange(tokenizer.vocab_size - 1) for _ in range(rng.randint(500, 760))]
        params = SamplingParams.from_dict({"max_new_tokens": rng.randint(64, 256),
                                           "do_sample": False, "ignore_eos": True})
        return Prompt(ids, params)

    async def drive() -> dict:
        calls = [engine.submit([request()], streamed=False) for _ in range(8)]
        decode, tokens, t_all, consecutive, pairs = [], 0, 0.0, 0, 0
        for step in range(warm_up + steps):
            sched = engine.scheduler
            calls = [c for c in calls
                     if not (c[0].seqs and all(s.finish_reason for s in c[0].seqs))]
            while len(calls) < 8:  # a finished request is replaced at once
                calls.append(engine.submit([request()], streamed=False))
            decode_only = not (sched.waiting or sched.prefilling)
            before = sum(len(s.tokens) for s in sched.running)
            t0 = time.perf_counter()
            engine.step()
            seconds = time.perf_counter() - t0
            await asyncio.sleep(0)  # the events are handed over; nothing reads them here
            for c in calls:
                while not c[0].events.empty():
                    c[0].events.get_nowait()
            if step < warm_up:
                continue
            t_all += seconds
            tokens += max(0, sum(len(s.tokens) for s in sched.running) - before)
            if decode_only:
                decode.append(seconds)
            for s in sched.running:
                pairs += len(s.blocks) - 1
                consecutive += sum(b == a + 1 for a, b in zip(s.blocks, s.blocks[1:]))
        return {"decode_step_ms": statistics.median(decode) * 1e3 if decode else None,
                "decode_steps": len(decode), "tokens_per_s": tokens / t_all,
                "consecutive": consecutive / max(1, pairs)}

    with torch.inference_mode():
        return asyncio.run(drive())


def run_chat(quantize: str | None, turns: int) -> dict:
    """4 conversations in turn, one request at a time: each turn's prompt the last one's, its
    answer (100 greedy tokens) and a new message of 40 tokens; a conversation past 850 tokens
    starts again. The time to each turn's first token (its prompt's read) after the first
    turn, and the share of its prompt the cache held."""
    import torch

    from gpt2serve.engine import Prompt
    from gpt2serve.sampling import SamplingParams

    engine, tokenizer = stepped_engine(quantize)
    rng = random.Random(0)
    draw = lambda n: [rng.randrange(tokenizer.vocab_size - 1) for _ in range(n)]  # noqa: E731
    params = SamplingParams.from_dict({"max_new_tokens": 100, "do_sample": False,
                                       "ignore_eos": True})
    chats = [draw(200) for _ in range(4)]
    first_token, cached = [], []

    async def drive() -> None:
        for turn in range(turns):
            for c, prompt in enumerate(chats):
                (request,) = engine.submit([Prompt(prompt, params)], streamed=False)
                t0 = time.perf_counter()
                while not (request.seqs and request.seqs[0].tokens):
                    engine.step()
                seconds = time.perf_counter() - t0
                while not request.seqs[0].finish_reason:
                    engine.step()
                await asyncio.sleep(0)  # the events are handed over; nothing reads them
                if turn:
                    first_token.append(seconds)
                    cached.append(request.cached_tokens / len(prompt))
                chats[c] = prompt + request.seqs[0].tokens + draw(40)
                if len(chats[c]) > 850:
                    chats[c] = draw(200)

    with torch.inference_mode():
        asyncio.run(drive())
    return {"first_token_ms": statistics.median(first_token) * 1e3,
            "cached": statistics.mean(cached)}


REPLAYS = {  # workload, KV blocks (of 16 positions), prefix caching
    "distinct prompts, caching off": ("distinct", 512, False),
    "distinct prompts": ("distinct", 512, True),
    "system prompts, 512 blocks": ("system", 512, True),
    "system prompts, 1024 blocks": ("system", 1024, True),
    "chats, 512 blocks": ("chat", 512, True),
    "chats, 2048 blocks": ("chat", 2048, True),
}


def replay(workload: str, num_blocks: int, caching: bool, steps: int = 20000) -> dict:
    """The block manager alone, 8 sequences at a time, a step a token, as the scheduler
    drives it: admission with the prefix cache's hits, growth, release. `distinct`: prompts
    of 600-960 tokens no other shares; `system`: half of them one of 6 prompts of 400 tokens
    and a distinct 16-300; `chat`: 40 conversations, each turn the last one's prompt, answer
    and a new message of 20-80 tokens. Hits: prompt blocks found cached over prompt blocks,
    and the share of table neighbours that are consecutive, both after 2,000 steps."""
    import inspect

    from gpt2serve.engine import kv_cache
    from gpt2serve.engine.kv_cache import BlockManager, prefix_keys

    size, rng, fresh = 16, random.Random(0), iter(range(10**6, 10**9))
    blocks = BlockManager(num_blocks, size)
    placed = "keep" in inspect.signature(blocks.admit).parameters  # (not before 8080029)
    grow_args = len(inspect.signature(blocks.grow).parameters)  # (table, left), as it takes
    # the blocks decode steps fill join the cache too (the scheduler's, since block_key)
    generated = caching and hasattr(kv_cache, "block_key")
    draw = lambda n: [next(fresh) for _ in range(n)]  # noqa: E731
    systems = [draw(400) for _ in range(6)]
    chats = [draw(rng.randint(100, 300)) for _ in range(40)]
    running, hits, queried, pairs, consecutive = [], 0, 0, 0, 0
    for step in range(steps):
        while len(running) < 8:
            if workload == "chat":
                c = rng.randrange(len(chats))
                ids, new = chats[c], rng.randint(50, 150)
                answer = draw(new)
                chats[c] = ids + answer + draw(rng.randint(20, 80))
                if len(chats[c]) >= 850:
                    chats[c] = draw(rng.randint(100, 300))
            else:
                if workload == "system" and rng.random() < 0.5:
                    ids = rng.choice(systems) + draw(rng.randint(16, 300))
                else:
                    ids = draw(rng.randint(600, 960) if workload == "distinct" else
                               rng.randint(16, 700))
                new = rng.randint(16, 1024 - len(ids))
                answer = draw(new)
            keys = prefix_keys(ids, size) if caching else []
            cached = blocks.cached(keys)[:(len(ids) - 1) // size]  # its last token is read
            prompt_blocks, growth = blocks.need(len(ids), new, 1)
            table = blocks.admit(prompt_blocks, growth, cached,
                                 **({"keep": growth} if placed else {}))
            if table is None:
                break
            if step >= 2000:
                hits, queried = hits + len(cached), queried + len(keys)
            for block, key in list(zip(table, keys))[len(cached):]:
                blocks.remember(block, key)
            end = len(ids) + (new if workload == "chat" else rng.randint(1, new))
            filled = prefix_keys(ids + answer, size) if generated else []
            running.append([table, len(ids), end, growth, filled, len(ids)])
        for seq in running:
            seq[1] += 1
            if (seq[1] - 1) // size == len(seq[0]):
                seq[0].append(blocks.grow(*((seq[0], seq[3])[:grow_args])))
                seq[3] -= 1
            full = (seq[1] - 1) // size  # blocks whose every position is written
            if (seq[1] - 1) % size == 0 and full * size > seq[5] and full <= len(seq[4]):
                blocks.remember(seq[0][full - 1], seq[4][full - 1])
        for seq in [s for s in running if s[1] >= s[2]]:
            running.remove(seq)
            blocks.release(seq[0], seq[3])
        if step >= 2000 and step % 50 == 0:
            for seq in running:
                pairs += len(seq[0]) - 1
                consecutive += sum(b == a + 1 for a, b in zip(seq[0], seq[0][1:]))
    return {"consecutive": consecutive / pairs, "hits": hits / queried if queried else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", type=Path, help="another checkout's root, to compare with")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quantize", choices=["int8"], default=None)
    p.add_argument("--isa", choices=["native", "avx2"], default="native",
                   help="avx2: the engines run under hardware.AVX2_CAP_ENV")
    p.add_argument("--warm-up", type=int, default=400)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--replay", action="store_true",
                   help="the block manager alone, on the workloads of REPLAYS: table order "
                        "and prefix-cache hits (seconds, no model)")
    p.add_argument("--chat", type=int, metavar="TURNS",
                   help="instead, chats' time to first token over TURNS turns (run_chat)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        out = ({name: replay(*spec) for name, spec in REPLAYS.items()} if args.replay else
               run_chat(args.quantize, args.chat) if args.chat else
               run_engine(args.quantize, args.warm_up, args.steps))
        print(json.dumps(out))
        return
    if args.replay:
        trees = {"this tree": HERE.parent, **({"against": args.against} if args.against else {})}
        for name, root in trees.items():
            env = {**os.environ, "PYTHONPATH": f"{root.resolve() / 'src'}{os.pathsep}{HERE}"}
            out = subprocess.run([sys.executable, str(HERE / "kv_layout.py"), "--child",
                                  "--replay"], env=env, capture_output=True, text=True,
                                 check=True)
            for workload, x in json.loads(out.stdout.strip().splitlines()[-1]).items():
                hits = "" if x["hits"] is None else f", prefix hits {x['hits']:.1%}"
                print(f"{name:9s} {workload:30s}: {x['consecutive']:.1%} of table neighbours "
                      f"consecutive{hits}")
        return
    from gpt2serve import hardware

    cap = hardware.AVX2_CAP_ENV if args.isa == "avx2" else {}
    print(f"{host_isa({**os.environ, **cap})}; measured read bandwidth "
          f"{read_bandwidth() / 1e9:.1f} GB/s; {'int8' if args.quantize else 'fp32'} weights")
    trees = {"this tree": HERE.parent}
    if args.against:
        trees["against"] = args.against.resolve()
    results: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, root in trees.items():
            env = {**os.environ, **cap, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{HERE}"}
            cmd = [sys.executable, str(HERE / "kv_layout.py"), "--child", "--warm-up",
                   str(args.warm_up), "--steps", str(args.steps)]
            if args.quantize:
                cmd += ["--quantize", args.quantize]
            if args.chat:
                cmd += ["--chat", str(args.chat)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            x = results[name][-1]
            print(f"round {r + 1} {name:9s}: " + (
                f"first token {x['first_token_ms']:.1f} ms, {x['cached']:.0%} of prompts "
                f"cached" if args.chat else
                f"decode step {x['decode_step_ms']:.2f} ms ({x['decode_steps']} steps), "
                f"{x['tokens_per_s']:.1f} tok/s, {x['consecutive']:.0%} of table neighbours "
                f"consecutive"), flush=True)
    if args.chat:
        first = {name: statistics.median(x["first_token_ms"] for x in runs)
                 for name, runs in results.items()}
        for name, runs in results.items():
            print(f"{name:9s} median: first token {first[name]:.1f} ms, "
                  f"{statistics.median(x['cached'] for x in runs):.0%} of prompts cached")
        if args.against:
            print(f"this tree over against: first token "
                  f"{first['against'] / first['this tree']:.2f}x sooner")
        return
    medians = {name: {k: statistics.median(x[k] for x in runs)
                      for k in ("decode_step_ms", "tokens_per_s", "consecutive")}
               for name, runs in results.items()}
    for name, m in medians.items():
        print(f"{name:9s} median: decode step {m['decode_step_ms']:.2f} ms, "
              f"{m['tokens_per_s']:.1f} tok/s, {m['consecutive']:.0%} consecutive")
    if args.against:
        a, b = medians["this tree"], medians["against"]
        print(f"this tree over against: decode step "
              f"{b['decode_step_ms'] / a['decode_step_ms']:.2f}x faster, "
              f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x tok/s")


if __name__ == "__main__":
    main()
