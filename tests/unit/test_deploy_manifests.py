"""deploy/kubernetes/ against the Kubernetes schemas (offline) and against the server it runs: the
flags it passes, the ports, the health services its probes ask, the metric its autoscaler reads."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenloom import server
from tokenloom.__main__ import parser
from tokenloom.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
ADAPTER_VALUES = KUBE / "prometheus-adapter-values.yaml"
# gRPC probes are GA from 1.27; the newest schemas kubernetes-validate ships are checked too.
OLDEST_KUBERNETES = "1.27"
NO_VALIDATOR = "kubernetes-validate is not installed (pip install kubernetes-validate: it bundles the schemas)"


def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifests() -> dict[str, list[dict]]:
    resources = _load(KUBE / "kustomization.yaml")[0]["resources"]
    return {name: _load(KUBE / name) for name in resources}


def _one(kind: str) -> dict:
    found = [doc for docs in _manifests().values() for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} among the kustomization's resources, found {len(found)}"
    return found[0]


def _services() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for docs in _manifests().values() for doc in docs if doc["kind"] == "Service"}


def _kinds_and_names(docs) -> list[tuple[str, str]]:
    return sorted((doc["kind"], doc["metadata"]["name"]) for doc in docs)


def _container() -> dict:
    (container,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _server_args(argv: list[str]):
    """The server's own parser on `argv`; a flag it does not know fails the test, naming it."""
    try:
        return parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"python -m tokenloom rejects {argv} (its error is printed above)")


def _deployment_args():
    container = _container()
    assert "command" not in container, "the image's ENTRYPOINT (python -m tokenloom) must stay in place"
    return _server_args(container["args"])


def test_the_kustomization_lists_every_manifest_in_the_folder():
    manifests = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml", ADAPTER_VALUES.name}
    assert set(_manifests()) == manifests


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_builds_the_kustomization_into_every_manifest():
    rendered = subprocess.run(["kubectl", "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    in_files = [doc for docs in _manifests().values() for doc in docs]
    assert _kinds_and_names(yaml.safe_load_all(rendered.stdout)) == _kinds_and_names(in_files)


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version):
    kv = pytest.importorskip("kubernetes_validate", reason=NO_VALIDATOR)
    version = kv.latest_version() if version == "latest" else version
    problems = []
    for name, docs in _manifests().items():
        for doc in docs:
            try:  # strict: an unknown or misspelt field is an error, not silently dropped
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as error:
                problems.append(f"{name}: {error.message} at {'.'.join(map(str, error.path))}")
            except kv.SchemaNotFoundError as error:
                problems.append(f"{name}: {error.message}")
    assert not problems, f"not valid Kubernetes {version}:\n" + "\n".join(problems)


def test_the_deployment_passes_only_flags_the_server_accepts_and_listens_on_every_interface():
    args = _deployment_args()
    assert args.host == "0.0.0.0", "the kubelet's probes and the other pods reach the pod's IP, not loopback"
    assert not ipaddress.ip_address(args.metrics_host).is_loopback


def test_the_container_ports_are_the_ports_the_server_listens_on():
    args = _deployment_args()
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    assert ports == {"grpc": args.port, "http": args.http_port, "metrics": args.metrics_port}


def test_the_services_reach_the_pods_by_the_container_port_names():
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in _container()["ports"]}
    services = _services()
    assert services["tokenloom-headless"]["spec"]["clusterIP"] == "None"
    headless_ports = {p["name"]: p["port"] for p in services["tokenloom-headless"]["spec"]["ports"]}
    assert headless_ports["grpc"] == _deployment_args().port, "clients dial the server's own gRPC port"
    for name, service in services.items():
        selector = service["spec"]["selector"]
        assert selector.items() <= pod_labels.items(), f"{name} selects no tokenloom pod"
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, f"{name}: {port['targetPort']} is no container port"
    for kind in ("Deployment", "PodDisruptionBudget"):
        assert _one(kind)["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def _health_statuses(services: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """What the server's own health servicer answers for each service: before and after it serves."""

    async def check(stub, service: str) -> str:
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.code().name  # NOT_FOUND: a service the server never registered
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def run():
        grpc_server = grpc.aio.server()
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        health = await server._health_and_reflection(grpc_server)
        await grpc_server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                loading = {s: await check(stub, s) for s in services}
                await server._set_serving(health)
                serving = {s: await check(stub, s) for s in services}
        finally:
            await grpc_server.stop(None)
        return loading, serving

    return asyncio.run(run())


def test_the_probes_ask_the_servers_health_service_on_its_grpc_port():
    container, args = _container(), _deployment_args()
    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert "grpc" in probe, f"{kind} should be the kubelet's native gRPC probe"
        assert probe["grpc"]["port"] == args.port, f"{kind} asks port {probe['grpc']['port']}"
    services = sorted({probe["grpc"].get("service", "") for probe in probes.values()})
    loading, serving = _health_statuses(services)
    assert loading == dict.fromkeys(services, "NOT_SERVING")
    assert serving == dict.fromkeys(services, "SERVING")


def test_the_pod_outlives_its_drain():
    pod = _one("Deployment")["spec"]["template"]["spec"]
    container, args = _container(), _deployment_args()
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    pre_stop_seconds = float(pre_stop["exec"]["command"][-1]) if "exec" in pre_stop else 0.0
    # The server is gone within --grace-seconds plus one second of SIGTERM (docs/operations.md).
    drain_ends = pre_stop_seconds + args.grace_seconds + 1
    assert "--grace-seconds" in " ".join(container["args"]), "set the grace explicitly, next to the pod's"
    assert pod["terminationGracePeriodSeconds"] > drain_ends
    liveness = container["livenessProbe"]
    # A draining server answers NOT_SERVING: liveness must not kill it before its streams finish.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > args.grace_seconds + 1


def test_prometheus_scrapes_the_metrics_port():
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(_deployment_args().metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def _registry_families() -> dict[str, str]:
    return {family.name: family.type for family in Metrics().registry.collect()}


def test_the_autoscaler_scales_on_a_gauge_the_server_exports_through_the_adapters_rule():
    families = _registry_families()
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == _one("Deployment")["metadata"]["name"]
    rules = {rule["name"]["as"]: rule for rule in _load(ADAPTER_VALUES)[0]["rules"]["custom"]}
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods"
        name = metric["pods"]["metric"]["name"]
        assert name in rules, f"no Prometheus Adapter rule serves {name}"
        rule = rules[name]
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group()
        assert families.get(series) == "gauge", f"{series} is not a gauge of the server's registry"
        assert re.search(rule["name"]["matches"], series)
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}, "a Pods metric is per pod"
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def _dockerfile() -> dict[str, str]:
    """The last value of each instruction (EXPOSE, ENTRYPOINT, CMD) in the Dockerfile."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return {words[0].upper(): words[1] for words in lines if len(words) == 2}


def test_the_image_runs_the_server_and_exposes_its_ports():
    docker = _dockerfile()
    assert yaml.safe_load(docker["ENTRYPOINT"]) == ["python", "-m", "tokenloom"]
    args = _server_args(yaml.safe_load(docker["CMD"]))
    assert args.host == "0.0.0.0"
    assert sorted(map(int, shlex.split(docker["EXPOSE"]))) == sorted([args.port, args.http_port, args.metrics_port])
