"""int8 and int4 quality gates, teacher-forced over a fixed text: top-1 agreement on the trained
demo model, relative logit error on a random-weight model whose logits are nearly flat, and
the held-out loss on the tail of tiny Shakespeare the demo model did not train on.
bench/quality.py measures the same against llama.cpp's q8_0, q4_0 and q4_K_M."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import SHARED, make_hf_model
from gpt2serve import checkpoint, hardware, kernels
from gpt2serve.engine import EngineConfig
from gpt2serve.model import KVCache

# Romeo and Juliet, Act II Scene II (public domain).
TEXT = """ROMEO:
He jests at scars that never felt a wound.
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.
Arise, fair sun, and kill the envious moon,
Who is already sick and pale with grief,
That thou her maid art far more fair than she:
Be not her maid, since she is envious;
Her vestal livery is but sick and green
And none but fools do wear it; cast it off.
It is my lady, O, it is my love!
O, that she knew she were!
She speaks yet she says nothing: what of that?
Her eye discourses; I will answer it.

JULIET:
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name;
Or, if thou wilt not, be but sworn my love,
And I'll no longer be a Capulet.

ROMEO:
Shall I hear more, or shall I speak at this?

JULIET:
'Tis but thy name that is my enemy;
Thou art thyself, though not a Montague.
What's Montague? it is nor hand, nor foot,
Nor arm, nor face, nor any other part
Belonging to a man. O, be some other name!
What's in a name? that which we call a rose
By any other name would smell as sweet;
"""


def teacher_forced_logits(folder, quantize, ids, how):
    """Logits at every position of ids: read as one prompt (fbgemm's GEMM for int8), or one
    token per decode step (our small-batch kernel, kernels.int8_linear), each step's keys and
    values stored in the cache an engine of these weights holds by default (fp16 for int8
    and int4 where our decode kernel reads it: EngineConfig.cache_dtype)."""
    model, _ = checkpoint.load(folder, quantize=quantize)
    dtype = EngineConfig().cache_dtype(torch.float32, quantized=quantize is not None)
    cache, blocks = KVCache.for_sequences(model.config, 1, len(ids), dtype, "cpu")
    ids = torch.tensor(ids)
    if how == "prompt":
        return model.prefill(ids, cache, blocks[0], all_logits=True)
    first = model.prefill(ids[:1], cache, blocks[0])
    steps = [model.decode_step(ids[t:t + 1], torch.tensor([t]), cache, blocks)[0]
             for t in range(1, len(ids))]
    return torch.stack([first, *steps])


# The gates, by weights: top-1 agreement with fp32 on the demo model (measured on this text:
# int8 98-99%, int4 96.5%; over the held-out tail bench/quality.py gives int4 97.2% against
# llama.cpp q4_0's 96.4%), relative logit error on random weights (int8 2.1%, int4 16.4%: a
# 4-bit weight's error is ~8% of it, compounded over the layers; q4_0's fit is worse,
# tests/test_kernels.py), and held-out loss above fp32's (int8 +0.0006, int4 -0.0017 nats).
AGREEMENT = {"int8": 0.97, "int4": 0.95}
LOGIT_ERROR = {"int8": 0.05, "int4": 0.20}
LOSS_ABOVE_FP32 = {"int8": 0.01, "int4": 0.01}


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("how", ["prompt", "decode"])
def test_quantized_weights_keep_the_demo_models_choices(how, quantize):
    model, tokenizer = checkpoint.load(None)
    ids = tokenizer.encode(TEXT)[:model.config.n_positions]
    assert len(ids) > 200
    fp32 = teacher_forced_logits(None, None, ids, how)
    quantized = teacher_forced_logits(None, quantize, ids, how)
    agreement = (fp32.argmax(-1) == quantized.argmax(-1)).float().mean().item()
    print(f"\ndemo model, {len(ids)} tokens, {how}: {quantize} top-1 agreement with fp32 "
          f"{agreement:.1%}")
    assert agreement >= AGREEMENT[quantize]


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("how", ["prompt", "decode"])
def test_quantized_relative_logit_error_on_random_weights(tmp_path, how, quantize):
    folder = make_hf_model(tmp_path / "random", n_embd=256, n_layer=4, n_head=4,
                           n_positions=256)
    ids = torch.randint(0, 400, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    fp32 = teacher_forced_logits(folder, None, ids, how)
    quantized = teacher_forced_logits(folder, quantize, ids, how)
    error = ((quantized - fp32).norm() / fp32.norm()).item()
    print(f"\nrandom model, {how}: {quantize} relative logit error {error:.2%}")
    assert error <= LOGIT_ERROR[quantize]


@pytest.mark.skipif(not (SHARED / "tinyshakespeare.txt").exists(),
                    reason="needs ../shared/data/tinyshakespeare.txt")
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_held_out_loss_stays_near_fp32s(quantize):
    """The demo model's loss over four windows of the last 5% of tiny Shakespeare."""
    model, tokenizer = checkpoint.load(None)
    text = (SHARED / "tinyshakespeare.txt").read_text()
    ids = tokenizer.encode(text[int(len(text) * 0.95):])
    n = model.config.n_positions

    def loss(quantize):
        total = 0.0
        for start in range(0, 4 * n, n):
            window = ids[start:start + n]
            logits = teacher_forced_logits(None, quantize, window, "prompt")
            total += torch.nn.functional.cross_entropy(logits[:-1],
                                                       torch.tensor(window[1:])).item()
        return total / 4

    fp32, quantized = loss(None), loss(quantize)
    print(f"\ndemo model, held-out loss: fp32 {fp32:.4f}, {quantize} {quantized:.4f}")
    assert quantized <= fp32 + LOSS_ABOVE_FP32[quantize]


def test_quantized_memory_and_refusals(tiny_model):
    fp32, _ = checkpoint.load(tiny_model)
    int8, _ = checkpoint.load(tiny_model, quantize="int8")
    int4, _ = checkpoint.load(tiny_model, quantize="int4")
    assert int8.weight_bytes() < 0.4 * fp32.weight_bytes()
    assert int4.weight_bytes() < int8.weight_bytes()
    for quantize in ("int8", "int4"):
        with pytest.raises(checkpoint.CheckpointError,
                           match=f"{quantize} runs on CPU with float32"):
            checkpoint.load(tiny_model, dtype=torch.bfloat16, quantize=quantize)
    with pytest.raises(checkpoint.CheckpointError, match="--quantize must be one of"):
        checkpoint.load(tiny_model, quantize="int3")


VNNI_HOST = {"avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}


@pytest.mark.parametrize("flags, env, levels", [
    (VNNI_HOST, {}, 127),
    (VNNI_HOST, {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}, 63),
    (VNNI_HOST, {"FBGEMM_ENABLE_INSTRUCTIONS": "avx512"}, 63),      # AVX-512 without VNNI
    (VNNI_HOST, {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX512_E1"}, 127),
    (VNNI_HOST, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, 127),               # does not reach fbgemm
    ({"avx2", "avx_vnni"}, {}, 63),                                  # no fbgemm AVX-VNNI kernel
    ({"avx2"}, {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX512_E1"}, 63),     # can't force up
    (set(), {}, 63),
])
def test_int8_weight_range_follows_the_kernel_that_will_run(flags, env, levels):
    assert hardware.int8_weight_levels(flags, env) == levels


def _python(code: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_quantized_weights_under_an_avx2_cap_pass_the_quality_gates():
    """What `bench/offline.py --isa avx2` runs: every library capped at AVX2 in a fresh
    process (the caps are read once, at start). On a VNNI host the int8 kernel loses VNNI
    there (7-bit weights), and the int4 kernel runs its AVX2 form."""
    cap = hardware.AVX2_CAP_ENV
    assert _python("from gpt2serve import quantize; print(quantize.WEIGHT_LEVELS)", cap) == "63"
    if kernels.INT4_ISA:
        assert _python("from gpt2serve import kernels; print(kernels.INT4_ISA)", cap) == "1"
    gates = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "demo_models_choices or relative_logit_error"],
        env={**os.environ, **cap}, capture_output=True, text=True)
    assert gates.returncode == 0, gates.stdout[-3000:]
    assert "8 passed" in gates.stdout


SATURATION_CHECK = """
import warnings, torch
warnings.simplefilter("ignore")
K, N, level = 256, 64, {level}
q = torch.quantize_per_channel(torch.ones(N, K), torch.full((N,), 1 / level, dtype=torch.double),
                               torch.zeros(N, dtype=torch.long), 0, torch.qint8)
x = torch.ones(1, K)  # every activation quantizes to 255
x[0, 0] = 0
y = torch.ops.quantized.linear_dynamic(x, torch.ops.quantized.linear_prepack(q, None), False)
print(((y - x.sum()).abs().max() / x.sum()).item())
"""


@pytest.mark.skipif(hardware.fbgemm_isa() != "avx512_vnni", reason="needs a VNNI host")
def test_the_fbgemm_cap_reaches_the_kernel():
    """FBGEMM_ENABLE_INSTRUCTIONS=AVX2 really takes VNNI away (8-bit weights saturate) and
    7-bit weights stay exact there; ONEDNN_MAX_CPU_ISA alone leaves VNNI on."""
    error = lambda level, env: float(_python(SATURATION_CHECK.format(level=level), env))
    assert error(127, {}) < 1e-5
    assert error(127, {"ONEDNN_MAX_CPU_ISA": "AVX2"}) < 1e-5
    assert error(127, {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}) > 0.1
    assert error(63, {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}) < 1e-5
