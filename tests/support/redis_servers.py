"""Redis for the tests: the shared server, and servers of a test's own that it may stop and start again.

- `shared_redis_url()`: `OAP_TEST_REDIS_URL` (default redis://127.0.0.1:6379/0) once it answers PING; unreachable →
  skip, or fail under `OAP_REQUIRE_SERVICES=1`. Tests keep apart on it by their own key names (each test's
  backends and agents differ), never by flushing it.
- `OwnRedis`: `redis-server --port <free> --save '' --appendonly no` as a subprocess of the test (`start()`,
  `stop()` by PID, `start()` again on the same port); `own_redis()` yields one started and stops it at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

from .node_tools import services_required
from .processes import LOOPBACK, free_port

SHARED_URL = os.environ.get("OAP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
START_SECONDS = 10.0


def _unavailable(reason: str) -> None:
    if services_required():
        pytest.fail(f"{reason} (OAP_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def shared_redis_url() -> str:
    client = redis.Redis.from_url(SHARED_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        _unavailable(f"Redis at {SHARED_URL} is unreachable ({type(exc).__name__})")
    finally:
        client.close()
    return SHARED_URL


class OwnRedis:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://{LOOPBACK}:{port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            _unavailable("redis-server is not installed (Debian: apt-get install redis-server)")
        assert server is not None
        command = [server, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + START_SECONDS
        try:
            while True:
                try:
                    client.ping()
                    return
                except (redis.RedisError, OSError):
                    if time.monotonic() > deadline or self._process.poll() is not None:
                        raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None


@contextmanager
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
