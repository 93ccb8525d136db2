"""Tokenizer files and incremental detokenization on real byte-level BPE."""

import pytest

from conftest import GPT2_TOKENIZER
from gpt2serve.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["Hello world, this is GPT-2.", "héllo wörld ✓ 日本語 🤖 done", "ROMEO:\nBut soft!\n\n"]


@pytest.fixture(scope="module")
def gpt2():
    if not GPT2_TOKENIZER.exists():
        pytest.skip("../shared/data not available")
    return Tokenizer.from_dir(GPT2_TOKENIZER)


def test_reference_encoding(gpt2):
    assert gpt2.encode(TEXTS[0]) == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]
    assert gpt2.vocab_size == 50257 and gpt2.eos_id == 50256


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_rebuild_the_text_and_never_split_a_character(gpt2, text):
    ids = gpt2.encode(text)
    assert any("\ufffd" in gpt2.token_text(i) for i in ids) or text.isascii()
    detok = IncrementalDetokenizer(gpt2)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_flush_returns_an_incomplete_tail(gpt2):
    ids = gpt2.encode("日")
    detok = IncrementalDetokenizer(gpt2)
    partial = "".join(detok.push(i) for i in ids[:-1])
    assert partial == ""
    assert detok.flush() == gpt2.decode(ids[:-1])


def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        Tokenizer.from_dir(tmp_path)
