"""The install is split by use: `make run` (scripts/deps.sh run) asks for
what building and running need and nothing else - no Python, no PyPI, no
test tools (a GPU node without PyPI must be able to run the server) - while
`make test` adds the test tools and the venv. Checked with the script's dry
run and make's -n, so nothing is installed here."""
import os
import subprocess

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD_ONLY = {"build-essential", "pkg-config", "libmicrohttpd-dev", "libjansson-dev",
              "libcurl4-openssl-dev", "libsqlite3-dev", "libssl-dev", "libhiredis-dev"}
TEST_ONLY = {"libcmocka-dev", "python3", "python3-venv", "python3-pip",
             "python3-numpy", "clang", "libclang-rt-14-dev", "chromium", "chromium-driver",
             "python3-selenium", "prometheus", "redis-server", "tmux"}


def dry(what):
    p = subprocess.run(["bash", "scripts/deps.sh", what], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, DEPS_DRY_RUN="1"))
    assert p.returncode == 0, p.stderr
    lines = dict(ln.split(": ", 1) for ln in p.stdout.splitlines() if ": " in ln)
    return set(lines["packages"].split()), lines["venv"]


def test_run_needs_only_build_deps():
    pkgs, venv = dry("run")
    assert pkgs == BUILD_ONLY and venv == "no"


def test_test_adds_test_tools_and_venv():
    pkgs, venv = dry("test")
    assert pkgs == BUILD_ONLY | TEST_ONLY and venv == "yes"
    pkgs, venv = dry("bench")
    assert pkgs == BUILD_ONLY | TEST_ONLY | {"wrk"} and venv == "yes"
    pkgs, venv = dry("cuda")  # scripts/gpu-check.sh: cmocka, no Python
    assert pkgs == BUILD_ONLY | {"libcmocka-dev"} and venv == "no"


def test_make_targets_use_the_right_set():
    def plan(target):
        p = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
        return p.stdout
    run = plan("run")
    assert "scripts/deps.sh run" in run and "deps.sh test" not in run, run
    assert "pip" not in run
    test = plan("test")
    assert "scripts/deps.sh test" in test, test


def test_readme_names_the_supported_debian():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    assert "Debian 12 (bookworm)" in text
