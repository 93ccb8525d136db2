"""Deployment, verified offline: Dockerfile lint, manifests against KServe's CRD schemas and
Kubernetes' own, the points a cluster would fail on (shared storage, GPU placement, restricted
Pod Security, Knative and KEDA settings, names and images the docs use), a simulated pod started
exactly as the ServingRuntime says, `download` against a local Hub, `convert` of an OpenAI
TensorFlow checkpoint written here, and the container-limit helpers."""

import gzip
import http.server
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest
import torch
import yaml

from conftest import SHARED, ServerProcess, free_port, make_hf_model
from gpt2serve import convert
from gpt2serve.download import MARKER

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCS = (ROOT / "docs" / "deploy.md").read_text()
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


DOCS_MANIFESTS = current_manifests()
LEGACY = next(d for p, d in manifests() if d["apiVersion"].startswith("serving.kubeflow.org"))
RUNTIMES = {n: d for (k, n), d in DOCS_MANIFESTS.items() if k == "ServingRuntime"}
ISVCS = {n: d for (k, n), d in DOCS_MANIFESTS.items() if k == "InferenceService"}
TRAINED = {n: d for (k, n), d in DOCS_MANIFESTS.items() if k == "TrainedModel"}


def is_multi_model(isvc: dict) -> bool:
    """KServe's rule (IsMMSPredictor): a predictor without storageUri, storageUris or storage
    is a multi-model server, gets the model agent and takes TrainedModels."""
    model = isvc["spec"]["predictor"]["model"]
    return not ({"storageUri", "storage"} & set(model) or "storageUris" in isvc["spec"]["predictor"])


SINGLE = {n: d for n, d in ISVCS.items() if not is_multi_model(d)}
MULTI = {n: d for n, d in ISVCS.items() if is_multi_model(d)}


def runtime_of(isvc: dict) -> dict:
    return RUNTIMES[isvc["spec"]["predictor"]["model"]["runtime"]]


def serving_container(isvc: dict) -> dict:
    """The kserve-container as KServe builds it: the runtime's container with the
    InferenceService's model fields laid over it (args appended)."""
    base = runtime_of(isvc)["spec"]["containers"][0]
    model = isvc["spec"]["predictor"]["model"]
    merged = {**base, **{k: v for k, v in model.items()
                         if k not in ("modelFormat", "runtime", "storageUri", "args")}}
    merged["args"] = base.get("args", []) + model.get("args", [])
    return merged


def flag(args: list[str], name: str) -> str | None:
    """The value argparse would see last for --name=value."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return values[-1] if values else None


def quantity(q: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "m": 1e-3}
    for u, f in units.items():
        if str(q).endswith(u):
            return float(q[:-len(u)]) * f
    return float(q)


def pods() -> list[tuple[str, dict, list[dict]]]:
    """(what, pod-level spec, containers) for every pod the current manifests create."""
    out = []
    for name, isvc in ISVCS.items():
        pred = isvc["spec"]["predictor"]
        out.append((f"InferenceService {name} ({mode(isvc)})", pred, [serving_container(isvc)]))
    job = DOCS_MANIFESTS[("Job", "gpt2-prep")]["spec"]["template"]["spec"]
    out.append(("Job gpt2-prep", job, job["containers"]))
    return out


# ---- image ---------------------------------------------------------------------------------

def test_dockerfile_lints_clean():
    out = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


DOCKER_BUILDS = re.findall(r"^\$ docker build (.*?) \.$", DOCS.replace("\\\n", ""), re.M)


def built_tags() -> dict[str, str]:
    """tag -> the docker build arguments docs/deploy.md uses for it."""
    tags = {}
    for line in DOCKER_BUILDS:
        m = re.search(r"-t \$REGISTRY/gpt2serve:(\S+)", line)
        tags[m.group(1)] = line
    return tags


def test_dockerfile_variants():
    dockerfile = (ROOT / "Dockerfile").read_text()
    # No nvidia/cuda base: the torch wheels carry their CUDA libraries.
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", dockerfile, re.M).group(1)
    assert base.startswith("python:") and not re.search(r"^FROM nvidia", dockerfile, re.M | re.I)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", dockerfile, re.M)
    tags = built_tags()
    assert set(tags) == {"0.1.0", "0.1.0-cu126", "0.1.0-cpu"}
    assert "--build-arg" not in tags["0.1.0"]  # PyPI's torch: CUDA 13, sm_75 and newer
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126" in tags["0.1.0-cu126"]
    assert "REQUIRE_CUDA_ARCH=sm_70" in tags["0.1.0-cu126"]  # the build fails without V100 kernels
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in tags["0.1.0-cpu"]
    for arg in ("TORCH_INDEX_URL", "REQUIRE_CUDA_ARCH"):
        assert re.search(rf"^ARG {arg}=", dockerfile, re.M)


def test_the_image_build_check_fails_without_the_arch():
    """The Dockerfile's arch check, run with this machine's torch (CPU: empty arch list)."""
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", "")
    code = re.search(r'python3 -c "(import sys, torch;.*?)"', dockerfile).group(1)
    for required, rc in (("sm_70", 1), ("", 0)):
        run = subprocess.run([sys.executable, "-c", code.replace("${REQUIRE_CUDA_ARCH}", required)],
                             capture_output=True, text=True)
        assert run.returncode == rc, run.stderr
        assert "arch list" in run.stdout


# ---- schemas -------------------------------------------------------------------------------

# TrainedModel (serving.kserve.io/v1alpha1), written from KServe's Go type (TrainedModelSpec:
# all three model fields required, memory a Kubernetes quantity) for as long as its CRD is not
# among ../shared/data/kserve-crds; the CRD is used instead once it is there. Unknown fields
# are refused here, where the API server would drop them without a word.
_QUANTITY = r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
TRAINEDMODEL_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1alpha1"},
        "kind": {"const": "TrainedModel"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "required": ["inferenceService", "model"],
            "additionalProperties": False,
            "properties": {
                "inferenceService": {"type": "string"},
                "model": {
                    "type": "object", "required": ["storageUri", "framework", "memory"],
                    "additionalProperties": False,
                    "properties": {"storageUri": {"type": "string"},
                                   "framework": {"type": "string"},
                                   "memory": {"type": ["string", "integer"],
                                              "pattern": _QUANTITY}}}}}}}


def crd_schema(kind: str, version: str) -> dict:
    plural = {"InferenceService": "inferenceservices", "ServingRuntime": "servingruntimes",
              "ClusterServingRuntime": "clusterservingruntimes",
              "TrainedModel": "trainedmodels"}[kind]
    path = CRDS / f"serving.kserve.io_{plural}.yaml"
    if kind == "TrainedModel" and not path.exists():
        return TRAINEDMODEL_SCHEMA
    crd = yaml.safe_load(path.read_text())
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


def test_serving_pods_validate_as_kubernetes_pods():
    """The pods KServe will build, checked against Kubernetes' Pod schema (the CRDs leave
    some container fields loose)."""
    import kubernetes_validate

    for what, spec, containers in pods():
        pod_spec = {k: v for k, v in spec.items() if k in (
            "securityContext", "serviceAccountName", "imagePullSecrets", "tolerations",
            "affinity", "restartPolicy", "volumes")}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
               "spec": {**pod_spec, "containers": containers}}
        kubernetes_validate.validate(pod, "1.30", strict=True)


# ---- how the pieces fit --------------------------------------------------------------------

def test_the_manifests_fit_together():
    pvc = DOCS_MANIFESTS[("PersistentVolumeClaim", "gpt2-models")]
    job = DOCS_MANIFESTS[("Job", "gpt2-prep")]["spec"]["template"]["spec"]
    assert job["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    mount = job["containers"][0]["volumeMounts"][0]["mountPath"]
    script = job["containers"][0]["args"][0]
    for name, isvc in ISVCS.items():
        model = isvc["spec"]["predictor"]["model"]
        assert model["modelFormat"]["name"] in {
            f["name"] for f in runtime_of(isvc)["spec"]["supportedModelFormats"]}
        uri = model.get("storageUri", "")
        if uri.startswith("pvc://"):
            claim, folder = uri[len("pvc://"):].split("/", 1)
            assert claim == pvc["metadata"]["name"], name
            assert f"--out {mount}/{folder} " in script, f"the Job does not write {uri}"
    # one runtime answers a bare `modelFormat: gpt2`, so KServe never has to choose
    assert sum(f.get("autoSelect", False) for r in RUNTIMES.values()
               for f in r["spec"]["supportedModelFormats"]) == 1


def test_model_storage_is_shared_across_nodes():
    pvc = DOCS_MANIFESTS[("PersistentVolumeClaim", "gpt2-models")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # The one-node alternative is documented where the volume is made.
    assert "ReadWriteOnce with all replicas on one node" in DOCS


def test_gpu_placement():
    for name, rt in RUNTIMES.items():
        spec, res = rt["spec"], rt["spec"]["containers"][0]["resources"]
        assert "nodeSelector" not in spec  # a GPU Operator label would leave pods Pending elsewhere
        if "nvidia.com/gpu" in res["limits"]:
            assert {"key": "nvidia.com/gpu", "operator": "Exists",
                    "effect": "NoSchedule"} in spec["tolerations"], name
    for isvc in ISVCS.values():
        assert "nodeSelector" not in isvc["spec"]["predictor"]
    v100 = RUNTIMES["gpt2serve-v100"]["spec"]
    assert v100["containers"][0]["image"].endswith(":0.1.0-cu126")
    terms = v100["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    values = [v for t in terms for e in t["matchExpressions"] for v in e["values"]]
    assert values and all("V100" in v for v in values)
    # CUDA 13 wheels start at sm_75: the default runtime must not be pinned to V100s.
    assert RUNTIMES["gpt2serve"]["spec"]["containers"][0]["image"].endswith(":0.1.0")
    assert "affinity" not in RUNTIMES["gpt2serve"]["spec"]


def test_restricted_pod_security_everywhere():
    """The restricted Pod Security Standard's container rules, on every pod incl. the Job."""
    for what, spec, containers in pods():
        pod_sc = spec.get("securityContext", {})
        for c in containers:
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, what
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, what
            assert sc.get("allowPrivilegeEscalation") is False, what
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), what
            assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, what
            assert not sc.get("privileged", False), what
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), what
        # A container KServe injects (the agent) inherits the pod-level fields, so a
        # Standard-mode pod sets them too. Knative refuses a pod-level security context
        # unless its kubernetes.podspec-securitycontext flag is on (off by default), and its
        # queue-proxy carries its own restricted one: a Knative pod sets none.
        if what.startswith("InferenceService"):
            if what.endswith("(Knative)"):
                assert not pod_sc, what
            else:
                assert pod_sc.get("runAsNonRoot") is True and \
                    pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", what
        assert not any("hostPath" in v for v in spec.get("volumes", [])), what


def test_api_key_comes_from_a_secret(monkeypatch):
    containers = [rt["spec"]["containers"][0] for rt in RUNTIMES.values()]
    containers += LEGACY["spec"]["predictor"]["containers"]
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        ref = env["GPT2SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("gpt2serve-api-key", "api-key")
        assert not ref.get("optional", False)  # a missing Secret must not mean an open server
        assert not any(a.startswith("--api_key") for a in c["args"])  # never in the pod spec
    assert "kubectl create secret generic gpt2serve-api-key --from-literal=api-key=" in DOCS
    # ... and the server reads that variable.
    from gpt2serve.cli import build_parser

    monkeypatch.setenv("GPT2SERVE_API_KEY", "k3y")
    assert build_parser().parse_args(["serve"]).api_key == "k3y"


def test_s3_copy_has_ephemeral_storage():
    s3 = [i for i in SINGLE.values() if i["spec"]["predictor"]["model"]["storageUri"].startswith("s3://")]
    assert s3
    for isvc in s3:
        res = serving_container(isvc)["resources"]
        # fp16 gpt2-xl is 3.2 GB on disk; the copy goes to an emptyDir on the node
        assert quantity(res["requests"]["ephemeral-storage"]) >= 4 * 2**30
        assert quantity(res["limits"]["ephemeral-storage"]) >= quantity(
            res["requests"]["ephemeral-storage"])


def test_cpu_node_service_runs_int8():
    # The repository runtime keeps float32: its models load while it serves (test_multi_model_*).
    cpu = [i for i in SINGLE.values() if flag(serving_container(i)["args"], "device") == "cpu"]
    assert cpu
    for isvc in cpu:
        c = serving_container(isvc)
        assert flag(c["args"], "quantize") == "int8"
        assert flag(c["args"], "threads") is None  # taken from the CPU limit (cgroup quota)
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        assert float(c["resources"]["limits"]["cpu"]).is_integer()
        assert int(isvc["spec"]["predictor"]["scaleTarget"]) == int(flag(c["args"], "max_batch_size"))


def mode(isvc: dict) -> str:
    return isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]


def test_knative_services():
    knative = [i for i in ISVCS.values() if mode(i) == "Knative"]
    assert len(knative) >= 3
    for isvc in knative:
        name, pred, ann = isvc["metadata"]["name"], isvc["spec"]["predictor"], isvc["metadata"]["annotations"]
        args = serving_container(isvc)["args"]
        deadline = ann["serving.knative.dev/progress-deadline"]
        assert deadline.endswith("s") and int(deadline[:-1]) > 600, name  # Knative's default
        assert ann["autoscaling.knative.dev/target-utilization-percentage"] == "70"
        assert ann["serving.kserve.io/enable-prometheus-scraping"] == "true"
        assert pred["scaleMetric"] == "concurrency"
        assert pred["scaleTarget"] == int(flag(args, "max_batch_size"))
        # A hard limit below what our server queues would hold requests in queue-proxy
        # before our 503 backpressure could act.
        cc = pred["containerConcurrency"]
        assert cc == 0 or cc >= int(flag(args, "max_batch_size")) + int(flag(args, "max_queue"))
        # Retention only means something on a service that scales to zero.
        retention = "autoscaling.knative.dev/scale-to-zero-pod-retention-period" in ann
        assert retention == (pred["minReplicas"] == 0), name
        assert pred["maxReplicas"] == 10
        assert pred["minReplicas"] in (0, 3), name
    assert sum(i["spec"]["predictor"]["minReplicas"] == 3 for i in knative) >= 2
    # Knative refuses a pod spec's tolerations and affinity unless its config-features say
    # so (both off by default): the docs enable the flag of each field a Knative pod sets.
    for field in ("tolerations", "affinity"):
        if any(field in runtime_of(i)["spec"] or field in i["spec"]["predictor"]
               for i in knative):
            assert f'"kubernetes.podspec-{field}": "enabled"' in DOCS, field


def test_standard_mode_scales_with_keda_on_our_metrics():
    from gpt2serve import metrics

    std = [i for i in SINGLE.values() if mode(i) == "Standard"]
    assert len(std) == 1
    isvc = std[0]
    name, pred, ann = isvc["metadata"]["name"], isvc["spec"]["predictor"], isvc["metadata"]["annotations"]
    assert ann["serving.kserve.io/autoscalerClass"] == "keda"
    assert not any(k.startswith(("autoscaling.knative.dev", "serving.knative.dev")) for k in ann)
    assert "containerConcurrency" not in pred and "scaleMetric" not in pred
    assert (pred["minReplicas"], pred["maxReplicas"]) == (3, 10)
    (metric,) = pred["autoScaling"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["metric"]["backend"] == "prometheus"
    query = metric["external"]["metric"]["query"]
    for gauge in (metrics.RUNNING, metrics.QUEUE_DEPTH):  # names the server really exports
        assert f"{gauge._name}{{" in query
    # Standard-mode pods are named <isvc>-predictor-<hash>
    assert set(re.findall(r'pod=~"([^"]+)"', query)) == {f"{name}-predictor-.*"}
    threshold = int(metric["external"]["target"]["value"])
    assert 0 < threshold <= int(flag(serving_container(isvc)["args"], "max_batch_size"))
    # Scraping points at our container, not at queue-proxy's port (none in Standard mode).
    port = serving_container(isvc)["ports"][0]["containerPort"]
    assert ann["serving.kserve.io/enable-prometheus-scraping"] == "false"
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"]) == ("true", str(port))


def test_standard_mode_pods_serve_until_the_proxies_let_go_then_drain_within_their_grace():
    """Standard mode has no queue-proxy: a stopping pod must keep serving while the proxies
    learn it left the endpoints (a preStop sleep), then drain in what is left of its grace
    period. Knative refuses a container's `lifecycle` (queue-proxy drains there)."""
    from gpt2serve.cli import build_parser
    from gpt2serve.server.shutdown import WRITE_OUT_SECONDS

    standard = [i for i in ISVCS.values() if mode(i) == "Standard"]
    assert len(standard) == 2
    for isvc in standard:
        container = serving_container(isvc)
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2
        serve = build_parser().parse_args(["serve", *container["args"]])
        needed = float(command[1]) + serve.shutdown_grace + WRITE_OUT_SECONDS
        assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] > needed
    for isvc in ISVCS.values():
        if mode(isvc) == "Knative":
            assert "lifecycle" not in serving_container(isvc)


def test_probes_are_what_knative_accepts():
    for rt in RUNTIMES.values():
        c = rt["spec"]["containers"][0]
        port = c["ports"][0]["containerPort"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["httpGet"]["port"] == port  # Knative >= 1.1 accepts only this port
    assert "Knative Serving 1.15" in DOCS  # the startupProbe's minimum, named


def test_legacy_manifest_is_what_knative_of_its_era_accepts():
    pred = LEGACY["spec"]["predictor"]
    (c,) = pred["containers"]
    assert "startupProbe" not in c
    for probe in ("readinessProbe", "livenessProbe"):
        assert "port" not in c.get(probe, {}).get("httpGet", {}), probe
    assert set(c["securityContext"]) <= {"runAsUser", "runAsGroup"}
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert (pred["minReplicas"], pred["maxReplicas"]) == (3, 10)
    terms = pred["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["values"] == ["Tesla_V100"]
    assert c["image"].endswith(":0.1.0-cu126")  # V100 kernels
    assert flag(c["args"], "model_name") == LEGACY["metadata"]["name"]
    assert pred["imagePullSecrets"] == [{"name": "registry-credentials"}]


# ---- many models in one service: KServe's multi-model serving -------------------------------

AGENT_PROTOCOLS = ("s3://", "gs://", "https://", "http://")  # what KServe's model agent pulls
AGENT_PORT = 8080  # the agent posts load and unload to localhost:8080, whatever the runtime says


def budget_of(isvc: dict) -> int:
    from gpt2serve.engine.kv_cache import parse_size

    return parse_size(flag(serving_container(isvc)["args"], "memory_budget"))


def test_multi_model_service_is_what_kserve_serves_trained_models_on():
    assert MULTI
    for name, isvc in MULTI.items():
        pred, ann = isvc["spec"]["predictor"], isvc["metadata"]["annotations"]
        runtime, c = runtime_of(isvc), serving_container(isvc)
        args = c["args"]
        # A repository at the agent's emptyDir, each folder served under its own name,
        # on the port the agent calls.
        assert flag(args, "model_dir") == "/mnt/models", name
        assert flag(args, "model_name") is None, name
        assert flag(args, "http_port") == str(AGENT_PORT) == str(c["ports"][0]["containerPort"])
        # Loaded by the agent, or by a first request after a container restart.
        assert flag(args, "load_models") == "none", name
        # `multiModel: true` marks ModelMesh runtimes (its gRPC model-runtime API, which we do
        # not serve): KServe's own multi-model serving does not need it.
        assert not runtime["spec"].get("multiModel", False), name
        # The budget leaves at least 1 GiB under the container's limit for what it does not
        # count (interpreter, torch, tokenizers, activations).
        limit = quantity(c["resources"]["limits"]["memory"])
        assert budget_of(isvc) + 2**30 <= limit, name
        assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"]
        # KServe checks TrainedModels' memory against the limit on the InferenceService's own
        # model spec (without one, against KServe's default), not against the runtime's.
        own = pred["model"]["resources"]
        assert quantity(own["limits"]["memory"]) == limit, name
        # The agent's copies are ephemeral storage; a TrainedModel's files are no larger than
        # its memory, so a limit of at least the memory limit holds all that KServe admits.
        eph = quantity(own["limits"]["ephemeral-storage"])
        assert quantity(own["requests"]["ephemeral-storage"]) <= eph and eph >= limit, name
        # Standard mode, a fixed number of replicas, our metrics scraped on our port.
        assert mode(isvc) == "Standard" and ann["serving.kserve.io/autoscalerClass"] == "none"
        assert pred["minReplicas"] == pred["maxReplicas"] >= 1
        assert ann["serving.kserve.io/enable-prometheus-scraping"] == "false"
        assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"]) == ("true", str(AGENT_PORT))
        # The agent downloads with the predictor's service account.
        account = DOCS_MANIFESTS[("ServiceAccount", pred["serviceAccountName"])]
        assert account["secrets"], name
        # whose S3 client has no default region: it reads AWS_DEFAULT_REGION, which KServe
        # sets from the Secret's s3-region annotation alone
        for ref in account["secrets"]:
            secret = DOCS_MANIFESTS[("Secret", ref["name"])]["metadata"]["annotations"]
            assert secret.get("serving.kserve.io/s3-region"), ref


def test_trained_models_fit_their_service():
    assert TRAINED
    for name, tm in TRAINED.items():
        spec, model = tm["spec"], tm["spec"]["model"]
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", name)  # KServe's webhook refuses other names
        # On a single-model service a TrainedModel stays not Ready (IsNotMMSPredictor).
        isvc = MULTI[spec["inferenceService"]]
        assert model["storageUri"].startswith(AGENT_PROTOCOLS), name  # pvc:// is not one
        # The agent lists the S3/GCS prefix: without the slash, gpt2-x would also take gpt2-x-v2/.
        assert model["storageUri"].endswith("/"), name
        assert model["framework"] == isvc["spec"]["predictor"]["model"]["modelFormat"]["name"]
        # A fine-tuned 124M in float32: the memory declared covers its weights (its file), and
        # one model fits the budget.
        assert GPT2_SIZES["gpt2"][2] * 4 <= quantity(model["memory"]) < budget_of(isvc), name
    for svc, isvc in MULTI.items():
        declared = sum(quantity(tm["spec"]["model"]["memory"]) for tm in TRAINED.values()
                       if tm["spec"]["inferenceService"] == svc)
        # Past the limit, KServe leaves a TrainedModel not Ready (MemoryResourceNotAvailable).
        assert declared <= quantity(isvc["spec"]["predictor"]["model"]["resources"]["limits"]["memory"])


def test_repository_sizing_note_matches_the_runtime():
    (isvc,) = MULTI.values()
    from gpt2serve.engine.kv_cache import parse_size

    args = serving_container(isvc)["args"]
    budget, kv = budget_of(isvc), parse_size(flag(args, "kv_cache_memory"))
    limit = quantity(isvc["spec"]["predictor"]["model"]["resources"]["limits"]["memory"])
    (memory,) = {quantity(tm["spec"]["model"]["memory"]) for tm in TRAINED.values()}
    layers, embd, params = GPT2_SIZES["gpt2"]
    weights, block = params * 4, 2 * layers * embd * 4 * 16  # fp32, blocks of 16 tokens
    blocks, loaded = kv // block, params * 4 + kv
    note = " ".join(DOCS[DOCS.index("### Sizing a repository"):DOCS.index("## Autoscaling")].split())
    assert f"| weights, fp32 | {weights / 2**20:.1f} MiB " in note
    assert (f"| {kv / 2**20:.0f} MiB: {blocks} blocks of 16 tokens = {blocks * 16:,} tokens, "
            f"{blocks * 16 / 1024:.1f} full-context sequences |") in note
    assert f"| together | {loaded / 2**20:.1f} MiB |" in note
    assert (f"holds {budget // loaded} such models loaded at once ({budget / 2**30:.0f} GiB / "
            f"{loaded / 2**20:.1f} MiB = {budget / loaded:.1f})") in note
    assert f"The container's limit, {limit / 2**30:.0f}Gi, is the budget plus " \
           f"{(limit - budget) / 2**30:.0f} GiB" in note
    assert f"so {limit // memory:.0f} fit under {limit / 2**30:.0f}Gi" in note
    assert f"cap the service at {limit // loaded:.0f} TrainedModels" in note
    full = 2 * layers * 1024 * embd * 4  # the default cache: --max_batch_size full sequences
    batch = int(flag(args, "max_batch_size"))
    assert f"{batch * full / 1e9:.1f} GB for {batch}) would hold {20 * batch * full / 1e9:.0f} GB" \
        in note


def _supports_repositories() -> bool:
    import contextlib
    import io

    from gpt2serve.cli import build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(["serve", "--memory_budget=1GiB", "--load_models=none"])
    except SystemExit:
        return False
    return True


@pytest.mark.skipif(not _supports_repositories(), reason="the server has no repository flags yet")
def test_multi_model_pod_simulation(tmp_path):
    """The multi-model pod as KServe runs it: our container with the runtime's args and an
    empty /mnt/models, Ready with no model; then the agent's calls exactly as it makes them
    (pkg/agent/puller.go): the folder downloaded with a SUCCESS.<sha256> file, POST load with
    the body {} and no key; on delete, the folder removed first, then POST unload."""
    isvc = next(iter(MULTI.values()))
    container = serving_container(isvc)
    mnt = tmp_path / "mnt" / "models"
    mnt.mkdir(parents=True)
    port = free_port()
    args = [a.replace("/mnt/models", str(mnt)) for a in container["args"]]
    args = [a for a in args if not a.startswith(("--memory_budget=", "--kv_cache_memory="))]
    args += ["--memory_budget=1GiB", "--kv_cache_memory=8MiB", f"--http_port={port}"]
    env = {e["name"]: e.get("value", "test-key") for e in container["env"]}
    srv = ServerProcess(*args, env=env)
    srv.port, srv.url = port, f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer test-key"}
    name = next(iter(TRAINED))
    try:
        ready = container["readinessProbe"]["httpGet"]["path"]
        for _ in range(600):
            assert srv.proc.poll() is None, "the server exited with an empty repository"
            try:
                if httpx.get(srv.url + ready, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("not Ready with an empty repository: KServe would place no TrainedModel")
        # The agent's download, then its load.
        make_hf_model(mnt / name)
        (mnt / name / f"SUCCESS.{'0' * 64}").write_text(json.dumps(
            TRAINED[name]["spec"]["model"]))
        agent = f"http://localhost:{port}/v2/repository/models/{name}"
        r = httpx.post(f"{agent}/load", content="{}",
                       headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 200, r.text
        index = httpx.post(f"{srv.url}/v2/repository/index", headers=auth, timeout=10).json()
        assert {"name": name, "state": "READY"}.items() <= next(
            m for m in index if m["name"] == name).items()
        # The agent's own proxy forwards from 127.0.0.1 too, with X-Forwarded-For: the key it is.
        proxied = httpx.post(f"{agent}/load", content="{}", timeout=60,
                             headers={"content-type": "application/json",
                                      "x-forwarded-for": "10.0.0.7"})
        assert proxied.status_code == 401
        sample = (DEPLOY / "kserve" / "sample.json").read_text()
        r = httpx.post(f"{srv.url}/v1/models/{name}:predict", content=sample, headers=auth,
                       timeout=60)
        assert r.status_code == 200 and r.json()["predictions"][0].startswith("ROMEO:"), r.text
        # kubectl delete trainedmodel: the folder goes first, then the unload.
        shutil.rmtree(mnt / name)
        r = httpx.post(f"{agent}/unload", content="{}",
                       headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{srv.url}/v1/models/{name}:predict", content=sample, headers=auth,
                       timeout=60)
        assert r.status_code == 404, r.text
        index = httpx.post(f"{srv.url}/v2/repository/index", headers=auth, timeout=10).json()
        assert name not in {m["name"] for m in index}
    finally:
        srv.stop()


# ---- the docs, as written ------------------------------------------------------------------

def images() -> list[str]:
    found = []
    for _, d in manifests():
        text = yaml.safe_dump(d)
        found += re.findall(r"image: (\S+)", text)
    return found


def test_images_use_the_docs_registry_variable():
    assert len(re.findall(r"^\$ export REGISTRY=", DOCS, re.M)) == 1
    tags = built_tags()
    refs = images()
    assert refs
    for ref in refs:
        repo, tag = ref.rsplit(":", 1)
        assert repo == "REGISTRY/gpt2serve" and tag in tags, ref
    assert "ghcr.io/example" not in DOCS
    # Every file with an image goes through the one substitution when applied.
    for path in DEPLOY.rglob("*.yaml"):
        rel = path.relative_to(ROOT).as_posix()
        lines = [ln for ln in DOCS.splitlines() if rel in ln and "kubectl apply" in ln]
        if "REGISTRY/" in path.read_text():
            assert lines, f"docs never apply {rel}"
            for ln in lines:
                assert f'sed "s|REGISTRY/|$REGISTRY/|" {rel} | kubectl apply -f -' in ln, ln
    for tag in tags:
        assert f"docker push $REGISTRY/gpt2serve:{tag}" in DOCS


def test_docs_call_the_services_by_their_names():
    names = set(ISVCS) | {LEGACY["metadata"]["name"]} | set(TRAINED)  # TrainedModels: served names
    called = re.findall(r"/v1/models/([\w-]+):predict", DOCS)
    called += re.findall(r'"model": "([\w-]+)"', DOCS)
    called += re.findall(r"inferenceservice[ /]([\w-]+)", DOCS)
    called += re.findall(r"Host: ([\w-]+)\.default\.", DOCS)
    called += re.findall(r"svc/([\w-]+)-predictor", DOCS)
    assert called and set(called) <= names, set(called) - names
    assert set(ISVCS) | set(TRAINED) <= set(called)  # each service and model has its own call
    for isvc in SINGLE.values():  # the served model name is the InferenceService's
        assert "--model_name={{.Name}}" in runtime_of(isvc)["spec"]["containers"][0]["args"]


def test_docs_name_the_minimum_versions():
    for needle in ("KServe 0.16", "Knative Serving 1.15", "KEDA", "driver >= 580",
                   "driver >= 525", "70%"):
        assert needle in DOCS, needle
    # PVC models are mounted, not copied
    assert "mounts the PVC read-only" in DOCS


# Parameters of the GPT-2 family (HF configs): layers, n_embd, parameter count.
GPT2_SIZES = {"gpt2": (12, 768, 124_439_808), "gpt2-medium": (24, 1024, 354_823_168),
              "gpt2-large": (36, 1280, 774_030_080), "gpt2-xl": (48, 1600, 1_557_611_200)}


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def test_sizing_table_matches_the_formula():
    """Each row: weights per dtype, and the KV cache of one full-context sequence:
    2 (k, v) x layers x 1024 positions x n_embd x bytes per value. Quantized (CPU), the
    layers' matmuls take a byte (int8) or 4.5 bits (int4) a weight, the tied embedding and
    head a byte, the position embeddings, norms and biases 4 bytes."""
    vocab, positions = 50257, 1024
    for model, (layers, embd, params) in GPT2_SIZES.items():
        row = re.search(rf"^\| `{model}` \|(.*)$", DOCS, re.M)
        assert row, model
        cells = [c.strip() for c in row.group(1).split("|")]
        assert cells[0] == f"{params / 1e6:.0f}M", (model, cells)
        assert cells[1] == gb(params * 4) and cells[2] == gb(params * 2), (model, cells)
        matmul = 12 * layers * embd * embd
        rest = vocab * embd + 4 * (positions * embd + 13 * layers * embd + 2 * embd)
        for bits, col in ((8, 3), (4.5, 4)):
            assert cells[col].startswith(f"{(matmul * bits / 8 + rest) / 1e9:.2f} GB"), (model, cells)
        for nbytes, col in ((2, 5), (4, 6)):
            assert cells[col] == f"{2 * layers * 1024 * embd * nbytes / 1e6:.1f} MB", (model, cells)


# ---- the pod, simulated --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["aitextgen", "aitextgen-cpu"])
def test_pod_simulation(tmp_path, tiny_model, name):
    """Start the server with exactly the args and env KServe gives the container, against a
    folder laid out as /mnt/models, the API key from the 'Secret'; probe it where the YAML says,
    scrape what KEDA's query reads, send sample.json with and without the key."""
    isvc = ISVCS[name]
    container = serving_container(isvc)
    mnt = tmp_path / "mnt" / "models"
    shutil.copytree(tiny_model, mnt)
    port = free_port()
    args = [a.replace("{{.Name}}", name).replace("/mnt/models", str(mnt))
            for a in container["args"]]
    if flag(args, "device") == "cuda":  # only difference from the pod: no GPU here
        args += ["--device=cpu", "--dtype=float32"]
    args += [f"--http_port={port}"]  # and a free port instead of 8080
    env = {e["name"]: e.get("value", "test-key") for e in container["env"]}  # valueFrom: the Secret
    srv = ServerProcess(*args, env=env)
    srv.port, srv.url = port, f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer test-key"}
    try:
        srv.wait_ready(model=name, headers=auth)
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            path = container[probe]["httpGet"]["path"]
            assert httpx.get(srv.url + path).status_code == 200, probe  # no key: kubelet has none
        scrape = httpx.get(srv.url + "/metrics")
        assert scrape.status_code == 200
        assert "gpt2serve_running_sequences" in scrape.text and "gpt2serve_queue_depth" in scrape.text
        sample = (DEPLOY / "kserve" / "sample.json").read_text()
        url = f"{srv.url}/v1/models/{name}:predict"
        assert httpx.post(url, content=sample, timeout=60).status_code == 401
        r = httpx.post(url, content=sample, timeout=60, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0].startswith("ROMEO:")
    finally:
        srv.stop()


# ---- download against a local Hub ----------------------------------------------------------

class FakeHub(http.server.BaseHTTPRequestHandler):
    """The Hub's file API for one repository, org/tiny: `refs` name commits (a branch, a tag,
    refs/pr/1), `commits` hold each one's files; files are served by commit only."""
    commits: dict[str, Path]
    refs: dict[str, str]
    seen_auth: list
    seen_encoding: list
    seen_paths: list
    sizes_listed = True  # the listing gives each file's size when asked (`?blobs=true`)
    content_length = True  # an answer says its length; without, its end is the connection's
    padding: dict[str, bytes] = {}  # bytes sent after a file's own, by file name
    gzipped = False  # files sent gzipped, whatever the client accepts

    def do_GET(self):
        self.seen_paths.append(self.path)
        self.seen_auth.append(self.headers.get("authorization"))
        self.seen_encoding.append(self.headers.get("accept-encoding"))
        path, _, query = self.path.partition("?")
        listing = re.fullmatch(r"/api/models/org/tiny/revision/([^/]+)", path)
        resolve = re.fullmatch(r"/org/tiny/resolve/([0-9a-f]{40})/([^/]+)", path)
        if listing:
            rev = urllib.parse.unquote(listing.group(1))
            sha = self.refs.get(rev, rev if rev in self.commits else None)
            if sha is None:
                self.send_error(404)
                return
            files = sorted(self.commits[sha].iterdir()) + [Path("flax_model.msgpack")]
            sized = self.sizes_listed and query == "blobs=true"
            body = json.dumps({"sha": sha, "siblings": [
                {"rfilename": f.name, **({"size": f.stat().st_size if f.exists() else 9}
                                         if sized else {})} for f in files]}).encode()
        elif resolve and resolve.group(1) in self.commits and (
                self.commits[resolve.group(1)] / resolve.group(2)).is_file():
            body = (self.commits[resolve.group(1)] / resolve.group(2)).read_bytes()
            body += self.padding.get(resolve.group(2), b"")
        else:
            self.send_error(404)
            return
        self.send_response(200)
        if resolve and self.gzipped:
            body = gzip.compress(body)
            self.send_header("content-encoding", "gzip")
        if self.content_length:
            self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _cli_download(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2serve.cli", "download", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_download_from_hub_file_api(tmp_path, tiny_model):
    """The files of one commit, pinned when the download starts: a resumed download after
    the branch moved finishes the commit it began (it mixed two), and one whose marker names
    no commit is not finished at all; a revision with a slash is quoted; a failed listing
    leaves the folder free; errors are one line and exit 2."""
    moved = make_hf_model(tmp_path / "moved", seed=9)
    notok = tmp_path / "notok"
    shutil.copytree(tiny_model, notok)
    (notok / "tokenizer.json").unlink()
    ait = make_hf_model(tmp_path / "ait", tokenizer_file="aitextgen.tokenizer.json")
    first, second, third, fourth = (f"{i}" * 40 for i in "abcd")
    handler = type("Hub", (FakeHub,), {
        "commits": {first: tiny_model, second: moved, third: notok, fourth: ait},
        "refs": {"main": first, "v2": second, "refs/pr/1": second, "notok": third,
                 "ait": fourth},
        "seen_auth": [], "seen_encoding": [], "seen_paths": []})
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}",
               "HF_TOKEN": "secret-token"}
        out = tmp_path / "downloaded"
        run = _cli_download(env, "org/tiny", "--out", str(out))
        assert run.returncode == 0, run.stderr
        assert "model.safetensors" in run.stderr and "100.0%" in run.stderr  # progress
        assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == sorted(
            p.name for p in tiny_model.iterdir())  # no flax, no .part left behind
        assert json.loads((out / MARKER).read_text())["sha"] == first
        assert set(handler.seen_auth) == {"Bearer secret-token"}
        # sizes are checked against content-length: a compressed answer would fail them
        assert set(handler.seen_encoding) == {"identity"}
        from gpt2serve import checkpoint
        checkpoint.load(out)
        missing = _cli_download(env, "org/none", "--out", str(tmp_path / "x"))
        assert missing.returncode == 2 and "not found or not accessible" in missing.stderr
        # A second run resumes its own download, at its commit though main has moved on
        (out / "model.safetensors").unlink()
        handler.refs["main"] = second
        again = _cli_download(env, "org/tiny", "--out", str(out))
        assert again.returncode == 0, again.stderr
        assert (out / "model.safetensors").read_bytes() == (
            tiny_model / "model.safetensors").read_bytes()
        # another repository or revision into the same folder is refused (its files were
        # kept as the new model's: the wrong weights loaded)
        other = _cli_download(env, "org/tiny", "--revision", "v2", "--out", str(out))
        assert other.returncode == 2 and "holds another download" in other.stderr
        # a marker that names no commit (written before markers did): its files may be of
        # an older one, so it is not finished at the head; with no file yet it starts afresh
        (out / MARKER).write_text(json.dumps({"repo": "org/tiny", "revision": "main"}))
        old = _cli_download(env, "org/tiny", "--out", str(out))
        assert old.returncode == 2 and "did not record its commit" in old.stderr
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        (fresh / MARKER).write_text(json.dumps({"repo": "org/tiny", "revision": "main"}))
        assert _cli_download(env, "org/tiny", "--out", str(fresh)).returncode == 0
        assert json.loads((fresh / MARKER).read_text())["sha"] == second
        assert (fresh / "model.safetensors").read_bytes() == (
            moved / "model.safetensors").read_bytes()
        (out / MARKER).unlink()
        other = _cli_download(env, "org/tiny", "--out", str(out))
        assert other.returncode == 2 and "already holds config.json" in other.stderr
        # a mistyped revision leaves nothing behind; a pull request's ref is quoted
        pr = tmp_path / "pr"
        typo = _cli_download(env, "org/tiny", "--revision", "refs/pr/2", "--out", str(pr))
        assert typo.returncode == 2 and "not found" in typo.stderr
        assert _cli_download(env, "org/tiny", "--revision", "refs/pr/1", "--out",
                             str(pr)).returncode == 0
        assert (pr / "model.safetensors").read_bytes() == (
            moved / "model.safetensors").read_bytes()
        # an aitextgen repository brings its tokenizer; one without a tokenizer is refused
        # before anything is fetched
        assert _cli_download(env, "org/tiny", "--revision", "ait", "--out",
                             str(tmp_path / "ait-dl")).returncode == 0
        checkpoint.load(tmp_path / "ait-dl")
        none = _cli_download(env, "org/tiny", "--revision", "notok", "--out",
                             str(tmp_path / "notok-dl"))
        assert none.returncode == 2 and "no tokenizer" in none.stderr
        assert not (tmp_path / "notok-dl").exists()
    finally:
        hub.shutdown()
        hub.server_close()
    # the Hub out of reach, and a name that is no repository id
    gone = _cli_download(env, "org/tiny", "--out", str(tmp_path / "gone"))
    assert gone.returncode == 2 and "ConnectError" in gone.stderr, gone.stderr
    assert "Traceback" not in gone.stderr
    bad = _cli_download(env, "../etc", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "not a Hub repository id" in bad.stderr


@pytest.fixture
def hub_of(tmp_path):
    """A running FakeHub of these commits and refs; yields (handler, environment)."""
    servers = []

    def start(commits: dict, refs: dict):
        handler = type("Hub", (FakeHub,), {"commits": commits, "refs": refs,
                                           "seen_auth": [], "seen_encoding": [], "seen_paths": []})
        hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=hub.serve_forever, daemon=True).start()
        servers.append(hub)
        return handler, {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}"}
    yield start
    for hub in servers:
        hub.shutdown()
        hub.server_close()


def test_a_second_download_into_a_folder_waits_for_the_first(tmp_path, tiny_model, hub_of):
    """Two runs into one folder took turns at one .part file: one renamed the other's
    truncated file into place, exited 0, and every later run took it for complete."""
    import fcntl
    import selectors

    _, env = hub_of({"a" * 40: tiny_model}, {"main": "a" * 40})
    out = tmp_path / "out"
    out.mkdir()
    held = os.open(out, os.O_RDONLY)  # another run writing into the folder
    fcntl.flock(held, fcntl.LOCK_EX)
    second = subprocess.Popen([sys.executable, "-m", "gpt2serve.cli", "download", "org/tiny",
                               "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(second.stderr, selectors.EVENT_READ)
            assert sel.select(timeout=120), "the second run said nothing"
            assert second.stderr.readline().strip() == f"waiting for another download into {out}"
        assert list(out.iterdir()) == [] and second.poll() is None  # nothing written: it waits
    finally:
        os.close(held)
    assert second.wait(timeout=120) == 0, second.stderr.read()
    from gpt2serve import checkpoint
    checkpoint.load(out)


def test_a_download_writes_config_json_last_and_refuses_a_file_for_a_folder(
        tmp_path, tiny_model, hub_of):
    """A repository's scan takes a folder with config.json for a model: an interrupted
    download's, weights missing, was one that failed to load. An --out under a file was
    refused only once the files came (convert's after every tensor was read)."""
    handler, env = hub_of({"a" * 40: tiny_model}, {"main": "a" * 40})
    assert _cli_download(env, "org/tiny", "--out", str(tmp_path / "out")).returncode == 0
    fetched = [p.rsplit("/", 1)[1] for p in handler.seen_paths if "/resolve/" in p]
    assert fetched[-1] == "config.json" and "model.safetensors" in fetched
    (tmp_path / "file").write_text("")
    handler.seen_paths.clear()
    for args in (["download", "org/tiny", "--out", str(tmp_path / "file" / "sub")],
                 ["convert", str(tiny_model), "--out", str(tmp_path / "file")]):
        run = subprocess.run([sys.executable, "-m", "gpt2serve.cli", *args], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stderr
        assert f"{tmp_path / 'file'} is a file, not a folder" in run.stderr, run.stderr
    assert handler.seen_paths == []  # (said before the Hub was asked anything)


def test_a_resumed_download_whose_commit_left_the_hub_says_so(tmp_path, tiny_model, hub_of):
    """A force-push took the commit a folder's download began at: the error said the
    repository was not found and that private ones need HF_TOKEN."""
    first, second = "a" * 40, "b" * 40
    handler, env = hub_of({first: tiny_model}, {"main": first})
    out = tmp_path / "out"
    assert _cli_download(env, "org/tiny", "--out", str(out)).returncode == 0
    (out / "model.safetensors").unlink()
    handler.commits = {second: make_hf_model(tmp_path / "pushed", seed=9)}
    handler.refs["main"] = second
    gone = _cli_download(env, "org/tiny", "--out", str(out))
    assert gone.returncode == 2
    assert f"began at commit {first}, which the Hub no longer has" in gone.stderr, gone.stderr
    assert "HF_TOKEN" not in gone.stderr
    shutil.rmtree(out)
    assert _cli_download(env, "org/tiny", "--out", str(out)).returncode == 0


def test_a_download_stops_at_the_size_the_listing_gives(tmp_path, tiny_model):
    """Found in the list of what was left alone: an answer without Content-Length was written
    for as long as the server sent, and a failed file's .part stayed on the disk. Now the
    listing's sizes bound each file (a file over them, or whose Content-Length disagrees, is
    refused and its .part removed), a file of neither is bounded unless it is weights, and
    progress shows a percentage from the listing."""
    from gpt2serve import checkpoint
    from gpt2serve.download import SMALL_FILE_LIMIT

    handler = type("Hub", (FakeHub,), {"commits": {"a" * 40: tiny_model},
                                       "refs": {"main": "a" * 40},
                                       "seen_auth": [], "seen_encoding": [], "seen_paths": []})
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}"}

        def download(out: str, failure: str | None = None, **hub_settings) -> str:
            hub_settings = {"sizes_listed": True, "content_length": False, "padding": {},
                            "gzipped": False, **hub_settings}
            for name, value in hub_settings.items():
                setattr(handler, name, value)
            run = _cli_download(env, "org/tiny", "--out", str(tmp_path / out))
            assert (run.returncode == 0) == (failure is None), run.stderr
            assert failure is None or failure in run.stderr, run.stderr
            assert "Traceback" not in run.stderr
            assert not list((tmp_path / out).glob("*.part"))
            return run.stderr

        assert "100.0%" in download("listed")  # sizes from the listing alone
        checkpoint.load(tmp_path / "listed")
        download("over", "sent more than", padding={"model.safetensors": b"x" * 5000})
        download("unlisted", sizes_listed=False)  # no size anywhere: weights are not bounded
        checkpoint.load(tmp_path / "unlisted")
        download("endless", f"sent more than {SMALL_FILE_LIMIT} bytes", sizes_listed=False,
                 padding={"config.json": b" " * (SMALL_FILE_LIMIT + 1)})
        download("disagree", "differs from the size the listing gives", content_length=True,
                 padding={"config.json": b" "})
        download("unlisted-lengths", sizes_listed=False, content_length=True)
        checkpoint.load(tmp_path / "unlisted-lengths")
        # compressed though identity was asked for (the Hub may, for text files):
        # Content-Length is the compressed size, and the listing's is the one to check
        download("gzip", content_length=True, gzipped=True)
        checkpoint.load(tmp_path / "gzip")
    finally:
        hub.shutdown()
        hub.server_close()


def _sharded(src: Path, folder: Path, names: tuple[str, str]) -> Path:
    """`src` with its weights in two shards under `names`, and their index."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    halves = {names[0]: keys[::2], names[1]: keys[1::2]}
    for shard, part in halves.items():
        save_file({k: state[k] for k in part}, folder / shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, part in halves.items() for k in part}}))
    return folder


def test_download_of_a_sharded_model_fetches_the_shards_its_index_names(tmp_path, tiny_model):
    """Found by a fuzz pass: every model-*.safetensors the repository listed was fetched; a
    shard name with '#' was sent as a URL fragment and the answer saved under the name; a
    symlink at a file's .part name was followed, the download written where it pointed."""
    good = _sharded(tiny_model, tmp_path / "good",
                    ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"))
    shutil.copy(good / "model-00001-of-00002.safetensors", good / "model-unrelated.safetensors")
    hostile = _sharded(tiny_model, tmp_path / "hostile",
                       ("model-#1.safetensors", "model-00002-of-00002.safetensors"))
    first, second = "a" * 40, "b" * 40
    handler = type("Hub", (FakeHub,), {"commits": {first: good, second: hostile},
                                       "refs": {"main": first, "hostile": second},
                                       "seen_auth": [], "seen_encoding": [], "seen_paths": []})
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}"}
        out, victim = tmp_path / "out", tmp_path / "victim.txt"
        out.mkdir()
        victim.write_text("precious")
        (out / "config.json.part").symlink_to(victim)
        run = _cli_download(env, "org/tiny", "--out", str(out))
        assert run.returncode == 0, run.stderr
        assert victim.read_text() == "precious"
        assert not (out / "config.json").is_symlink()
        assert sorted(p.name for p in out.glob("*.safetensors")) == [
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        from gpt2serve import checkpoint
        checkpoint.load(out)
        refused = _cli_download(env, "org/tiny", "--revision", "hostile", "--out",
                                str(tmp_path / "h"))
        assert refused.returncode == 2 and "not a safetensors index of shards" in refused.stderr
        assert "Traceback" not in refused.stderr
        into_a_file = _cli_download(env, "org/tiny", "--out", str(victim))
        assert into_a_file.returncode == 2 and "Traceback" not in into_a_file.stderr
    finally:
        hub.shutdown()
        hub.server_close()



def test_an_index_whose_shard_names_are_not_strings_is_refused(tmp_path):
    """Found by a review: a list for a shard's name raised TypeError (unhashable), which
    `gpt2serve download` printed as a traceback."""
    from gpt2serve import download

    index = tmp_path / "model.safetensors.index.json"
    for shard in (["model-00001-of-00001.safetensors"], {"a": 1}, 7, None):
        index.write_text(json.dumps({"weight_map": {"transformer.wte.weight": shard}}))
        with pytest.raises(download.DownloadError, match="not a safetensors index"):
            download.shards(index, ["model-00001-of-00001.safetensors"])

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


def write_tf_checkpoint(prefix: Path, tensors: dict, shapes: dict | None = None,
                        dtypes: dict | None = None, others: dict | None = None,
                        data_block_listed: int = 1) -> None:
    """What `tf.train.Saver` writes: model.ckpt.index (a table of BundleEntryProto) and one
    data shard. Written from the format's description, independently of the reader. `shapes`
    and `dtypes` give an entry a shape or a dtype of its own, whatever its array's; `others`
    adds entries as given, BundleEntryProto bytes by name; the index block lists the data
    block `data_block_listed` times."""
    data, entries = bytearray(), [(b"", b"\x08\x01")]  # BundleHeaderProto{num_shards: 1}
    for name in sorted(tensors):
        arr = tensors[name].astype("<f4")
        entry = tf_entry((dtypes or {}).get(name, 1), (shapes or {}).get(name, arr.shape),
                         len(data), arr.nbytes)
        entries.append((name.encode(), entry))
        data += arr.tobytes()
    entries += [(name.encode(), entry) for name, entry in (others or {}).items()]
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))
    table = bytearray()

    def add_block(block: bytes) -> bytes:
        handle = _varint(len(table)) + _varint(len(block))
        table.extend(block + b"\x00" + b"\x00" * 4)  # no compression, crc (unchecked)
        return handle

    data_handle = add_block(_block(entries))
    meta_handle = add_block(_block([]))
    index_handle = add_block(_block([(entries[-1][0], data_handle)] * data_block_listed))
    footer = (meta_handle + index_handle).ljust(40, b"\x00")
    table += footer + struct.pack("<Q", 0xDB4775248B80FB57)
    Path(f"{prefix}.index").write_bytes(bytes(table))


def tf_entry(dtype: int, shape, offset: int, size: int) -> bytes:
    """BundleEntryProto: dtype=1, shape=2 (TensorShapeProto of dims, each size=1), offset=4,
    size=5."""
    dims = b"".join(b"\x12" + _varint(len(d)) + d for d in (b"\x08" + _varint(n) for n in shape))
    return (b"\x08" + _varint(dtype) + b"\x12" + _varint(len(dims)) + dims
            + b"\x20" + _varint(offset) + b"\x28" + _varint(size))


def openai_release(tmp_path: Path):
    """OpenAI's TensorFlow release of a small HF model (returned, for reference)."""
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
    return src, hf_dir, ref


def test_convert_openai_tf_checkpoint_keeps_logits(tmp_path):
    from transformers import GPT2LMHeadModel

    src, hf_dir, ref = openai_release(tmp_path)
    out = tmp_path / "converted"
    run = subprocess.run([sys.executable, "-m", "gpt2serve.cli", "convert", str(src), "--out",
                          str(out), "--dtype", "float32"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    # progress: the bytes written, to the last
    assert re.search(r"model\.safetensors \(float32\) +100\.0% +[0-9.]+ MiB", run.stderr)
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    converted = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, ref(ids).logits, atol=0, rtol=0)
    from gpt2serve.tokenizer import Tokenizer
    text = "ROMEO: But soft, héllo"
    assert Tokenizer.from_dir(out).encode(text) == Tokenizer.from_dir(hf_dir).encode(text)

    half = tmp_path / "fp16"
    run = subprocess.run([sys.executable, "-m", "gpt2serve.cli", "convert", str(hf_dir),
                          "--out", str(half)], check=True, capture_output=True, text=True,
                         timeout=120)
    assert re.search(r"model\.safetensors \(float16\) +100\.0%", run.stderr), run.stderr
    written = json.loads((half / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "float16"
    # (the source's `dtype`, float32, was kept: transformers read fp16 weights as fp32)
    assert GPT2LMHeadModel.from_pretrained(half, dtype="auto").dtype == torch.float16
    small = GPT2LMHeadModel.from_pretrained(half, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, ref(ids).logits, atol=2e-2, rtol=0)


def _convert(src: Path, out: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2serve.cli", "convert", str(src), "--out",
                           str(out), "--dtype", "float32"], capture_output=True, text=True,
                          timeout=120, **kw)


def _data_shard(src: Path) -> Path:
    return next(src.glob("model.ckpt.data-*"))


@pytest.mark.parametrize("breakage,message", [
    (lambda src: (src / "hparams.json").write_text('{"n_vocab": 400}'),
     r"hparams.json: not OpenAI's hparams .* missing 'n_ctx'"),
    (lambda src: (src / "hparams.json").write_text("{nope"), r"hparams.json: not valid JSON"),
    (lambda src: _edit_json(src / "hparams.json", n_layer="2"),
     r"hparams.json: 'n_layer' must be an integer"),
    (lambda src: (src / "encoder.json").unlink(), r"no tokenizer found"),
    (lambda src: (src / "model.ckpt.index").write_bytes(b"\x00" * 100),
     r"model.ckpt.index: not a TensorFlow checkpoint index"),
    (lambda src: _data_shard(src).write_bytes(_data_shard(src).read_bytes()[:1000]),
     r"tensor model/.* has a size or offset that does not fit"),
    (lambda src: _data_shard(src).unlink(), r"data shard 0 \(.*\) is missing"),
    (lambda src: _edit_json(src / "hparams.json", n_embd=32),
     r"tensor model/wte has shape \[400, 64\], hparams.json implies \[400, 32\]"),
    # Found by fuzz helper 43: each raised a traceback, hung, or took gigabytes
    (lambda src: _rewrite_release(src, others={"model/x": b"\x20" + b"\xff" * 11 + b"\x01"}),
     r"model.ckpt.index: not a TensorFlow checkpoint index \(a varint longer than 10 bytes"),
    (lambda src: os.truncate(src / "model.ckpt.index", 9 << 20),
     r"model.ckpt.index: 9437184 bytes, more than the 8 MiB an index may take"),
    (lambda src: _rewrite_release(src, shapes={"model/h0/mlp/c_fc/w": (0, 64, 256)}),
     r"tensor model/h0/mlp/c_fc/w has shape \[0, 64, 256\], hparams.json implies "
     r"\[1, 64, 256\]"),
    (lambda src: _rewrite_release(src, dtypes={"model/wpe": 3}),
     r"tensor model/wpe has dtype 3, not DT_FLOAT, DT_DOUBLE or DT_HALF"),
    (lambda src: (_data_shard(src).unlink(), os.mkfifo(src / "model.ckpt.data-00000-of-00001")),
     r"data shard 0 \(model\.ckpt\.data-00000-of-00001\) is missing or not a regular file"),
    (lambda src: (src / "generation_config.json").write_text(" " * (2 << 20) + "{}"),
     r"openai/generation_config\.json: 2097154 bytes, more than the 1024 KiB"),
    (lambda src: (src / "generation_config.json").write_text('{"eos_token_id": "50256"}'),
     r"openai/generation_config\.json: 'eos_token_id' must be a token id or a list"),
    (lambda src: _edit_json(src / "hparams.json", n_vocab=300),
     r"openai: tokenizer has \d+ tokens but hparams.json n_vocab is 300"),
    (lambda src: _rewrite_release(src, data_block_listed=2),
     r"not a TensorFlow checkpoint index \(data blocks that overlap or come out of order"),
    (lambda src: _rewrite_release(src, drop="model/h1/ln_2/b"),
     r"model.ckpt.index: no tensor model/h1/ln_2/b, which hparams.json's GPT-2 has"),
    # (was "config.json: missing")
    (lambda src: (src / "model.ckpt.index").unlink(), r"openai/model\.ckpt\.index: missing"),
], ids=["hparams incomplete", "hparams not json", "hparams a string size", "no encoder",
        "index garbage", "shard truncated", "shard missing", "hparams wrong width",
        "an overlong varint", "an index of megabytes", "a weight of the wrong shape",
        "an integer tensor", "a fifo for a shard", "a generation config of megabytes",
        "a generation config's eos a string", "a tokenizer past n_vocab",
        "a data block listed twice", "a tensor missing", "no index"])
def test_convert_names_what_is_wrong_with_a_release(tmp_path, breakage, message):
    """One line on stderr and exit status 2, as for a model folder the server refuses; not a
    traceback from the tokenizer library, the JSON reader or the TensorFlow reader."""
    src, _, _ = openai_release(tmp_path)
    breakage(src)
    run = _convert(src, tmp_path / "out")
    assert run.returncode == 2, run.stderr
    assert re.search(message, run.stderr) and "Traceback" not in run.stderr, run.stderr
    # nothing is written: a release found broken only once converted (a width that does
    # not match) was written into the folder first
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_convert_refuses_a_checkpoint_entry_of_a_hostile_shape(tmp_path):
    """Dimensions of 2**62 beside a 0 passed the size check (their product is 0), then
    numpy raised from reshape: a traceback."""
    src, _, _ = openai_release(tmp_path)
    for old in src.glob("model.ckpt.*"):
        old.unlink()
    write_tf_checkpoint(src / "model.ckpt", {"model/wte": np.zeros(0, "<f4")},
                        shapes={"model/wte": (2**62, 2**62, 0)})
    run = _convert(src, tmp_path / "out")
    assert run.returncode == 2 and "tensor model/wte has shape" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def _rewrite_release(src: Path, drop: str | None = None, **written) -> dict:
    """The release's checkpoint written again without `drop`, with write_tf_checkpoint's
    `written` arguments; its tensors, as they were."""
    prefix = src / "model.ckpt"
    entries, _ = convert.read_tf_index(prefix)
    data = _data_shard(src).read_bytes()
    tensors = {name: np.frombuffer(data[offset:offset + size], "<f4").reshape(shape)
               for name, (_, shape, _, offset, size) in entries.items()}
    for old in src.glob("model.ckpt.*"):
        old.unlink()
    write_tf_checkpoint(prefix, {k: v for k, v in tensors.items() if k != drop}, **written)
    return tensors


def test_convert_reads_only_the_network_s_entries_of_a_release(tmp_path):
    """Found by fuzz helper 43: every entry of the index was read and converted before any
    was checked, so entries on the same bytes (a 7.9 KB index asked for 12.8 GB), one of
    integers, or one past the data went in; 'model/zzz/wte' replaced model/wte. Only the
    network's entries are read now, each by its exact name; model.safetensors is written
    with the mode the other files get (safetensors wrote it 0600, which a server running as
    another user could not read)."""
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    src, _, ref = openai_release(tmp_path)
    wte_bytes = 400 * 64 * 4
    others = {f"model/x{i:03d}": tf_entry(1, (400, 64), 0, wte_bytes) for i in range(50)}
    others |= {"model/zzz/wte": tf_entry(1, (400, 64), 10**9, wte_bytes),  # past the data
               "model/int": tf_entry(3, (4,), 0, 16), "optimizer/m": tf_entry(1, (1,), 0, 4)}
    _rewrite_release(src, others=others)
    out = tmp_path / "out"
    run = _convert(src, out, umask=0o022)
    assert run.returncode == 0, run.stderr
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    with torch.no_grad():
        torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(out).eval()(ids).logits,
                                   ref(ids).logits, atol=0, rtol=0)
    assert set(load_file(out / "model.safetensors")) == {
        k for k in ref.state_dict() if k != "lm_head.weight"}
    assert {(out / name).stat().st_mode & 0o777 for name in (
        "config.json", "model.safetensors", "tokenizer.json")} == {0o644}


def test_an_index_key_is_bounded_by_the_one_before_it():
    """Found by a review: keys that each kept all of the one before and added a byte grew as
    the square of the index (a megabyte of them, 15 GB); a key may keep no more than there was
    to keep, and be at most MAX_KEY_BYTES long."""
    for shared, unshared in ((3, 1), (0, convert.MAX_KEY_BYTES + 1)):
        block = (_varint(shared) + _varint(unshared) + _varint(0) + b"x" * unshared
                 + struct.pack("<II", 0, 1))
        with pytest.raises(ValueError, match=f"a key of {shared} \\+ {unshared} bytes after "
                                             f"one of 0"):
            list(convert._block(block + b"\x00", 0, len(block)))


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_convert_reads_a_tied_head_under_lm_head_keeps_the_eos_and_refuses_to_overwrite(
        tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_hf_model(tmp_path / "hf")
    state = load_file(src / "model.safetensors")
    state["lm_head.weight"] = state.pop("transformer.wte.weight")
    save_file(state, src / "model.safetensors")
    (src / "generation_config.json").write_text('{"eos_token_id": 7}')
    assert _convert(src, tmp_path / "out").returncode == 0
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["transformer.wte.weight"], state["lm_head.weight"])
    from gpt2serve import checkpoint
    assert checkpoint.check(tmp_path / "out").config.eos_token_id == 7  # the model's own
    (src / "generation_config.json").unlink()  # converted again: the old one is not kept
    assert _convert(src, tmp_path / "out").returncode == 0
    assert checkpoint.check(tmp_path / "out").config.eos_token_id == 0
    same = _convert(src, src)
    assert same.returncode == 2 and "another folder" in same.stderr
    into_a_file = _convert(src, src / "config.json")  # refused before anything is read
    assert into_a_file.returncode == 2 and "not a folder" in into_a_file.stderr
    # a folder where a file goes: refused before any file is moved (found by a review: the
    # files before it were moved, leaving `out` half old, half new)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    (tmp_path / "out" / "tokenizer.json").unlink()
    (tmp_path / "out" / "tokenizer.json").mkdir()
    save_file({k: v * 2 for k, v in state.items()}, src / "model.safetensors")  # new weights
    in_the_way = _convert(src, tmp_path / "out")
    assert in_the_way.returncode == 2 and "a folder where" in in_the_way.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()
            if p.is_file()} == {k: v for k, v in before.items() if k != "tokenizer.json"}
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


# ---- what the container gives us: CPU quota, GPU architecture --------------------------------

def _cgroup(root: Path, files: dict) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


@pytest.mark.parametrize("files,limit", [
    ({"cpu.max": "400000 100000"}, 4.0),                      # v2, limits.cpu: 4
    ({"cpu.max": "150000 100000"}, 1.5),                      # v2, limits.cpu: 1500m
    ({"cpu.max": "max 100000"}, None),                        # v2, no limit
    ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 2.0),  # v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "50000",
      "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 0.5),       # v1, combined controller
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),  # v1, no limit
    ({}, None),                                               # no cgroup files at all
])
def test_cgroup_cpu_limit(tmp_path, files, limit):
    from gpt2serve import hardware

    assert hardware.cgroup_cpu_limit(_cgroup(tmp_path, files)) == limit


def test_default_threads_follow_the_cpu_limit(tmp_path, monkeypatch):
    from gpt2serve import hardware

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert hardware.default_threads(_cgroup(tmp_path / "a", {"cpu.max": "400000 100000"})) == 4
    # rounded down: 2.5 CPUs of quota run 2 threads, and at least one
    assert hardware.default_threads(_cgroup(tmp_path / "b", {"cpu.max": "250000 100000"})) == 2
    assert hardware.default_threads(_cgroup(tmp_path / "c", {"cpu.max": "50000 100000"})) == 1
    # never more than the cores we may run on, and all of them without a limit
    assert hardware.default_threads(_cgroup(tmp_path / "d", {"cpu.max": "6400000 100000"})) == 16
    assert hardware.default_threads(_cgroup(tmp_path / "e", {"cpu.max": "max 100000"})) == 16


def test_resolve_threads_uses_the_cgroup_only_without_a_flag(monkeypatch):
    from gpt2serve import checkpoint, hardware

    monkeypatch.setattr(hardware, "default_threads", lambda root=None: 3)
    assert checkpoint.resolve_threads(None) == 3
    assert checkpoint.resolve_threads(7) == 7


CU130 = "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120".split()  # torch 2.13.0 from PyPI, as built
CU126 = "sm_50 sm_60 sm_70 sm_75 sm_80 sm_86 sm_90".split()


@pytest.mark.parametrize("cap,archs,tag", [
    ((7, 0), CU130, "gpt2serve:0.1.0-cu126"),   # V100 on the default image: the seed's failure
    ((6, 1), CU130, "gpt2serve:0.1.0-cu126"),   # Pascal
    ((7, 0), CU126, None),
    ((8, 9), CU130, None),                       # L4 runs sm_86 cubins
    ((9, 0), CU126, None),
    ((10, 0), CU126, "gpt2serve:0.1.0"),         # Blackwell needs the CUDA 13 image
    ((12, 1), CU130, None),                      # same major as sm_120
    ((9, 0), ["sm_80", "sm_90a"], None),
    ((9, 2), ["sm_80", "sm_90a"], "gpt2serve:0.1.0"),  # arch-specific cubins run on 9.0 only
    ((10, 0), ["sm_80", "compute_90"], None),    # PTX is compiled by the driver for newer GPUs
])
def test_gpu_image_hint(cap, archs, tag):
    from gpt2serve import hardware

    hint = hardware.gpu_image_hint(cap, archs, "Tesla V100-SXM2-16GB")
    if tag is None:
        assert hint is None
    else:
        assert f"use the image tagged {tag} " in hint and f"sm_{cap[0]}{cap[1]}" in hint
        assert "\n" not in hint


def test_the_hint_names_tags_the_docs_build():
    from gpt2serve import hardware

    docs = (ROOT / "docs" / "deploy.md").read_text()
    for tag in (hardware.DEFAULT_GPU_TAG, hardware.LEGACY_GPU_TAG):
        assert f"$REGISTRY/gpt2serve:{tag} " in docs
