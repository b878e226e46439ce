"""The cancel watch both workers use: a marker that appears in storage (its presigned GET turns from 404 to 200) is
seen within one poll period - 2 s for trainings, 1 s for a running inference job - over real HTTP."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpu_runtime import training_worker, worker
from gpu_runtime.service import CancelWatch


@pytest.fixture
def marker():
    """An HTTP server answering 404 until ``state["set"]``, then 200 (what a presigned GET of a marker does)."""
    state = {"set": False, "polls": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            state["polls"] += 1
            self.send_response(200 if state["set"] else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cancel", state
    server.shutdown()


def test_poll_periods():
    assert training_worker.CANCEL_POLL_SECONDS == 2.0
    assert worker.CANCEL_POLL_SECONDS == 1.0


@pytest.mark.parametrize("every", [training_worker.CANCEL_POLL_SECONDS, worker.CANCEL_POLL_SECONDS])
def test_a_marker_is_seen_within_one_poll_period(marker, every):
    url, state = marker
    watch = CancelWatch(url, lambda: False, every)
    watch.start()
    try:
        began = time.monotonic()
        while state["polls"] < 1 and time.monotonic() - began < every * 3:
            time.sleep(0.02)
        assert not watch() and state["polls"] >= 1  # polled, not cancelled
        state["set"] = True
        since = time.monotonic()
        while not watch() and time.monotonic() - since < every * 3:
            time.sleep(0.02)
        assert watch(), "the marker was not seen"
        assert time.monotonic() - since <= every + 1.5  # within a period (2 s for trainings, not 10), with slack
    finally:
        watch.stop()


def test_the_worker_flag_counts_without_a_url():
    flag = {"set": False}
    watch = CancelWatch(None, lambda: flag["set"], 1.0)
    watch.start()  # no URL: no thread, the flag alone decides
    assert watch.thread is None and not watch() and not watch.poll()
    flag["set"] = True
    assert watch()
