"""The command a benchmark records with its figures reads as run from the repository root,
wherever it was run from (bench/common.from_root)."""

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench_common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paths_given_in_bench_are_recorded_from_the_root():
    from_root = bench_common().from_root
    argv = ["--out", "results/offline-x.json", "--only", "gpt2serve fp32", "openvino int8 w-only",
            "--offline", "results/offline-greedy.json", "--rounds", "3",
            "--model", "openai-community/gpt2"]  # (a name with a slash, no folder of that name)
    assert from_root(argv, ROOT / "bench") == [
        "--out", "bench/results/offline-x.json", "--only", "gpt2serve fp32",
        "openvino int8 w-only", "--offline", "bench/results/offline-greedy.json",
        "--rounds", "3", "--model", "openai-community/gpt2"]
    # given in the root, or as absolute paths under it: the same record
    assert from_root(["--out", "bench/results/offline-x.json"], ROOT) == [
        "--out", "bench/results/offline-x.json"]
    assert from_root(["--out", str(ROOT / "bench" / "results" / "x.json")], ROOT / "src") == [
        "--out", "bench/results/x.json"]


def test_paths_outside_the_checkout(tmp_path):
    from_root = bench_common().from_root
    (tmp_path / "out").mkdir()
    # relative: written from the root, as a path that leaves it; absolute: kept
    assert from_root(["--out", "out/x.json"], tmp_path) == [
        "--out", os.path.relpath(tmp_path / "out" / "x.json", ROOT)]
    assert from_root(["--out", str(tmp_path / "x.json")], ROOT / "bench") == [
        "--out", str(tmp_path / "x.json")]
