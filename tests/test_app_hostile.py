"""Hostile input and hostile web pages against the launched app (stand-in backend, real HTTP on 127.0.0.1).

Each test is one finding of the outside probe (issue 26) and fails on the code it found it in:
the quadratic seed-list parser, DNS rebinding and foreign origins, the open upload route and
monitoring page, unhandled odd job ids, lone surrogates reaching the store.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from app_launch import fake_server

from webui.guard import is_trusted, same_origin, trusted_hosts
from webui.inputs import MAX_SEED_LIST_CHARS, FieldError, parse_explore, parse_seed_list

GOOD = dict(prompts="a red circle", negative="", seed_count=2, seed_start=0, seed_list="", steps=4,
            solver="consistency", guidance=3.0, width=32, height=32, refine_steps=6, image=None,
            keep_image_size=False)
MB = 1_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from fake_server(tmp_path_factory, "hostile")


def call(url: str, api: str, body: str, timeout: float = 20.0, headers: dict | None = None) -> tuple[str, dict, float]:
    """POST /gradio_api/call/<api> with a raw JSON body, then read its event stream: (event, data, seconds)."""
    t0 = time.perf_counter()
    with httpx.Client(timeout=timeout, headers=headers) as client:
        r = client.post(f"{url}gradio_api/call/{api}", content=body.encode("utf-8", "surrogatepass"),
                        headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text[:200]
        event_id = r.json()["event_id"]
        event, data = "", {}
        with client.stream("GET", f"{url}gradio_api/call/{api}/{event_id}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event in ("error", "complete"):
                    data = json.loads(line.split(":", 1)[1]) if line.split(":", 1)[1].strip() != "null" else {}
                    break
    return event, data, time.perf_counter() - t0


def explore_body(**changes) -> str:
    return json.dumps({"data": list({**GOOD, **changes}.values())})


class Prober(threading.Thread):
    """GET /healthz over one keep-alive connection every 20 ms; records the longest wait."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.waits = url, threading.Event(), []

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                t = time.perf_counter()
                assert client.get(f"{self.url}healthz").text == "ok"
                self.waits.append(time.perf_counter() - t)
                time.sleep(0.02)


# --- 1. length limits before parsing; linear seed parsing ---------------------------------------

@pytest.mark.parametrize("text", ["1" * MB, "1-" * (MB // 2), "1," * (MB // 2), " " * MB + "1"])
def test_a_megabyte_seed_list_is_rejected_at_once_naming_the_field_and_limit(text):
    t = time.perf_counter()
    with pytest.raises(FieldError) as err:
        parse_explore(**{**GOOD, "seed_list": text})
    took = time.perf_counter() - t
    assert err.value.field == "Seed list" and str(MAX_SEED_LIST_CHARS) in str(err.value)
    assert len(str(err.value)) < 200  # the input is never echoed
    assert took < 0.05, f"{took * 1e3:.1f} ms"


def test_seed_parsing_is_linear_up_to_the_limit():
    """The longest accepted text parses in well under a millisecond per character: no backtracking."""
    text = ",".join(str(4_000_000_000 + i) for i in range(64))[:MAX_SEED_LIST_CHARS]
    text = text.rsplit(",", 1)[0]
    t = time.perf_counter()
    seeds = parse_seed_list(text)
    assert time.perf_counter() - t < 0.01 and len(seeds) == text.count(",") + 1
    for bad in ["9" * 999, "1-" + "9" * 990, "0-" * 499]:
        t = time.perf_counter()
        with pytest.raises(FieldError, match="Seed list"):
            parse_seed_list(bad)
        assert time.perf_counter() - t < 0.01


@pytest.mark.parametrize("field, value, name", [
    ("prompts", "p" * MB, "Prompts"),
    ("negative", "n" * MB, "Negative prompt"),
    ("solver", "s" * MB, "Solver"),
    ("prompts", "a \ud800 lone surrogate", "Prompts"),
    ("negative", "\udfff", "Negative prompt"),
])
def test_every_text_field_has_a_limit_and_must_be_valid_text(field, value, name):
    t = time.perf_counter()
    with pytest.raises(FieldError) as err:
        parse_explore(**{**GOOD, field: value}, solvers=["consistency"])
    assert err.value.field == name and len(str(err.value)) < 200
    assert time.perf_counter() - t < 0.05


def test_a_megabyte_seed_list_over_http_never_stalls_other_requests(server):
    """The bar: a 1 MB seed list is rejected with the field's message while /healthz keeps answering."""
    backend, _paths, url = server
    call(url, "preview", explore_body(seed_list="x"))  # warm up: Gradio's first event imports pandas (~1 s)
    backend.calls.clear()
    prober = Prober(url)
    prober.start()
    time.sleep(0.2)
    try:
        event, data, took = call(url, "preview", explore_body(seed_list="1" * MB), timeout=10)
    finally:
        time.sleep(0.2)
        prober.stop.set()
        prober.join()
    assert event == "error" and "Seed list: at most 1000 characters" in data["error"], data
    assert len(data["error"]) < 200 and backend.calls == []
    worst = max(prober.waits)
    print(f"\n1 MB seed list: rejected over HTTP in {took * 1e3:.0f} ms (POST + event stream); "
          f"/healthz max wait {worst * 1e3:.0f} ms over {len(prober.waits)} probes")
    assert worst < 0.2


def test_a_lone_surrogate_or_odd_job_id_gets_one_sentence_and_writes_nothing(server):
    backend, _paths, url = server
    backend.calls.clear()
    event, data, _ = call(url, "preview", explore_body(prompts="a \ud800 b"))
    assert event == "error" and data["error"].startswith("Prompts:") and "surrogate" in data["error"]
    assert backend.calls == []  # nothing ran, nothing was written
    for raw in ["9223372036854775808", "Infinity", "NaN", "-Infinity", '"twelve"', '"' + "7" * MB + '"', "null",
                "[1]", "true"]:
        event, data, _ = call(url, "cancel_job", '{"data": [' + raw + ']}')
        assert event == "error" and data["error"] == "Job id: enter the number of a job from the list.", (raw, data)
    for field, value, name in [("seed_count", "abc", "Seed count"), ("seed_start", "Infinity", "Seed start"),
                               ("steps", "NaN", "Preview steps"), ("width", [1], "Width"),
                               ("guidance", "x" * MB, "Guidance"), ("prompts", 7, "Prompts")]:
        body = explore_body(**{field: value}).replace('"Infinity"', "Infinity").replace('"NaN"', "NaN")
        event, data, _ = call(url, "preview", body)
        assert event == "error" and data["error"].startswith(name + ":") and len(data["error"]) < 200, data
    event, data, _ = call(url, "refine", json.dumps({"data": [["x:0"], "steps"]}))
    assert event == "error" and data["error"].startswith("Selection:"), data
    assert backend.calls == []
    event, data, _ = call(url, "search_history", json.dumps({"data": ["q" * MB]}))
    assert event == "error" and data["error"] == "Search: at most 200 characters, got 1000000"
    event, data, _ = call(url, "history_png", json.dumps({"data": ["final:" + "1" * MB]}))
    assert event == "error" and data["error"].startswith("Item:") and len(data["error"]) < 200


def test_the_engine_refuses_a_lone_surrogate_before_writing():
    from runtime.request import PreviewRequest, validate

    class Model:
        default_guidance = 3.0

    with pytest.raises(ValueError, match=r"prompts\[0\].*surrogate"):
        validate(PreviewRequest(prompts=["a\ud800"], seeds=[1]), Model())
    with pytest.raises(ValueError, match="negative_prompt.*surrogate"):
        validate(PreviewRequest(prompts=["a"], seeds=[1], negative_prompt="\udc00"), Model())


# --- 2. trusted hosts, same origin, security headers --------------------------------------------

FOREIGN = "evil.example.com"


def test_a_foreign_host_is_refused_without_cors_headers(server):
    """DNS rebinding: a page on evil.example.com re-pointed at 127.0.0.1 sends Host and Origin of its own."""
    _backend, _paths, url = server
    port = httpx.URL(url).port
    rebound = {"Host": f"{FOREIGN}:{port}", "Origin": f"http://{FOREIGN}:{port}"}
    for method, path in [("GET", ""), ("GET", "config"), ("GET", "gradio_api/info"),
                         ("POST", "gradio_api/call/jobs"), ("OPTIONS", "gradio_api/queue/join")]:
        r = httpx.request(method, url + path, headers={**rebound, "Access-Control-Request-Method": "POST"},
                          json={"data": []} if method == "POST" else None)
        assert 400 <= r.status_code < 500, (method, path, r.status_code)
        assert not any(k.lower().startswith("access-control-") for k in r.headers), (path, dict(r.headers))
    assert httpx.get(url + "config", headers={"Host": "localhost"}).status_code == 200


def test_a_foreign_origin_gets_no_cors_header_and_cannot_write(server):
    _backend, _paths, url = server
    evil = {"Origin": f"http://{FOREIGN}"}
    r = httpx.get(url + "config", headers=evil)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = httpx.post(url + "gradio_api/call/jobs", headers=evil, json={"data": []})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = httpx.options(url + "gradio_api/queue/join", headers={**evil, "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    for origin in ("null", f"http://127.0.0.1:{httpx.URL(url).port + 1}"):  # another local port is another site
        r = httpx.get(url + "config", headers={"Origin": origin})
        assert "access-control-allow-origin" not in r.headers
    own = url.rstrip("/")  # the app's own page: same origin, as a browser sends it
    r = httpx.post(url + "gradio_api/call/jobs", headers={"Origin": own}, json={"data": []})
    assert r.status_code == 200 and r.headers.get("access-control-allow-origin") == own


def test_every_answer_carries_security_headers(server):
    _backend, _paths, url = server
    r = httpx.get(url)
    assert r.status_code == 200 and "<html" in r.text.lower()
    assert "frame-ancestors 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "SAMEORIGIN" and r.headers["x-content-type-options"] == "nosniff"


def test_trusted_host_list():
    assert trusted_hosts("127.0.0.1") == ("localhost", "127.0.0.1", "::1")
    hosts = trusted_hosts("0.0.0.0", ["box.lan, *.example.org"], share=True)
    assert "0.0.0.0" not in hosts and "box.lan" in hosts and "*.gradio.live" in hosts
    assert is_trusted("BOX.lan.:7860", hosts) and is_trusted("[::1]:7860", hosts) and is_trusted("127.0.0.2", hosts)
    assert is_trusted("a.example.org", hosts) and not is_trusted("example.org.evil.com", hosts)
    assert not is_trusted("evil.example.com", hosts) and not is_trusted("", hosts)
    assert trusted_hosts("10.0.0.5")[-1] == "10.0.0.5"
    from webui.guard import Guard

    behind_proxy = Guard(None, trusted_hosts("127.0.0.1", ["app.example.org"]))
    assert behind_proxy._declared("https://app.example.org") and not behind_proxy._declared("https://evil.org")
    assert not Guard(None, trusted_hosts("127.0.0.1"))._declared("http://localhost:9999")
    assert same_origin("http://localhost:7860", "localhost:7860") and not same_origin("null", "localhost:7860")
    assert not same_origin("http://localhost:7861", "localhost:7860")


# --- 4. closed routes, request size -------------------------------------------------------------

def test_uploads_and_monitoring_are_closed(server):
    _backend, paths, url = server
    before = sorted(p for p in paths.gradio_tmp.rglob("*") if p.is_file())
    for _ in range(3):
        r = httpx.post(url + "gradio_api/upload", files={"files": ("a.png", b"\x89PNG" + b"x" * 1000)})
        assert r.status_code == 404
    assert sorted(p for p in paths.gradio_tmp.rglob("*") if p.is_file()) == before
    assert httpx.get(url + "gradio_api/upload_progress?upload_id=x").status_code == 404
    assert httpx.get(url + "monitoring/summary").status_code == 404
    assert httpx.get(url + "monitoring").status_code == 404


def test_an_oversized_body_is_refused_before_it_is_read(server):
    _backend, _paths, url = server
    r = httpx.post(url + "gradio_api/call/preview", content=b"x" * (5 * MB), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_the_upload_routes_open_only_for_an_editing_model_and_stay_bounded():
    """A text-to-image model takes no files (404); an editing model's uploads are limited to one input image."""
    import asyncio

    from webui.guard import UPLOAD_OVERHEAD_BYTES, Guard

    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def status(guard: Guard, path: str, length: int) -> int:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "method": "POST", "path": path,
                 "headers": [(b"host", b"127.0.0.1:7860"), (b"content-length", str(length).encode())]}
        asyncio.run(guard(scope, receive, send))
        return sent[0]["status"]

    text_model = Guard(inner, trusted_hosts("127.0.0.1"))
    editing = Guard(inner, trusted_hosts("127.0.0.1"), max_upload=10 * MB)
    assert status(text_model, "/gradio_api/upload", 1000) == 404
    assert status(editing, "/gradio_api/upload", 1000) == 200
    assert status(editing, "/gradio_api/upload", 10 * MB + UPLOAD_OVERHEAD_BYTES) == 200
    assert status(editing, "/gradio_api/upload", 10 * MB + UPLOAD_OVERHEAD_BYTES + 1) == 413
    assert status(editing, "/gradio_api/call/preview", 5 * MB) == 413  # other requests keep their limit
    assert status(editing, "/monitoring", 10) == 404 and status(editing, "/upload", 10) == 404


def test_an_image_field_naming_a_server_file_is_refused(server):
    """Gradio checks a file record's path only when it carries ``meta``; a bare ``{"path": ...}`` reaches the
    handler, which reads nothing outside Gradio's upload folder (here: the store's own database file)."""
    backend, paths, url = server
    backend.calls.clear()
    for image in ({"path": str(paths.db)}, {"path": str(paths.gradio_tmp / ".." / "data" / "store.sqlite3")},
                  {"path": str(paths.db), "meta": {"_type": "gradio.FileData"}}):
        event, data, _ = call(url, "preview", explore_body(image=image))
        assert event == "error", (image, data)
    event, data, _ = call(url, "preview", explore_body(image={"path": str(paths.db)}))
    assert data["error"] == "image: upload the image through the app; files on the server are not read", data
    assert backend.calls == []
