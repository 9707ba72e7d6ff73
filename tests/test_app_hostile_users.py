"""Multi-user mode behind a reverse proxy: each request's owner is the proxy's user header.

Before issue 26 every row's owner was "local": any client could cancel any job and read every prompt.
"""

from __future__ import annotations

import json

import httpx
import pytest
from app_fake_backend import FakeBackend
from app_launch import app_paths, launched
from test_app_hostile import GOOD, call

from webui import app
from webui.admin import ADMIN_PASSWORD_ENV

HEADER = "X-Forwarded-User"


def as_user(name: str):
    """``call`` with the proxy's header set."""
    def run(url: str, api: str, body: str):
        return call(url, api, body, headers={HEADER: name})
    return run


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("users")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(ADMIN_PASSWORD_ENV, raising=False)
        paths = app_paths(tmp)
        backend = FakeBackend(paths.exports)
        with launched(backend, paths, user_header=HEADER, admin_users=("root",)) as (url, _admin):
            yield backend, url


def test_users_see_and_cancel_only_their_own_rows(proxied):
    backend, url = proxied
    alice, bob = as_user("alice"), as_user("bob")
    event, data, _ = alice(url, "preview", json.dumps({"data": list({**GOOD, "prompts": "alice's secret"}.values())}))
    assert event == "complete", data
    assert set(backend.owners.values()) == {"alice"}
    (job,) = backend.refine([1], 3, "alice")
    event, data, _ = bob(url, "cancel_job", json.dumps({"data": [job]}))
    assert event == "error" and "not yours" in data["error"]
    assert backend.jobs_[job]["state"] != "cancelled"
    event, data, _ = bob(url, "search_history", json.dumps({"data": [""]}))
    assert event == "complete" and data[0] == [] and "0 image(s)" in data[2]
    event, data, _ = bob(url, "jobs", json.dumps({"data": []}))
    assert event == "complete" and "secret" not in json.dumps(data)
    event, data, _ = alice(url, "search_history", json.dumps({"data": ["secret"]}))
    assert event == "complete" and len(data[0]) >= 1
    event, data, _ = alice(url, "cancel_job", json.dumps({"data": [job]}))
    assert event == "complete" and data == [f"Job #{job}: cancelled."]


def test_an_admin_user_sees_refines_and_cancels_every_users_rows(proxied):
    """--admin-users: the named users' scope is every user's rows; others still see only their own."""
    backend, url = proxied
    alice, root = as_user("alice"), as_user("root")
    event, data, _ = alice(url, "preview", json.dumps({"data": list({**GOOD, "prompts": "alice's draft"}.values())}))
    assert event == "complete", data
    pid = max(p for p, o in backend.owners.items() if o == "alice")
    (job,) = backend.refine([pid], 50, "alice")
    event, data, _ = root(url, "search_history", json.dumps({"data": ["draft"]}))
    assert event == "complete" and len(data[0]) >= 1
    event, data, _ = root(url, "jobs", json.dumps({"data": []}))
    assert event == "complete" and "draft" in json.dumps(data)
    event, data, _ = root(url, "cancel_job", json.dumps({"data": [job]}))
    assert event == "complete" and data == [f"Job #{job}: cancelled."]
    event, data, _ = as_user("bob")(url, "search_history", json.dumps({"data": ["draft"]}))
    assert event == "complete" and data[0] == []


def test_a_request_without_the_user_header_is_refused(proxied):
    _backend, url = proxied
    assert httpx.get(url).status_code == 401
    assert httpx.post(url + "gradio_api/call/jobs", json={"data": []}).status_code == 401
    assert httpx.get(url + "healthz").text == "ok"  # the health probe needs no user
    assert httpx.get(url, headers={HEADER: "carol"}).status_code == 200


def test_the_auth_file(tmp_path):
    path = tmp_path / "users.txt"
    path.write_text("# team\nalice:wonder land\n\nbob:pw:with:colons\n", encoding="utf-8")
    check = app.read_auth_file(path)
    assert check("alice", "wonder land") and check("bob", "pw:with:colons")
    assert not check("alice", "wonder") and not check("mallory", "") and not check("bob", "x" * 10_000)
    path.write_text("alice\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1 .* is not 'name:password'"):
        app.read_auth_file(path)
