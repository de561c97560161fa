"""Instructions per request, counted by valgrind's callgrind: the one figure the machine's load cannot move.

    .venv/bin/python bench/instructions.py [--baseline REV] [--repeat 3] [--seconds 20]
        [--redis-url redis://127.0.0.1:6379/0]
        [--parts plain,jwt,sessions,cross-app,cross-app-redis,front-door,front-door-okta,rate-limit,rate-limit-redis,
         traced,traced-ratio]

Each gateway (this checkout's, and with `--baseline` that revision's, built as `proxy_overhead.py` builds it) runs
under callgrind with counting off; after a warm-up, counting is switched on for one wrk run (8 connections) against
the bench's nginx backend, then off, and the instructions of all the gateway's threads are divided by the requests
wrk completed. User space only: the kernel's share (sockets, log writes) is not in the count. Valgrind runs the
gateway ~50x slower, so the run serves a few hundred requests; one run's count per request varies by up to ~0.7 %
from one gateway process to the next (string hashing is seeded per process; collections fall where they fall), so a
figure to hold against a floor like 0.99 takes `--repeat 3`: the revisions take turns, and the median of each counts.
`sessions` is jwt with every request continuing one MCP session, as the bench's `sessions` part (`session_load.py`):
with `--baseline b6b678e`, sealed session ids against the in-process binding table. `cross-app` and
`cross-app-redis` are the `redis` part's targets (an `okta-cross-app` backend, without and with `REDIS_URL`): after
the probe's exchange every request is a credential cache hit. `front-door` is the jwt gateway with `FRONT_DOOR=on`
(DESIGN.md §8) and every request carrying the gateway's own access token instead of Okta's: a login made by
`front_door_setup.py` (a live grant in the gateway's store, the token minted with the key the gateway is given as
`FRONT_DOOR_SIGNING_KEY`), the agent by `front_door.default_agent`. `front-door-okta` is the same gateway sent the
jwt part's Okta token: what turning the front door on costs callers with Okta tokens. `rate-limit` is the jwt gateway
with every request budget of DESIGN.md §9 set (`per_user`, `per_agent`, `per_user_backend`: three buckets taken per
request), so generous that nothing is refused, in process; `rate-limit-redis` the same with `REDIS_URL` (the buckets
in Redis, one Lua script per request). `traced` is the jwt gateway with tracing on (DESIGN.md §9), every request
sampled (`OTEL_TRACES_SAMPLER=always_on`) and its spans exported over OTLP/HTTP to the bench's nginx on loopback: the
exporter's thread is counted too; `traced-ratio` the same with the sampler the README advises
(`parentbased_traceidratio`, 0.01: about one request in a hundred sampled). With `jwt` among the parts, each
front-door, rate-limit and traced part's count is also printed over jwt's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from processes import HERE, BenchError, Service, ensure_tools, free_port, services, wait_ready
from revisions import Revision, current_revision, prepare_baseline
from session_load import open_session
from targets import PSK_VALUE, SESSION_SECRET, Target, gateway_config, nginx_config, probe, start_idp
from wrk_runner import REQUEST_HEADERS, Wrk, wrk_script

VALGRIND_START_SECONDS = 180.0
PARTS = (
    "plain",
    "jwt",
    "sessions",
    "cross-app",
    "cross-app-redis",
    "front-door",
    "front-door-okta",
    "rate-limit",
    "rate-limit-redis",
    "traced",
    "traced-ratio",
)
FRONT_DOOR_PARTS = {"front-door", "front-door-okta"}
RATE_LIMIT_PARTS = {"rate-limit", "rate-limit-redis"}
TRACED_PARTS = {"traced", "traced-ratio"}
IDP_PARTS = {"jwt", "sessions", "cross-app", "cross-app-redis", *TRACED_PARTS, *FRONT_DOOR_PARTS, *RATE_LIMIT_PARTS}
DEFAULT_REDIS_URL = os.environ.get("OAP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# The front door's settings. Its Okta app is never called on the measured path (no login, no Cross App Access), so
# any client id and secret do; OKTA_DOMAIN is the IdP's org all the same.
FRONT_DOOR_ENV = {
    "FRONT_DOOR": "on",
    "OKTA_CLIENT_ID": "0oabenchgateway00001",
    "OKTA_CLIENT_SECRET": "bench-gateway-app-secret",
    "STATE_ENCRYPTION_KEY": "oap-bench-state-encryption-key-0123456789",
}
FRONT_DOOR_YAML = "front_door:\n  default_agent: bench-agent\n"  # gateway_config's agent
SETUP_SECONDS = 60.0
# Every request budget, each far above what valgrind's few hundred requests could spend: the buckets are taken (three
# per request), never refused.
RATE_LIMIT_YAML = """rate_limits:
  per_user: {requests_per_minute: 10000000}
  per_agent: {requests_per_minute: 10000000}
  per_user_backend: {requests_per_minute: 10000000, burst: 10000000}
"""


def callgrind_total(out_files: Sequence[Path]) -> int:
    """The instructions counted in the dumps (one file per thread); `totals:` is each file's count."""
    total = 0
    for path in out_files:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def front_door_login(revision: Revision, workdir: Path, database_url: str, base_url: str) -> dict[str, str]:
    """`front_door_setup.py`, run by `revision`'s Python: the store migrated, a grant in it, and a token for the
    bench backend's path (`/mcp`); also the signing key's PEM, shared by every front-door gateway of the run."""
    key_file = workdir / "front-door-key.pem"
    command = [str(revision.python), str(HERE / "front_door_setup.py"), "--database-url", database_url]
    command += ["--base-url", base_url, "--resource-path", "/mcp", "--key-file", str(key_file)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}  # a clean environment, like the gateway's
    result = subprocess.run(command, capture_output=True, text=True, timeout=SETUP_SECONDS, env=env, check=False)
    line = next((ln for ln in reversed(result.stdout.splitlines()) if ln.startswith("{")), None)
    if result.returncode != 0 or line is None:
        raise BenchError(f"front_door_setup.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    facts: dict[str, str] = json.loads(line)
    return facts | {"signing_key": key_file.read_text()}


def measure(
    revision: Revision,
    part: str,
    workdir: Path,
    backend_port: int,
    wrk: Wrk,
    seconds: float,
    idp: dict[str, str],
    redis_url: str = DEFAULT_REDIS_URL,
) -> tuple[int, int]:
    """(instructions, requests) of one run of `revision`'s gateway in configuration `part`."""
    out_dir = workdir / f"callgrind-{revision.label}-{part}"
    shutil.rmtree(out_dir, ignore_errors=True)  # an earlier round's (copied out first with --keep)
    out_dir.mkdir()
    port = free_port()
    config = workdir / f"{part}.yaml"
    headers = dict(REQUEST_HEADERS)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LOG_LEVEL": "INFO",
        "BENCH_PSK": PSK_VALUE,
        "AUDIT_ENABLED": "false",
        "DATABASE_URL": f"sqlite:///{workdir / f'{revision.label}-{part}.db'}",
        "DATA_DIR": str(workdir / f"{revision.label}-{part}-data"),  # session.key: not in the cwd
    }
    if part in IDP_PARTS:
        env |= {"OKTA_ISSUER": idp["issuer"], "OKTA_AUDIENCE": idp["audience"], "OKTA_JWKS_URI": idp["jwks_uri"]}
        backend = {"sessions": "sessions", "cross-app": "cross-app", "cross-app-redis": "cross-app"}.get(part, "psk")
        config.write_text(gateway_config(backend_port, idp["client_id"], backend=backend, idp=idp))
        headers["Authorization"] = f"Bearer {idp['token']}"
        if part in FRONT_DOOR_PARTS:  # the same gateway, the front door on; the grant made before it starts
            base_url = f"http://127.0.0.1:{port}"
            login = front_door_login(revision, workdir, env["DATABASE_URL"], base_url)
            env |= FRONT_DOOR_ENV | {"OKTA_DOMAIN": idp["org"], "GATEWAY_BASE_URL": base_url}
            env["FRONT_DOOR_SIGNING_KEY"] = login["signing_key"]
            config.write_text(config.read_text() + FRONT_DOOR_YAML)
            if part == "front-door":
                headers["Authorization"] = f"Bearer {login['token']}"
        if backend == "cross-app":  # as the bench's GatewayLauncher sets them
            env |= {"OKTA_DOMAIN": idp["org"], "SESSION_SECRET": SESSION_SECRET}
        if part == "cross-app-redis":
            env["REDIS_URL"] = redis_url
        if part in RATE_LIMIT_PARTS:
            config.write_text(config.read_text() + RATE_LIMIT_YAML)
        if part in TRACED_PARTS:  # spans exported to the bench's nginx (its OTLP sink location)
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{backend_port}"
            env["OTEL_TRACES_SAMPLER"] = "always_on" if part == "traced" else "parentbased_traceidratio"
            if part == "traced-ratio":  # what the README advises: one request in a hundred sampled
                env["OTEL_TRACES_SAMPLER_ARG"] = "0.01"
        if part == "rate-limit-redis":  # serve requires SESSION_SECRET with REDIS_URL
            env |= {"REDIS_URL": redis_url, "SESSION_SECRET": SESSION_SECRET}
    else:
        config.write_text(gateway_config(backend_port))
    script = workdir / f"{part}.lua"
    script.write_text(wrk_script(headers))
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--separate-threads=yes",
        f"--callgrind-out-file={out_dir / 'callgrind.out.%p'}",
        str(revision.gateway),
        "serve",
        "--config",
        str(config),
        "--env-file",
        "/dev/null",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with services() as started:
        service = Service(f"gateway-{revision.label}-{part}", command, workdir, env=env)
        started.append(service)
        deadline = time.monotonic() + VALGRIND_START_SECONDS
        while True:
            try:
                wait_ready(service, f"http://127.0.0.1:{port}/healthz")
                break
            except BenchError:
                if time.monotonic() > deadline:
                    raise
        url = f"http://127.0.0.1:{port}/mcp"
        probe(service, url, headers)
        if part == "sessions":  # every request from here on continues the session initialized now
            target = Target(service.name, service, url, script, headers)
            open_session(target, workdir)
            script = target.script
        wrk.run("warm-up", url, script, 8, 3)
        pid = str(service.process.pid)
        subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
        run = wrk.run(service.name, url, script, 8, seconds)
        subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)  # written when it returns
        dumps = sorted(out_dir.glob("callgrind.out.*"))
        service.stop()
    errors = {kind: count for kind, count in run.socket_errors.items() if kind != "timeout"}
    if run.non_2xx or errors:
        raise BenchError(f"{service.name}: {run.non_2xx} answers >= 400, socket errors {run.socket_errors}")
    if run.socket_errors:  # wrk only counts a late answer (> 2 s) as a timeout; it still arrives and is counted
        print(f"  ({service.name}: {run.socket_errors['timeout']} wrk timeouts: the machine is busy)", flush=True)
    return callgrind_total(dumps), run.requests


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=None, help="a git revision to count beside this checkout")
    parser.add_argument(
        "--parts", default="plain,jwt", help=f"configurations, of {', '.join(PARTS)} (default: plain,jwt)"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of counted load per run (default 20)")
    parser.add_argument(
        "--redis-url", default=DEFAULT_REDIS_URL, help="REDIS_URL of the cross-app-redis and rate-limit-redis parts"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each gateway, the revisions taking turns; the median counts (default 1; 3 for a figure)",
    )
    parser.add_argument("--keep", type=Path, default=None, help="copy the callgrind dumps here (callgrind_annotate)")
    options = parser.parse_args(argv)
    parts = [p for p in options.parts.split(",") if p]
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise BenchError("valgrind is not installed (Debian/Ubuntu: apt-get install -y valgrind)")
    wrk_path, nginx = ensure_tools()
    revisions = [current_revision()]
    if options.baseline:
        revisions.append(prepare_baseline(options.baseline))
    wrk = Wrk(wrk_path, 1)
    with tempfile.TemporaryDirectory(prefix="oap-instructions-") as tmp, services() as started:
        workdir = Path(tmp)
        backend_port = free_port()
        (workdir / "nginx.conf").write_text(nginx_config(workdir, backend_port))
        nginx_command = [nginx, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", str(workdir / "e.log")]
        backend = Service("nginx", nginx_command, workdir)
        started.append(backend)
        wait_ready(backend, f"http://127.0.0.1:{backend_port}/")
        idp = start_idp(workdir, started, []) if IDP_PARTS & set(parts) else {}
        runs: dict[tuple[str, str], list[float]] = {}
        for part in parts:
            for round_ in range(1, options.repeat + 1):
                for revision in revisions:
                    instructions, requests = measure(
                        revision, part, workdir, backend_port, wrk, options.seconds, idp, options.redis_url
                    )
                    runs.setdefault((revision.label, part), []).append(instructions / requests)
                    if options.keep is not None:
                        kept = f"{revision.label}-{part}" + (f"-{round_}" if options.repeat > 1 else "")
                        shutil.copytree(workdir / f"callgrind-{revision.label}-{part}", options.keep / kept)
                    print(
                        f"{part:15} {revision.label:9} {revision.describe:24} {instructions / requests / 1000:8.1f} k "
                        f"instructions/request ({requests} requests)",
                        flush=True,
                    )
        counts = {key: statistics.median(values) for key, values in runs.items()}
        if options.repeat > 1:
            print(f"\nmedian of {options.repeat} runs (k instructions/request):")
            for (label, part), value in counts.items():
                print(f"  {part:15} {label:9} {value / 1000:8.1f}")
        if options.baseline:
            print("\nratio current / baseline (instructions per request; < 1 is fewer):")
            for part in parts:
                print(f"  {part:15} {counts[('current', part)] / counts[('baseline', part)]:.3f}")
        over_jwt = [part for part in parts if part in FRONT_DOOR_PARTS | RATE_LIMIT_PARTS | TRACED_PARTS]
        if over_jwt and "jwt" in parts:
            print(
                "\nratio to jwt (instructions per request; the target of the front door and of in-process rate "
                "limits: <= ~1.03, i.e. >= 0.97x req/s; rate-limit-redis and traced: printed):"
            )
            for part in over_jwt:
                for revision in revisions:
                    ratio = counts[(revision.label, part)] / counts[(revision.label, "jwt")]
                    print(f"  {part:15} {revision.label:9} {ratio:.3f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        sys.exit(1)
