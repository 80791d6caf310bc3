"""The dashboard at / end to end in headless Chromium (Debian's chromium and
chromium-driver, driven by selenium): it asks for the token once and keeps it
for the session, shows devices, submits a job from the form and follows it
to the end over /v1/events, and unloads a resident; the models panel (kinds,
inspection, residency, actions that submit jobs), the job detail view
(timeline, params, result, a prepare's steps), failed states in red and the
job form at 480 px with every param of a type from /openapi.json.
Screenshots go to the build directory (dashboard*.png): look at them."""
import json
import os
import shutil

import pytest

from conftest import BUILD

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
TOKEN = "dash-T0ken"

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (python3-selenium, scripts/deps-extra.txt)")
if not (os.access(CHROMIUM, os.X_OK) and os.access(DRIVER, os.X_OK)):
    pytest.skip("chromium/chromedriver are not installed (Debian packages chromium and "
                "chromium-driver, scripts/deps-extra.txt)", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1400,1300", "--no-first-run", "--disable-extensions",
              "--user-data-dir=%s" % (tmp_path / "chromium-profile")):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def page_errors(drv):
    """Script errors in the page. HTTP errors the test provokes on purpose
    (the 401 of the first probe, a 400 for a bad model) are logged by the
    browser as network errors and are not counted."""
    return [e for e in drv.get_log("browser")
            if e["level"] == "SEVERE" and e.get("source") != "network"]


def wait(drv, timeout=60):
    return WebDriverWait(drv, timeout, poll_frequency=0.1)


def screenshot(drv, name, width=1400):
    os.makedirs(BUILD, exist_ok=True)
    path = os.path.join(BUILD, name)
    # The whole page, not just the window.
    drv.execute_script("window.scrollTo(0, 0)")
    h = drv.execute_script("return document.documentElement.scrollHeight")
    drv.set_window_size(width, max(900, min(int(h) + 40, 4000)))
    assert drv.save_screenshot(path)
    assert os.path.getsize(path) > 10000
    return path


def login(drv, srv):
    drv.get(srv.base + "/")
    wait(drv).until(EC.visibility_of_element_located((By.ID, "token-input")))
    drv.find_element(By.ID, "token-input").send_keys("wrong")
    drv.find_element(By.ID, "token-submit").click()
    wait(drv).until(EC.text_to_be_present_in_element((By.ID, "token-error"), "refused"))
    drv.find_element(By.ID, "token-input").send_keys(TOKEN)
    drv.find_element(By.ID, "token-submit").click()
    wait(drv).until(EC.visibility_of_element_located((By.ID, "app")))
    wait(drv).until(lambda d: d.find_element(By.ID, "conn").get_attribute("data-state") == "live")


def submit(drv, type_, model, params="{}"):
    Select(drv.find_element(By.ID, "job-type")).select_by_value(type_)
    m = drv.find_element(By.ID, "job-model")
    m.clear()
    m.send_keys(model)
    p = drv.find_element(By.ID, "job-params")
    p.clear()
    p.send_keys(params)
    drv.find_element(By.ID, "job-submit").click()
    res = drv.find_element(By.ID, "job-result")
    wait(drv, 30).until(lambda d: res.text != "")
    return res


def job_row(drv, job_id, state, timeout=120):
    sel = 'tr[data-job-id="%s"][data-state="%s"]' % (job_id, state)
    return wait(drv, timeout).until(EC.presence_of_element_located((By.CSS_SELECTOR, sel)))


def test_dashboard_submit_and_follow_a_job(make_server, model_root, browser):
    model = model_root / "m"
    model.mkdir()
    for i in range(3):
        (model / ("w%d.bin" % i)).write_bytes(os.urandom(200000))
    srv = make_server(args=["--model-root", str(model_root)], env={"MODELPREP_TOKEN": TOKEN},
                      token=TOKEN)
    drv = browser
    # static files are open, the API is not
    srv.token = None
    status, hdrs, body = srv.request("GET", "/", raw=True)
    assert status == 200 and hdrs["Content-Type"].startswith("text/html")
    assert b'src="/ui/app.js"' in body
    assert srv.request("GET", "/ui/style.css", raw=True)[0] == 200
    assert srv.request("GET", "/ui/openapi.yaml", raw=True)[0] == 404
    assert srv.get("/v1/jobs")[0] == 401
    srv.token = TOKEN

    login(drv, srv)
    # devices with memory bars
    dev = wait(drv).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#devices .device")))
    assert "host" in dev.text or "cuda" in dev.text
    assert dev.find_elements(By.CSS_SELECTOR, ".bar .fill")

    # a client mistake shows the server's problem detail, and nothing is created
    res = submit(drv, "verify", "/etc")
    assert "400" in res.text and "model" in res.text, res.text
    res = submit(drv, "verify", str(model), params="[1]")
    assert "JSON object" in res.text

    res = submit(drv, "verify", str(model))
    assert res.text.startswith("submitted j_"), res.text
    job_id = res.get_attribute("data-job-id")
    row = job_row(drv, job_id, "succeeded")
    assert "100%" in row.text and "verify" in row.text and str(model) in row.text
    assert not row.find_element(By.CSS_SELECTOR, "button.cancel").is_displayed()
    status, doc = srv.get("/v1/jobs/" + job_id)
    assert status == 200 and doc["state"] == "succeeded" and doc["result"]["ok"] is True
    assert [j["id"] for j in srv.get("/v1/jobs")[1]["jobs"]] == [job_id]

    assert "hashes recorded for 3 files" in row.text, row.text  # a first run checks nothing

    # a job submitted elsewhere shows up live through the event stream
    other = srv.submit({"type": "verify", "model": str(model)})
    row = job_row(drv, other["id"], "succeeded")
    wait(drv).until(lambda d: "verified 3 files" in row.text)

    # a changed file fails the verify: red, with the code and the file named
    (model / "w1.bin").write_bytes(os.urandom(200000))
    bad = srv.submit({"type": "verify", "model": str(model)})
    row = job_row(drv, bad["id"], "failed")
    wait(drv).until(lambda d: "checksum_mismatch" in row.text and "w1.bin" in row.text)

    # the token is kept for the session: a reload does not ask again
    drv.refresh()
    wait(drv).until(EC.visibility_of_element_located((By.ID, "app")))
    assert not drv.find_element(By.ID, "auth").is_displayed()
    job_row(drv, job_id, "succeeded")
    assert drv.execute_script("return sessionStorage.getItem('modelprep.token')") == TOKEN
    assert page_errors(drv) == []
    screenshot(drv, "dashboard.png")


def test_dashboard_unloads_a_resident(make_server, model_root, browser):
    np = pytest.importorskip("numpy")
    st = pytest.importorskip("safetensors.numpy")
    model = model_root / "tiny"
    model.mkdir()
    st.save_file({"a": np.arange(4096, dtype=np.float32).reshape(64, 64),
                  "b": np.ones((128,), dtype=np.float16)}, str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    srv = make_server(args=["--model-root", str(model_root), "--devices", "host"])
    status, doc = srv.post("/v1/jobs", {"type": "nope", "model": str(model)})
    assert status == 400
    probe = srv.post("/v1/jobs", {"type": "warm_load", "model": str(model), "params": {}})
    if probe[0] == 400 and any(e.get("field") == "type" for e in probe[1].get("errors") or []):
        pytest.skip("warm_load is not a registered job type in this build yet")
    assert probe[0] == 202, probe
    first = srv.wait_job(probe[1]["id"])
    assert first["state"] == "succeeded", first
    drv = browser
    drv.get(srv.base + "/")  # no token on this server: straight to the app
    wait(drv).until(EC.visibility_of_element_located((By.ID, "app")))

    # a warm_load from the form makes a second resident
    res = submit(drv, "warm_load", str(model))
    assert res.text.startswith("submitted j_"), res.text
    job_id = res.get_attribute("data-job-id")
    job_row(drv, job_id, "succeeded")
    rid = srv.get("/v1/jobs/" + job_id)[1]["result"]["resident_id"]
    sel = 'tr[data-resident-id="%s"][data-state="resident"]' % rid
    row = wait(drv).until(EC.presence_of_element_located((By.CSS_SELECTOR, sel)))
    assert str(model) in row.text
    before = srv.get("/v1/devices")[1]["devices"][0]["resident_bytes"]
    assert before > 0
    row.find_element(By.CSS_SELECTOR, "button.unload").click()
    wait(drv).until(EC.presence_of_element_located(
        (By.CSS_SELECTOR, 'tr[data-resident-id="%s"][data-state="unloaded"]' % rid)))
    status, doc = srv.get("/v1/residents/" + rid)
    assert status == 200 and doc["state"] == "unloaded"
    after = srv.get("/v1/devices")[1]["devices"][0]["resident_bytes"]
    assert after < before
    # the first resident is untouched and can still be unloaded
    first_rid = first["result"]["resident_id"]
    wait(drv).until(EC.presence_of_element_located(
        (By.CSS_SELECTOR, 'tr[data-resident-id="%s"][data-state="resident"]' % first_rid)))
    # the chart's legend has the last load's throughput from the job result
    wait(drv).until(EC.text_to_be_present_in_element((By.ID, "chart-legend"), "last load"))
    assert page_errors(drv) == []
    screenshot(drv, "dashboard-unload.png")


def test_dashboard_live_progress_and_cancel(make_server, tmp_path, browser):
    """A download from a throttled test hub: the row shows live progress and a
    rate while it runs, and its Cancel button cancels it."""
    import subprocess
    from conftest import tool
    repo = tmp_path / "hubroot" / "acme" / "slow"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text('{"model_type": "llama"}')
    (repo / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
                                             + os.urandom(4 << 20))
    hub = subprocess.Popen([tool("testhub"), "--slow", "200000", str(tmp_path / "hubroot")],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        line = hub.stdout.readline().decode()
        assert line.startswith("listening on "), line
        srv = make_server(args=["--hub-endpoint", line.split("listening on ", 1)[1].strip()])
        drv = browser
        drv.get(srv.base + "/")
        wait(drv).until(EC.visibility_of_element_located((By.ID, "app")))
        res = submit(drv, "download", "acme/slow")
        assert res.text.startswith("submitted j_"), res.text
        job_id = res.get_attribute("data-job-id")
        row = job_row(drv, job_id, "running", timeout=30)
        # progress and a rate arrive over the event stream while it runs
        sel = 'tr[data-job-id="%s"][data-state="running"]' % job_id

        def moving(d):
            r = d.find_elements(By.CSS_SELECTOR, sel)
            return r and "/s" in r[0].find_element(By.CSS_SELECTOR, "td.rate").text and r[0]
        row = wait(drv, 30).until(moving)
        width = row.find_element(By.CSS_SELECTOR, ".bar .fill").value_of_css_property("width")
        assert float(width.rstrip("px")) > 0
        screenshot(drv, "dashboard-running.png")
        row.find_element(By.CSS_SELECTOR, "button.cancel").click()
        job_row(drv, job_id, "cancelled", timeout=60)
        status, doc = srv.get("/v1/jobs/" + job_id)
        assert doc["state"] == "cancelled" and doc["error"]["code"] == "cancelled", doc
        assert page_errors(drv) == []
    finally:
        hub.terminate()
        hub.wait(timeout=30)
        hub.stdout.close()


RED = "rgba(214, 69, 69, 1)"


def css(drv, sel):
    return drv.find_element(By.CSS_SELECTOR, sel)


def click_fresh(drv, sel):
    """Clicks sel, finding it again if a live update re-rendered it between
    the find and the click (the detail view redraws on each event)."""
    from selenium.common.exceptions import StaleElementReferenceException

    def attempt(d):
        try:
            css(d, sel).click()
            return True
        except StaleElementReferenceException:
            return False
    wait(drv).until(attempt)


def test_dashboard_models_detail_and_form(make_server, model_root, browser):
    """The models panel lists a converted model, its actions submit jobs
    (inspect fills in the inspection, load shows where it is resident); a
    job opens in a detail view with its timeline, params and result; a
    prepare shows its steps linked to their jobs; failed jobs (and a verify
    mismatch) are red; at 480 px the form offers every param of a type."""
    pytest.importorskip("torch")
    from test_prepare import bin_model
    bin_model(str(model_root / "old"))
    (model_root / "bad").mkdir()
    (model_root / "bad" / "w0.bin").write_bytes(os.urandom(4096))
    (model_root / "v").mkdir()
    (model_root / "v" / "w.bin").write_bytes(b"1" * 4096)
    srv = make_server(args=["--model-root", str(model_root), "--devices", "host"])
    conv = srv.run_job({"type": "convert", "model": str(model_root / "old")})
    assert conv["state"] == "succeeded", conv
    converted = conv["result"]["next_model"]
    bad = srv.run_job({"type": "inspect", "model": str(model_root / "bad")})
    assert bad["state"] == "failed", bad
    assert srv.run_job({"type": "verify", "model": str(model_root / "v")})["result"]["ok"]
    (model_root / "v" / "w.bin").write_bytes(b"2" * 4096)
    mism = srv.run_job({"type": "verify", "model": str(model_root / "v")})
    assert mism["state"] == "failed" and mism["error"]["code"] == "checksum_mismatch", mism

    drv = browser
    drv.get(srv.base + "/")
    wait(drv).until(EC.visibility_of_element_located((By.ID, "app")))
    row_sel = 'tr[data-model="%s"][data-kind="converted"]' % converted
    row = wait(drv).until(EC.presence_of_element_located((By.CSS_SELECTOR, row_sel)))
    assert "converted" in row.text and "not inspected" in row.text
    # the path is one line, cut with an ellipsis, whole in the tooltip
    assert row.find_element(By.CSS_SELECTOR, ".model-name").text == "old"
    path = row.find_element(By.CSS_SELECTOR, ".path")
    assert path.get_attribute("title") == converted
    assert path.value_of_css_property("white-space") == "nowrap"
    assert path.value_of_css_property("text-overflow") == "ellipsis"
    assert path.size["height"] < 20  # one line

    # actions submit jobs: inspect fills in what the model is
    row.find_element(By.CSS_SELECTOR, "button.act-inspect").click()
    res = css(drv, "#models-result")
    wait(drv).until(lambda d: res.get_attribute("data-job-id"))
    job_row(drv, res.get_attribute("data-job-id"), "succeeded")
    wait(drv).until(lambda d: "LlamaForCausalLM" in css(d, row_sel + " td.inspection").text)
    insp = css(drv, row_sel + " td.inspection").text
    assert "params" in insp and "per rank" in insp and "tp1" in insp, insp
    # load: it becomes resident on device #0, and the chart has a bar for it
    first = res.get_attribute("data-job-id")
    css(drv, row_sel + " button.act-warm_load").click()
    wait(drv).until(lambda d: res.get_attribute("data-job-id") != first)
    load_id = res.get_attribute("data-job-id")
    job_row(drv, load_id, "succeeded")
    assert srv.get("/v1/jobs/" + load_id)[1]["type"] == "warm_load"
    wait(drv).until(lambda d: "#0" in css(d, row_sel + " td.where").text)
    wait(drv).until(EC.text_to_be_present_in_element((By.ID, "chart-legend"), "1 finished load"))

    # failed and mismatched jobs are red, with start time and duration
    for jid, text in ((bad["id"], "failed"), (mism["id"], "failed")):
        r = job_row(drv, jid, "failed")
        assert "bad" in r.get_attribute("class").split()
        state = r.find_element(By.CSS_SELECTOR, ".state")
        assert state.text == text and state.value_of_css_property("color") == RED
        assert r.find_element(By.CSS_SELECTOR, "td.started").text not in ("", "–")
        assert r.find_element(By.CSS_SELECTOR, "td.duration").text.endswith(("ms", "s"))
    assert page_errors(drv) == []
    screenshot(drv, "dashboard-models.png")

    # the job detail: timeline replayed from the job's events, params, result
    drv.set_window_size(1400, 1300)
    job_row(drv, conv["id"], "succeeded").find_element(By.CSS_SELECTOR, "a.job-link").click()
    wait(drv).until(EC.visibility_of_element_located((By.ID, "job-detail")))
    wait(drv).until(EC.text_to_be_present_in_element((By.ID, "detail-id"), conv["id"]))
    wait(drv).until(lambda d: d.find_elements(
        By.CSS_SELECTOR, '#detail-timeline li[data-kind="state"][data-state="succeeded"]'))
    kinds = {li.get_attribute("data-kind")
             for li in drv.find_elements(By.CSS_SELECTOR, "#detail-timeline li")}
    assert {"state", "progress"} <= kinds, kinds
    assert json.loads(css(drv, "#detail-params").text) == conv["params"]
    assert json.loads(css(drv, "#detail-result").text)["next_model"] == converted
    facts = css(drv, "#detail-facts").text
    assert "duration" in facts and "throughput" in facts and "convert" in facts
    screenshot(drv, "dashboard-job.png")

    # a prepare: its steps, each linked to its child job
    prep = srv.run_job({"type": "prepare", "model": str(model_root / "old"),
                        "params": {"load": True}})
    assert prep["state"] == "succeeded", prep
    drv.set_window_size(1400, 1300)
    drv.execute_script("location.hash = arguments[0]", "#job=" + prep["id"])
    wait(drv).until(EC.text_to_be_present_in_element((By.ID, "detail-id"), prep["id"]))
    steps = wait(drv).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#detail-steps tbody tr"))
    assert [s.get_attribute("data-step") for s in steps] == [s["type"] for s in prep["steps"]]
    links = drv.find_elements(By.CSS_SELECTOR, "#detail-steps a.step-link")
    ran = [s["job"] for s in prep["steps"] if s.get("job")]
    assert ran and [a.get_attribute("title") for a in links] == ran
    screenshot(drv, "dashboard-prepare.png")
    drv.set_window_size(1400, 1300)
    click_fresh(drv, "#detail-steps a.step-link")
    wait(drv).until(EC.text_to_be_present_in_element((By.ID, "detail-id"), ran[0]))
    wait(drv).until(EC.text_to_be_present_in_element((By.ID, "detail-facts"), prep["id"]))

    # a failed job's detail is red and says why
    drv.execute_script("location.hash = arguments[0]", "#job=" + bad["id"])
    wait(drv).until(EC.text_to_be_present_in_element((By.ID, "detail-id"), bad["id"]))
    err = wait(drv).until(EC.visibility_of_element_located((By.ID, "detail-error")))
    assert bad["error"]["code"] in err.text and err.value_of_css_property("color") == RED
    assert css(drv, "#detail-state").value_of_css_property("color") == RED
    wait(drv).until(lambda d: d.find_elements(
        By.CSS_SELECTOR, '#detail-timeline li.bad[data-kind="state"]'))
    screenshot(drv, "dashboard-failed.png")
    css(drv, "#detail-close").click()
    assert not css(drv, "#job-detail").is_displayed()

    # the form at 480 px: every param of each type, from /openapi.json, fits
    schemas = srv.get("/openapi.json")[1]["components"]["schemas"]
    drv.set_window_size(480, 1000)
    form = css(drv, "#job-form")
    drv.execute_script("arguments[0].scrollIntoView()", form)
    for t in ("download", "convert", "inspect", "shard", "warm_load", "verify", "prepare"):
        Select(css(drv, "#job-type")).select_by_value(t)
        names = [e.get_attribute("data-param")
                 for e in drv.find_elements(By.CSS_SELECTOR, "#job-fields [data-param]")]
        assert names == list(schemas["Params_" + t]["properties"]), (t, names)
    Select(css(drv, "#job-type")).select_by_value("warm_load")
    assert drv.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth") is True
    assert drv.execute_script(
        "const f = document.getElementById('job-form'); return f.scrollWidth <= f.clientWidth") is True
    # the fields are typed by the schema and sent as params
    m = css(drv, "#job-model")
    m.clear()
    m.send_keys(converted)
    css(drv, '#job-fields [data-param="tp_size"]').send_keys("1")
    Select(css(drv, '#job-fields [data-param="load_format"]')).select_by_value("safetensors")
    css(drv, '#job-fields [data-param="devices"]').send_keys("0")
    css(drv, "#job-submit").click()
    out = css(drv, "#job-result")
    wait(drv).until(lambda d: out.text.startswith("submitted "))
    doc = srv.wait_job(out.get_attribute("data-job-id"))
    assert doc["params"] == {"tp_size": 1, "load_format": "safetensors", "devices": [0]}, doc
    assert doc["state"] == "succeeded", doc
    assert page_errors(drv) == []
    screenshot(drv, "dashboard-form-480.png", width=480)
