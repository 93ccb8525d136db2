"""`gpt2serve download`: fetch a GPT-2 model folder from the Hugging Face Hub.

Speaks the Hub's plain file API (`/api/models/{repo}/revision/{rev}` to list files and name
the commit, `/{repo}/resolve/{commit}/{file}` to fetch one), honours `HF_ENDPOINT` and
`HF_TOKEN`, takes only what the server loads (config, tokenizer, and safetensors, else
`pytorch_model.bin`), writes each file through a `.part` file so an interrupted download never
leaves a truncated model, stops each file at the size the listing and its answer give (a
server that sends without end cannot fill the disk; a mirror that gives neither size may,
with weights), marks the folder with the repository, revision and commit so that a second
run resumes it at that commit but never mixes in another model's or commit's files, lets one
run at a time write into a folder (another waits), and shows progress on stderr.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
from pathlib import Path
from urllib.parse import quote

import httpx

from . import jsonfile
from .progress import Progress
from .tokenizer import TOKENIZER_FILES

DEFAULT_ENDPOINT = "https://huggingface.co"
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer_config.json",
               "added_tokens.json", "special_tokens_map.json")  # (the last two: vocab.json's)
REPO_ID = re.compile(r"\w[\w.-]*(/\w[\w.-]*)?", re.ASCII)  # (owner/)name, not starting . or -
# A shard's name as transformers writes it (model-00001-of-00002.safetensors): one file of the
# folder, safe in a URL and on any filesystem.
SHARD = re.compile(r"model-[A-Za-z0-9._-]{1,200}\.safetensors")


# The most a file other than weights may be when neither its answer nor the listing gives its
# size (the largest GPT-2 tokenizer.json is 1.4 MB).
SMALL_FILE_LIMIT = 64 << 20
# Names the repository, revision and commit a folder was downloaded from (download._marker).
MARKER = ".gpt2serve-download.json"
INDEX = "model.safetensors.index.json"
MODEL_FILES = (SMALL_FILES + tuple(n for names in TOKENIZER_FILES for n in names)
               + (INDEX, "pytorch_model.bin"))


class DownloadError(RuntimeError):
    pass


def wanted_files(files: list[str]) -> list[str]:
    """Which of a repo's files make a loadable folder: config, the first tokenizer the
    loader would read, and safetensors over .bin (a sharded model's shards are those its
    index names, read once it is here: `shards`)."""
    names = set(files)
    if "config.json" not in names:
        raise DownloadError("repository has no config.json")
    tokenizer = next((t for t in TOKENIZER_FILES if names.issuperset(t)), None)
    if tokenizer is None:
        wanted = " or ".join("+".join(t) for t in TOKENIZER_FILES)
        raise DownloadError(f"repository has no tokenizer (looked for {wanted})")
    chosen = [f for f in SMALL_FILES if f in names] + list(tokenizer)
    if "model.safetensors" in names:
        chosen.append("model.safetensors")
    elif INDEX in names:
        chosen.append(INDEX)
    elif "pytorch_model.bin" in names:
        chosen.append("pytorch_model.bin")
    else:
        raise DownloadError("repository has no model.safetensors or pytorch_model.bin")
    return chosen


def download(repo_id: str, out: Path, revision: str = "main", endpoint: str | None = None,
             token: str | None = None, progress=sys.stderr) -> list[Path]:
    """Every file from one commit: the one `revision` names when the download starts, kept
    in the folder's marker, so that a resumed download never mixes in files of a later one."""
    if not REPO_ID.fullmatch(repo_id):
        raise DownloadError(f"{repo_id!r} is not a Hub repository id (owner/name)")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    token = token or os.environ.get("HF_TOKEN")
    # identity: a compressed answer's content-length is not the size of the bytes we write
    # (huggingface_hub asks for identity too)
    headers = {"accept-encoding": "identity"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    try:
        mine = _marker(out, repo_id, revision)
        with httpx.Client(headers=headers, follow_redirects=True, timeout=60) as client:
            commit = mine.get("sha") if mine and isinstance(mine.get("sha"), str) else None
            sha, sizes = _listing(client, endpoint, repo_id, revision, commit)
            chosen = wanted_files(list(sizes))
            out.mkdir(parents=True, exist_ok=True)
            with _only_writer(out, progress):
                theirs = _marker(out, repo_id, revision)  # (again: one may have just ended)
                began = theirs.get("sha") if theirs else None
                if isinstance(began, str) and began != sha:
                    raise DownloadError(f"{out}: another download of {repo_id}@{revision} "
                                        f"began at commit {began}; run again to finish it")
                # whole or not at all: a run that reads it before taking the lock
                part = out / f"{MARKER}.part"
                part.write_text(json.dumps({"repo": repo_id, "revision": revision,
                                            "sha": sha}) + "\n")
                part.replace(out / MARKER)
                base = f"{endpoint}/{repo_id}/resolve/{quote(sha, safe='')}"
                paths = [_fetch(client, base, out, name, sizes[name], progress)
                         for name in chosen if name != "config.json"]
                if INDEX in chosen:
                    paths += [_fetch(client, base, out, name, sizes[name], progress)
                              for name in shards(out / INDEX, list(sizes))]
                # config.json last, as convert writes it: a repository's scan takes a folder
                # with one for a model, and an interrupted download's was one that failed
                return paths + [_fetch(client, base, out, "config.json", sizes["config.json"],
                                       progress)]
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise DownloadError(f"{endpoint}: {type(e).__name__}: {e}") from None
    except OSError as e:  # --out a file, a name too long for its filesystem, ...
        raise DownloadError(str(e)) from None


@contextlib.contextmanager
def _only_writer(out: Path, progress):
    """Held while this run writes into `out` (an exclusive flock of the folder itself): two
    runs into one folder took turns at the same .part file, and one renamed the other's
    truncated file into place, where every later run took it for complete. A second run
    waits, then finds the first one's files done. (On one machine: NFS does not pass a
    folder's flock to other hosts.)"""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another download into {out}", file=progress, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (the lock with it)


def shards(index: Path, files: list[str]) -> list[str]:
    """The shards a downloaded index names: each a shard's file name (SHARD) that the
    repository lists. Every model-*.safetensors it listed was fetched, and a name with '#'
    or '?' was sent as a URL's fragment or query, its answer saved under the name."""
    names = jsonfile.shard_names(index, DownloadError)
    if not all(SHARD.fullmatch(n) for n in names):
        raise DownloadError(f"{index}: not a safetensors index of shards named "
                            f"model-*.safetensors")
    missing = sorted(set(names) - set(files))
    if missing:
        raise DownloadError(f"{index}: names {missing[0]}, which the repository does not have")
    return names


def _listing(client: httpx.Client, endpoint: str, repo_id: str, revision: str,
             commit: str | None) -> tuple[str, dict[str, int | None]]:
    """(the commit, its files and their sizes) of `revision`, or of `commit` when resuming a
    download. `blobs=true` asks for the sizes (huggingface_hub's `files_metadata`); a
    mirror that lists none leaves them None."""
    r = client.get(f"{endpoint}/api/models/{repo_id}/revision/{quote(commit or revision, safe='')}",
                   params={"blobs": "true"})
    if r.status_code in (401, 403, 404):
        if commit and _listing(client, endpoint, repo_id, revision, None)[0] != commit:
            raise DownloadError(f"{repo_id}@{revision}: the folder's download began at "
                                f"commit {commit}, which the Hub no longer has (HTTP "
                                f"{r.status_code}); empty the folder to download "
                                f"{revision} afresh")
        raise DownloadError(f"{repo_id}@{revision}: not found or not accessible "
                            f"(HTTP {r.status_code}; private repos need HF_TOKEN)")
    if r.status_code != 200:
        raise DownloadError(f"{r.url}: HTTP {r.status_code}")
    try:
        info = r.json()
        sizes = {s["rfilename"]: s.get("size") for s in info.get("siblings", [])}
        sha = info.get("sha") or commit or revision
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise DownloadError(f"{r.url}: not the Hub's file listing ({e})") from None
    if not all(isinstance(f, str) and (n is None or type(n) is int and n >= 0)
               for f, n in sizes.items()) or not isinstance(sha, str):
        raise DownloadError(f"{r.url}: not the Hub's file listing")
    return sha, sizes


def _marker(out: Path, repo_id: str, revision: str) -> dict | None:
    """The marker of an earlier download of this repository and revision into `out`, to
    resume (None: a new download). A download of another repository or revision, or into a
    folder that holds model files from elsewhere, is refused: those files were kept as if
    they were its own, and the wrong weights loaded without an error. So is resuming one whose
    marker names no commit (written before markers did) once it holds files: they may be of
    an older commit than the revision's head, and finishing at the head would mix the two."""
    marker = out / MARKER
    present = sorted(p.name for p in out.glob("*") if p.name in MODEL_FILES
                     or p.name.endswith(".safetensors"))
    if marker.is_file():
        try:
            theirs = json.loads(marker.read_text())
        except (OSError, ValueError):
            theirs = None
        if not isinstance(theirs, dict) or (theirs.get("repo"), theirs.get("revision")) != (
                repo_id, revision):
            raise DownloadError(f"{out} holds another download ({theirs}); download "
                                f"{repo_id}@{revision} into another folder, or empty it")
        if not isinstance(theirs.get("sha"), str) and present:
            raise DownloadError(f"{out} holds {', '.join(present)} of a download that did not "
                                f"record its commit; finishing it at {revision}'s head could "
                                f"mix two commits: empty the folder and download again")
        return theirs
    if present:
        raise DownloadError(f"{out} already holds {', '.join(present)}, not from a "
                            f"download of {repo_id}; download into an empty folder")
    return None


def _fetch(client: httpx.Client, base: str, out: Path, name: str, listed: int | None,
           progress) -> Path:
    """`name` of the commit at `base`, into `out`: as many bytes as the listing and the
    answer's Content-Length say (they must agree), no more; when neither says,
    SMALL_FILE_LIMIT bounds all but the weights."""
    dest, url = out / name, f"{base}/{quote(name)}"
    if dest.exists():
        return dest  # complete files only ever appear through the rename below
    part = dest.with_name(dest.name + ".part")
    with client.stream("GET", url) as r:
        if r.status_code != 200:
            raise DownloadError(f"{url}: HTTP {r.status_code}")
        # a compressed answer's Content-Length is not the size of the bytes httpx gives us
        # (we ask for identity; huggingface_hub says the Hub may compress text files anyway)
        sent = (r.headers.get("content-length")
                if r.headers.get("content-encoding", "identity").lower() == "identity" else None)
        size = int(sent) if sent is not None else listed
        if listed is not None and size != listed:
            raise DownloadError(f"{url}: Content-Length {size} differs from the size the "
                                f"listing gives, {listed}")
        limit = size if size is not None else (
            None if name.endswith((".safetensors", ".bin")) else SMALL_FILE_LIMIT)
        shown = Progress(progress, dest.name, size)
        # A new file, never one already there: a symlink left at the .part name was
        # followed, and the download written wherever it pointed.
        part.unlink(missing_ok=True)
        try:
            with open(part, "xb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    if limit is not None and shown.done + len(chunk) > limit:
                        raise DownloadError(f"{url}: sent more than {limit} bytes")
                    f.write(chunk)
                    shown.add(len(chunk))
            if size is not None and shown.done != size:
                raise DownloadError(f"{url}: got {shown.done} of {size} bytes")
        except BaseException:
            part.unlink(missing_ok=True)  # a partial file is never resumed: free the disk
            raise
        finally:
            shown.end()  # (an error after it goes on a line of its own)
    part.rename(dest)
    return dest
