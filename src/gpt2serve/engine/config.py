"""What an Engine is configured with: one dataclass that the CLI's flags, the server and the
README's flag table are all derived from or checked against (tests/engine/test_config.py).

Each field's metadata holds its flag's help; `add_flags` makes the `serve` flags from the fields
and `from_args` reads them back, so no layer forwards the settings one by one."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch

from .. import kernels


def _flag(help: str, parse: Callable[[str], Any] | None = None, **kw: Any) -> dict:
    return {"help": help, "parse": parse, **kw}


KV_CACHE_DTYPES = ("auto", "float32", "float16")
# A step's buffers are laid out for this many rows at load: 10^12 asked for 128 TB and ended
# in a traceback. GPT-2's steps are bound by arithmetic long before this batch.
MAX_BATCH_SIZE = 4096


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = field(default=32, metadata=_flag(
        f"sequences decoded together at most (up to {MAX_BATCH_SIZE})"))
    max_model_len: int | None = field(default=None, metadata=_flag(
        "tokens per sequence at most, prompt included (default: the model's context, which "
        "also caps it: a model of a shorter one says so as it loads)"))
    kv_cache_memory: int | None = field(default=None, metadata=_flag(
        "KV-cache budget of each model: bytes, or e.g. 600MiB, 4GiB, never more than "
        "max_batch_size full-context sequences use (default: that, capped at 60%% of the "
        "memory left after the weights on CPU, 90%% of free GPU memory on CUDA; in a "
        "repository, 1/16 of --memory_budget)",
        parse="size"))
    kv_cache_dtype: str = field(default="auto", metadata=_flag(
        "what the KV cache holds: auto = the model's dtype, but float16 for int8 and int4 "
        "models on CPU; float16 halves the bytes a position takes on a float32 model, so the "
        "cache holds twice the tokens and long contexts attend faster, at fp16's rounding of "
        "each key and value (greedy text may then part from transformers' after many "
        "tokens)", choices=KV_CACHE_DTYPES))
    block_size: int = field(default=16, metadata=_flag(
        "positions per KV-cache block (at most the model's context: a longer block holds "
        "no more)"))
    max_prefill_tokens: int = field(default=512, metadata=_flag(
        "prompt tokens read per step at most; beside running streams the engine reads fewer, "
        "as many as keep a step within about --prefill_step_stretch decode steps' time"))
    prefill_step_stretch: float = field(default=1.5, metadata=_flag(
        "a decode step of streams that also reads a prompt chunk aims at this many decode "
        "steps' time, so they wait about that much longer for each token while a prompt is "
        "read; higher reads prompts beside them sooner and makes more tokens a second (8 "
        "streamed 960-token prompts, int8 on 2 CPU cores: 90 tok/s at 1.5, 125 at 6, 151 at "
        "0); 0: max_prefill_tokens beside every decode step. Beside whole completions (V1, "
        "V2, OpenAI without stream) prompts are read max_prefill_tokens a step"))
    enable_prefix_caching: bool = field(default=True, metadata=_flag(
        "keep the KV blocks of prompts read, and let a prompt that starts the same way reuse "
        "them instead of reading that part again (a request's cache_salt keeps tenants apart)",
        parse="bool"))
    enforce_eager: bool = field(default=False, metadata=_flag(
        "run every step op by op through the model (the eager runner): on CUDA no CUDA graph, "
        "on CPU no replayed plan of kernel calls nor int8 screen of the LM head (to compare, "
        "or to rule them out)", action="store_true"))
    max_queue: int = field(default=256, metadata=_flag(
        "requests waiting for a slot before new ones get 503"))
    request_timeout: float = field(default=600.0, metadata=_flag(
        "seconds a request may wait for a slot before it gets 503"))
    max_n: int = field(default=16, metadata=_flag("sequences per prompt"))
    max_prompt_chars: int = field(default=32768, metadata=_flag(
        "longer prompts are refused before tokenizing"))
    threads: int | None = field(default=None, metadata=_flag(
        "intra-op CPU threads (default: the container's CPU limit, else all cores)"))

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "block_size", "max_prefill_tokens", "max_n",
                     "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_model_len", "threads", "kv_cache_memory"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_batch_size > MAX_BATCH_SIZE:
            raise ValueError(f"max_batch_size must be at most {MAX_BATCH_SIZE}, got "
                             f"{self.max_batch_size}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.prefill_step_stretch != 0 and not self.prefill_step_stretch >= 1:
            raise ValueError(f"prefill_step_stretch must be 0 or at least 1, got "
                             f"{self.prefill_step_stretch}")
        if self.max_queue < 0 or not self.request_timeout > 0:  # (nan too; inf: no limit)
            raise ValueError(f"max_queue must be at least 0 and request_timeout a positive "
                             f"number of seconds, got {self.max_queue} and "
                             f"{self.request_timeout}")

    def cache_dtype(self, model_dtype: torch.dtype, quantized: bool) -> torch.dtype:
        """The KV cache's dtype for a model that computes in `model_dtype`, its layers'
        weights int8 or int4 if `quantized`."""
        if self.kv_cache_dtype != "auto":
            return getattr(torch, self.kv_cache_dtype)
        # On an int8 or int4 model the fp16 cache leaves the logits as far from fp32's as the
        # fp32 cache does, and the top-1 agreement and held-out loss where they were
        # (bench/quality.py --parts cache; docs/benchmarks.md, "KV cache in fp16"), in half
        # the bytes. Only where our decode kernel reads fp16 in place: torch's ops would
        # widen every position again at every step.
        if (quantized and model_dtype == torch.float32
                and kernels.runs_decode_attention(torch.empty(0, dtype=torch.float16),
                                                  model_dtype)):
            return torch.float16
        return model_dtype

    def context(self, n_positions: int) -> int:
        """The longest sequence an engine of a model with `n_positions` takes."""
        return min(self.max_model_len or n_positions, n_positions)

    def block(self, context: int) -> int:
        """The KV cache's block for sequences of `context` tokens: --block_size, or the
        context where that is shorter (a block of a million positions, of a 256-token model,
        reserved 7.8 GB for one sequence)."""
        return min(self.block_size, context)

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser, parsers: dict[str, Callable],
                  names: tuple[str, ...] | None = None) -> None:
        """`--<field>` for each field (those in `names` only, if given); `parsers` holds the
        parsers that fields name ("size": bytes, "bool": true or false)."""
        for f in fields(cls):
            if names is not None and f.name not in names:
                continue
            meta = f.metadata
            if meta.get("action"):
                parser.add_argument(f"--{f.name}", action=meta["action"], help=meta["help"])
                continue
            if meta.get("choices"):
                parser.add_argument(f"--{f.name}", choices=meta["choices"], default=f.default,
                                    help=meta["help"])
                continue
            parse = parsers[meta["parse"]] if meta.get("parse") else _type_of(f)
            parser.add_argument(f"--{f.name}", type=parse, default=f.default, help=meta["help"])

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> EngineConfig:
        """The fields that `args` has (flags made by add_flags), with `overrides` on top."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, **overrides})


def _type_of(f) -> Callable[[str], Any]:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    return float if kind.startswith("float") else int
