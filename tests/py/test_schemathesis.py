"""The contract, checked by schemathesis against the live server (with a
token, as the document requires): requests generated from /openapi.json must
never get a 5xx, every response must match the schema of its documented
status (and content type), a request without the token must get a 401, and
every request the document says is valid must be accepted - except where
the answer depends on what the server holds (a model that is not cached or
not under a model root, an id that does not exist, an Idempotency-Key used
before for another request): a 404 or 409, or a 400/422 whose error codes
are all in STATE_CODES below.

Bounded: the document's examples, its boundary cases (the coverage phase)
and MAX_EXAMPLES generated requests per operation, derandomized, so the run
takes well under a minute on two cores. The event streams (SSE) are
left out: they stay open by design."""
import json
import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from conftest import Server  # noqa: E402

MAX_EXAMPLES = int(os.environ.get("MODELPREP_SCHEMATHESIS_EXAMPLES", "40"))

# Error codes that say "the request was well-formed, but the server does not
# hold what it names": the schema cannot know about the cache or the model
# roots, so a generated model name is usually one of these.
STATE_CODES = {"not_cached", "not_found", "outside_roots", "no_model_roots",
               "idempotency_conflict",
               # two params that must agree (devices: one per tp rank), which
               # OpenAPI 3.0 cannot state; the descriptions say it
               "param_conflict",
               # staging_bytes over --staging-cap (a share of this host's memory)
               "staging_cap",
               # a tp_size or device index beyond the devices this server has
               "no_such_device"}
TOKEN = "st-T0ken"


def seed_hub_cache(data_dir, org="acme", name="tiny"):
    """A cached snapshot as huggingface_hub lays it out, so /v1/models has
    something to describe (the examples in the document name acme/tiny)."""
    import hashlib
    base = os.path.join(str(data_dir), "hub", "models--%s--%s" % (org, name))
    commit = "c" * 40
    snap = os.path.join(base, "snapshots", commit)
    os.makedirs(os.path.join(base, "blobs"))
    os.makedirs(os.path.join(base, "refs"))
    os.makedirs(snap)
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(commit)
    for rel, data in (("config.json", b'{"model_type": "llama"}'),
                      ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")):
        h = hashlib.sha256(data).hexdigest()
        with open(os.path.join(base, "blobs", h), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", h), os.path.join(snap, rel))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    np = pytest.importorskip("numpy")
    stn = pytest.importorskip("safetensors.numpy")
    base = tmp_path_factory.mktemp("st")
    root = base / "models"
    m = root / "m"
    m.mkdir(parents=True)
    stn.save_file({"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, str(m / "model.safetensors"))
    (m / "config.json").write_text('{"model_type": "llama"}')
    seed_hub_cache(base / "data")
    # No network: the hub endpoint is a closed local port, so a generated
    # download job fails fast instead of reaching out.
    srv = Server(base / "data", ["--model-root", str(root), "--devices", "host",
                                 "--hub-endpoint", "http://127.0.0.1:9", "--workers", "1",
                                 "--no-access-log"], env={"MODELPREP_TOKEN": TOKEN},
                 token=TOKEN).start()
    # Real objects of every kind, so responses about them are checked too.
    srv.model = str(m)
    srv.verify_job = srv.run_job({"type": "verify", "model": str(m)})
    srv.load_job = srv.run_job({"type": "warm_load", "model": str(m)})
    assert srv.load_job["state"] == "succeeded", srv.load_job
    srv.token = None  # from here on schemathesis sends the token itself
    yield srv
    rc = srv.stop()
    assert rc == 0, "modelprepd exited %s\n%s" % (rc, srv.logs())


@pytest.fixture(scope="module")
def api_schema(live):
    schema = schemathesis.openapi.from_url(live.base + "/openapi.json")
    schema.config.update(base_url=live.base, request_timeout=30)
    # Valid requests only: the document states a subset of what the server
    # takes (simple patterns), so "invalid per the document" is not always
    # refused; the negative cases the server must refuse are in test_api.c.
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE])
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schemathesis.check
def accepted_unless_state(ctx, response, case):
    """positive_data_acceptance, except for a 400 naming state-dependent codes."""
    if response.status_code in (400, 422) and case.meta and case.meta.generation.mode.is_positive:
        try:
            codes = {e.get("code") for e in (json.loads(response.content).get("errors") or [])}
        except ValueError:
            codes = set()
        if codes and codes <= STATE_CODES:
            return True
    return positive_data_acceptance(ctx, response, case)


def test_real_objects_match_their_schemas(live, api_schema):
    """Responses about objects that exist (which generated ids rarely hit):
    runs first, before the generated requests evict acme/tiny (the example
    in the document): a finished job, a resident with its tensor table and
    digest, a cached model with its files."""
    import requests
    h = {"Authorization": "Bearer " + TOKEN}
    rid = live.load_job["result"]["resident_id"]
    checks = [("GET", "/v1/jobs/{id}", "/v1/jobs/" + live.verify_job["id"]),
              ("GET", "/v1/jobs/{id}", "/v1/jobs/" + live.load_job["id"]),
              ("GET", "/v1/jobs", "/v1/jobs?limit=5"),
              ("GET", "/v1/residents", "/v1/residents"),
              ("GET", "/v1/residents/{id}", "/v1/residents/" + rid),
              ("GET", "/v1/residents/{id}/digest", "/v1/residents/%s/digest" % rid),
              ("GET", "/v1/models", "/v1/models"),
              ("GET", "/v1/models/{org}/{name}", "/v1/models/acme/tiny")]
    for method, template, path in checks:
        r = requests.request(method, live.base + path, headers=h, timeout=30)
        assert r.status_code == 200, (path, r.status_code, r.text)
        api_schema[template][method].validate_response(r)
    res = requests.get(live.base + "/v1/residents/" + rid, headers=h, timeout=30).json()
    assert isinstance(res["tensors"], int) and res["tensors"] == len(res["tensor_table"]) == 1
    assert res["state"] == "resident"
    models = requests.get(live.base + "/v1/models", headers=h, timeout=30).json()["models"]
    assert [(x["model"], x["revision"]) for x in models if x["kind"] == "hub"] == [("acme/tiny", "main")]


@schema.exclude(path_regex=r"events$").parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.generate])
def test_api_matches_its_contract(case, live):
    # The token goes with the call (not the schema's config), so the auth
    # checks can replay the request without it and with a wrong one.
    case.call_and_validate(headers={"Authorization": "Bearer " + TOKEN}, timeout=30,
                           additional_checks=[accepted_unless_state],
                           excluded_checks=[positive_data_acceptance])

