"""benchmarks.harness.stream_generate (the TTFT benchmarks' one streaming request) against a stand-in server."""

import http.server
import json
import threading

import pytest

from benchmarks.harness import stream_generate


def _server(chunks: list[bytes]):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()
            for c in chunks:
                self.wfile.write(c)

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_first_chunk_time_and_last_chunk():
    chunks = [f"data: {json.dumps({'text': str(i), 'meta_info': {'prompt_tokens': 5}})}\n\n".encode()
              for i in range(3)] + [b"data: [DONE]\n\n"]
    srv = _server(chunks)
    try:
        ttft, latency, last = stream_generate(f"http://127.0.0.1:{srv.server_port}", {"stream": True})
    finally:
        srv.shutdown()
    assert last == {"text": "2", "meta_info": {"prompt_tokens": 5}}       # [DONE] is not a chunk
    assert ttft is not None and 0 < ttft <= latency


def test_nothing_streamed_gives_no_ttft():
    srv = _server([b"data: [DONE]\n\n"])
    try:
        ttft, latency, last = stream_generate(f"http://127.0.0.1:{srv.server_port}", {"stream": True})
    finally:
        srv.shutdown()
    assert ttft is None and last is None and latency > 0


def test_an_http_error_is_raised():
    import urllib.error
    with pytest.raises(urllib.error.URLError):
        stream_generate("http://127.0.0.1:9", {"stream": True}, timeout_s=5)


def test_request_phases_come_from_the_meta_infos_timestamps():
    from benchmarks.harness import request_phases

    meta = {"request_received_ts": 100.0, "api_server_dispatch_finish_ts": 100.25, "forward_entry_time": 100.5,
            "prefill_finished_time": 101.75}
    assert request_phases(meta) == {"preprocess_s": 0.25, "to_forward_s": 0.25, "prefill_s": 1.25}
    # a server without --enable-metrics sends none of them; a missing one drops only its phases
    assert request_phases({}) == {}
    assert request_phases({**meta, "forward_entry_time": None}) == {"preprocess_s": 0.25}
