"""Rewrite the tables of docs/benchmarks.md and the plots under docs/ from bench/results/*.json.

    python bench/report.py

A table sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` and is made from
bench/results/NAME.json (written by bench/offline.py or bench/serving.py, which bench/run.py
calls); a block without its JSON is left as it is. Plots (matplotlib, PNG):
docs/bench-throughput.png (aggregate tok/s against concurrent clients, from serving.json),
docs/bench-ttft.png (time to first token p50 and p95 against clients) and docs/bench-batch1.png
(batch-1 tok/s per engine from offline-greedy.json, each bar with the speed at which reading
its weights once per token takes the machine's measured read bandwidth). The `ledger` block
is the latest run of each machine class in bench/results/ledger.csv.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
LEDGER = RESULTS / "ledger.csv"
OURS = ("gpt2serve fp32", "gpt2serve int8", "gpt2serve int4")
# Peers named fp32 that are not fp32 engines everywhere: OpenVINO's defaults compute in bf16
# and keep a u8 KV cache where the CPU has BF16. Their tables show them; the headline's best
# fp32 peer is never one.
NOT_FP32 = ("openvino fp32 default",)
REGRESSION = 0.95  # our change over the peers' below which the ledger marks a regression
# How each engine's row is named in the tables.
LABEL = {"gpt2serve fp32": "gpt2serve fp32", "gpt2serve int8": "gpt2serve int8",
         "gpt2serve int4": "gpt2serve int4",
         "gpt2serve fp16": "gpt2serve fp16",
         "transformers fp32": "transformers `generate` fp32",
         "ctranslate2 fp32": "CTranslate2 fp32", "ctranslate2 int8": "CTranslate2 int8",
         "llama.cpp f32": "llama.cpp f32", "llama.cpp q8_0": "llama.cpp q8_0",
         "llama.cpp q4_0": "llama.cpp q4_0", "llama.cpp q4_K_M": "llama.cpp q4_K_M",
         "openvino fp32": "OpenVINO fp32 (f32 compute and KV cache)",
         "openvino fp32 default": "OpenVINO fp32, its defaults",
         "openvino int8": "OpenVINO int8, its defaults",
         "openvino int8 w-only": "OpenVINO int8 weights only",
         "openvino int4": "OpenVINO int4, its defaults",
         "transformers one-at-a-time": "one-at-a-time predictor (`transformers`)",
         "vllm": "vLLM CPU fp32"}


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def machine_line(r: dict) -> str:
    m, v = r["machine"], r["versions"]
    bw = (f"{m['read_bandwidth_gb_s']} GB/s" if m.get("read_bandwidth_gb_s")
          else m.get("read_bandwidth_note", "not recorded"))
    cap = "none" if m.get("cap", "none") == "none" else m["cap"]
    where = m["gpu"] if m.get("gpu") else f"{m['cpu']}, ISA {m['isa']}"
    line = (f"Machine: {where} (torch kernels {m['torch_kernels']}), ISA cap: {cap}; "
            f"{m['threads']} threads of {m['cpus']} CPUs; measured read bandwidth {bw}.")
    versions = ", ".join(f"{k} {val}" for k, val in v.items())
    return f"{line}\nVersions: {versions}."


def skipped_line(r: dict) -> str:
    """The engines that failed or were skipped: those not in the table, and those that failed
    in a later round, whose figures are the median of the rounds they ran."""
    skipped = r.get("skipped") or {}
    shown = r.get("tok_s") or r.get("levels") or {}
    lines = [(title, "; ".join(f"{LABEL.get(n, n)}: {why}" for n, why in skipped.items()
                               if (n in shown) == in_table))
             for title, in_table in (("Not in this table", False),
                                     ("Failed in a later round", True))]
    return "".join(f"\n{title}: {names}.\n" for title, names in lines if names)


def engine_label(r: dict, name: str) -> str:
    """An engine's or server's row name, with the rounds its medians are of where it failed
    in a later one."""
    partial = r.get("rounds_run") or {}
    return LABEL.get(name, name) + (f" ({partial[name]} of {r['rounds']} rounds)"
                                    if name in partial else "")


def duration(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else ""


def is_ours(engine: str) -> bool:
    """One of our engines, its variants (`gpt2serve int8 kv32`, ...) included: never a peer."""
    return engine.startswith("gpt2serve")


def counterpart(engine: str) -> str:
    """Our engine of the same kind: int8 against int8 and q8_0 peers, int4 against int4 and
    q4 peers, fp32 against the rest."""
    if "int8" in engine or "q8" in engine:
        return "gpt2serve int8"
    return "gpt2serve int4" if "int4" in engine or "q4" in engine else "gpt2serve fp32"


def offline_table(r: dict) -> str:
    tok = {n: {int(b): v for b, v in by.items()} for n, by in r["tok_s"].items()}
    batches = sorted({b for by in tok.values() for b in by})
    head = ["engine", *[f"batch {b} tok/s" for b in batches],
            *[f"ours / it, batch {b}" for b in batches]]
    rows = [head, ["---"] + ["---:"] * (len(head) - 1)]
    for name, by in tok.items():
        ours = tok.get(counterpart(name), {})
        rows.append([engine_label(r, name),
                     *[f"{by[b]:.1f}" if b in by else "—" for b in batches],
                     *["" if name in OURS else ratio(ours.get(b), by.get(b)) for b in batches]])
    table = "\n".join("| " + " | ".join(c) + " |" for c in rows)
    shares = r.get("batch1_bandwidth_share") or {}  # (runs since 2026-12-06 record them)
    streamed = [f"{LABEL.get(n, n)} {nbytes / 1e6:.0f} MB a token, {nbytes * tok[n][1] / 1e9:.1f}"
                f" GB/s" + (f" ({statistics.median(shares[n]):.0%} of the bandwidth measured "
                            f"before each round's run, median)" if n in shares else "")
                for n, nbytes in (r.get("weight_bytes") or {}).items() if 1 in tok.get(n, {})
                # (a decode figure: where long prompts take most of the time, it is none)
                and r["prompt_tokens"] <= r["new_tokens"] // 4]
    rounds = f"median of {r['rounds']} rounds of " if r.get("rounds", 1) > 1 else ""
    model = r["model"].split(",")[0]  # "GPT-2 124M, random weights, ..."
    text = (f"{machine_line(r)}\n{model}, {r['prompt_tokens']}-token prompts, "
            f"{r['new_tokens']} new tokens, {r['sampling']} ({json.dumps(r['mode'])}); "
            f"{rounds}median of {r['repeats']} runs, each engine in a fresh process.\n\n{table}\n")
    if streamed:
        text += "\nWeights read at batch 1: " + "; ".join(streamed) + ".\n"
    return text + skipped_line(r) + f"\n```bash\n{r['command']}\n```\n"


def serving_table(r: dict) -> str:
    head = ["server", "clients", "tok/s", "TTFT p50", "TTFT p95", "latency p50", "latency p95"]
    rows = [head, ["---", "---:", "---:", "---:", "---:", "---:", "---:"]]
    rounds = (f", each figure the median of {r['rounds']} rounds" if r.get("rounds", 1) > 1
              else "")
    for name, levels in r["levels"].items():
        label = engine_label(r, name)
        for i, lv in enumerate(levels):
            rows.append([label if i == 0 else "", str(lv["concurrency"]),
                         f"{lv['tok_s']:.1f}", duration(lv["p50_ttft_s"]),
                         duration(lv["p95_ttft_s"]) if "p95_ttft_s" in lv else "",
                         duration(lv["p50_latency_s"]), duration(lv["p95_latency_s"])])
    text = (f"{machine_line(r)}\nGPT-2 124M, {r['prompt_tokens']}-token prompts, "
            f"{r['new_tokens']} new greedy tokens a request, each client in a closed loop for "
            f"{r['duration_s']:g} s a level{rounds}; ours and vLLM through their OpenAI streaming "
            f"routes, the one-at-a-time predictor through V1 `:predict` (its time to first "
            f"token is its whole latency).\n\n")
    text += "\n".join("| " + " | ".join(c) + " |" for c in rows) + "\n"
    ours = [n for n in r["levels"] if n.startswith("gpt2serve")]
    peers = [n for n in r["levels"] if not n.startswith("gpt2serve")]
    if ours and peers:
        levels = [lv["concurrency"] for lv in r["levels"][ours[0]]]
        rows = [["tok/s, ours / peer", *[f"{c} client{'s' if c > 1 else ''}" for c in levels]],
                ["---"] + ["---:"] * len(levels)]
        for o in ours:
            by_c = {lv["concurrency"]: lv["tok_s"] for lv in r["levels"][o]}
            for peer in peers:
                pc = {lv["concurrency"]: lv["tok_s"] for lv in r["levels"][peer]}
                rows.append([f"{LABEL.get(o, o)} / {LABEL.get(peer, peer)}",
                             *[ratio(by_c.get(c), pc.get(c)) for c in levels]])
        text += "\n" + "\n".join("| " + " | ".join(c) + " |" for c in rows) + "\n"
    text += offline_peers_table(r)
    return text + skipped_line(r) + f"\n```bash\n{r['command']}\n```\n"


def offline_peers_table(r: dict) -> str:
    """Our server at c clients over each peer of its kind at batch c offline (serving.py
    --offline): the peers have no server to race, so theirs is the figure without HTTP."""
    offline = r.get("offline_peers")
    if not offline:
        return ""
    levels = {n: {lv["concurrency"]: lv["tok_s"] for lv in rows}
              for n, rows in r["levels"].items() if n.startswith("gpt2serve")}
    clients = sorted({c for by in levels.values() for c in by})
    rows = [["our server / the peer offline", *[f"{c} client{'s' if c > 1 else ''} / batch {c}"
                                                for c in clients]],
            ["---"] + ["---:"] * len(clients)]
    for ours, by_c in levels.items():
        for peer, by_batch in offline["tok_s"].items():
            if counterpart(peer) == ours:
                by_b = {int(b): v for b, v in by_batch.items()}  # (JSON's keys are strings)
                rows.append([f"{LABEL.get(ours, ours)} / {LABEL.get(peer, peer)} "
                             f"({', '.join(f'{by_b[c]:.1f}' for c in clients if c in by_b)})",
                             *[ratio(by_c.get(c), by_b.get(c)) for c in clients]])
    bw = offline.get("read_bandwidth_gb_s")
    return (f"\nOver the peers offline (`--offline`: their tok/s, in parentheses, from the "
            f"offline run of this machine and cap just before this one"
            f"{f', {bw} GB/s' if bw else ''}):\n\n"
            + "\n".join("| " + " | ".join(c) + " |" for c in rows) + "\n")


def long_prompt_table(r: dict) -> str:
    ttft = r.get("ttft_under_load") or {}
    rows = [["server", "TTFT alone", "TTFT while 15 long requests stream", "while / alone"],
            ["---", "---:", "---:", "---:"]]
    for name, t in ttft.items():
        rows.append([LABEL.get(name, name), duration(t["alone_s"]),
                     duration(t["with_15_streams_s"]),
                     ratio(t["with_15_streams_s"], t["alone_s"])])
    return (f"{machine_line(r)}\nMedian of 10 short requests (4 new tokens) alone, then while "
            f"15 requests of 400 tokens stream.\n\n"
            + "\n".join("| " + " | ".join(c) + " |" for c in rows) + "\n"
            + f"\n```bash\n{r['command']}\n```\n")


def same_machine(a: dict, b: dict) -> bool:
    return all(a["machine"].get(k) == b["machine"].get(k) for k in ("cpu", "isa", "cap"))


def headline(offlines: list[dict | None], serving: dict | None) -> str:
    """Each of our engines against its best peer, from the first of `offlines` that ran it
    (a later one only if measured on the first one's machine class)."""
    lines = ["| question | gpt2serve | best peer measured beside it |", "| --- | --- | --- |"]
    first = next(filter(None, offlines), None)
    offlines = [o for o in offlines if o and same_machine(o, first)]
    for ours in OURS:
        offline = next((o for o in offlines if ours in o["tok_s"]), None)
        if offline is None:
            continue
        tok = {n: {int(b): v for b, v in by.items()} for n, by in offline["tok_s"].items()}
        peers = {n: by for n, by in tok.items() if not is_ours(n) and counterpart(n) == ours
                 and n not in NOT_FP32}
        for b in (1, 8):
            if b not in tok[ours]:
                continue
            best = max(((by[b], n) for n, by in peers.items() if b in by), default=None)
            peer = (f"{LABEL.get(best[1], best[1])} {best[0]:.1f}: ours "
                    f"{ratio(tok[ours][b], best[0])}" if best else "none set up")
            lines.append(f"| CPU offline, {ours.split()[1]}, batch {b} | "
                         f"{tok[ours][b]:.1f} tok/s | {peer} |")
    if serving:
        levels = serving["levels"]
        top = max(lv["concurrency"] for lv in next(iter(levels.values())))
        at = {n: next((lv for lv in rows if lv["concurrency"] == top), None)
              for n, rows in levels.items()}
        for ours in [n for n in levels if n.startswith("gpt2serve")]:
            peers = [f"{LABEL.get(n, n)} {lv['tok_s']:.1f}: ours "
                     f"{ratio(at[ours]['tok_s'], lv['tok_s'])}" for n, lv in at.items()
                     if not n.startswith("gpt2serve") and lv]
            lines.append(f"| server, {top} clients, {ours.split()[1]} | {at[ours]['tok_s']:.1f}"
                         f" tok/s | {'; '.join(peers) or 'none set up'} |")
    return "\n".join(lines) + "\n"


def ledger_table(rows: list[dict]) -> str:
    """Each engine's latest run on each machine class and benchmark in
    bench/results/ledger.csv, our engines' figures over their previous run on the same class
    (a regression on a class nobody is on shows here), and the peers measured beside them.
    The VMs' bandwidth drifts by a third and more between runs, so beside our change stands
    the peers' between the same two runs (the geometric mean over the peers both ran): our
    engine regressed where its change falls short of theirs by more than 5%, which the table
    marks."""
    from common import machine_class

    # (class, benchmark, sampling, engine) -> {run: {batch: tok/s}}, runs in order
    runs: dict[tuple, dict[tuple, dict]] = {}
    for row in rows:
        key = (machine_class(row), row["benchmark"], row["sampling"], row["engine"])
        run = (row["date"], row["commit"], row["bandwidth_gb_s"])
        runs.setdefault(key, {}).setdefault(run, {})[row["batch"]] = float(row["tok_s"])

    def peers_change(key: tuple, latest: tuple, before: tuple, batch: str) -> float | None:
        changes = [by_run[latest][batch] / by_run[before][batch]
                   for (*where, engine), by_run in runs.items()
                   if tuple(where) == key[:3] and not engine.startswith("gpt2serve")
                   and batch in by_run.get(latest, {}) and batch in by_run.get(before, {})]
        return math.prod(changes) ** (1 / len(changes)) if changes else None

    out = ["| machine class | benchmark | run (date, commit, read GB/s) | engine | tok/s by "
           "batch or clients (ours: over the engine's previous run on the class; the peers' "
           "change between the same two runs) |",
           "| --- | --- | --- | --- | --- |"]
    for key, by_run in sorted(runs.items()):
        cls, bench, sampling, engine = key
        order = list(by_run)
        latest, before = order[-1], (order[-2] if len(order) > 1 else None)
        cells = []
        for batch, tok_s in by_run[latest].items():
            old = by_run[before].get(batch) if before else None
            change = ""
            if old and engine in OURS:
                peers = peers_change(key, latest, before, batch)
                # more than 5% below the peers' change (or below the last run, with no peers)
                against_peers = tok_s / old / (peers or 1)
                change = (f" ({tok_s / old:.2f}x" + (f"; peers {peers:.2f}x" if peers else "")
                          + (f"; **{against_peers:.2f}x the peers' change**" if peers and
                             against_peers < REGRESSION else "; **over 5% down, no peers beside**"
                             if against_peers < REGRESSION else "") + ")")
            cells.append(f"{batch}: {tok_s:g}{change}")
        name = f"{bench} {sampling}".strip()
        out.append(f"| {cls} | {name} | {latest[0]}, {latest[1]}, {latest[2]} | "
                   f"{LABEL.get(engine, engine)} | {', '.join(cells)} |")
    return "\n".join(out) + "\n"


def replace_block(text: str, name: str, body: str) -> str:
    key = re.escape(name)
    pattern = re.compile(rf"(<!-- bench:{key} -->\n).*?(<!-- /bench:{key} -->)", re.S)
    if not pattern.search(text):
        print(f"docs/benchmarks.md has no block {name}: not written")
        return text
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def plots(offline: dict | None, serving: dict | None) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: plots not redrawn")
        return
    if serving:
        where = serving["machine"].get("gpu") or (
            f"{serving['machine']['cpu'].split('@')[0].strip()}, "
            f"{serving['machine']['threads']} threads")
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, rows in serving["levels"].items():
            ax.plot([r["concurrency"] for r in rows], [r["tok_s"] for r in rows], marker="o",
                    linewidth=2, label=LABEL.get(name, name).replace("`", ""))
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_title(f"Serving GPT-2 124M, {serving['new_tokens']} tokens a request\n{where}",
                     fontsize=10)
        ax.set_xticks(sorted({r["concurrency"] for rows in serving["levels"].values()
                              for r in rows}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(ROOT / "docs" / "bench-throughput.png", dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(9, 4.2))
        for i, (name, rows) in enumerate(serving["levels"].items()):
            color = f"C{i}"
            xs = [r["concurrency"] for r in rows]
            label = LABEL.get(name, name).replace("`", "")
            ax.plot(xs, [r["p50_ttft_s"] * 1000 for r in rows], marker="o", color=color,
                    linewidth=2, label=f"{label} p50")
            if "p95_ttft_s" in rows[0]:
                ax.plot(xs, [r["p95_ttft_s"] * 1000 for r in rows], marker="^", color=color,
                        linestyle="--", label=f"{label} p95")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("time to first token, ms (log scale)")
        ax.set_title(f"Time to first token, p50 (solid) and p95 (dashed)\n{where}", fontsize=10)
        ax.set_xticks(sorted({r["concurrency"] for rows in serving["levels"].values()
                              for r in rows}))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        fig.savefig(ROOT / "docs" / "bench-ttft.png", dpi=110)
        plt.close(fig)
    if offline:
        tok = {n: by.get("1", by.get(1)) for n, by in offline["tok_s"].items()}
        tok = {n: v for n, v in tok.items() if v}
        names = sorted(tok, key=tok.get)
        bw = offline["machine"].get("read_bandwidth_gb_s")
        nbytes = offline.get("weight_bytes") or {}
        fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(names) + 1.6))
        colors = ["C0" if is_ours(n) else "C7" for n in names]
        ax.barh(range(len(names)), [tok[n] for n in names], color=colors)
        for i, n in enumerate(names):
            ax.text(tok[n] - 2, i, f"{tok[n]:.0f}", va="center", ha="right", fontsize=8,
                    color="white", fontweight="bold")
            if bw and n in nbytes:
                ceiling = bw * 1e9 / nbytes[n]
                ax.plot([ceiling, ceiling], [i - 0.4, i + 0.4], color="C3", linewidth=2.5,
                        label="bandwidth bound: read bandwidth / bytes a token"
                        if i == min(j for j, m in enumerate(names) if m in nbytes) else None)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([LABEL.get(n, n).replace("`", "") for n in names], fontsize=8)
        ax.set_xlabel("tokens/s at batch 1 (greedy, 64 new tokens)")
        cap = offline["machine"].get("cap", "none")
        ax.set_title(f"GPT-2 124M, batch 1\n{offline['machine']['cpu'].split('@')[0].strip()}, "
                     f"{offline['machine']['threads']} threads"
                     f"{'' if cap == 'none' else ', capped at AVX2'}"
                     + (f", {bw} GB/s read" if bw else ""), fontsize=10)
        ax.grid(alpha=0.3, axis="x")
        if bw and nbytes:
            ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(ROOT / "docs" / "bench-batch1.png", dpi=110)
        plt.close(fig)


def main() -> None:
    offline, serving = load("offline-greedy"), load("serving")
    text = DOC.read_text()
    # every run under its file's name: offline-greedy, offline-int4-avx2, ..., and the same
    # runs on another machine class under a suffix of its own (offline-greedy-emr)
    for path in sorted(RESULTS.glob("offline-*.json")):
        text = replace_block(text, path.stem, offline_table(load(path.stem)))
    for path in sorted(RESULTS.glob("serving*.json")):
        text = replace_block(text, path.stem, serving_table(load(path.stem)))
    if serving:
        text = replace_block(text, "long-prompts", long_prompt_table(serving))
    text = replace_block(text, "headline", headline([offline, load("offline-int4")], serving))
    if LEDGER.exists():
        with LEDGER.open() as f:
            text = replace_block(text, "ledger", ledger_table(list(csv.DictReader(f))))
    DOC.write_text(text)
    plots(offline, serving)
    print(f"rewrote the tables of {DOC.relative_to(ROOT)} and the plots under docs/")


if __name__ == "__main__":
    main()
