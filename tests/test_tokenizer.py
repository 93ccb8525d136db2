"""Tokenizer files and incremental detokenization on real byte-level BPE."""

import random

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


def test_a_prompt_ending_inside_a_character_is_completed_by_the_continuation(gpt2):
    """'中' is bytes e4 b8 ad; a token-id prompt may end after e4. The continuation's first
    tokens finish the character: seeded with the prompt's tail (as vLLM does) it reads '中文',
    not a U+FFFD for each of its bytes."""
    e4, b8, ad = (gpt2._tok.token_to_id(c) for c in "ä¸Ń")  # GPT-2's byte-level symbols
    prompt = gpt2.encode("Hello ") + [e4]
    generated = [b8, ad, *gpt2.encode("文")]
    unseeded = IncrementalDetokenizer(gpt2)
    assert "".join(unseeded.push(i) for i in generated) == "\ufffd\ufffd文"
    seeded = IncrementalDetokenizer(gpt2, prompt)
    deltas = [seeded.push(i) for i in generated] + [seeded.flush()]
    assert "".join(deltas) == "中文"
    # Nothing generated: the prompt's own unfinished byte is not part of the continuation.
    assert IncrementalDetokenizer(gpt2, prompt).flush() == ""


def test_a_run_of_lead_bytes_is_sent_as_the_next_byte_settles_each(gpt2):
    """d8 starts a two-byte character; another d8 cannot finish it, so its U+FFFD is certain
    then and is sent then: only the last, which a later byte may still finish, waits. A model
    writing a run of lead bytes held the whole stream back, each token's window longer, until
    the sequence ended; and a prompt ending in such a run began its continuation with them."""
    d8, x80 = (gpt2._tok.token_to_id(c) for c in ("Ø", "Ģ"))  # bytes d8 and 80
    assert gpt2.token_bytes(d8) == b"\xd8" and gpt2.token_bytes(x80) == b"\x80"
    a = gpt2.encode("A")[0]
    for ids, want in [([d8] * 5 + [a], ["", "\ufffd", "\ufffd", "\ufffd", "\ufffd", "\ufffdA"]),
                      ([d8] * 3 + [x80], ["", "\ufffd", "\ufffd", "\u0600"])]:
        detok = IncrementalDetokenizer(gpt2)
        deltas = [detok.push(i) for i in ids]
        assert deltas == want and detok.flush() == ""
        assert "".join(deltas) == gpt2.decode(ids)
    prompt = gpt2.encode("Hello ") + [d8] * 3
    seeded = IncrementalDetokenizer(gpt2, prompt)
    assert seeded.held == 1  # the last d8 alone: x80 finishes it
    assert seeded.push(x80) == "\u0600" and seeded.flush() == ""


def test_deltas_rebuild_any_text_and_show_no_replacement_it_lacks(gpt2):
    """Random text of two- to four-byte characters, and its tokens with some cut out (bytes
    that make no character): the deltas join to the text decode gives, and none shows a
    U+FFFD that text lacks. c4 | b6 e6 (Ķ, then a character the stream ends inside) gave
    U+FFFD for c4 alone: the cut before the unfinished character's token split Ķ."""
    assert gpt2.token_bytes(35050) == b"\xb6\xe6"
    rng = random.Random(7)
    alphabet = [chr(c) for c in (*range(0x100, 0x250), *range(0x4E00, 0x4E80),
                                 *range(0x1F600, 0x1F650))] + list("ab ,.")
    cases = [[128, 35050, 243]]
    for k in range(600):
        ids = gpt2.encode("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))))
        if k % 2 and len(ids) > 1:
            cut = sorted(rng.sample(range(len(ids) + 1), 2))
            ids = ids[:cut[0]] + ids[cut[1]:]
        cases.append(ids)
    for ids in cases:
        detok = IncrementalDetokenizer(gpt2)
        deltas = [detok.push(i) for i in ids] + [detok.flush()]
        text = gpt2.decode(ids)
        assert "".join(deltas) == text, ids
        assert "\ufffd" in text or not any("\ufffd" in d for d in deltas), ids


def test_a_special_token_ends_an_unfinished_character(gpt2):
    """e4, <|endoftext|>, b8 ad: no character goes on across the special token, as
    /detokenize writes it. decode (special tokens skipped) joined the bytes around it; a
    prompt ending e4 <|endoftext|> held its byte, and the continuation began with U+FFFD."""
    e4, b8, ad = (gpt2._tok.token_to_id(c) for c in "ä¸Ń")
    eos = gpt2.eos_id
    detok = IncrementalDetokenizer(gpt2)
    deltas = [detok.push(i) for i in (e4, eos, b8, ad)] + [detok.flush()]
    assert "".join(deltas) == gpt2.decode([e4, eos, b8, ad], skip_special_tokens=False
                                          ).replace("<|endoftext|>", "")
    assert deltas[:2] == ["", "\ufffd"]
    seeded = IncrementalDetokenizer(gpt2, gpt2.encode("Hello ") + [e4, eos])
    assert seeded.held == 0 and seeded.push(gpt2.encode("A")[0]) == "A"
    # an id past the vocabulary (a padded model's 50304 rows) is no special token: it has
    # no text, and the character goes on across it, as decode and /detokenize have it
    padded = IncrementalDetokenizer(gpt2)
    assert "".join(padded.push(i) for i in (e4, 50300, b8, ad)) == "中"
    # with nothing held, such ids hold nothing open (each push decoded the window they
    # kept open again: quadratic in a run of them)
    assert [padded.push(i) for i in (50300, 50301)] == ["", ""] and padded.held == 0
    assert padded.push(gpt2.encode(" A")[0]) == " A" and padded.held == 0


def test_a_replacement_character_written_out_is_a_whole_character(gpt2):
    """U+FFFD typed in a prompt, or written by the model, is bytes ef bf bd: a whole
    character, not one left unfinished. The continuation's text does not begin with the
    prompt's (it did, with the prompt's last token, when text ending in U+FFFD was taken
    for an unfinished character), and the model's is sent at once, not at the end."""
    prompt = gpt2.encode("Hello \ufffd")
    detok = IncrementalDetokenizer(gpt2, prompt)
    assert detok.held == 0
    deltas = [detok.push(i) for i in gpt2.encode(" world \ufffd")]
    assert "".join(deltas) == " world \ufffd" and deltas[-1].endswith("\ufffd")
    assert detok.flush() == ""


def test_tokens_a_fine_tune_added_beside_vocab_and_merges_are_read_as_transformers_does(
        tmp_path):
    """transformers 4's slow GPT2Tokenizer saved added tokens in added_tokens.json (which are
    special in special_tokens_map.json) beside vocab.json and merges.txt: they were ignored,
    so '<|sep|>' was read as 7 tokens and id 50258 could not be decoded."""
    if not GPT2_TOKENIZER.exists():
        pytest.skip("../shared/data/gpt2-tokenizer not available")
    import json
    import shutil

    from transformers import GPT2Tokenizer

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(GPT2_TOKENIZER / name, tmp_path / name)
    (tmp_path / "added_tokens.json").write_text(json.dumps(
        {"<|pad|>": 50257, "<|sep|>": 50258, "ROMEO": 50259}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": {"content": "<|pad|>"},
         "additional_special_tokens": ["<|sep|>"]}))
    ours, ref = Tokenizer.from_dir(tmp_path), GPT2Tokenizer.from_pretrained(tmp_path)
    for text in ("Hello <|sep|> ROMEO: hi<|pad|><|endoftext|>", "ROMEOS and <|sep|><|sep|>x"):
        ids = ours.encode(text)
        assert ids == ref.encode(text) and 50258 in ids
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids) == text
    assert ours.vocab_size == len(ref) == 50260
    assert "<|pad|>" not in ours.decode(ours.encode("a<|pad|>b"))  # special: skipped
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|pad|>": 50300}))
    with pytest.raises(ValueError, match="has id 50300, not the next free one"):
        Tokenizer.from_dir(tmp_path)
