"""EngineConfig, the `serve` flags and the README's flag table cannot drift apart."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from gpt2serve import kernels
from gpt2serve.cli import ENGINE_FLAGS, build_parser
from gpt2serve.engine import EngineConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def serve_parser():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices["serve"]


def test_every_engine_setting_is_a_serve_flag_read_back_as_given():
    names = {f.name for f in fields(EngineConfig)}
    assert set(ENGINE_FLAGS) | {"threads"} == names
    args = serve_parser().parse_args([])
    assert EngineConfig.from_args(args) == EngineConfig()
    args = serve_parser().parse_args(["--max_batch_size", "3", "--kv_cache_memory", "2MiB",
                                      "--enforce_eager", "--max_model_len", "64",
                                      "--request_timeout", "1.5", "--threads", "2",
                                      "--kv_cache_dtype", "float16",
                                      "--prefill_step_stretch", "0"])
    config = EngineConfig.from_args(args)
    assert (config.max_batch_size, config.kv_cache_memory, config.enforce_eager,
            config.max_model_len, config.request_timeout, config.threads,
            config.kv_cache_dtype, config.prefill_step_stretch
            ) == (3, 2 << 20, True, 64, 1.5, 2, "float16", 0)
    with pytest.raises(SystemExit):  # argparse names the choices
        serve_parser().parse_args(["--kv_cache_dtype", "fp8"])


def test_the_readme_flag_table_lists_exactly_the_serve_flags():
    text = README.read_text()
    table = text[text.index("| flag | default |"):]
    table = table[:table.index("\n\n")]
    documented = set(re.findall(r"`--(\w+)`", table))
    flags = {opt[2:] for a in serve_parser()._actions for opt in a.option_strings
             if opt.startswith("--") and "-" not in opt[2:] and opt != "--help"}
    assert documented == flags, (documented - flags, flags - documented)
    for name in ENGINE_FLAGS:  # and each engine setting's default, as the dataclass has it
        default = next(f.default for f in fields(EngineConfig) if f.name == name)
        row = next(line for line in table.splitlines() if f"`--{name}`" in line)
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert f"| {default:g} |" in row, row


@pytest.mark.parametrize("bad", [{"max_batch_size": 0}, {"max_batch_size": 4097},
                                 {"block_size": 0},
                                 {"max_model_len": 0}, {"request_timeout": 0},
                                 {"kv_cache_dtype": "fp8"}, {"prefill_step_stretch": 0.5}])
def test_settings_out_of_range_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EngineConfig(**bad)


def test_the_cache_dtype_auto_is_the_models_but_fp16_for_a_quantized_cpu_model():
    """int8 and int4 models get an fp16 cache where our decode kernel reads it in place
    (our C kernels on, F16C); a flag other than auto is taken as given."""
    auto = EngineConfig()
    quantized = torch.float16 if kernels.ENABLED and kernels.HALF_RUNS else torch.float32
    assert auto.cache_dtype(torch.float32, quantized=True) == quantized
    assert auto.cache_dtype(torch.float32, quantized=False) == torch.float32
    assert auto.cache_dtype(torch.bfloat16, quantized=False) == torch.bfloat16
    for given in ("float32", "float16"):
        for q in (True, False):
            assert (EngineConfig(kv_cache_dtype=given).cache_dtype(torch.float32, quantized=q)
                    == getattr(torch, given))


def test_a_stretch_of_0_reads_the_most_beside_every_decode_step():
    """--prefill_step_stretch 0: max_prefill_tokens beside decode steps from the first."""
    from gpt2serve import checkpoint
    from gpt2serve.engine import Engine
    from gpt2serve.engine.scheduler import MIN_CHUNK

    model, tokenizer = checkpoint.load(None)
    for stretch, beside in ((1.5, MIN_CHUNK), (0, 96)):
        engine = Engine(model, tokenizer, EngineConfig(
            max_batch_size=2, max_prefill_tokens=96, prefill_step_stretch=stretch),
            runner="eager", threaded=False)
        assert engine.scheduler.budget.tokens(streams=True) == beside


def test_a_block_longer_than_the_context_is_the_context():
    """--block_size 1000000 of a 256-token model reserved 7.8 GB for one sequence."""
    from gpt2serve import checkpoint
    from gpt2serve.engine import Engine

    model, tokenizer = checkpoint.load(None)
    context = model.config.n_positions
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=2, block_size=10**6),
                    runner="eager", threaded=False)
    assert engine.cache.block_size == context
    assert engine.cache.num_blocks == 2  # two full-context sequences, one block each
