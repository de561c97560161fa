"""Shared fixtures for the forwarding tests: the devkit's real MCP SDK backends, started once per session.

- `employees_backend`: stateless (`python -m okta_agent_proxy.devkit.sample_backends employees`), checks a
  pre-shared key in `X-API-Key` (`SAMPLE_BACKEND_API_KEY`).
- `partners_backend`: `--stateful` (sessions, a GET stream), checks HTTP Basic (`SAMPLE_BACKEND_BASIC`).

Both answer 401 without the credential, so every successful call through the gateway proves it injected it.
`sample_gateway_config` routes `/employees` and `/partners` to them with the matching `auth_method`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.gateway import DEFAULT_BASIC, DEFAULT_KEY, basic_backend, gateway_config, psk_backend
from tests.support.processes import ServerProcess, start_server


@dataclass(frozen=True)
class SampleBackends:
    employees: ServerProcess  # stateless, pre-shared key
    partners: ServerProcess  # stateful, HTTP Basic

    def config(self, **extra: Any) -> str:
        """Gateway YAML: /employees → employees (pre-shared-key), /partners → partners (service-account)."""
        return gateway_config(
            employees=psk_backend(self.employees.url("/mcp"), "/employees", **extra),
            partners=basic_backend(self.partners.url("/mcp"), "/partners", **extra),
        )


def _start_sample(name: str, *, stateful: bool, credential: dict[str, str]) -> ServerProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMPLE_BACKEND_")} | credential

    def command(port: int) -> list[str]:
        argv = [sys.executable, "-m", "okta_agent_proxy.devkit.sample_backends", name, "--port", str(port)]
        return [*argv, "--stateful"] if stateful else argv

    # Any HTTP answer on /mcp (401 without the credential) means uvicorn is up.
    return start_server(command, http_path="/mcp", env=env, name=f"sample-{name}")


@pytest.fixture(scope="session")
def sample_backends() -> Iterator[SampleBackends]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        employees = pool.submit(
            _start_sample, "employees", stateful=False, credential={"SAMPLE_BACKEND_API_KEY": DEFAULT_KEY}
        )
        partners = pool.submit(
            _start_sample, "partners", stateful=True, credential={"SAMPLE_BACKEND_BASIC": ":".join(DEFAULT_BASIC)}
        )
        futures = (employees, partners)
        failures = [future.exception() for future in futures]
    started = [future.result() for future, failure in zip(futures, failures, strict=True) if failure is None]
    if len(started) < len(futures):
        for server in started:
            server.close()
        raise next(failure for failure in failures if failure is not None)
    try:
        yield SampleBackends(*started)
    finally:
        for server in started:
            server.close()
