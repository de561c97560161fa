"""What the bench points wrk at: the nginx backend, the gateway in each configuration, and how one run is taken.

The backend is nginx answering a fixed JSON-RPC result. Its locations behind the gateway check what the gateway
forwards: the caller's `Authorization` must not arrive (400) and the pre-shared key must (403 otherwise), so a
gateway that forwards what it must not cannot pass as fast. The session location (`sessions` part) also answers
every request with the backend's own `Mcp-Session-Id` and refuses any other id (`session_load.py`); the cross-app
location (`redis` part) wants a bearer token that is not the caller's (the one from the Cross App Access exchange).
Each gateway is started from a revision's own `okta-agent-proxy` command in a clean environment (an `OKTA_ISSUER`,
`ALLOWED_HOSTS`, `REDIS_URL`, … in ours would change what is measured; a target that wants one gets it explicitly),
with the same config files for every revision and a `DATA_DIR` of its own in the run's temporary folder. Before any
load, one request through each target must return exactly the backend's body (`probe`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit_stores import ScratchPostgres, audit_dropped, sqlite_audit_rows
from cross_app import credential_counts, redis_commands
from processes import HERE, STARTUP_SECONDS, BenchError, Service, free_port, http
from revisions import Revision
from wrk_runner import REQUEST_BODY, REQUEST_HEADERS, CpuMeter, Run, Wrk, ms, optional, report_errors, wrk_script

BACKEND_BODY = '{"jsonrpc":"2.0","id":1,"result":{}}'
PSK_HEADER = "X-API-Key"
PSK_VALUE = "bench-pre-shared-key"
GATEWAY_BACKEND_PATH = "/gateway/mcp"  # the nginx location that checks what the gateway forwards
BACKEND_PATHS = {
    "psk": GATEWAY_BACKEND_PATH,
    "sessions": "/sessions/mcp",  # the same checks, and the backend's Mcp-Session-Id on every answer
    "cross-app": "/cross-app/mcp",  # a bearer token from the Cross App Access exchange, never the caller's
}
BACKEND_SESSION_ID = "bench-session"
JWT_AUDIENCE = "api://oap-bench"
SESSION_SECRET = "oap-bench-session-secret-0123456789abcdef"  # serve wants one with REDIS_URL (>= 32 bytes)


def probe(service: Service, url: str, headers: dict[str, str]) -> None:
    """One request as wrk sends it; anything but the backend's exact answer is a misconfiguration."""
    status, body = http("POST", url, REQUEST_BODY, headers)
    if status != 200 or body != BACKEND_BODY:
        raise BenchError(
            f"{service.name} at {url} answered {status} {body[:300]!r} instead of 200 {BACKEND_BODY!r}\n"
            f"{service.log_tail()}"
        )


def nginx_config(workdir: Path, port: int, caller_token: str | None = None) -> str:
    """The backend; `caller_token`: the IdP's token, which must never reach the cross-app location."""
    temp = "\n".join(
        f"  {kind}_temp_path {workdir / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    checks = f"""      if ($http_authorization) {{
        return 400 '{{"bench":"the caller Authorization header reached the backend"}}';
      }}
      if ($http_{PSK_HEADER.lower().replace("-", "_")} != "{PSK_VALUE}") {{
        return 403 '{{"bench":"the pre-shared key did not reach the backend"}}';
      }}"""
    not_the_caller = ""
    if caller_token is not None:
        not_the_caller = f"""
      if ($http_authorization = "Bearer {caller_token}") {{
        return 400 '{{"bench":"the caller token reached the backend"}}';
      }}"""
    return f"""
worker_processes 1;
daemon off;
pid {workdir / "nginx.pid"};
error_log {workdir / "nginx-error.log"} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temp}
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  default_type application/json;
  server {{
    listen 127.0.0.1:{port};
    location / {{ return 200 '{BACKEND_BODY}'; }}
    location = /v1/traces {{ default_type application/x-protobuf; return 200 ''; }}  # an OTLP/HTTP sink
    location = {BACKEND_PATHS["psk"]} {{
{checks}
      return 200 '{BACKEND_BODY}';
    }}
    location = {BACKEND_PATHS["sessions"]} {{
      add_header Mcp-Session-Id {BACKEND_SESSION_ID} always;
{checks}
      if ($http_mcp_session_id !~ "^({BACKEND_SESSION_ID})?$") {{
        return 400 '{{"bench":"a session id the backend never issued reached it"}}';
      }}
      return 200 '{BACKEND_BODY}';
    }}
    location = {BACKEND_PATHS["cross-app"]} {{
      if ($http_authorization !~ "^Bearer ey") {{
        return 403 '{{"bench":"no access token from the exchange reached the backend"}}';
      }}{not_the_caller}
      return 200 '{BACKEND_BODY}';
    }}
  }}
}}
"""


def gateway_config(
    backend_port: int, agent_client_id: str | None = None, *, backend: str = "psk", idp: dict[str, str] | None = None
) -> str:
    """One backend `bench` on `/mcp`: `psk` or `sessions` (pre-shared key), or `cross-app` (Okta Cross App Access
    at the IdP `idp`, whose agent key signs the exchanges)."""
    config = f"""backends:
  bench:
    url: http://127.0.0.1:{backend_port}{BACKEND_PATHS[backend]}
    paths: [/mcp]
"""
    if backend == "cross-app":
        if idp is None or agent_client_id is None:
            raise ValueError("a cross-app backend needs the IdP and the agent")
        config += f"""    auth_method: okta-cross-app
    auth_config:
      id_jag_mode: static
      target_authorization_server: {idp["backend_issuer"]}
      target_token_endpoint: {idp["backend_token_endpoint"]}
      scopes: [{idp["backend_scope"]}]
"""
    else:
        config += f"""    auth_method: pre-shared-key
    auth_config:
      key: ${{BENCH_PSK}}
      header_name: {PSK_HEADER}
"""
    if agent_client_id is not None:  # the agent whose app the IdP's token was issued to; default scopes [mcp:read]
        config += f"""agents:
  bench-agent:
    client_id: {agent_client_id}
    backend_access: [bench]
"""
        if backend == "cross-app" and idp is not None:
            config += f"""    key_id: {idp["agent_key_id"]}
    private_key: {{file: {idp["agent_key"]}}}
"""
    return config


@dataclass
class Target:
    name: str  # as printed: the key, plus " [base]" for the baseline's
    service: Service
    url: str
    script: Path
    headers: dict[str, str]
    key: str = ""  # the same for a gateway target of this revision and its baseline twin (default: the name)
    ready_url: str = ""  # polled until it answers, before the probe (default: the URL)
    baseline: bool = False
    metrics_url: str | None = None  # audit on: where to read the drop counter
    audit_rows: Callable[[], int] | None = None  # rows in its audit table, for the check after the runs
    audit_on: bool = False
    credentials_url: str | None = None  # a cross-app target: its /metrics, for the credential cache's counters
    redis_url: str | None = None  # REDIS_URL given to it: the server's command count is read around each run
    runs: list[Run] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.key = self.key or self.name
        self.ready_url = self.ready_url or self.url


class GatewayLauncher:
    """Starts `okta-agent-proxy serve` of a revision in front of nginx, in one of the bench's configurations."""

    def __init__(
        self,
        workdir: Path,
        started: list[Service],
        backend_port: int,
        proxy_pin: Sequence[str],
        postgres: dict[str, ScratchPostgres],
    ) -> None:
        self.workdir = workdir
        self.started = started
        self.backend_port = backend_port
        self.proxy_pin = list(proxy_pin)
        self.postgres = postgres  # a scratch database per revision label
        self.plain_config = workdir / "gateway.yaml"
        self.plain_config.write_text(gateway_config(backend_port))
        self.plain_script = workdir / "mcp_post.lua"
        self.plain_script.write_text(wrk_script(REQUEST_HEADERS))
        self.jwt_script = workdir / "mcp_post_jwt.lua"

    def start(
        self,
        key: str,
        revision: Revision,
        *,
        log_level: str = "INFO",
        audit: str | None = None,
        workers: int = 1,
        idp: dict[str, str] | None = None,
        backend: str = "psk",
        redis_url: str | None = None,
    ) -> Target:
        """A gateway target; `backend`: which nginx location (`BACKEND_PATHS`) and credential its backend has;
        `redis_url`: its REDIS_URL (with the SESSION_SECRET that serve then requires)."""
        name = key + revision.mark
        port = free_port()
        slug = name.replace(" ", "-").replace("=", "-").replace("[", "").replace("]", "")
        # Without audit the store is still opened (config history), in a file of its own.
        sqlite_path = self.workdir / f"{slug}.db"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LOG_LEVEL": log_level,
            "BENCH_PSK": PSK_VALUE,
            "AUDIT_ENABLED": "true" if audit else "false",
            "DATABASE_URL": f"sqlite:///{sqlite_path}",
            "DATA_DIR": str(self.workdir / f"{slug}-data"),  # session.key, --workers' metrics: not in the cwd
        }
        config, script, headers = self.plain_config, self.plain_script, REQUEST_HEADERS
        if idp is not None:
            env |= {"OKTA_ISSUER": idp["issuer"], "OKTA_AUDIENCE": idp["audience"]}
            env["OKTA_JWKS_URI"] = idp["jwks_uri"]
            config = self.workdir / ("gateway-jwt.yaml" if backend == "psk" else f"gateway-jwt-{backend}.yaml")
            config.write_text(gateway_config(self.backend_port, idp["client_id"], backend=backend, idp=idp))
            headers = {**REQUEST_HEADERS, "Authorization": f"Bearer {idp['token']}"}
            script = self.jwt_script
            script.write_text(wrk_script(headers))
        elif backend != "psk":
            raise ValueError(f"a {backend} backend needs the IdP")
        if backend == "cross-app":
            env |= {"OKTA_DOMAIN": idp["org"] if idp else "", "SESSION_SECRET": SESSION_SECRET}  # secret: like for like
        if redis_url is not None:
            env |= {"REDIS_URL": redis_url, "SESSION_SECRET": SESSION_SECRET}

        def count_rows() -> int:
            return sqlite_audit_rows(sqlite_path)

        if audit == "postgresql":
            database = self.postgres[revision.label]
            env["DATABASE_URL"] = database.url
            count_rows = database.count_audit_rows
        command = [*(self.proxy_pin if workers == 1 else []), str(revision.gateway), "serve", "--config", str(config)]
        command += ["--env-file", "/dev/null", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--workers", str(workers)]
        service = Service(name, command, self.workdir, env=env)
        self.started.append(service)
        return Target(
            name,
            service,
            f"http://127.0.0.1:{port}/mcp",
            script,
            headers,
            key=key,
            ready_url=f"http://127.0.0.1:{port}/healthz",
            baseline=revision.is_baseline,
            metrics_url=f"http://127.0.0.1:{port}/metrics" if audit else None,
            audit_rows=count_rows if workers == 1 else None,
            audit_on=audit is not None,
            credentials_url=f"http://127.0.0.1:{port}/metrics" if backend == "cross-app" else None,
            redis_url=redis_url,
        )


class Measurer:
    """Takes wrk runs against targets, with the CPU accounting and the audit drop counter around each."""

    def __init__(self, wrk: Wrk, started: list[Service], warmup: float) -> None:
        self.wrk = wrk
        self.started = started
        self.warmup = warmup
        self.runs: list[Run] = []

    def measure(self, target: Target, connections: int, seconds: float, label: str | None = None) -> Run:
        service = target.service
        service.check_alive()  # a target that died could leave its port to something else that answers
        meter = CpuMeter(service.process.pid, [s.process.pid for s in self.started if s.process.poll() is None])
        dropped_before = audit_dropped(target.metrics_url) if target.metrics_url else None
        credentials_before = credential_counts(target.credentials_url) if target.credentials_url else None
        redis_before = redis_commands(target.redis_url) if target.redis_url else None
        before = meter.sample()
        run = self.wrk.run(label or target.name, target.url, target.script, connections, seconds)
        CpuMeter.apply(run, before, meter.sample())
        service.check_alive()
        if target.metrics_url and dropped_before is not None:
            run.audit_dropped = audit_dropped(target.metrics_url) - dropped_before
        if target.redis_url and redis_before is not None:
            redis_after = redis_commands(target.redis_url)
            run.redis_commands = None if redis_after is None else redis_after - redis_before - 1  # our INFO
        if target.credentials_url and credentials_before is not None:
            credentials_after = credential_counts(target.credentials_url)
            if credentials_after is not None:
                run.credential_hits = credentials_after[0] - credentials_before[0]
                run.credential_misses = credentials_after[1] - credentials_before[1]
        report_errors(run)
        if run.credential_misses:
            raise BenchError(
                f"{run.target}: {run.credential_misses} backend credentials fetched anew during the run (cache "
                f"misses; {run.credential_hits} hits): after the warm-up every request should be a cache hit"
            )
        self.runs.append(run)
        target.runs.append(run)
        dropped = f"  audit events dropped {run.audit_dropped}" if run.audit_dropped else ""
        if run.credential_hits is not None:
            dropped += f"  credential cache hits {run.credential_hits}, misses {run.credential_misses}"
        if run.redis_commands is not None:
            dropped += f"  redis commands {run.redis_commands}"
        print(
            f"  {run.target:<34} {run.rps:>9.0f} req/s  p50 {ms(run.p50_ms)}  p99 {ms(run.p99_ms)}  "
            f"cpu {optional(run.cpu_us_per_request, '.0f')} us/req{dropped}",
            flush=True,
        )
        return run

    def warm(self, target: Target) -> None:
        if self.warmup > 0:
            run = self.wrk.run(target.name + " (warm-up)", target.url, target.script, 32, self.warmup)
            report_errors(run)


def start_idp(workdir: Path, started: list[Service], load_pin: Sequence[str]) -> dict[str, str]:
    """The devkit Okta emulator (`bench/idp.py`) and the JSON line it prints once it serves."""
    command = [sys.executable, str(HERE / "idp.py"), JWT_AUDIENCE, "--agent-key", str(workdir / "agent-key.pem")]
    service = Service("idp", [*load_pin, *command], workdir)
    started.append(service)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        service.check_alive()
        for line in service.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"token"' in line:
                facts: dict[str, str] = json.loads(line)
                return facts
        time.sleep(0.05)
    raise BenchError(f"the IdP did not start within {STARTUP_SECONDS:.0f} s:\n{service.log_tail()}")


def verify_microbench(python: Path, proxy_pin: Sequence[str]) -> dict[str, Any]:
    """`bench/jwt_verify.py` run by `python` (a revision's), pinned like the proxy: µs per token validation."""
    result = subprocess.run(
        [*proxy_pin, str(python), str(HERE / "jwt_verify.py")], capture_output=True, text=True, timeout=120
    )
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("{")), None)
    if result.returncode != 0 or line is None:
        raise BenchError(f"jwt_verify.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    figures: dict[str, Any] = json.loads(line)
    return figures
