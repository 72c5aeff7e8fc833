"""A real Prometheus scrapes a live server, and every query of the Grafana dashboard returns data."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from server_process import free_port
from metrics_scrape import Scrape
from test_metrics import cancelled, complete_and_invalid

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "tokenloom.json"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
# What Grafana would put in for its variables; 30 s holds many 1 s scrapes.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "1s", "$__range": "5m", "$instance": ".*"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' nested panels included."""
    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in panels(dashboard["panels"]) for t in p.get("targets", [])]


def promql(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def api(base: str, path: str, **params: str) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else base + path
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_for(condition, what: str, timeout: float = 30.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"waited {timeout} s for {what}")


def test_dashboard_is_grafana_json_on_a_prometheus_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert len(dashboard_queries()) >= 10


@pytest.fixture
def prometheus(metrics_server, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (`make install` installs Debian's package with apt-get)")
    example = SCRAPE_CONFIG.read_text()
    config = example.replace("localhost:8000", f"127.0.0.1:{metrics_server.metrics_port}")
    config = config.replace("scrape_interval: 5s", "scrape_interval: 1s")
    assert config.count("127.0.0.1:") == 1 and "scrape_interval: 1s" in config, "the example config changed shape"
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        def ready():
            if proc.poll() is not None:
                log_text = (tmp_path / "prometheus.log").read_text()
                raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{log_text}")
            try:
                return urllib.request.urlopen(base + "/-/ready", timeout=1).status == 200
            except OSError:
                return False

        wait_for(ready, "prometheus to start")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_every_dashboard_query_returns_data_from_a_real_prometheus(metrics_server, prometheus):
    def scraped_value() -> float | None:
        result = api(prometheus, "/api/v1/query", query="tokenloom_generated_tokens_total")["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def target_up() -> bool:
        targets = api(prometheus, "/api/v1/targets")["data"]["activeTargets"]
        return any(t["health"] == "up" for t in targets) and scraped_value() is not None

    wait_for(target_up, "the first scrape of the server")
    # Traffic of every kind between scrapes, so that rates and quantiles have something to show.
    asyncio.run(complete_and_invalid(metrics_server.address))
    asyncio.run(cancelled(metrics_server.address))
    served = Scrape(metrics_server.metrics_url).get("generated_tokens_total")
    wait_for(lambda: scraped_value() >= served, "a scrape after the traffic")

    empty, nan = [], []
    for title, expr in dashboard_queries():
        answer = api(prometheus, "/api/v1/query", query=promql(expr))
        assert answer["status"] == "success", (title, expr, answer)
        values = [float(r["value"][1]) for r in answer["data"]["result"]]
        if not values:
            empty.append((title, expr))
        elif not any(math.isfinite(v) for v in values):
            nan.append((title, expr))
    assert not empty, f"queries with no data: {empty}"
    assert not nan, f"queries with only NaN: {nan}"
