"""The README describes this repository as it is: the contract it points at
ships here (openapi/, not an absent shared/api.md), the files it names
exist, and the data-dir names it shows are the ones the jobs write."""
import os
import re

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def readme():
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def test_contract_is_in_the_repository():
    text = readme()
    assert "shared/api.md" not in text
    for path in ("openapi/openapi.yaml", "openapi/README.md"):
        assert path in text and os.path.exists(os.path.join(REPO, path)), path


def test_named_repo_files_exist():
    text = readme()
    named = set(re.findall(r"`((?:scripts|openapi|tests|bench|docker|web|tools)/[\w./-]+)`", text))
    assert named, "no file paths found"
    missing = [p for p in sorted(named) if "<" not in p and not os.path.exists(os.path.join(REPO, p))]
    assert missing == [], missing


def test_data_dir_names_are_what_the_jobs_write(make_server, tmp_path):
    torch = pytest.importorskip("torch")
    text = readme()
    assert "<org>--<name>-<revision>/" in text and "<dir>-tp<N>/" in text
    assert "converted/<name>/" not in text and "sharded/<name>-tpN/" not in text
    # a hub snapshot converts into converted/<org>--<name>-<revision>
    data = tmp_path / "d"
    repo = data / "hub" / "models--acme--tiny"
    commit = "a" * 40
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snap.mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    torch.save({"w": torch.randn(4, 4)}, repo / "blobs" / "b1")
    os.symlink("../../blobs/b1", snap / "pytorch_model.bin")
    s = make_server(data_dir=data)
    job = s.run_job({"type": "convert", "model": "acme/tiny"})
    assert job["state"] == "succeeded", job
    assert os.path.relpath(job["result"]["output_path"], os.path.realpath(str(data))) == \
        os.path.join("converted", "acme--tiny-main")
