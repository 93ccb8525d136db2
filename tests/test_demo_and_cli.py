"""The embedded demo model and the `gpt2serve generate` command."""

import os
import re
import signal
import subprocess
import sys

import httpx

from conftest import free_port, running_server
from gpt2serve import checkpoint

DEMO = checkpoint.DEMO_MODEL_DIR


def test_demo_model_is_small_and_loads():
    size = sum(f.stat().st_size for f in DEMO.iterdir())
    assert size <= 20 * 2**20
    model, tokenizer = checkpoint.load(None)
    assert 2000 <= tokenizer.vocab_size <= 8192
    assert model.config.n_layer >= 2


def generate(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "gpt2serve.cli", "generate", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_generate_prints_shakespeare_shaped_text():
    text = generate("ROMEO:", "--max-length", "120", "--seed", "1")
    assert text.startswith("ROMEO:")
    assert text == generate("ROMEO:", "--max-length", "120", "--seed", "1")
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) >= 3  # verse comes in lines
    # A speaker's name alone on its line, in capitals, as in the play text: "JULIET:".
    speakers = [line for line in lines[1:] if re.fullmatch(r"[A-Z][A-Za-z ]+:", line.strip())]
    assert speakers, text


def test_an_fp16_model_on_cpu_generates_what_torch_ops_alone_do():
    """--dtype float16 on CPU: our attention kernels, which read and write fp32 rows, served
    its fp16 cache, and wrote fp32 output over a half-size tensor: the process died of heap
    corruption (or hung) on its first token."""
    args = ["ROMEO:", "--dtype", "float16", "--max-new-tokens", "12", "--temperature", "0"]
    torch_ops = subprocess.run([sys.executable, "-m", "gpt2serve.cli", "generate", *args],
                               capture_output=True, text=True, timeout=120,
                               env={**os.environ, "GPT2SERVE_C_KERNELS": "0"})
    assert torch_ops.returncode == 0, torch_ops.stderr
    assert generate(*args) == torch_ops.stdout


def test_generate_options_and_errors():
    three = generate("JULIET:", "--max-new-tokens", "10", "-n", "3", "--seed", "2")
    assert three.count("JULIET:") == 3 and three.count("==========") == 2
    bad = subprocess.run([sys.executable, "-m", "gpt2serve.cli", "generate", "x",
                          "--temperature", "-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--temperature must be in" in bad.stderr  # the flag's name
    none = subprocess.run([sys.executable, "-m", "gpt2serve.cli", "generate", "x",
                           "--max-new-tokens", "0"], capture_output=True, text=True, timeout=60)
    assert none.returncode == 2, none.stdout  # (it printed the prompt, as the API routes refuse)
    assert none.stderr.strip().endswith("--max-new-tokens must be at least 1"), none.stderr
    both = subprocess.run([sys.executable, "-m", "gpt2serve.cli", "generate", "x",
                           "--max-length", "9", "--max-new-tokens", "3"],
                          capture_output=True, text=True, timeout=60)
    assert "give either --max-length or --max-new-tokens" in both.stderr, both.stderr
    long = subprocess.run([sys.executable, "-m", "gpt2serve.cli", "generate", "x",
                           "--max-length", "5000"], capture_output=True, text=True, timeout=60)
    assert "--max-length is 5000. This model's maximum context length" in long.stderr
    for command in (["generate", "x"], ["serve"]):  # not '/nonexistent/config.json: missing'
        missing = subprocess.run([sys.executable, "-m", "gpt2serve.cli", *command,
                                  "--model_dir", "/nonexistent"],
                                 capture_output=True, text=True, timeout=60)
        assert missing.returncode == 2, missing.stderr
        assert missing.stderr.strip().endswith("/nonexistent: no such folder"), missing.stderr


def test_a_model_folder_without_config_json_is_refused_not_served_as_no_models(tmp_path):
    """A folder of a model's files with no config.json was taken for a repository of model
    folders holding none: the server went ready with no model and said nothing, and every
    request was a 404. OpenAI's TensorFlow release is named, with the command that reads it."""
    import shutil

    broken = tmp_path / "upload"
    shutil.copytree(DEMO, broken)
    (broken / "config.json").unlink()
    release = tmp_path / "release"
    release.mkdir()
    for name in ("hparams.json", "model.ckpt.index", "encoder.json", "vocab.bpe"):
        (release / name).write_text("{}")
    for folder, says in ((broken, f"{broken}/config.json: missing"),
                         (release, "OpenAI's TensorFlow release, which is read once converted")):
        for command in (["generate", "x"], ["serve", "--http_port", "0"]):
            run = subprocess.run([sys.executable, "-m", "gpt2serve.cli", *command,
                                  "--model_dir", str(folder)],
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == 2 and says in run.stderr, run.stderr


def test_generate_takes_what_a_shell_gives_it():
    """Found by a pass over `generate` with odd arguments: a prompt that was not UTF-8 (its
    bytes reach Python as lone surrogates) ended in a TypeError's traceback; -n 20 was refused
    as "'n' must be in [1, 16]" (the engine's default), where -n 129 said [1, 128]; Ctrl-C
    while it generated printed a traceback."""
    cli = [sys.executable, "-m", "gpt2serve.cli", "generate"]
    bad = subprocess.run([*cli, b"ab\xff"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "argument prompt: not UTF-8 text (character 3 of 3)" in bad.stderr
    bad = subprocess.run([*cli, "ab", "--stop", b"\xfe"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "argument --stop: not UTF-8 text (character 1 of 1)" in bad.stderr
    twenty = generate("JULIET:", "--max-new-tokens", "3", "-n", "20", "--seed", "4")
    assert twenty.count("JULIET:") == 20
    # 64 sequences of 250 tokens: seconds of work, interrupted once the engine has started. As
    # a terminal's foreground job gets Ctrl-C: with SIGINT's default action, which a job the
    # shell started in the background (`make test &`, nohup) inherits as ignored, and Python
    # keeps ignoring: the run went on to its end and exited 0.
    run = subprocess.Popen([*cli, "ROMEO:", "--max-new-tokens", "250", "--min-length", "250",
                            "-n", "64", "--device", "cpu"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        said = ""
        for line in run.stderr:
            said += line
            if "runner: " in line:  # its step thread about to start
                break
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == -signal.SIGINT, said + err  # ended by the signal, for a shell
    assert err.strip().endswith("gpt2serve: interrupted") and "Traceback" not in err, err
    assert out == ""


def test_help_says_each_default_once_and_never_the_api_key():
    """serve's --help printed $GPT2SERVE_API_KEY's value as --api_key's default, and the
    defaults a flag's help already states a second time ("(default: None)")."""
    run = subprocess.run([sys.executable, "-m", "gpt2serve.cli", "serve", "--help"],
                         env={**os.environ, "GPT2SERVE_API_KEY": "a-secret-key"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.split())
    assert "a-secret-key" not in text
    assert "(default: None)" not in text and "frozenset" not in text
    assert "--http_port HTTP_PORT REST: V1, V2, OpenAI, /metrics, the playground (default: " \
        "8080)" in text
    assert "default: the embedded demo model" in text
    assert "the embedded demo model (default" not in text  # said once


def test_serve_refuses_flag_values_that_cannot_serve_before_it_loads():
    """Found by a fuzz pass: each of these started a server whose every request failed
    (413 for any body, "at most 0 per request"), or ended in a traceback (OverflowError,
    a ValueError from the engine's config), or took nan for a timeout."""
    for flag, value, said in [
            ("--max_body_bytes", "-1", "argument --max_body_bytes"),
            ("--max_instances", "0", "argument --max_instances"),
            ("--load_timeout", "nan", "argument --load_timeout"),
            ("--shutdown_grace", "-5", "argument --shutdown_grace"),
            ("--http_port", "99999", "argument --http_port"),
            ("--memory_budget", "inf", "argument --memory_budget"),
            ("--memory_budget", "0.5", "argument --memory_budget"),
            ("--kv_cache_memory", "1e300GiB", "argument --kv_cache_memory"),
            ("--kv_cache_memory", "0.1", "argument --kv_cache_memory"),
            ("--request_timeout", "nan", "request_timeout a positive number"),
            ("--block_size", "0", "block_size must be at least 1"),
            ("--max_batch_size", "1000000000000", "max_batch_size must be at most 4096"),
            # kserve.ModelServer's, which gpt2serve sets: --workers 4 served from one process
            ("--workers", "4", "--workers is set by gpt2serve: gpt2serve serves from one"),
            ("--grpc_max_receive_message_length", "100", "use --max_body_bytes"),
            ("--grpc_max_send_message_length", "100", "a response is not bounded"),
            # kserve's default, given: replaced by --max_body_bytes all the same
            ("--grpc_max_receive_message_length", "8388608", "use --max_body_bytes"),
            ("--grpc_max_send_message", "8388608", "a response is not bounded"),  # abbreviated
            ("--no_such_flag", "1", "unrecognized arguments: --no_such_flag 1")]:
        run = subprocess.run([sys.executable, "-m", "gpt2serve.cli", "serve", flag, value],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and said in run.stderr, (flag, value, run.stderr)
        assert "Traceback" not in run.stderr, (flag, value, run.stderr)


def test_threads_below_one_and_a_bad_kernels_variable_are_one_line_errors():
    """generate and kernels raised torch's traceback for --threads -1 (and generate took 0 for
    every core), and an unknown $GPT2SERVE_KERNELS gave a traceback that did not name it."""
    for command in (["generate", "x"], ["kernels"], ["serve", "--http_port", "0"]):
        for threads in ("0", "-1"):
            run = subprocess.run([sys.executable, "-m", "gpt2serve.cli", *command,
                                  "--threads", threads],
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == 2, run.stderr
            assert f"--threads must be at least 1, got {threads}" in run.stderr, run.stderr
        run = subprocess.run([sys.executable, "-m", "gpt2serve.cli", *command],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "GPT2SERVE_KERNELS": "fast"})
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert "$GPT2SERVE_KERNELS is 'fast': one of auto, ours, torch" in run.stderr


def cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2serve.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_an_empty_path_is_refused_not_taken_for_the_current_folder(tmp_path):
    """`--out "$OUT"` with OUT unset wrote a converted or downloaded model into the current
    folder; an empty --model_dir served the demo model."""
    for args in (["convert", str(checkpoint.DEMO_MODEL_DIR), "--out", ""],
                 ["convert", " ", "--out", str(tmp_path / "out")],
                 ["download", "gpt2", "--out", ""],
                 ["generate", "--model_dir", "", "hi"], ["kernels", "--model_dir", ""],
                 ["serve", "--model_dir", ""]):
        run = cli(*args)
        assert run.returncode == 2 and "an empty path" in run.stderr, (args, run.stderr)
    # a path the check itself cannot look at is an argument error too, not a traceback
    run = cli("download", "gpt2", "--out", str(tmp_path / ("a" * 300) / "model"))
    assert run.returncode == 2 and "File name too long" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_threads_past_the_cpus_are_a_one_line_error():
    """100,000 crashed starting its threads (a segfault); 10^20 overflowed in torch."""
    for threads in (str((os.cpu_count() or 1) + 1), "100000000000000000000"):
        run = cli("generate", "x", "--threads", threads)
        assert run.returncode == 2 and "--threads must be at most" in run.stderr, run.stderr


def test_a_port_in_use_is_said_in_one_line_before_anything_loads():
    """A taken port failed once ModelServer started: three tracebacks, exit status 1 or 3."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy, free = str(taken.getsockname()[1]), str(free_port())
        for ports, flag in (((busy, free), "--http_port"), ((free, busy), "--grpc_port")):
            run = cli("serve", "--http_port", ports[0], "--grpc_port", ports[1])
            assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
            assert f"{flag} {busy}: Address already in use" in run.stderr, run.stderr
            assert "loaded" not in run.stderr  # (before the model loads)
    run = cli("serve", "--http_port", free, "--grpc_port", free)
    assert run.returncode == 2 and f"--http_port and --grpc_port are both {free}" in run.stderr


def test_an_api_key_with_a_newline_serves_and_one_no_client_can_send_is_refused():
    """A Secret made from a file keeps the file's newline, which no header carries: every
    request got 401. Whitespace alone, or a control character, no client can send at all."""
    with running_server("--enable_grpc", "false", env={"GPT2SERVE_API_KEY": "sekrit\n"},
                        headers={"Authorization": "Bearer sekrit"}) as srv:
        r = httpx.get(f"{srv.url}/v1/models", headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 200, r.text
        assert httpx.get(f"{srv.url}/v1/models").status_code == 401
    for key, said in (("  \n", "whitespace alone"), ("a\x01b", "control character")):
        run = cli("serve", env={"GPT2SERVE_API_KEY": key})
        assert run.returncode == 2 and said in run.stderr, run.stderr


def test_generate_into_a_closed_pipe_ends_quietly_as_sigpipe_would():
    """`generate | head`: the reader gone was reported as an error, exit status 2."""
    run = subprocess.Popen([sys.executable, "-m", "gpt2serve.cli", "generate", "ROMEO:",
                            "--max-new-tokens", "4"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    run.stdout.close()  # the reader leaves before the text is written
    assert run.wait(timeout=120) == 128 + signal.SIGPIPE
    assert "error" not in run.stderr.read()
