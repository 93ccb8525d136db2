"""`gpt2serve download`: fetch a GPT-2 model folder from the Hugging Face Hub.

Speaks the Hub's plain file API (`/api/models/{repo}/revision/{rev}` to list files,
`/{repo}/resolve/{rev}/{file}` to fetch one), honours `HF_ENDPOINT` and `HF_TOKEN`, takes only
what the server loads (config, tokenizer, and safetensors, else `pytorch_model.bin`), writes
each file through a `.part` file so an interrupted download never leaves a truncated model,
marks the folder with the repository and revision so that a second run resumes it but never
mixes in another model's files, and shows progress on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import httpx

DEFAULT_ENDPOINT = "https://huggingface.co"
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "vocab.json", "merges.txt")


# Names the repository and revision a folder was downloaded from (download._claim).
MARKER = ".gpt2serve-download.json"
MODEL_FILES = SMALL_FILES + ("model.safetensors.index.json", "pytorch_model.bin")


class DownloadError(RuntimeError):
    pass


def wanted_files(files: list[str]) -> list[str]:
    """Which of a repo's files make a loadable folder: prefer safetensors over .bin."""
    names = set(files)
    chosen = [f for f in SMALL_FILES if f in names]
    if "model.safetensors" in names:
        chosen.append("model.safetensors")
    elif "model.safetensors.index.json" in names:
        chosen.append("model.safetensors.index.json")
        chosen += sorted(f for f in names if f.startswith("model-") and f.endswith(".safetensors"))
    elif "pytorch_model.bin" in names:
        chosen.append("pytorch_model.bin")
    else:
        raise DownloadError("repository has no model.safetensors or pytorch_model.bin")
    if "config.json" not in names:
        raise DownloadError("repository has no config.json")
    return chosen


def download(repo_id: str, out: Path, revision: str = "main", endpoint: str | None = None,
             token: str | None = None, progress=sys.stderr) -> list[Path]:
    _claim(out, repo_id, revision)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    token = token or os.environ.get("HF_TOKEN")
    # identity: a compressed answer's content-length is not the size of the bytes we write
    # (huggingface_hub asks for identity too)
    headers = {"accept-encoding": "identity"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    with httpx.Client(headers=headers, follow_redirects=True, timeout=60) as client:
        r = client.get(f"{endpoint}/api/models/{repo_id}/revision/{revision}")
        if r.status_code in (401, 403, 404):
            raise DownloadError(f"{repo_id}@{revision}: not found or not accessible "
                                f"(HTTP {r.status_code}; private repos need HF_TOKEN)")
        r.raise_for_status()
        files = [s["rfilename"] for s in r.json().get("siblings", [])]
        paths = []
        for name in wanted_files(files):
            url = f"{endpoint}/{repo_id}/resolve/{revision}/{name}"
            paths.append(_fetch(client, url, out / name, progress))
    return paths


def _claim(out: Path, repo_id: str, revision: str) -> None:
    """Mark `out` as this repository's download (MARKER), so that a second run resumes it,
    keeping its complete files, while a download of another repository or revision, or into
    a folder that holds model files from elsewhere, is refused: those files were kept as if
    they were its own, and the wrong weights loaded without an error."""
    marker = out / MARKER
    ours = {"repo": repo_id, "revision": revision}
    if marker.is_file():
        try:
            theirs = json.loads(marker.read_text())
        except (OSError, ValueError):
            theirs = None
        if theirs != ours:
            raise DownloadError(f"{out} holds another download ({theirs}); download "
                                f"{repo_id}@{revision} into another folder, or empty it")
    else:
        present = sorted(p.name for p in out.glob("*") if p.name in MODEL_FILES
                         or p.name.endswith(".safetensors"))
        if present:
            raise DownloadError(f"{out} already holds {', '.join(present)}, not from a "
                                f"download of {repo_id}; download into an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(ours) + "\n")


def _fetch(client: httpx.Client, url: str, dest: Path, progress) -> Path:
    if dest.exists():
        return dest  # complete files only ever appear through the rename below
    part = dest.with_name(dest.name + ".part")
    with client.stream("GET", url) as r:
        if r.status_code != 200:
            raise DownloadError(f"{url}: HTTP {r.status_code}")
        total = int(r.headers.get("content-length") or 0)
        done, t0, last = 0, time.monotonic(), 0.0
        with open(part, "wb") as f:
            for chunk in r.iter_bytes(1 << 20):
                f.write(chunk)
                done += len(chunk)
                now = time.monotonic()
                if now - last > 0.5 or done == total:
                    last = now
                    _show(progress, dest.name, done, total, now - t0)
    if total and done != total:
        raise DownloadError(f"{url}: got {done} of {total} bytes")
    part.rename(dest)
    if progress:
        progress.write("\n")
    return dest


def _show(progress, name: str, done: int, total: int, elapsed: float) -> None:
    if not progress:
        return
    rate = done / elapsed / 2**20 if elapsed > 0 else 0.0
    pct = f"{100 * done / total:5.1f}%" if total else "     "
    progress.write(f"\r{name:32s} {pct} {done / 2**20:9.1f} MiB {rate:7.1f} MiB/s")
    progress.flush()
