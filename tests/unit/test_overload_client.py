"""The overload benchmark's raw burst client (`benchmarks/serve_overload.py`): it parses whole HTTP
responses, and its clock covers the server's time and not the client's."""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import REPO

DELAY_S = 0.05


def _benchmark():
    # A script, not a package module; it puts `benchmarks/` on sys.path itself for its `serve_load`.
    spec = importlib.util.spec_from_file_location("serve_overload", REPO / "benchmarks" / "serve_overload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


overload = _benchmark()


class _SlowRejections(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(DELAY_S)
        body = b'{"detail": "overloaded"}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:5])
        self.wfile.flush()
        time.sleep(0.01)  # the body in two segments: a status line alone is not a response
        self.wfile.write(body[5:])

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # /healthz, kept alive: the connection stays open after the answer
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


class _HangsUp(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.do_GET()

    def do_GET(self) -> None:
        self.wfile.write(b"HTTP/1.1 503 Service Unavailable\r\n")  # then closes, mid-headers
        self.close_connection = True


@contextlib.contextmanager
def _server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def slow_server() -> Iterator[str]:
    with _server(_SlowRejections) as url:
        yield url


def test_raw_burst_times_each_request_from_its_write_to_its_whole_response(slow_server: str) -> None:
    results = overload.raw_burst(slow_server, 12)
    assert len(results) == 12 and {status for status, _, _ in results} == {503}
    # Each clock starts before its request is written and stops at the body's last byte, so it holds
    # the server's whole time (sleeps are at least as long as asked), however loaded the machine.
    assert all(seconds >= DELAY_S + 0.01 for _, seconds, _ in results), results
    summary = overload.summarise(results)
    assert summary["rejected_503"] == 12 and summary["accepted"] == 0


def test_raw_burst_counts_a_connection_closed_mid_response_apart() -> None:
    with _server(_HangsUp) as url:
        results = overload.raw_burst(url, 4)  # kept waiting for the rest, it would raise at its deadline
    assert [status for status, _, _ in results] == [0] * 4
    assert overload.summarise(results)["other"] == [0]


def test_opening_the_connections_reads_each_answer_on_a_connection_left_open(slow_server: str) -> None:
    assert overload.open_connections(slow_server, 6) == {200: 6}  # waiting for a close instead, it would time out


def test_opening_the_connections_counts_one_closed_mid_response_apart() -> None:
    with _server(_HangsUp) as url:
        assert overload.open_connections(url, 3) == {0: 3}


@pytest.mark.parametrize(
    ("data", "closed", "status"),
    [
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n", False, None),  # headers not ended
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nab", False, None),  # body short
        (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nabcd", False, 503),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n", False, None),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n", False, 200),
        (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\nbusy", False, None),
        (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\nbusy", True, 503),
    ],
)
def test_a_response_counts_once_it_is_whole(data: bytes, closed: bool, status: int | None) -> None:
    assert overload.response_status(data, closed) == status
