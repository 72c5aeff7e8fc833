"""Serves a `Runtime` (runtime.py): gRPC and HTTP fronts, health, metrics, signals and the drain."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .front import reflection, servicer
from .front.gateway import SHUTDOWN_MESSAGE, Gateway
from .front.http_app import HttpFront
from .front.http_server import HttpServer
from .front.admission import Admission, AdmissionConfig
from .front.auth import BearerTokenInterceptor, one_token
from .front.clients import TokensFile
from .front.decoding import MalformedRequestInterceptor
from .front.identity import Identify
from .engine.engine import Engine
from .engine.engine_thread import EngineThread
from .fault import FaultPlan
from .metrics import Metrics, MetricsConfig
from .front.stream import StreamConfig, StreamHub
from .front.validation import Limits
from .runtime import Runtime
from .engine.generation import TokenText

log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# After the grace, how long the requests still open get to take the end the engine's stop gives them.
_CUT_SECONDS = 0.5
# After the drain: how long what is left (health Watch streams, the last statuses of streams that
# just ended, a stream whose client stopped reading) gets before gRPC cuts it.
_CLOSE_SECONDS = 0.2


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    grace_seconds: float = 10.0
    # TLS when both are set (PEM bytes), plaintext when neither; kept out of repr, as is the token.
    tls_cert_chain: bytes | None = field(default=None, repr=False)
    tls_private_key: bytes | None = field(default=None, repr=False)
    auth_token: str | None = field(default=None, repr=False)  # None: no authentication
    auth_tokens_file: str | None = None  # tokens -> client ids and limits (front/clients.py); reloaded on SIGHUP
    stream: StreamConfig = StreamConfig()  # per-stream buffer and idle cut (front/stream.py)
    http_port: int = 8080  # the OpenAI-compatible HTTP API and the explorer page (on `host`); 0: none
    # Seconds after which a gRPC connection is asked to go (GOAWAY; its open calls finish first), so that
    # long-lived clients reconnect and re-resolve, and see replicas added since; 0: never.
    max_connection_age: float = 0.0

    def __post_init__(self):
        if (self.tls_cert_chain is None) != (self.tls_private_key is None):
            raise ValueError("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
        if not 0 <= self.http_port <= 65535:
            raise ValueError(f"--http-port {self.http_port} is not in 0..65535")
        if self.max_connection_age < 0:
            raise ValueError(f"--max-connection-age {self.max_connection_age:g} must be >= 0 (0: never)")
        if self.auth_token is not None and not self.auth_token:
            raise ValueError("the auth token (--auth-token / TOKENLOOM_AUTH_TOKEN) must not be empty")
        if self.auth_token is not None and self.auth_tokens_file is not None:
            raise ValueError("give one token source: --auth-tokens-file, or --auth-token / --auth-token-file / "
                             "TOKENLOOM_AUTH_TOKEN, not both")

    @property
    def authenticated(self) -> bool:
        return self.auth_token is not None or self.auth_tokens_file is not None


class ListenError(RuntimeError):
    """A port to serve on could not be bound (in use, or not an address of this machine)."""


def _max_message_bytes(limits: Limits) -> int:
    # Room for a context's worth of ids / text plus protobuf overhead.
    return max(4 * 2**20, 64 * limits.context_length)


def _listen(server: grpc.aio.Server, config: ServerConfig, address: str) -> None:
    """Bind `address` alone: the server is built without SO_REUSEPORT, so a port that another process
    listens on is an error here, not a port the two share."""
    try:
        if config.tls_cert_chain is None:
            port = server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials([(config.tls_private_key, config.tls_cert_chain)])
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc >= 1.5x raises where older versions returned 0
        port = 0
    if port == 0:
        raise ListenError(f"cannot listen on {address}: {_bind_error(config.host, config.port)} "
                          f"(is another server on port {config.port}?)")


def _bind_error(host: str, port: int) -> str:
    """Why binding `host:port` fails, from the OS (gRPC's own error does not say)."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host.strip("[]") or None, port,
                                                              type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(sockaddr)
    except OSError as exc:
        return exc.strerror or str(exc)
    return "gRPC could not bind it"


def _metrics_exposed(metrics_cfg: MetricsConfig | None, config: ServerConfig) -> bool:
    """The gRPC port is protected (TLS or a token) while /metrics, plain HTTP without a token,
    listens beyond this machine."""
    if metrics_cfg is None or not metrics_cfg.port or not (config.tls_cert_chain or config.authenticated):
        return False
    try:
        return not ipaddress.ip_address(metrics_cfg.host.strip("[]")).is_loopback
    except ValueError:
        return metrics_cfg.host != "localhost"


async def _health_and_reflection(server: grpc.aio.Server) -> grpc_health.aio.HealthServicer:
    """grpc.health.v1 answering NOT_SERVING (for the server, "", and for our service) until
    `serve` says otherwise, and server reflection (v1 and v1alpha), so grpcurl-style tools need no
    proto files."""
    health = grpc_health.aio.HealthServicer()
    for service in ("", servicer.SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable(server, (servicer.SERVICE_NAME, HEALTH_SERVICE_NAME))
    return health


async def _set_serving(health: grpc_health.aio.HealthServicer) -> None:
    for service in ("", servicer.SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)


async def _not_serving_on(engine_failed: asyncio.Event, health, http: HttpServer | None) -> None:
    await engine_failed.wait()
    if http is not None:
        http.front.serving = False
    for service in ("", servicer.SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    log.critical("health: NOT_SERVING, the engine has failed; restart the server")


def _reload(tokens: TokensFile, admission: Admission) -> None:
    """SIGHUP: read the tokens file again; a file that does not load leaves everything as it was."""
    if tokens.reload():
        admission.set_client_limits(tokens.table.limits)


async def _drain(server: grpc.aio.Server, health, admission: Admission, engine: Engine, hub: StreamHub,
                 grace: float) -> None:
    """NOT_SERVING while the port still answers (a health Check then says NOT_SERVING rather than
    failing to connect), no new request admitted (UNAVAILABLE), open ones get `grace` seconds.

    Those still open then are ended by the engine's stop, which gives each its final event at the
    next step boundary: their handlers answer UNAVAILABLE (the server is shutting down) and count
    them as `shutdown`. What has not ended `_CUT_SECONDS` later (a client that stopped reading),
    `_close` leaves to gRPC. All of it fits in the second after the grace that a shutdown may take."""
    await health.enter_graceful_shutdown()
    admission.close()
    log.info("draining: health NOT_SERVING, %d open requests get up to %g s", admission.num_open, grace)
    if await admission.wait_idle(grace):
        await asyncio.to_thread(engine.stop)
    else:
        log.warning("%d requests still open after %g s: ending them (UNAVAILABLE, the server is shutting down)",
                    admission.num_open, grace)
        admission.cut()
        deadline = time.monotonic() + _CUT_SECONDS
        hub.cut_unread(SHUTDOWN_MESSAGE)  # blocked on a client that does not read: they would not see their end
        await asyncio.to_thread(engine.stop, _CUT_SECONDS)
        if not await admission.wait_idle(max(deadline - time.monotonic(), 0.0)):
            log.warning("%d requests did not take their end in %g s: gRPC cancels them",
                        admission.num_open, _CUT_SECONDS)


async def _close(server: grpc.aio.Server, endpoint, http: HttpServer | None) -> None:
    """After the drain, together: gRPC and HTTP cut what is left after `_CLOSE_SECONDS`, and the
    metrics endpoint's thread stops (it looks for a stop every 0.5 s)."""
    stops = [server.stop(_CLOSE_SECONDS)]
    if endpoint is not None:
        stops.append(asyncio.to_thread(endpoint.stop))
    if http is not None:
        stops.append(http.stop())
    await asyncio.gather(*stops)


def _token_check(config: ServerConfig, tokens: TokensFile | None):
    """Whether a bearer token is accepted (the tokens file's, or the one token); None: no authentication."""
    if tokens is not None:
        return lambda t: tokens.table.client_of(t) is not None
    return one_token(config.auth_token.encode()) if config.auth_token else None


def _grpc_server(runtime: Runtime, metrics: Metrics, accepts, max_connection_age: float) -> grpc.aio.Server:
    """The server with its interceptors: authentication first, so that a call without a valid token
    is refused before its body is parsed; then the malformed-body check. A connection older than
    `max_connection_age` gets a GOAWAY (gRPC adds ±10 % jitter); its calls run to their end, however
    long (no max_connection_age_grace: a stream is never cut for it)."""
    interceptors = [MalformedRequestInterceptor(metrics.malformed_request)]
    if accepts is not None:
        interceptors.insert(0, BearerTokenInterceptor(accepts, metrics.auth_failed))
    size = _max_message_bytes(runtime.limits)
    options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
               ("grpc.so_reuseport", 0)]
    if max_connection_age:
        options.append(("grpc.max_connection_age_ms", max(1, round(max_connection_age * 1000))))
    return grpc.aio.server(options=options, interceptors=interceptors)


def _admission(cfg: AdmissionConfig, runtime: Runtime, tokens: TokensFile | None) -> Admission:
    cfg = cfg.resolved(runtime.served.max_num_seqs, runtime.served.kv_cache_tokens)
    log.info("admission: up to %s queued requests and %s queued prompt tokens, queue wait up to %s",
             cfg.max_queued_requests or "unlimited", cfg.max_queued_prompt_tokens or "unlimited",
             f"{cfg.max_queue_wait:g} s" if cfg.max_queue_wait else "unlimited")
    admission = Admission(cfg)
    if tokens is not None:
        admission.set_client_limits(tokens.table.limits)
    return admission


def _announce(runtime: Runtime, config: ServerConfig, address: str, tokens: TokensFile | None) -> None:
    tokens_used = f", bearer tokens of {len(tokens.table.limits)} clients" if tokens else ""
    security = ("TLS" if config.tls_cert_chain else "plaintext") + (
        tokens_used or (", bearer token" if config.auth_token else ""))
    http = f", HTTP on http://{config.host}:{config.http_port}" if config.http_port else ""
    log.info("tokenloom serving %s on %s (%s)%s", runtime.served.name, address, security, http)
    print(f"tokenloom: serving {runtime.served.name} on {address} ({security}){http}", flush=True)


def _http_server(runtime: Runtime, config: ServerConfig, gateway: Gateway, accepts) -> HttpServer | None:
    """The HTTP front on its bound port (--http-port), not started yet; None when it is off."""
    if not config.http_port:
        return None
    front = HttpFront(gateway, runtime.served, TokenText(runtime.loaded.tokenizer).token, accepts,
                      max_body_bytes=_max_message_bytes(runtime.limits))
    try:
        return HttpServer(front, config.host, config.http_port, tls=(config.tls_cert_chain, config.tls_private_key))
    except RuntimeError as exc:
        raise ListenError(str(exc)) from None


def _metrics_endpoint(metrics: Metrics, metrics_cfg: MetricsConfig | None, config: ServerConfig):
    """/metrics serving (None: off), with a warning when it is open beyond a protected server's machine."""
    try:
        endpoint = metrics.serve_http(metrics_cfg) if metrics_cfg is not None else None
    except RuntimeError as exc:
        raise ListenError(str(exc)) from None
    if _metrics_exposed(metrics_cfg, config):
        log.warning("/metrics on http://%s:%d is plain HTTP without authentication, reachable beyond this "
                    "machine, while gRPC needs TLS or a token: bind it to this machine with --metrics-host "
                    "127.0.0.1, or turn it off with --metrics-port 0", metrics_cfg.host, metrics_cfg.port)
    return endpoint


async def serve(
    runtime: Runtime, config: ServerConfig, engine_thread: EngineThread, ready: asyncio.Event | None = None,
    metrics_cfg: MetricsConfig | None = None,  # None: no metrics endpoint
    admission_cfg: AdmissionConfig | None = None,
    faults: FaultPlan | None = None,  # test-only (--inject-fault)
) -> None:
    loop = asyncio.get_running_loop()
    metrics = Metrics()
    hub = StreamHub(loop, metrics, config.stream)
    engine_failed = asyncio.Event()

    def on_engine_exit(death: BaseException | None) -> None:  # engine thread
        if death is not None:
            loop.call_soon_threadsafe(engine_failed.set)

    engine = runtime.engine(hub.publish, metrics, faults=faults, on_exit=on_engine_exit)
    hub.engine = engine
    tokens = TokensFile(config.auth_tokens_file) if config.auth_tokens_file else None
    accepts = _token_check(config, tokens)
    server = _grpc_server(runtime, metrics, accepts, config.max_connection_age)
    admission = _admission(admission_cfg or AdmissionConfig(), runtime, tokens)
    gateway = Gateway(runtime.preprocessor, hub, admission, Identify(admission.config.trusted_metadata_key, tokens))
    servicer.add_to_server(servicer.GenerationServicer(gateway, runtime.served), server)
    health = await _health_and_reflection(server)
    address = f"{config.host}:{config.port}"
    _listen(server, config, address)
    http = _http_server(runtime, config, gateway, accepts)
    endpoint = _metrics_endpoint(metrics, metrics_cfg, config)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if tokens is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload, tokens, admission)
    await server.start()
    if http is not None:
        await http.start()
    # Health answers NOT_SERVING meanwhile. The warm-up steps the shared scheduler and KV store, so
    # the serving engine starts after it (requests that come early wait in its inbox).
    await asyncio.wrap_future(engine_thread.submit(runtime.warm_up))
    engine.start(engine_thread)
    if not stop.is_set():
        await _set_serving(health)
        if http is not None:
            http.front.serving = True
    _announce(runtime, config, address, tokens)
    if ready is not None:
        ready.set()
    # A dead engine cannot come back: health says NOT_SERVING (so a balancer or an orchestrator
    # moves traffic away and restarts us) and new requests get UNAVAILABLE until a signal stops us.
    failed = asyncio.ensure_future(_not_serving_on(engine_failed, health, http))
    await stop.wait()
    failed.cancel()
    signalled = time.monotonic()
    if http is not None:
        http.front.serving = False
    await _drain(server, health, admission, engine, hub, config.grace_seconds)
    await _close(server, endpoint, http)
    log.info("stopped %.2f s after the signal (grace %g s)", time.monotonic() - signalled, config.grace_seconds)
