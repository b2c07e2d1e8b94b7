"""EndpointGenerator against a misbehaving chat-completions server on 127.0.0.1 (http.server in a thread).

14 misbehaviours: malformed JSON, an answer without choices, a truncated body, a trickled body, trickled
headers, 429 then 200 (Retry-After in seconds), 503 then 200 (backoff), 5xx on every attempt, a Retry-After
far beyond the cap, a Retry-After as an HTTP date, a Retry-After past the deadline, content parts (text,
refusal, image), an int content and a NaN content. Waits go to a fake `sleep`: no test sleeps for a retry.
The server stops by itself after LIFETIME seconds, and every answer it trickles ends within a few seconds.
"""
import email.utils
import json
import socket
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from editcollapse.hardcases.endpoint import EndpointGenerator
from editcollapse.hardcases.validate import validate

LIFETIME = 120.0  # seconds the server lives at most
CF = [dict(case_id=0, prompt="Berlin is the capital of", subject="Berlin", target_new="Italy", ground_truth="Germany")]
SAMPLE = {"prompt": "Mango is a kind of", "subject": "Mango", "target_new": "vegetable", "ground_truth": "fruit"}


def completion(content, finish="stop") -> bytes:
    """A chat-completions answer holding `content` as given (json writes NaN as NaN)."""
    return json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}]}).encode()


def send(handler, status=200, body=b"", headers=(), length=None):
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    for k, v in headers:
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    handler.wfile.write(body)


def answer(content, finish="stop"):
    return lambda h: send(h, body=completion(content, finish))


def status(code, *headers):
    return lambda h: send(h, code, json.dumps({"error": {"message": f"status {code}"}}).encode(), headers)


def raw(body: bytes):
    return lambda h: send(h, body=body)


def truncated(h):
    body = completion(json.dumps([SAMPLE]))
    send(h, body=body[:50], length=len(body))  # then the connection closes


def _send_slowly(h, data: bytes, delay, record) -> None:
    """`data` one byte every `delay` seconds; `record` gets the bytes sent and whether the client left."""
    for i in range(len(data)):
        try:
            h.wfile.write(data[i:i + 1])
            h.wfile.flush()
        except OSError:
            record.update(sent=i, left=True)
            return
        time.sleep(delay)
    record.update(sent=len(data), left=False)


def trickle(delay, record):
    """The whole answer, its body one byte every `delay` seconds."""
    def step(h):
        body = completion(json.dumps([SAMPLE]))
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.flush()
        _send_slowly(h, body, delay, record)
    return step


def trickle_headers(delay, record):
    """The status line and headers, one byte every `delay` seconds."""
    def step(h):
        _send_slowly(h, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + b"X-Pad: " + b"a" * 200 + b"\r\n",
                     delay, record)
    return step


class Handler(BaseHTTPRequestHandler):
    """POST <route>/chat/completions: the route's next step (its last step repeats); hits are counted."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        srv = self.server
        route = self.path.removesuffix("/chat/completions")
        with srv.guard:
            i = srv.hits[route]
            srv.hits[route] += 1
        steps = srv.routes[route]
        try:
            steps[min(i, len(steps) - 1)](self)
        except OSError:  # the client gave up
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.routes, srv.hits, srv.guard = {}, defaultdict(int), threading.Lock()
    base = f"http://127.0.0.1:{srv.server_address[1]}"

    def route(*steps):
        name = f"/r{len(srv.routes)}"
        srv.routes[name] = list(steps)
        return base + name

    srv.route = route
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    stop = threading.Timer(LIFETIME, srv.shutdown)  # stops by itself, whatever the tests do
    stop.daemon = True
    stop.start()
    yield srv
    stop.cancel()
    srv.shutdown()
    srv.server_close()


def endpoint(url, waits=None, **kw):
    kw.setdefault("timeout", 30.0)
    return EndpointGenerator(url, "test-model", subjects=["Mango", "Thunder"], sleep=(
        waits.append if waits is not None else lambda s: pytest.fail(f"slept {s} s")), **kw)


def reason(g):
    _, dropped = validate([g], counterfact=CF)
    return list(dropped.reason)


def hits(server, url):
    return server.hits[url[url.rindex("/"):]]


@pytest.mark.parametrize("step, detail", [(raw(b'{"choices": [{"message": '), "not a chat-completions answer"),
                                          (raw(b'{"id": "x"}'), "not a chat-completions answer"),
                                          (truncated, "RemoteProtocolError")])
def test_broken_answers_are_failed_calls(server, step, detail):
    url = server.route(step)
    g = endpoint(url).ask("p")
    assert g.text is None and detail in g.error and hits(server, url) == 1  # not retried
    assert reason(g) == ["error"]


@pytest.mark.parametrize("trickled", [trickle, trickle_headers])
def test_a_trickling_server_cannot_stretch_a_call_past_its_timeout(server, trickled):
    """httpx's timeout bounds each read; the call's timeout bounds the whole call, however the bytes come."""
    record = {}
    url = server.route(trickled(0.03, record))  # 6 s or more for the whole answer
    t0 = time.monotonic()
    g = endpoint(url, timeout=1.0).ask("p")
    elapsed = time.monotonic() - t0
    assert g.text is None and g.error.startswith("timeout after 1 s in all") and reason(g) == ["timeout"]
    assert elapsed < 3.0  # within 3x the timeout
    for _ in range(100):  # the server notices the hang-up at its next byte
        if record:
            break
        time.sleep(0.05)
    assert record["left"] and record["sent"] < 150


def test_429_then_200_waits_retry_after(server):
    waits = []
    url = server.route(status(429, ("Retry-After", "2")), answer(json.dumps([SAMPLE])))
    g = endpoint(url, waits).ask("p")
    assert g.error is None and waits == [2.0] and hits(server, url) == 2
    assert g.response["choices"][0]["finish_reason"] == "stop"  # the raw answer is kept


def test_5xx_then_200_backs_off(server):
    waits = []
    url = server.route(status(503), status(502), answer(json.dumps([SAMPLE])))
    g = endpoint(url, waits, backoff=0.5).ask("p")
    assert g.error is None and waits == [0.5, 1.0] and hits(server, url) == 3


def test_5xx_every_time_gives_up_after_max_retries(server):
    waits = []
    url = server.route(status(500))
    g = endpoint(url, waits, max_retries=3).ask("p")
    assert g.text is None and g.error.startswith("http error 500 (3 retries)")
    assert waits == [1.0, 2.0, 4.0] and hits(server, url) == 4
    assert reason(g) == ["error"]


@pytest.mark.parametrize("after, wait", [
    ("3600", 5.0),  # capped at max_wait
    (email.utils.formatdate(time.time() + 86400, usegmt=True), 5.0),  # an HTTP date a day ahead: capped
    (email.utils.formatdate(time.time() - 86400, usegmt=True), 0.0),  # an HTTP date past: no wait
    ("soon", 1.0),  # unreadable: the backoff
])
def test_retry_after_is_honoured_and_capped(server, after, wait):
    waits = []
    url = server.route(status(429, ("Retry-After", after)), answer(json.dumps([SAMPLE])))
    assert endpoint(url, waits, max_wait=5.0).ask("p").error is None and waits == [wait]


def test_a_wait_past_the_deadline_ends_the_call(server):
    url = server.route(status(429, ("Retry-After", "20")), answer(json.dumps([SAMPLE])))
    g = endpoint(url, timeout=5.0).ask("p")  # the fake sleep fails the test if called
    assert g.text is None and "would pass the 5 s timeout" in g.error and hits(server, url) == 1


@pytest.mark.parametrize("content, why", [(5, "bad_content"), (float("nan"), "bad_content"),
                                          ({"text": "x"}, "bad_content"), (True, "bad_content"),
                                          ([{"type": "image_url", "image_url": {"url": "x"}}], "bad_content"),
                                          ([{"type": "refusal", "refusal": "I can't"}], "refusal"),
                                          ([], "empty"), (None, "empty")])
def test_content_that_is_not_text_is_a_rejection_with_its_reason(server, content, why):
    g = endpoint(server.route(answer(content))).ask("p")
    assert g.error is None
    assert reason(g) == [why]


def test_content_parts_are_text(server):
    text = json.dumps([SAMPLE])
    parts = [{"type": "text", "text": text[:20]}, {"type": "text", "text": text[20:]}]
    g = endpoint(server.route(answer(parts))).ask("p")
    cands, dropped = validate([g], counterfact=CF)
    assert dropped.empty and [c["subject"] for c in cands] == ["Mango"]


def test_generate_survives_mixed_contents_and_keeps_the_good_ones(server):
    """Answers: text, an int, NaN, content parts, text. generate() returns all five; the three good ones validate."""
    s = [dict(SAMPLE, prompt=f"Mango{i} is a kind of", subject=f"Mango{i}") for i in range(3)]
    url = server.route(answer(json.dumps([s[0]])), answer(7), answer(float("nan")),
                       answer([{"type": "text", "text": json.dumps([s[1]])}]), answer(json.dumps([s[2]])))
    gens = endpoint(url).generate(5)
    cands, dropped = validate(gens, counterfact=CF)
    assert [c["subject"] for c in cands] == ["Mango0", "Mango1", "Mango2"]
    assert list(dropped.reason) == ["bad_content", "bad_content"] and list(dropped.generation) == [1, 2]


def test_bad_settings_are_refused():
    for kw, what in ((dict(timeout=0), "timeout"), (dict(timeout=float("nan")), "timeout"),
                     (dict(timeout="5"), "timeout"), (dict(max_retries=-1), "max_retries"),
                     (dict(backoff=-1.0), "backoff"), (dict(max_wait=float("inf")), "max_wait")):
        with pytest.raises(ValueError, match=what):
            EndpointGenerator("http://127.0.0.1:9", "m", subjects=["a"], **kw)
    assert EndpointGenerator("http://127.0.0.1:9", "m", subjects=["a"], backoff=0, max_wait=0).backoff == 0.0


def test_connection_refused_is_a_failed_call():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    g = endpoint(f"http://127.0.0.1:{port}").ask("p")
    assert g.text is None and g.error.startswith("http error: ConnectError") and reason(g) == ["error"]
