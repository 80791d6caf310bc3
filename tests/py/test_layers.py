"""The layering check (scripts/check_layers.py) passes on the tree and
catches each kind of violation ARCHITECTURE.md forbids, in a scratch tree."""
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(ROOT, "scripts", "check_layers.py")


def run(root):
    p = subprocess.run([sys.executable, SCRIPT, str(root)], capture_output=True, text=True)
    return p.returncode, p.stdout


def write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def base_tree(root):
    write(root, "util/error.h", "/* */\n")
    write(root, "store/store.h", '#include "util/error.h"\n')
    write(root, "store/store.c", '#include "store/store.h"\n#include <sqlite3.h>\n')
    write(root, "gpu/gpu.h", '#include "util/error.h"\n')
    write(root, "gpu/gpu_internal.h", '#include "gpu/gpu.h"\n')
    write(root, "gpu/gpu.c", '#include "gpu/gpu_internal.h"\n')
    write(root, "loader/hub/hub.h", '#include "util/error.h"\n')
    write(root, "loader/hub/hub_internal.h", '#include "loader/hub/hub.h"\n')
    write(root, "loader/hub/hub.c", '#include "loader/hub/hub_internal.h"\n#include "gpu/gpu.h"\n')
    write(root, "server/a.h", "")
    write(root, "server/a.c", '#include "server/a.h"\n#include "loader/hub/hub.h"\n')
    write(root, "server/main.c", '#include "handlers/h.h"\n')
    write(root, "handlers/h.h", '#include "server/a.h"\n')
    write(root, "handlers/h.c", '#include "handlers/h.h"\n#include <microhttpd.h>\n')


def test_the_tree_passes():
    rc, out = run(ROOT)
    assert rc == 0, out
    assert "layers: ok" in out


def test_a_clean_scratch_tree_passes(tmp_path):
    base_tree(tmp_path)
    rc, out = run(tmp_path)
    assert rc == 0, out


def test_each_violation_is_named(tmp_path):
    cases = [
        ("gpu/bad.c", '#include "loader/hub/hub.h"\n', "gpu/ may not depend on loader/"),
        ("loader/hub/bad.c", '#include "store/store.h"\n', "loader/ may not depend on store/"),
        ("server/bad.c", '#include "handlers/h.h"\n', "server/ may not depend on handlers/"),
        ("handlers/bad.c", '#include "loader/hub/hub_internal.h"\n', "a private header of loader/hub/"),
        ("loader/hub/bad2.c", '#include "gpu/gpu_internal.h"\n', "only gpu/gpu.h"),
        ("server/bad2.c", "#include <sqlite3.h>\n", "only store/ speaks SQL"),
        ("loader/hub/bad3.c", "#include <microhttpd.h>\n", "only server/ and handlers/ speak HTTP"),
        ("loader/hub/bad4.c", "#include <cuda_runtime.h>\n", "only gpu/ speaks CUDA"),
        ("loader/hub/bad5.c", '#include "util/task.h"\n', "only loader/jobs/ knows the task contract"),
        ("server/bad3.c", '#include "util/nope.h"\n', "no such header"),
        ("tools/cli/bad.c", '#include "loader/hub/hub.h"\n', "the client speaks only the API"),
        ("tools/modelprep.c", '#include "store/store.h"\n', "the client speaks only the API"),
    ]
    for rel, text, expect in cases:
        d = tmp_path / rel.replace("/", "_")
        base_tree(d)
        write(d, "util/task.h", "")
        write(d, rel, text)
        rc, out = run(d)
        assert rc == 1, (rel, out)
        assert expect in out, (rel, out)


def test_cycles_between_modules(tmp_path):
    base_tree(tmp_path)
    write(tmp_path, "loader/x/x.h", '#include "loader/y/y.h"\n')
    write(tmp_path, "loader/y/y.h", '#include "loader/x/x.h"\n')
    write(tmp_path, "server/b.h", "")
    write(tmp_path, "server/b.c", '#include "server/a.h"\n')
    write(tmp_path, "server/a.c", '#include "server/a.h"\n#include "server/b.h"\n')
    rc, out = run(tmp_path)
    assert rc == 1, out
    assert "cycle: loader/x -> loader/y -> loader/x" in out
    assert "cycle: server/a -> server/b -> server/a" in out


def test_loader_modules_include_their_sub_folders(tmp_path):
    """A family folder below a loader module is part of it (formats/npy and
    formats/ may use each other), but it cannot carry a cycle between two
    loader modules."""
    base_tree(tmp_path)
    write(tmp_path, "loader/f/f.h", '#include "loader/f/a/a.h"\n')
    write(tmp_path, "loader/f/a/a.h", '#include "loader/f/f.h"\n')
    rc, out = run(tmp_path)
    assert rc == 0, out
    write(tmp_path, "loader/g/g.h", '#include "loader/f/f.h"\n')
    write(tmp_path, "loader/f/a/a.c", '#include "loader/g/g.h"\n')
    rc, out = run(tmp_path)
    assert rc == 1, out
    assert "cycle: loader/f -> loader/g -> loader/f" in out
