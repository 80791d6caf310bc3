"""GET /v1/events: one SSE stream of every job's state/progress/log changes and
of resident changes; Last-Event-ID (header or ?last_event_id) resumes exactly
where a client left off, also across a restart of the server."""
import http.client
import json
import os
import socket
import time
import urllib.parse

import pytest


class SSE:
    """A minimal text/event-stream client over one HTTP connection."""

    def __init__(self, srv, path="/v1/events", headers=None, timeout=30):
        u = urllib.parse.urlsplit(srv.base)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        h = {"Accept": "text/event-stream"}
        if srv.token:
            h["Authorization"] = "Bearer " + srv.token
        h.update(headers or {})
        self.conn.request("GET", path, headers=h)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = dict(self.resp.headers)
        self.comments = []
        self.retry = None

    def next(self):
        """The next event as {"id", "event", "data"}; comments are collected."""
        ev = {"id": None, "event": "message", "data": []}
        while True:
            line = self.resp.readline()
            if not line:
                raise EOFError("stream ended")
            line = line.decode().rstrip("\n")
            if line == "":
                if ev["data"] or ev["id"] is not None:
                    ev["data"] = "\n".join(ev["data"])
                    return ev
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                ev["data"].append(value)
            elif field == "id":
                ev["id"] = int(value)
            elif field == "event":
                ev["event"] = value
            elif field == "retry":
                self.retry = int(value)

    def until(self, pred, limit=2000):
        """Events up to and including the first one pred() accepts."""
        out = []
        for _ in range(limit):
            ev = self.next()
            out.append(ev)
            if pred(ev):
                return out
        raise AssertionError("no matching event in %d" % limit)

    def close(self):
        self.conn.close()


def make_model(root, name, nfiles=3, size=50000):
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for i in range(nfiles):
        (d / ("f%d.bin" % i)).write_bytes(os.urandom(size))
    return d


def job_done(job_id):
    def pred(ev):
        if ev["event"] != "state":
            return False
        doc = json.loads(ev["data"])
        return doc["id"] == job_id and doc["state"] in ("succeeded", "failed", "cancelled")
    return pred


def test_stream_carries_every_job_change_and_resumes(make_server, model_root):
    model = make_model(model_root, "m")
    srv = make_server(args=["--model-root", str(model_root)])
    srv.run_job({"type": "verify", "model": str(model)})  # before: not sent to new clients

    s = SSE(srv)
    assert s.status == 200
    assert s.headers["Content-Type"] == "text/event-stream"
    job = srv.submit({"type": "verify", "model": str(model)})
    evs = s.until(job_done(job["id"]))
    s.close()
    assert s.retry and s.retry > 0
    ids = [e["id"] for e in evs]
    assert all(i is not None for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    docs = [(e["event"], json.loads(e["data"])) for e in evs]
    assert all(d["id"] == job["id"] for _, d in docs), "an earlier job's events were sent"
    states = [d["state"] for k, d in docs if k == "state"]
    # "queued" goes out from the submitting thread just after the commit; a
    # worker that claims the job in between sends "running" first (known,
    # see the landing note; the job's own stream replays the store's order).
    assert sorted(states) == ["queued", "running", "succeeded"], states
    assert states[-1] == "succeeded", states
    assert any(k == "progress" for k, _ in docs)
    assert docs[-1][1]["result"]["ok"] is True

    # A second job runs while nobody listens; resuming from the last id gets
    # exactly its events, ids following on.
    job2 = srv.run_job({"type": "verify", "model": str(model)})
    s = SSE(srv, headers={"Last-Event-ID": str(ids[-1])})
    evs2 = s.until(job_done(job2["id"]))
    s.close()
    assert evs2[0]["id"] == ids[-1] + 1
    assert [e["id"] for e in evs2] == list(range(ids[-1] + 1, ids[-1] + 1 + len(evs2)))
    assert {json.loads(e["data"])["id"] for e in evs2} == {job2["id"]}

    # Resuming from the middle of the first job replays the rest of it, byte
    # for byte, in the same order; the query parameter does the same.
    k = len(evs) // 2
    for extra in ({"headers": {"Last-Event-ID": str(ids[k])}},
                  {"path": "/v1/events?last_event_id=%d" % ids[k]}):
        s = SSE(srv, **extra)
        replay = s.until(job_done(job["id"]))
        s.close()
        assert replay == evs[k + 1:]


def test_new_client_gets_only_new_events(make_server, model_root):
    model = make_model(model_root, "m", nfiles=1)
    srv = make_server(args=["--model-root", str(model_root)])
    old = srv.run_job({"type": "verify", "model": str(model)})
    s = SSE(srv)
    new = srv.submit({"type": "verify", "model": str(model)})
    evs = s.until(job_done(new["id"]))
    s.close()
    assert old["id"] not in {json.loads(e["data"])["id"] for e in evs}
    assert "connected" in s.comments


def test_bad_last_event_id_and_auth(make_server):
    srv = make_server(env={"MODELPREP_TOKEN": "tok"}, token="tok")
    for bad in ("abc", "-1", "+1", "1x", "", "99999999999999999999999"):
        s = SSE(srv, headers={"Last-Event-ID": bad})
        body = s.resp.read()
        s.close()
        assert s.status == 400, (bad, s.status)
        assert s.headers["Content-Type"] == "application/problem+json"
        assert json.loads(body)["status"] == 400
    srv.token = None
    s = SSE(srv)
    assert s.status == 401
    s.close()


def test_resume_across_a_restart_asks_for_a_resync(make_server, model_root, tmp_path):
    """Event ids are only kept in memory: an id from the previous process must
    not make the stream skip the new process's events; the client is told to
    reload (event: resync) and then gets everything this process has."""
    model = make_model(model_root, "m", nfiles=1)
    data = tmp_path / "data-restart"
    args = ["--model-root", str(model_root)]
    srv = make_server(args=args, data_dir=data)
    s = SSE(srv)
    job = srv.submit({"type": "verify", "model": str(model)})
    last = s.until(job_done(job["id"]))[-1]["id"]
    s.close()
    assert srv.stop() == 0

    srv2 = make_server(args=args, data_dir=data)
    job2 = srv2.run_job({"type": "verify", "model": str(model)})
    s = SSE(srv2, headers={"Last-Event-ID": str(last)})
    first = s.next()
    assert first["event"] == "resync", first
    assert first["id"] is None
    evs = s.until(job_done(job2["id"]))
    s.close()
    assert all(e["id"] > last for e in evs), "ids must grow across restarts"
    states = [json.loads(e["data"])["state"] for e in evs if e["event"] == "state"]
    # The submitting thread publishes "queued" just after the job's commit;
    # a worker that claims it in between publishes "running" first (known:
    # see the landing note). Every state is there, and the end is last.
    assert sorted(states) == ["queued", "running", "succeeded"] and states[-1] == "succeeded"


def test_open_streams_do_not_hold_up_shutdown(make_server):
    srv = make_server()
    streams = [SSE(srv) for _ in range(3)]
    for st in streams:
        assert st.status == 200
    t0 = time.time()
    assert srv.stop() == 0
    assert time.time() - t0 < 20
    for st in streams:
        with pytest.raises((EOFError, socket.timeout, ConnectionError, http.client.HTTPException)):
            while True:
                st.next()
        st.close()


def test_resident_changes_are_on_the_stream(make_server, model_root):
    pytest.importorskip("safetensors")
    import numpy as np
    from safetensors.numpy import save_file
    d = model_root / "tiny"
    d.mkdir()
    save_file({"w": np.ones((4, 4), dtype=np.float32)}, str(d / "model.safetensors"))
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    srv = make_server(args=["--model-root", str(model_root), "--devices", "host"])
    s = SSE(srv)
    status, doc = srv.post("/v1/jobs", {"type": "warm_load", "model": str(d), "params": {}})
    if status == 400 and any(e.get("field") == "type" for e in doc.get("errors") or []):
        s.close()
        pytest.skip("warm_load is not a registered job type in this build yet")
    assert status == 202, doc
    evs = s.until(lambda e: e["event"] == "resident")
    added = json.loads(evs[-1]["data"])
    job = srv.wait_job(doc["id"])
    assert job["state"] == "succeeded", job
    rid = job["result"]["resident_id"]
    assert added["id"] == rid and added["model"] == str(d)
    assert srv.delete("/v1/residents/" + rid)[0] == 200
    removed = json.loads(s.until(lambda e: e["event"] == "resident")[-1]["data"])
    s.close()
    assert removed["id"] == rid and removed != added
