"""A model folder's small JSON files (config.json, generation_config.json, the shard index,
OpenAI's hparams.json, the tokenizer's added and special tokens), read within bounds: a broken
or hostile one is an error that names it, never an exception nothing expects (a 500 on the
model list, a server that does not start) or a stall."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# These files take kilobytes (1.5B's shard index, the largest, about 30 KB). The model list
# reads each unloaded model's config.json on the event loop: a bound keeps that short.
MAX_BYTES = 2**20


def read(path: Path, error: type[Exception] = ValueError) -> Any:
    """The JSON value in `path`, or `error` naming it: too large, unreadable, not UTF-8, not
    JSON, nested past the parser's depth, or an integer past int()'s digit limit."""
    data = read_bytes(path, MAX_BYTES, f"{MAX_BYTES // 2**10} KiB a model's JSON file may take",
                      error)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise error(f"{path}: not valid JSON ({e})") from None


def read_bytes(path: Path, limit: int, bound: str, error: type[Exception] = ValueError) -> bytes:
    """`path`'s bytes, or `error` naming it where it holds more than `limit` (said as "more
    than the `bound`") or cannot be read. Counted as read, not only by its size: a file whose
    size says 0 (/proc's, through a symlink) went on for 256 GB, and a read to its end took
    5 GB in 15 s."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(limit + 1) if size <= limit else b""
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    if size > limit or len(data) > limit:
        said = f"{size} bytes" if size > limit else f"more than {limit} bytes read"
        raise error(f"{path}: {said}, more than the {bound}")
    return data


def shard_names(index: Path, error: type[Exception] = ValueError) -> list[str]:
    """The files a safetensors index (model.safetensors.index.json) names in its
    `weight_map`, sorted, once each; `error` naming the index where it is not one. Which names
    are acceptable is the caller's to say: a file of the folder (checkpoint.Weights), a
    shard's name safe in a URL (download.shards)."""
    value = read(index, error)
    weight_map = value.get("weight_map") if isinstance(value, dict) else None
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(n, str) for n in weight_map.values())):
        raise error(f"{index}: not a safetensors index (a 'weight_map' of tensor names to "
                    f"file names)")
    return sorted(set(weight_map.values()))
