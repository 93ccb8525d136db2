"""Our C kernels (kernels.py, _kernels.c) against the torch ops they replace, on a real model's
weights and a paged cache handed out the way the engine hands it out (tables out of order,
siblings sharing their prompt's blocks)."""

import contextvars
import errno
import mmap
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from conftest import make_hf_model
from gpt2serve import checkpoint, hardware, kernels
from gpt2serve.model import KVCache


def test_pip_install_built_the_kernels_where_a_compiler_is():
    if shutil.which(sysconfig.get_config_var("CC").split()[0]) is None:
        pytest.skip("no C compiler: the install skips the kernels and torch ops run")
    assert kernels._kernels is not None, "`pip install` did not build gpt2serve._kernels"
    # on unless GPT2SERVE_C_KERNELS=0 (a run of the suite on the torch ops alone)
    assert kernels.runs_decode_attention(torch.zeros(1), torch.float32) == kernels.ENABLED


def test_the_attention_kernels_take_fp32_rows_only():
    """An fp16 model's rows (--dtype float16 on CPU, its cache fp16 too) were taken, and the
    kernel wrote fp32 output over a half-size tensor."""
    half = torch.zeros(2, 1, 4, 8, 16, dtype=torch.float16)
    assert not kernels.runs_decode_attention(half, torch.float16)
    assert not kernels.runs_prompt_attention(half, torch.bfloat16)
    if kernels._kernels is None:
        return
    tables, pos = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    for rows in (torch.float16, torch.float32):
        qkv, out = torch.zeros(1, 48, dtype=rows), torch.zeros(1, 16, dtype=torch.float16)
        with pytest.raises(ValueError, match="fp32 rows"):
            kernels.bind_decode_attention(qkv, half, tables, pos, 0.25, out)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_hf_model(tmp_path_factory.mktemp("k") / "m", n_layer=2, n_head=4, n_embd=64,
                           n_positions=256)
    return checkpoint.load(folder)[0]


def decode(model, use_kernels: bool, monkeypatch,
           dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill four ragged prompts (rows 2 and 3 are siblings sharing row 2's prompt blocks),
    then decode 40 steps, the cache in `dtype`; -> (every step's logits, the cache)."""
    monkeypatch.setattr(kernels, "ENABLED", use_kernels)
    torch.manual_seed(0)
    cfg, bs = model.config, 8
    cache = KVCache(cfg, 64, bs, dtype, "cpu")
    assert kernels.runs_decode_attention(cache.kv, torch.float32) == (use_kernels and (
        dtype == torch.float32 or kernels.HALF_RUNS))
    blocks = torch.randperm(64)[:4 * 12].view(4, 12)  # out of order, as a pool hands them out
    lengths = torch.tensor([1, 19, 16, 16])
    blocks[3, :2] = blocks[2, :2]  # the sibling reads its prompt from the same two blocks
    tokens = torch.randint(0, cfg.vocab_size, (4, 19))
    model.prefill(tokens[:3], cache, blocks[:3], lengths=lengths[:3])
    pos, steps = lengths.clone(), []
    for _ in range(40):
        steps.append(model.decode_step(torch.randint(0, cfg.vocab_size, (4,)), pos, cache,
                                       blocks))
        pos += 1
    return torch.stack(steps), cache.kv


@pytest.mark.skipif(kernels._kernels is None, reason="kernels not built (no C compiler)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_matches_torch_ops(model, monkeypatch, dtype):
    if dtype == torch.float16 and not kernels.HALF_RUNS:
        pytest.skip("no AVX2 with F16C here: an fp16 cache is read by torch ops")
    ours, our_cache = decode(model, True, monkeypatch, dtype)
    ref, ref_cache = decode(model, False, monkeypatch, dtype)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # The first layer's keys and values come from the embeddings alone: stored bit for bit
    # (an fp16 cache: rounded to nearest even, as torch's cast rounds).
    torch.testing.assert_close(our_cache[0], ref_cache[0], atol=0, rtol=0)
    # Later layers' may round to the neighbouring fp16 value where the layers before them
    # summed in another order.
    tolerance = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(our_cache, ref_cache, atol=tolerance, rtol=tolerance)


@pytest.mark.skipif(kernels._kernels is None, reason="kernels not built (no C compiler)")
@pytest.mark.parametrize("isa", range(kernels.VECTOR_ISA + 1))  # each variant this CPU runs
# head dim 64 on AVX-512 has a form of its own, keys 16 at a time: blocks of 16, of 48 (three
# 16s), and of 8 (every key alone)
@pytest.mark.parametrize("block_size, head_dim", [(16, 64), (48, 64), (8, 64), (4, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_against_attention_written_out(block_size, head_dim, isa, dtype):
    """Random queries and cache entries of unit scale (sharp attention), sequences from one
    position to several blocks long: stores at pos, softmax(q.k * scale) @ v over 0..pos,
    in fp32 over the cache's values (an fp16 cache's widened)."""
    if dtype == torch.float16 and not (kernels.HALF_RUNS and isa >= 1):
        pytest.skip("an fp16 cache needs AVX2 with F16C")
    torch.manual_seed(1)
    heads, num_blocks, width = 3, 48, 9
    kv = torch.randn(2, heads, num_blocks, block_size, head_dim).to(dtype)
    blocks = torch.randperm(num_blocks)[:5 * width].view(5, width)
    # the last: its own block holds 20 positions, 16 keys and 4 alone where blocks hold 48
    pos = torch.tensor([0, block_size - 1, block_size, width * block_size - 1,
                        2 * block_size + 19])
    D = heads * head_dim
    qkv = torch.randn(5, 3 * D) * 2
    expected_kv = kv.clone()
    out = torch.empty(5, D)
    for n in range(5):
        slot_block, offset = blocks[n, pos[n] // block_size], pos[n] % block_size
        new = qkv[n, D:].view(2, heads, head_dim)
        expected_kv[:, :, slot_block, offset] = new.to(dtype)
        k, v = (expected_kv[i][:, blocks[n]].reshape(heads, -1, head_dim)[:, :pos[n] + 1]
                .float() for i in (0, 1))
        q = qkv[n, :D].view(heads, 1, head_dim)
        weights = torch.softmax(q @ k.transpose(1, 2) * 0.3, dim=-1)
        out[n] = (weights @ v).reshape(D)
    got = kernels.decode_attention(qkv, kv, blocks, pos, 0.3, isa)
    torch.testing.assert_close(kv, expected_kv, atol=0, rtol=0)
    torch.testing.assert_close(got, out, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(kernels._kernels is None or kernels.VECTOR_ISA < 2,
                    reason="prompt_attention runs with AVX-512 only")
@pytest.mark.parametrize("block_size, head_dim", [(16, 64), (4, 64), (16, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prompt_attention_against_attention_written_out(block_size, head_dim, dtype):
    """Four sequences' chunks of up to 13 rows, right-padded: from position 0, from the middle
    of a block (a prompt's second chunk), a single real row, and one reading a sibling's
    blocks. Each real row's key and value are stored at its position, in the cache's dtype as
    torch's cast rounds them, and nothing else in the cache changes (the padding's are not
    stored); row t of a sequence attends to positions 0..start + t through its block table,
    softmax(q.k * scale) @ v in fp32 over the cache's values (an fp16 cache's widened). Padding
    rows come out finite and are not compared."""
    torch.manual_seed(2)
    heads, num_blocks, width, T = 3, 48, 10, 13
    kv = torch.randn(2, heads, num_blocks, block_size, head_dim).to(dtype)
    blocks = torch.randperm(num_blocks)[:4 * width].view(4, width)
    blocks[3, :3] = blocks[2, :3]
    start = torch.tensor([0, block_size + block_size // 2, 5, 2 * block_size])
    lengths = torch.tensor([T, 9, 1, 7])
    D = heads * head_dim
    qkv = torch.randn(4 * T, 3 * D) * 2
    stored = kv.clone()
    for n in range(4):
        for t in range(int(lengths[n])):
            p = int(start[n]) + t
            new = qkv[n * T + t, D:].view(2, heads, head_dim)
            stored[:, :, blocks[n, p // block_size], p % block_size] = new.to(dtype)
    got = kernels.prompt_attention(qkv, kv, blocks, start, lengths, 0.3)
    torch.testing.assert_close(kv, stored, atol=0, rtol=0)
    assert torch.isfinite(got).all()
    for n in range(4):
        k, v = (kv[i][:, blocks[n]].reshape(heads, -1, head_dim).float() for i in (0, 1))
        for t in range(int(lengths[n])):
            seen = int(start[n]) + t + 1
            q = qkv[n * T + t, :D].view(heads, 1, head_dim)
            weights = torch.softmax(q @ k[:, :seen].transpose(1, 2) * 0.3, dim=-1)
            expected = (weights @ v[:, :seen]).reshape(D)
            torch.testing.assert_close(got[n * T + t], expected, atol=1e-5, rtol=1e-5)
    # all rows real (lengths None) reads as lengths of T each
    torch.testing.assert_close(
        kernels.prompt_attention(qkv, kv, blocks, start, None, 0.3),
        kernels.prompt_attention(qkv, kv, blocks, start, torch.full((4,), T), 0.3),
        atol=0, rtol=0)
    # what it cannot read is refused, not misread
    with pytest.raises(ValueError, match="contiguous"):
        kernels.prompt_attention(qkv[:, ::2], kv, blocks, start, lengths, 0.3)
    with pytest.raises(ValueError, match="int64"):
        kernels.prompt_attention(qkv, kv, blocks, start, lengths.int(), 0.3)
    with pytest.raises(ValueError, match="fp32 or fp16 cache"):  # (it would write past it)
        kernels.prompt_attention(qkv, kv.to(torch.bfloat16), blocks, start, lengths, 0.3)
    with pytest.raises(ValueError, match="fp32 or fp16 cache"):
        kernels.decode_attention(qkv[:4], kv.to(torch.bfloat16), blocks, start, 0.3)


@pytest.mark.skipif(not kernels.ENABLED or kernels.VECTOR_ISA < 2,
                    reason="prompt_attention runs with AVX-512 only, and our kernels on")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prompt_chunks_read_in_place_match_torch_ops(tmp_path, dtype):
    """A model of head dim 64 reads three ragged prompts in chunks of 7 (siblings sharing a
    prompt's blocks, tables out of order) attending in place, and through the torch ops on
    the gathered cache: every position's logits, the cache, and the decode steps after."""
    folder = make_hf_model(tmp_path / "m", n_layer=2, n_head=2, n_embd=128, n_positions=128)
    model = checkpoint.load(folder)[0]
    cfg, bs = model.config, 8
    torch.manual_seed(3)
    blocks = torch.randperm(48)[:3 * 6].view(3, 6)
    blocks[2, :2] = blocks[1, :2]  # the sibling's first 16 positions are its prompt's
    tokens = torch.randint(0, cfg.vocab_size, (3, 40))
    lengths = torch.tensor([40, 16, 23])

    def run(in_place: bool):
        cache = KVCache(cfg, 48, bs, dtype, "cpu")
        assert kernels.runs_prompt_attention(cache.kv, torch.float32)
        out = []
        for start in range(0, 40, 7):
            rows = [r for r in range(3) if start < lengths[r] and (r != 2 or start >= 16)]
            pieces = [tokens[r, start:min(start + 7, int(lengths[r]))] for r in rows]
            chunk = torch.zeros(len(rows), 7, dtype=torch.long)
            for i, piece in enumerate(pieces):
                chunk[i, :len(piece)] = piece
            logits = model.prefill(chunk, cache, blocks[rows], torch.tensor([start] * len(rows)),
                                   torch.tensor([len(p) for p in pieces]), all_logits=True,
                                   in_place=in_place)
            out += [logits[i, :len(p)] for i, p in enumerate(pieces)]
        step = model.decode_step(torch.tensor([1, 2, 3]), lengths, cache, blocks)
        return torch.cat(out), step, cache.kv

    ours, ref = run(True), run(False)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-3
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


def test_decode_attention_refuses_rows_it_cannot_address():
    if kernels._kernels is None:
        pytest.skip("kernels not built (no C compiler)")
    kv = torch.zeros(2, 2, 4, 8, 16)
    qkv = torch.zeros(3, 96)
    blocks, pos = torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.decode_attention(qkv[:, ::2], kv, blocks, pos, 0.25)
    # and an fp16 cache without the instructions that widen it (the baseline build)
    with pytest.raises(ValueError, match="fp16 cache needs AVX2"):
        kernels.decode_attention(qkv, kv.half(), blocks, pos, 0.25, isa=0)


def int8_written_out(x, q, scales, bias):
    """What kernels.int8_linear computes: each row of x to u8 with its own scale and zero
    point (its range stretched to hold 0), products summed exactly, then scaled. Also the
    norm of each row of x minus what its u8 values stand for."""
    lo, hi = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
    scale = (hi - lo) / 255
    zero = torch.round(-lo / scale)
    xq = (torch.round(x / scale[:, None]) + zero[:, None]).clamp(0, 255)
    dots = (xq.double() - zero[:, None].double()) @ q.double().t()
    error = (x.double() - scale[:, None].double() * (xq.double() - zero[:, None])).norm(dim=1)
    return (dots.float() * scale[:, None] * scales) + bias, error.float()


@pytest.mark.skipif(not kernels.INT8_RUNS, reason="no int8 kernel here (not built, or no AVX2)")
@pytest.mark.parametrize("form", [0, 1, 2])  # AVX2, VNNI, AMX
@pytest.mark.parametrize("m, k, n", [(1, 768, 2304), (3, 100, 7), (4, 64, 50257),
                                     (20, 200, 40)])
def test_int8_linear_against_the_arithmetic_written_out(form, m, k, n):
    """Odd sizes on purpose: k not a multiple of 32 (AMX: nor of 64, the last inputs in tiles
    of their own), n not of 4 (padding), one row and more, past one AMX tile's 16."""
    if form and hardware.fbgemm_isa() != "avx512_vnni":
        pytest.skip("needs a VNNI host")
    if form == 2 and not kernels.AMX:
        pytest.skip("needs AMX")
    torch.manual_seed(m)
    levels = 127 if form else 63  # the AVX2 kernel's weights hold 7 bits (quantize.py)
    q = torch.randint(-levels, levels + 1, (n, k), dtype=torch.int8)
    q[0] = levels  # a row at full scale against activations at 255: no int16 saturation
    scales, bias = torch.rand(n) / 100, torch.randn(n)
    x = torch.randn(m, k) * 3
    x[0] = x[0].abs()  # a row with no negative value: zero point 0
    packed, sums = kernels.pack_int8(q)
    padded_scales = torch.cat([scales, torch.zeros(sums.shape[0] - n)])
    error = torch.empty(m)
    got = kernels.int8_linear(x, packed, sums, padded_scales, bias, n, form, x_error=error)
    expected, expected_error = int8_written_out(x, q, scales, bias)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(error, expected_error, rtol=1e-5, atol=0)
    assert bool((error > 0).all())
    assert torch.equal(kernels.packed_int8_rows(packed, torch.tensor([n - 1, 0]), k),
                       q[[n - 1, 0]])


@pytest.mark.skipif(not (kernels.F32_RUNS and kernels.INT8_RUNS and kernels.INT4_ISA),
                    reason="needs our fp32, int8 and int4 kernels (built, AVX2)")
@pytest.mark.parametrize("n", [16, 48, 5000])
def test_each_panel_is_taken_once_whichever_thread_takes_it(n):
    """A decode step's rows share a call's panels out as they go: each thread starts on a run
    of its own, and one that is done takes the others' panels from the back (_kernels.c,
    take_panel). Whichever thread sums a panel, the sums are the same. With two threads,
    over many calls (one panel: a thread's run is empty and it takes from the other's at
    once; otherwise which thread is first done varies), every result equals one thread's,
    bit for bit, for each kernel and 1 and 9 rows."""
    torch.manual_seed(n)
    k = 256
    w, bias = torch.randn(k, n), torch.randn(n)
    q = torch.randint(-127 if kernels.INT8_VNNI else -63, 64, (n, k), dtype=torch.int8)
    packed, sums = kernels.pack_int8(q)
    scales = torch.cat([torch.rand(n) / 100, torch.zeros(sums.shape[0] - n)])
    panels, int4 = kernels.pack_f32(w), kernels.pack_int4(
        torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.rand(n, k // 32).half().float())
    calls = {"fp32": lambda x: kernels.linear_f32(x, panels, bias, n),
             "int8": lambda x: kernels.int8_linear(x, packed, sums, scales, bias, n),
             "int4": lambda x: kernels.int4_linear(x, int4, bias, n)}
    threads = torch.get_num_threads()
    try:
        for m in (1, 9):
            x = torch.randn(m, k)
            torch.set_num_threads(1)
            alone = {name: call(x) for name, call in calls.items()}
            torch.set_num_threads(2)
            for _ in range(50):
                for name, call in calls.items():
                    assert torch.equal(call(x), alone[name]), (name, m)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not (kernels.F32_RUNS and kernels.INT8_RUNS and kernels.INT4_ISA),
                    reason="needs our fp32, int8 and int4 kernels (built, AVX2)")
@pytest.mark.parametrize("m", [1, 9, 20])  # 20: past a decode step's few rows (FEW_ROWS)
def test_calls_run_together_give_each_calls_results_to_the_bit(m):
    """kernels.together runs a list's bound calls into our kernels by one team, a barrier
    between two (_kernels.run), and leaves the others as they are. A chain in which each
    call reads the output of the one before, as a layer's do (the QKV matmul with its
    LayerNorm fused, attention through a paged cache, GELU, a residual), a torch op in the
    middle: run together, over and over with two threads, it gives the bits of its calls
    made one by one on one thread."""
    torch.manual_seed(m)
    heads, head_dim, block_size, width = 2, 64, 16, 4
    d, n = heads * head_dim, 300
    ln = torch.nn.LayerNorm(d)
    ln.weight.data, ln.bias.data = torch.rand(d) + 0.5, torch.randn(d)
    q = torch.randint(-127 if kernels.INT8_VNNI else -63, 64, (3 * d, d), dtype=torch.int8)
    packed, sums = kernels.pack_int8(q)
    scales = torch.cat([torch.rand(3 * d) / 100, torch.zeros(sums.shape[0] - 3 * d)])
    panels, int4 = kernels.pack_f32(torch.randn(d, n) / 10), kernels.pack_int4(
        torch.randint(0, 16, (d, n), dtype=torch.uint8), torch.rand(d, n // 32 + 1) / 10)
    kv = torch.randn(2, heads, m * width, block_size, head_dim)
    tables = torch.randperm(m * width).view(m, width)  # out of order, as a pool hands them out
    positions = torch.randint(0, width * block_size, (m,))
    x, normed, qkv = torch.randn(m, d), torch.empty(m, d), torch.empty(m, 3 * d)
    attended, y2, y3 = torch.empty(m, d), torch.empty(m, n), torch.empty(m, d)
    b1, b2 = torch.randn(3 * d), torch.randn(n)  # (a bound call reads them: kept alive here)
    calls = [kernels.bind_int8_linear(x, packed, sums, scales, b1, qkv, ln=ln, normed=normed),
             kernels.bind_decode_attention(qkv, kv, tables, positions, 0.125, attended),
             kernels.bind_linear_f32(attended, panels, b2, y2, gelu=True),
             lambda: y2.mul_(0.5),
             kernels.bind_int4_linear(y2, int4, None, y3, residual=x)]
    together = kernels.together(calls)
    assert len(together) == 3 and together[1:] == calls[3:]  # one run, then the rest as is
    outputs = (normed, qkv, attended, y2, y3)

    def run(chain) -> list[torch.Tensor]:
        for out in outputs:
            out.fill_(float("nan"))
        for call in chain:
            call()
        return [t.clone() for t in outputs]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_by_one = run(calls)
        torch.set_num_threads(2)
        for _ in range(30):
            for got, expected in zip(run(together), one_by_one):
                assert torch.equal(got, expected)
    finally:
        torch.set_num_threads(threads)
    assert all(bool(t.isfinite().all()) for t in one_by_one)


@pytest.mark.skipif(not kernels.ENABLED, reason="our C kernels are not built or are off")
def test_a_call_refuses_what_it_cannot_run():
    """_kernels.Call binds a kernel by name to its arguments, checked as it is made; a run
    takes Calls alone."""
    from gpt2serve._kernels import Call, run

    with pytest.raises(TypeError, match="kernel decode_attention, linear_f32"):
        Call("int7_linear", 0)
    with pytest.raises(TypeError, match="kernel decode_attention, linear_f32"):
        Call()
    with pytest.raises(TypeError, match="kernel decode_attention, linear_f32"):
        Call("int8_linear\0", 0)
    with pytest.raises(TypeError, match="no keyword arguments"):
        Call("linear_f32", x=0)
    with pytest.raises(TypeError):
        Call("linear_f32", 0, 0)  # too few arguments
    x, y, w = torch.randn(2, 64), torch.empty(2, 16), torch.randn(64, 16)
    panels = kernels.pack_f32(w)
    args = (x.data_ptr(), panels.data_ptr(), 0, y.data_ptr(), 2, 64, 16)
    with pytest.raises(RuntimeError, match="isa 1 or 2"):
        Call("linear_f32", *args, 0, 0, 0, 0, 0.0, 0, 0, False, 0)
    call = Call("linear_f32", *args, kernels.VECTOR_ISA, 0, 0, 0, 0.0, 0, 0, False, 0)
    call()
    torch.testing.assert_close(y, x @ w, atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="no arguments"):
        call(1)
    with pytest.raises(TypeError, match="sequence of Calls"):
        run([call, lambda: None])
    with pytest.raises(TypeError, match="sequence of Calls"):
        run(call)
    run(())


@pytest.mark.skipif(not kernels.ENABLED, reason="our C kernels are not built or are off")
@pytest.mark.parametrize("layout", ["pack_int8", "int8 rows", "pack_f32", "fp32 rows"])
@pytest.mark.parametrize("d", [64, 30])
def test_the_embedding_call_gives_the_torch_ops_sums_to_the_bit(layout, d):
    """The decode plan's embedding (token rows in the LM head's layout, + wpe's rows) against
    the eager step's torch ops: tokens in the last, padded panel and at a panel's edges, a
    token twice, a width that is not a multiple of 4 (pack_int8 pads it); positions past
    wpe's end clamped as GPT._embed clamps them; a token outside the vocabulary refused."""
    torch.manual_seed(d)
    V, positions = 37, torch.tensor([0, 5, 5, 9, 2])
    tokens = torch.tensor([36, 0, 15, 16, 36])
    wpe = torch.randn(10, d)
    if layout.endswith("int8") or layout == "int8 rows":
        q, scales = torch.randint(-127, 128, (V, d), dtype=torch.int8), torch.rand(V) / 50
        rows = kernels.pack_int8(q)[0] if layout == "pack_int8" else q
        token_rows = q[tokens].float() * scales[tokens].unsqueeze(-1)
    else:
        w, scales = torch.randn(V, d), None
        rows = kernels.pack_f32(w.t().contiguous()) if layout == "pack_f32" else w
        token_rows = w[tokens]
    out = torch.full((len(tokens), d), float("nan"))
    kernels.bind_embedding(out, tokens, positions, wpe, rows, V, scales)()
    assert torch.equal(out, token_rows + wpe[positions])
    past = torch.tensor([10, 99, 9, 0, 1])  # positions past wpe's last take its last, as eager
    kernels.bind_embedding(out, tokens, past, wpe, rows, V, scales)()
    assert torch.equal(out, token_rows + wpe[past.clamp(max=9)])
    for token in (V, -1):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            kernels.bind_embedding(out, torch.tensor([0, token]), positions[:2], wpe, rows, V,
                                   scales)()


@pytest.mark.skipif(not kernels.AMX or not kernels.INT8_VNNI, reason="needs AMX (and VNNI)")
@pytest.mark.parametrize("m, k", [(1, 768), (8, 100), (16, 1600), (17, 3072), (128, 260)])
def test_int8_linear_amx_gives_the_vnni_sums(m, k):
    """Bit for bit, so that the kernel choice may switch forms between decode steps without
    changing a token: rows one tile holds, one past it, a prompt's; k a multiple of 64, and
    not (the last inputs in tiles of their own)."""
    torch.manual_seed(m)
    n = 48
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    packed, sums = kernels.pack_int8(q)
    scales, x = torch.rand(sums.shape[0]) / 100, torch.randn(m, k) * 3
    assert torch.equal(kernels.int8_linear(x, packed, sums, scales, None, n, 2),
                       kernels.int8_linear(x, packed, sums, scales, None, n, 1))


def int4_written_out(x, q, scales, bias):
    """What kernels.int4_linear computes: each group of 32 of a row of x to int8 with its own
    scale (largest |x| / 127, rounded half to even), each group's products with q - 8 summed
    exactly, then scaled by both scales and summed."""
    m, k = x.shape
    groups = scales.shape[1]
    xg = torch.nn.functional.pad(x, (0, groups * 32 - k)).view(m, groups, 32)
    largest = xg.abs().amax(-1, keepdim=True)
    xq = torch.round(xg * torch.where(largest > 0, 127 / largest, 0))
    w = torch.nn.functional.pad(q.double() - 8, (0, groups * 32 - k)).view(-1, groups, 32)
    dots = torch.einsum("mgi,ngi->mng", xq.double(), w)
    y = (dots * (largest / 127).double().view(m, 1, groups) * scales.double()).sum(-1)
    return y.float() + (0 if bias is None else bias)


@pytest.mark.skipif(not kernels.INT4_ISA, reason="no int4 kernel here (not built, or no AVX2)")
@pytest.mark.parametrize("isa", range(1, kernels.INT4_ISA + 1))  # each variant this CPU runs
@pytest.mark.parametrize("m, k, n", [(1, 768, 2304), (3, 100, 7), (9, 64, 50), (40, 3072, 40)])
def test_int4_linear_against_the_arithmetic_written_out(isa, m, k, n):
    """Odd sizes on purpose: k not a multiple of 32 or 64 (padded groups and blocks), n not
    of 16, rows over more than one tile (9: 8 and 1, AVX2's 4, 4 and 1), a prompt's (40, in
    groups of panels); weights at both ends of 0..15 against activations at +-127 (the
    int16 sums of the AVX2 and AVX-512 forms must not saturate)."""
    torch.manual_seed(m)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    q[0], q[-1] = 15, 0
    scales = (torch.rand(n, -(-k // 32)) / 100).half().float()
    bias, x = torch.randn(n), torch.randn(m, k) * 3
    x[0, :32] = 5.0  # a group of one value: every activation at 127
    packed = kernels.pack_int4(q, scales)
    assert packed.shape == (-(-n // 16), -(-k // 64), 576)
    torch.testing.assert_close(kernels.int4_linear(x, packed, bias, n, isa),
                               int4_written_out(x, q, scales, bias), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(kernels.int4_linear(x, packed, None, n, isa),
                               int4_written_out(x, q, scales, None), atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(kernels.INT4_ISA < 2, reason="one int4 form at most runs here")
@pytest.mark.parametrize("m, k", [(1, 768), (8, 100), (16, 1600), (17, 3072), (128, 256)])
def test_int4_linear_forms_give_the_same_sums(m, k):
    """Every form this CPU runs (AMX, VNNI, AVX-512, AVX2) gives bit for bit the same result:
    the int32 sums are exact and each form scales and adds them in the same order, so the
    kernel choice may switch forms between decode steps without changing a token. Rows one
    AMX tile holds (16), one past it (17: the tiles take a second shape), a prompt's 128."""
    torch.manual_seed(m)
    n = 48
    q, scales = kernels.quantize_int4(torch.randn(n, k) / k ** 0.5)
    packed, x = kernels.pack_int4(q, scales), torch.randn(m, k) * 3
    first = kernels.int4_linear(x, packed, None, n, 1)
    for isa in range(2, kernels.INT4_ISA + 1):
        assert torch.equal(kernels.int4_linear(x, packed, None, n, isa), first), isa


def test_int4_linear_refuses_a_form_this_cpu_lacks():
    if not kernels.ENABLED:
        pytest.skip("the C kernels are not built or are disabled")
    q, scales = kernels.quantize_int4(torch.randn(16, 64))
    with pytest.raises(ValueError, match="isa"):
        kernels.int4_linear(torch.randn(1, 64), kernels.pack_int4(q, scales), None, 16,
                            isa=5 if kernels._kernels.amx_ready() else 4)


@pytest.mark.skipif(not kernels.INT4_ISA, reason="no int4 kernel here (not built, or no AVX2)")
@pytest.mark.parametrize("isa", range(1, kernels.INT4_ISA + 1))
def test_int4_linear_fuses_layer_norm_gelu_and_residual(isa):
    torch.manual_seed(isa)
    m, k, n = 5, 256, 48
    ln = torch.nn.LayerNorm(k)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    q, scales = kernels.quantize_int4(torch.randn(n, k) / k ** 0.5)
    bias, x, residual = torch.randn(n), torch.randn(m, k) * 3 + 1, torch.randn(m, n)
    packed = kernels.pack_int4(q, scales)
    with torch.no_grad():
        normed = torch.nn.functional.layer_norm(x, (k,), ln.weight, ln.bias, ln.eps)
        ref = torch.nn.functional.gelu(int4_written_out(normed, q, scales, bias),
                                       approximate="tanh") + residual
        got = kernels.int4_linear(x, packed, bias, n, isa, ln=ln, gelu=True, residual=residual)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def q4_0(w):
    """llama.cpp's q4_0 (quantize_row_q4_0_ref) of w [n, k], dequantized: round to nearest,
    the largest |w| of each group of 32 at -8."""
    x = w.view(len(w), -1, 32)
    d = (x.gather(-1, x.abs().argmax(-1, keepdim=True)) / -8).half().float()
    q = torch.floor(x * torch.where(d != 0, 1 / d, 0) + 8.5).clamp(0, 15)
    return ((q - 8) * d).view_as(w)


def dequantized(q, scales):
    return (q.float() - 8) * scales.repeat_interleave(32, 1)[:, :q.shape[1]]


@pytest.mark.parametrize("c_module", [True, False], ids=["C", "torch"])
def test_int4_weights_fit_better_than_round_to_nearest(c_module, monkeypatch):
    """On the demo model's layers (trained weights, not Gaussian): each matrix's 4-bit form
    is closer to it than q4_0's (by 3% or more), scales fp16 exactly; and the torch form that
    runs without the C module gives the same weights."""
    if c_module and not kernels.INT4_ISA:
        pytest.skip("no C module here")
    weights = checkpoint.Weights(checkpoint.DEMO_MODEL_DIR)
    if not c_module:
        monkeypatch.setattr(kernels, "INT4_ISA", 0)
    names = [n for n in weights.where if n.startswith("h.") and n.endswith("weight")
             and len(weights.shape(n)) == 2]
    assert len(names) == 16  # four matrices in each of four layers
    for name in names:
        w = weights.get(name).float().t().contiguous()  # Conv1D's [in, out] -> [out, in]
        q, scales = kernels.quantize_int4(w)
        assert q.dtype == torch.uint8 and int(q.max()) <= 15
        assert torch.equal(scales, scales.half().float())
        ours = (dequantized(q, scales) - w).norm()
        assert ours < 0.97 * (q4_0(w) - w).norm(), name


def test_int4_quantization_of_odd_and_degenerate_groups():
    """A group of zeros (scale 0, every q at 8), one constant group, k not a multiple of 32;
    the C module and its torch form agree."""
    w = torch.randn(3, 70)
    w[0, :32] = 0
    w[1, 32:64] = 0.25
    q, scales = kernels.quantize_int4(w)
    assert q.shape == (3, 70) and scales.shape == (3, 3)
    assert float(scales[0, 0]) == 0 and bool((q[0, :32] == 8).all())
    torch.testing.assert_close(dequantized(q, scales)[1, 32:64], w[1, 32:64])
    assert (dequantized(q, scales) - w).norm() < 0.1 * w.norm()
    if kernels.INT4_ISA:
        isa, kernels.INT4_ISA = kernels.INT4_ISA, 0
        try:
            q2, scales2 = kernels.quantize_int4(w)
        finally:
            kernels.INT4_ISA = isa
        assert torch.equal(q, q2) and torch.equal(scales, scales2)


@pytest.mark.skipif(not kernels.F32_RUNS, reason="no fp32 kernel here (not built, or no AVX2)")
@pytest.mark.parametrize("isa", range(1, kernels.VECTOR_ISA + 1))  # each variant this CPU runs
@pytest.mark.parametrize("m, k, n", [(1, 768, 2304), (3, 5, 17), (9, 64, 50257), (301, 3072, 40)])
def test_linear_f32_against_float64(m, k, n, isa):
    """Odd sizes on purpose: n not a multiple of 16 (the last panel's padding), a decode
    step's rows over more than one tile (9: AVX-512's 8 and one, AVX2's 4, 4 and one), and a
    prompt's (301 x 3072: AVX2's 6-row tiles and a short one, panels a group at a time).
    Without bias too. Prefetching the next panel into L1 instead of L2 changes no sum."""
    torch.manual_seed(m)
    w, bias, x = torch.randn(k, n), torch.randn(n), torch.randn(m, k)
    panels = kernels.pack_f32(w)
    assert panels.shape == (-(-n // 16), k, 16)
    ref = x.double() @ w.double()
    got = kernels.linear_f32(x, panels, bias, n, isa)
    torch.testing.assert_close(got.double(), ref + bias.double(), atol=1e-4 * k ** 0.5,
                               rtol=1e-5)
    assert torch.equal(kernels.linear_f32(x, panels, bias, n, isa, l1_rows=m), got)
    torch.testing.assert_close(kernels.linear_f32(x, panels, None, n, isa).double(), ref,
                               atol=1e-4 * k ** 0.5, rtol=1e-5)
    index = torch.tensor([n - 1, 0, n // 2])  # the tied embedding reads columns as rows
    assert torch.equal(kernels.f32_columns(panels, index), w.t()[index])


@pytest.mark.skipif(not kernels.F32_RUNS, reason="no fp32 kernel here (not built, or no AVX2)")
@pytest.mark.parametrize("isa", range(1, kernels.VECTOR_ISA + 1))
@pytest.mark.parametrize("m", [1, 2, 3, 9])
def test_linear_f32_on_some_panels_gives_those_columns_of_the_whole_to_the_bit(m, isa):
    """packing.HeadScreen recomputes its candidates' panels, named in any order (the last,
    padded one and one named twice too), and relies on getting the full product's values."""
    torch.manual_seed(m)
    k, n = 96, 1000  # 63 panels, the last with 8 columns
    w, x = torch.randn(k, n), torch.randn(m, k)
    panels = kernels.pack_f32(w)
    whole = torch.nn.functional.pad(kernels.linear_f32(x, panels, None, n, isa), (0, 8))
    ids = torch.tensor([62, 0, 17, 17, 40, 1])
    got = kernels.linear_f32(x, panels, None, 16 * len(ids), isa, panel_ids=ids)
    assert torch.equal(got.view(m, len(ids), 16), whole.view(m, 63, 16)[:, ids])
    with pytest.raises(ValueError, match="panel_ids"):
        kernels.linear_f32(x, panels, None, 32, isa, panel_ids=torch.tensor([0, 63]))


@pytest.mark.skipif(not kernels.F32_RUNS, reason="no fp32 kernel here (not built, or no AVX2)")
@pytest.mark.parametrize("isa", range(1, kernels.VECTOR_ISA + 1))
@pytest.mark.parametrize("m, k, n", [(1, 768, 3072), (9, 64, 40), (40, 3072, 768)])
def test_linear_f32_fuses_layer_norm_gelu_and_residual(m, k, n, isa):
    """The ops FusedBlock hands the kernel, against torch's: the layer norm of the input,
    GELU's tanh form on the sum (rows at 10x scale: tanh saturated, and around 0), the
    residual added last."""
    torch.manual_seed(k)
    ln = torch.nn.LayerNorm(k)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    w, bias = torch.randn(k, n) / k ** 0.5, torch.randn(n)
    x, residual = torch.randn(m, k) * 3 + 1, torch.randn(m, n)
    bias[:n // 2] *= 10
    panels = kernels.pack_f32(w)
    with torch.no_grad():
        normed = torch.nn.functional.layer_norm(x, (k,), ln.weight, ln.bias, ln.eps)
        ref = torch.nn.functional.gelu(normed @ w + bias, approximate="tanh") + residual
        got = kernels.linear_f32(x, panels, bias, n, isa, ln=ln, gelu=True, residual=residual)
        # Strided views of the same input and residual: copied, and held through the call.
        strided = [torch.stack([t, torch.full_like(t, 7.0)], -1)[..., 0] for t in (x, residual)]
        assert not any(t.is_contiguous() for t in strided)
        got_strided = kernels.linear_f32(strided[0], panels, bias, n, isa, ln=ln, gelu=True,
                                         residual=strided[1])
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(got_strided, got)


def test_fused_blocks_match_the_ops_they_replace(model):
    """Through a real model: prompts and decode steps with every Block's FusedBlock, and
    with the torch ops it replaces."""
    if model.h[0].fused is None:
        pytest.skip("no fused blocks here (no fp32 kernel)")
    torch.manual_seed(1)
    cfg, fused = model.config, [b.fused for b in model.h]
    tokens = torch.randint(0, cfg.vocab_size, (3, 30))
    blocks = torch.arange(3 * 8).view(3, 8)
    logits = {}
    for name in ("fused", "ops"):
        for block, f in zip(model.h, fused):
            block.fused = f if name == "fused" else None
        cache = KVCache(cfg, 32, 8, torch.float32, "cpu")
        steps = [model.prefill(tokens[:, :20], cache, blocks)]
        for i in range(20, 30):
            steps.append(model.decode_step(tokens[:, i], torch.full((3,), i), cache, blocks))
        logits[name] = torch.stack(steps)
    for block, f in zip(model.h, fused):
        block.fused = f
    torch.testing.assert_close(logits["fused"], logits["ops"], atol=1e-5, rtol=1e-5)


def thp_mode() -> str | None:
    try:
        setting = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return setting.split("[")[1].split("]")[0]


@pytest.mark.skipif(not kernels.F32_RUNS, reason="no fp32 kernel here (not built, or no AVX2)")
@pytest.mark.skipif(thp_mode() not in ("always", "madvise"),
                    reason="transparent huge pages are off on this kernel")
def test_packed_weights_sit_in_huge_pages():
    """Weights read at 34 GB/s from 2 MiB pages against 28 from 4 KiB ones: the kernel must
    really back them with huge pages (a shared anonymous map, say, is left with 4 KiB)."""
    packed = kernels.pack_f32(torch.randn(768, 8192))  # 24 MiB
    address = packed.data_ptr()
    with open("/proc/self/smaps") as smaps:
        lines = smaps.read().splitlines()
    for i, line in enumerate(lines):
        span = line.split()[0]
        if line[0].isdigit() or line[0] in "abcdef":  # a mapping's first line: start-end ...
            start, end = (int(a, 16) for a in span.split("-"))
            if start <= address < end:
                fields = dict(f.split(":", 1) for f in lines[i + 1:i + 25] if ":" in f)
                assert int(fields["AnonHugePages"].split()[0]) >= 16 * 1024, fields
                return
    raise AssertionError("the packed weights' mapping is not in /proc/self/smaps")


@pytest.mark.skipif(not kernels.F32_RUNS, reason="no fp32 kernel here (not built, or no AVX2)")
def test_weights_load_where_the_kernel_has_no_huge_pages(monkeypatch):
    """A kernel built without transparent huge pages answers MADV_HUGEPAGE with EINVAL: the
    weights then sit in ordinary pages, and loading goes on."""
    class NoHugePages(mmap.mmap):
        def madvise(self, *args):
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(mmap, "mmap", NoHugePages)
    w = torch.randn(64, 40)
    # a fresh allocator, which maps now (the module's may have a map to hand out already)
    panels = kernels._HugePages().empty((3, 64, 16), torch.float32)
    panels.copy_(kernels.pack_f32(w))
    x = torch.randn(2, 64)
    torch.testing.assert_close(kernels.linear_f32(x, panels, None, 40), x @ w,
                               atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not kernels.F32_RUNS, reason="no fp32 kernel here (not built, or no AVX2)")
def test_an_arena_hands_its_pages_out_again_after_a_rewind():
    """Weights laid out on a thread that lent an arena take its memory, in turn, and the same
    memory again after a rewind (kernel_choice's copies, one group after another); past the
    arena's size, and on any other thread, the shared maps serve. The products stay right."""
    arena = kernels.PageArena(4 << 20)
    start, end = arena.region.data_ptr(), arena.region.data_ptr() + arena.region.numel()
    w = torch.randn(64, 1024)  # 256 KiB laid out

    def lay_out(count, matrix=w):
        arena.lend()
        return [kernels.pack_f32(matrix) for _ in range(count)]

    first = contextvars.copy_context().run(lay_out, 3)
    assert [p.data_ptr() - start for p in first] == [0, 256 << 10, 512 << 10]
    del first
    arena.rewind()
    again = contextvars.copy_context().run(lay_out, 1)[0]
    assert again.data_ptr() == start
    x = torch.randn(2, 64)
    torch.testing.assert_close(kernels.linear_f32(x, again, None, 1024), x @ w,
                               atol=1e-4, rtol=1e-5)
    past = contextvars.copy_context().run(lay_out, 1, torch.randn(768, 2048))[0]  # 6 MiB
    elsewhere = kernels.pack_f32(w)
    for outside in (past, elsewhere):
        assert not start <= outside.data_ptr() < end


def test_the_kernels_follow_the_isa_caps():
    """Under `bench/offline.py --isa avx2`'s caps an AVX-512 host runs our AVX2 code: attention
    and the fp32 matmuls follow torch's cap, int8 fbgemm's."""
    code = "from gpt2serve import kernels; print(kernels.VECTOR_ISA, kernels.INT8_VNNI)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **hardware.AVX2_CAP_ENV}, check=True)
    expected_attention = min(kernels.VECTOR_ISA, 1)
    assert out.stdout.split() == [str(expected_attention), "False"]
