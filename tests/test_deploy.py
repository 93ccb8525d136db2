"""Deployment, verified offline: Dockerfile lint, manifests against KServe's CRD schemas and
Kubernetes' own, a simulated pod started exactly as the ServingRuntime says, `download` against
a local Hub, `convert` of an OpenAI TensorFlow checkpoint written here."""

import http.server
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import jsonschema
import pytest
import torch
import yaml

from conftest import SHARED, ServerProcess, free_port, make_hf_model

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CRDS = SHARED / "kserve-crds"


def manifests():
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc:
                yield path.relative_to(DEPLOY), doc


def current_manifests() -> dict:
    """(kind, name) -> manifest, leaving out the legacy KFServing variant."""
    return {(d["kind"], d["metadata"]["name"]): d for p, d in manifests()
            if not d["apiVersion"].startswith("serving.kubeflow.org")}


def test_dockerfile_lints_clean():
    out = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def crd_schema(kind: str, version: str) -> dict:
    plural = {"InferenceService": "inferenceservices", "ServingRuntime": "servingruntimes",
              "ClusterServingRuntime": "clusterservingruntimes"}[kind]
    crd = yaml.safe_load((CRDS / f"serving.kserve.io_{plural}.yaml").read_text())
    return next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]
                if v["name"] == version)


KSERVE_DOCS = [(p, d) for p, d in manifests() if d["apiVersion"].startswith("serving.")]
CORE_DOCS = [(p, d) for p, d in manifests() if not d["apiVersion"].startswith("serving.")]


@pytest.mark.skipif(not CRDS.exists(), reason="../shared/data not available")
@pytest.mark.parametrize("path,doc", KSERVE_DOCS, ids=[f"{p}:{d['kind']}" for p, d in KSERVE_DOCS])
def test_kserve_resources_match_crd_schemas(path, doc):
    group, version = doc["apiVersion"].split("/")
    # The legacy KFServing API (serving.kubeflow.org) has the same v1beta1 shape as KServe's.
    jsonschema.validate(doc, crd_schema(doc["kind"], version))


@pytest.mark.parametrize("path,doc", CORE_DOCS, ids=[f"{p}:{d['kind']}" for p, d in CORE_DOCS])
def test_core_resources_validate(path, doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, "1.30", strict=True)


def test_the_manifests_fit_together():
    docs = current_manifests()
    runtime = docs[("ServingRuntime", "gpt2serve")]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    for (kind, _), d in docs.items():
        if kind == "InferenceService":
            pred = d["spec"]["predictor"]
            assert pred["model"]["runtime"] == "gpt2serve"
            assert pred["model"]["modelFormat"]["name"] in formats
            assert pred["containerConcurrency"] > 1  # continuous batching
            assert d["metadata"]["annotations"]["autoscaling.knative.dev/metric"] == "concurrency"
    pvc = docs[("PersistentVolumeClaim", "gpt2-models")]
    job = docs[("Job", "gpt2-xl-prep")]
    claim = job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == pvc["metadata"]["name"]
    uri = docs[("InferenceService", "aitextgen")]["spec"]["predictor"]["model"]["storageUri"]
    assert uri == "pvc://gpt2-models/gpt2-xl" and "/models/gpt2-xl" in job["spec"]["template"][
        "spec"]["containers"][0]["args"][0]


def test_pod_simulation(tmp_path, tiny_model):
    """Start the server with the ServingRuntime's args against a folder laid out as the storage
    initializer leaves /mnt/models, probe it where the YAML says, send sample.json."""
    docs = current_manifests()
    container = docs[("ServingRuntime", "gpt2serve")]["spec"]["containers"][0]
    isvc = docs[("InferenceService", "aitextgen")]
    name = isvc["metadata"]["name"]
    mnt = tmp_path / "mnt" / "models"
    shutil.copytree(tiny_model, mnt)
    port = free_port()
    args = [a.replace("{{.Name}}", name).replace("/mnt/models", str(mnt))
            for a in container["args"] + isvc["spec"]["predictor"]["model"]["args"]]
    # Only differences from the pod: no GPU here, and a free port instead of 8080.
    args += ["--device=cpu", "--dtype=float32", f"--http_port={port}"]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    srv = ServerProcess(*args, env=env)
    srv.port, srv.url = port, f"http://127.0.0.1:{port}"
    try:
        srv.wait_ready(model=name)
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            path = container[probe]["httpGet"]["path"]
            assert httpx.get(srv.url + path).status_code == 200, probe
        sample = (DEPLOY / "kserve" / "sample.json").read_text()
        r = httpx.post(f"{srv.url}/v1/models/{name}:predict", content=sample, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0].startswith("ROMEO:")
    finally:
        srv.stop()


# ---- download against a local Hub ----------------------------------------------------------

class FakeHub(http.server.BaseHTTPRequestHandler):
    repo: Path
    seen_auth: list

    def do_GET(self):
        self.seen_auth.append(self.headers.get("authorization"))
        files = sorted(p.name for p in self.repo.iterdir())
        if self.path == "/api/models/org/tiny/revision/main":
            body = json.dumps({"siblings": [{"rfilename": f} for f in files + ["flax_model.msgpack"]]}).encode()
        elif self.path.startswith("/org/tiny/resolve/main/") and \
                (self.repo / self.path.rsplit("/", 1)[1]).is_file():
            body = (self.repo / self.path.rsplit("/", 1)[1]).read_bytes()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_download_from_hub_file_api(tmp_path, tiny_model):
    handler = type("Hub", (FakeHub,), {"repo": tiny_model, "seen_auth": []})
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}",
               "HF_TOKEN": "secret-token"}
        out = tmp_path / "downloaded"
        run = subprocess.run([sys.executable, "-m", "gpt2serve.cli", "download", "org/tiny",
                              "--out", str(out)], env=env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        assert "model.safetensors" in run.stderr and "100.0%" in run.stderr  # progress
        assert sorted(p.name for p in out.iterdir()) == sorted(
            p.name for p in tiny_model.iterdir())  # no flax, no .part left behind
        assert set(handler.seen_auth) == {"Bearer secret-token"}
        from gpt2serve import checkpoint
        checkpoint.load(out)
        missing = subprocess.run([sys.executable, "-m", "gpt2serve.cli", "download", "org/none",
                                  "--out", str(tmp_path / "x")], env=env, capture_output=True,
                                 text=True, timeout=60)
        assert missing.returncode == 2 and "not found or not accessible" in missing.stderr
    finally:
        hub.shutdown()


# ---- OpenAI TensorFlow checkpoint -> safetensors --------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A LevelDB table block without prefix sharing, one restart point."""
    body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in entries)
    return body + struct.pack("<II", 0, 1)


def write_tf_checkpoint(prefix: Path, tensors: dict) -> None:
    """What `tf.train.Saver` writes: model.ckpt.index (a table of BundleEntryProto) and one
    data shard. Written from the format's description, independently of the reader."""
    data, entries = bytearray(), [(b"", b"\x08\x01")]  # BundleHeaderProto{num_shards: 1}
    for name in sorted(tensors):
        arr = tensors[name].astype("<f4")
        shape = b"".join(b"\x12" + _varint(len(d)) + d
                         for d in (b"\x08" + _varint(s) for s in arr.shape))
        entry = (b"\x08\x01" + b"\x12" + _varint(len(shape)) + shape
                 + b"\x20" + _varint(len(data)) + b"\x28" + _varint(arr.nbytes))
        entries.append((name.encode(), entry))
        data += arr.tobytes()
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))
    table = bytearray()

    def add_block(block: bytes) -> bytes:
        handle = _varint(len(table)) + _varint(len(block))
        table.extend(block + b"\x00" + b"\x00" * 4)  # no compression, crc (unchecked)
        return handle

    data_handle = add_block(_block(entries))
    meta_handle = add_block(_block([]))
    index_handle = add_block(_block([(entries[-1][0], data_handle)]))
    footer = (meta_handle + index_handle).ljust(40, b"\x00")
    table += footer + struct.pack("<Q", 0xDB4775248B80FB57)
    Path(f"{prefix}.index").write_bytes(bytes(table))


def test_convert_openai_tf_checkpoint_keeps_logits(tmp_path):
    from transformers import GPT2LMHeadModel

    hf_dir = make_hf_model(tmp_path / "hf", n_layer=2, n_embd=64, n_head=4, n_positions=64)
    ref = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    tf = {"model/wte": sd["transformer.wte.weight"], "model/wpe": sd["transformer.wpe.weight"],
          "model/ln_f/g": sd["transformer.ln_f.weight"], "model/ln_f/b": sd["transformer.ln_f.bias"]}
    for i in range(2):
        p = f"transformer.h.{i}."
        for sub in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            key = p + sub.replace("/", ".")
            tf[f"model/h{i}/{sub}/w"] = sd[key + ".weight"][None]  # OpenAI's [1, in, out]
            tf[f"model/h{i}/{sub}/b"] = sd[key + ".bias"]
        for ln in ("ln_1", "ln_2"):
            tf[f"model/h{i}/{ln}/g"] = sd[p + ln + ".weight"]
            tf[f"model/h{i}/{ln}/b"] = sd[p + ln + ".bias"]
    src = tmp_path / "openai"
    src.mkdir()
    write_tf_checkpoint(src / "model.ckpt", tf)
    (src / "hparams.json").write_text(json.dumps(
        {"n_vocab": ref.config.vocab_size, "n_ctx": 64, "n_embd": 64, "n_head": 4, "n_layer": 2}))
    tok = json.loads((hf_dir / "tokenizer.json").read_text())["model"]
    (src / "encoder.json").write_text(json.dumps(tok["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["merges"]]
    (src / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")

    out = tmp_path / "converted"
    run = subprocess.run([sys.executable, "-m", "gpt2serve.cli", "convert", str(src), "--out",
                          str(out), "--dtype", "float32"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    converted = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, ref(ids).logits, atol=0, rtol=0)
    from gpt2serve.tokenizer import Tokenizer
    text = "ROMEO: But soft, héllo"
    assert Tokenizer.from_dir(out).encode(text) == Tokenizer.from_dir(hf_dir).encode(text)

    half = tmp_path / "fp16"
    subprocess.run([sys.executable, "-m", "gpt2serve.cli", "convert", str(hf_dir), "--out",
                    str(half)], check=True, capture_output=True, timeout=120)
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "float16"
    small = GPT2LMHeadModel.from_pretrained(half, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, ref(ids).logits, atol=2e-2, rtol=0)
