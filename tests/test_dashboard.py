"""deploy/grafana/gpt2serve-dashboard.json: a dashboard Grafana imports (its schema's basics),
whose every metric is one that a running server exports."""

import json
import re
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import running_server

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "gpt2serve-dashboard.json"
# Metric names in PromQL: ours, and KServe's request_*_seconds histograms.
METRIC = re.compile(r"\b(gpt2serve_[a-z0-9_]+|request_[a-z]+_seconds(?:_bucket|_count|_sum)?)\b")


# The server's own series, which have no model label: the repository's gauges, the HTTP
# answers' count.
SERVER_LEVEL = {"gpt2serve_models_loaded", "gpt2serve_memory_budget_bytes",
                "gpt2serve_http_requests_total"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def test_the_dashboard_has_grafana_s_shape():
    dash = dashboard()
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["title"] and dash["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["definition"] == "label_values(gpt2serve_running_sequences, model)"
    # "All" must also match series without the label: `=~".*"` matches the empty value.
    assert model["includeAll"] and model["allValue"] == ".*"
    graphs = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(graphs) >= 10
    for p in dash["panels"]:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and g["x"] + g["w"] <= 24, p["title"]
    for p in graphs:
        assert p["type"] in {"timeseries", "stat", "gauge"}, p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            # every selector of our per-model metrics follows the model variable
            for name, selector in re.findall(r"(gpt2serve_[a-z0-9_]+)(\{[^}]*\})?", t["expr"]):
                if name not in SERVER_LEVEL:
                    assert selector == '{model=~"$model"}', t["expr"]
    # One panel for each thing an operator asks about.
    text = " ".join(queries(dash))
    for metric in ("generated_tokens_total", "time_to_first_token_seconds_bucket",
                   "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket",
                   "request_queue_time_seconds_bucket", "queue_depth", "running_sequences",
                   "kv_cache_usage_ratio", "prefix_cache_hits_total"):
        assert f"gpt2serve_{metric}" in text, metric


def exported(text: str) -> dict[str, str]:
    """Sample name -> its family's type, from a Prometheus text exposition."""
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    out = {}
    for name in re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{|\s)", text, re.M):
        family = next((name[: -len(s)] for s in ("_bucket", "_count", "_sum", "_total",
                                                  "_created")
                       if name.endswith(s) and name[: -len(s)] in types), name)
        out[name] = types.get(family, types.get(name, "untyped"))
    return out


@pytest.fixture(scope="module")
def metrics_text(tiny_model, tmp_path_factory):
    """A repository server (its budget and load metrics exist only there) of one model."""
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(tiny_model, repo / "aitextgen")
    with running_server("--model_dir", str(repo), "--enable_grpc", "false") as srv:
        r = httpx.post(f"{srv.url}/v1/models/aitextgen:predict",
                       json={"instances": [{"prompt": "ROMEO:", "max_new_tokens": 4}]},
                       timeout=60)
        assert r.status_code == 200
        r = httpx.post(f"{srv.url}/openai/v1/completions",
                       json={"model": "aitextgen", "prompt": "JULIET:", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200
        yield httpx.get(f"{srv.url}/metrics", timeout=10).text


def test_every_metric_the_dashboard_uses_is_exported(metrics_text):
    have = exported(metrics_text)
    used = {m for q in queries(dashboard()) for m in METRIC.findall(q)}
    assert len(used) >= 12
    missing = sorted(used - set(have))
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"
    for name in used:  # and the `model` its variable selects on
        if name.startswith("gpt2serve_") and name not in SERVER_LEVEL:
            assert re.search(rf'^{name}\{{[^}}]*model="aitextgen"', metrics_text, re.M), name
    for q in queries(dashboard()):
        # histogram_quantile reads a histogram's buckets; rate() a counter or histogram series
        for name in re.findall(r"histogram_quantile\([^,]+, sum by \([^)]*\) \(rate\((\w+)", q):
            assert name.endswith("_bucket") and have[name] == "histogram", q
        for name in re.findall(r"rate\((\w+)", q):
            assert have[name] in {"counter", "histogram"}, q
