#!/usr/bin/env python3
"""check_layers.py - holds the dependency rules of ARCHITECTURE.md.

Reads every #include "..." and <system header> of the service's sources and
fails (exit 1, one line per violation) when:
  - a folder includes a layer above it or beside it that it may not see
    (the LAYERS table below);
  - a file includes another module's private header (*_internal.h may only
    be included from its own folder and the folders below it);
  - a system header that belongs to one module (sqlite3.h, microhttpd.h,
    cuda*.h) appears outside it;
  - the task contract (util/task.h, util/jobtype.h) is used in loader/
    outside loader/jobs/;
  - modules include each other in a cycle. A module is a folder, except in
    loader/, where it is loader/<name> with everything below it (the format
    families under loader/formats/ are parts of one module: the directory
    and index logic of weights.c sits above them, the mp_weights they fill
    below them), and in server/, where each file pair (x.c, x.h) is one;
    server/main.c, the composition root, is left out;
  - the command-line client (tools/modelprep.c, tools/cli/) includes
    anything of ours but util/ and tools/cli/: it talks to the server only
    through the API, never through the loader or the store.

Usage: scripts/check_layers.py [repo root]
"""
import os
import re
import sys

ROOT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
TOP = ("util", "store", "gpu", "loader", "server", "handlers")

# Which top-level folders each folder may include (besides itself).
LAYERS = {
    "util": set(),
    "store": {"util"},
    "gpu": {"util"},
    "loader": {"util", "gpu"},
    "server": {"util", "store", "gpu", "loader"},
    "handlers": {"util", "store", "gpu", "loader", "server"},
}
# The only headers of gpu/ that another folder may include.
GPU_PUBLIC = {"gpu/gpu.h", "gpu/dummy.h"}
# System headers that belong to one place.
SYSTEM_OWNERS = [
    (re.compile(r"^sqlite3\.h$"), ("store/",), "only store/ speaks SQL"),
    (re.compile(r"^microhttpd\.h$"), ("server/", "handlers/"), "only server/ and handlers/ speak HTTP"),
    (re.compile(r"^(cuda|cuda_runtime|cuda_runtime_api|cuda_fp16|cuda_bf16)\.h$"), ("gpu/",),
     "only gpu/ speaks CUDA"),
]
TASK_CONTRACT = {"util/task.h", "util/jobtype.h"}
# The composition root wires every layer together.
ROOTS = {"server/main.c"}

INC = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]')


def sources():
    for top in TOP:
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith((".c", ".h", ".cu")):
                    yield os.path.relpath(os.path.join(d, f), ROOT)


def includes(path):
    out = []
    with open(os.path.join(ROOT, path), errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            m = INC.match(line)
            if m:
                out.append((n, m.group(1), m.group(2)))
    return out


def module_of(path):
    top = path.split("/")[0]
    if top == "server":
        return "server/" + os.path.splitext(os.path.basename(path))[0]
    if top == "loader":
        return "/".join(path.split("/")[:2])
    return os.path.dirname(path)


def check():
    errors = []
    edges = {}
    for src in sorted(sources()):
        top = src.split("/")[0]
        for line, kind, inc in includes(src):
            where = f"{src}:{line}: #include {'<' if kind == '<' else chr(34)}{inc}{'>' if kind == '<' else chr(34)}"
            if kind == "<":
                for rx, owners, why in SYSTEM_OWNERS:
                    if rx.match(inc) and not src.startswith(owners):
                        errors.append(f"{where}: {why}")
                continue
            itop = inc.split("/")[0]
            if itop not in TOP:
                continue  # generated or local headers
            if not os.path.exists(os.path.join(ROOT, inc)):
                errors.append(f"{where}: no such header")
                continue
            if itop != top and itop not in LAYERS[top] and src not in ROOTS:
                errors.append(f"{where}: {top}/ may not depend on {itop}/ (see ARCHITECTURE.md)")
            if itop == "gpu" and top != "gpu" and inc not in GPU_PUBLIC:
                errors.append(f"{where}: only gpu/gpu.h is gpu/'s interface")
            base = os.path.basename(inc)
            if base.endswith("_internal.h"):
                idir = os.path.dirname(inc)
                if not (os.path.dirname(src) == idir or src.startswith(idir + "/")):
                    errors.append(f"{where}: a private header of {idir}/")
            if inc in TASK_CONTRACT and top == "loader" and not src.startswith("loader/jobs/"):
                errors.append(f"{where}: only loader/jobs/ knows the task contract")
            if src in ROOTS:
                continue
            a, b = module_of(src), module_of(inc)
            if a != b:
                edges.setdefault(a, set()).add(b)
    errors += cycles(edges)
    errors += client_errors()
    return errors


# What the client may include of ours.
CLIENT_MAY = ("util/", "tools/cli/")


def client_sources():
    for rel in ("tools/modelprep.c",):
        if os.path.exists(os.path.join(ROOT, rel)):
            yield rel
    for d, _, files in os.walk(os.path.join(ROOT, "tools", "cli")):
        for f in files:
            if f.endswith((".c", ".h")):
                yield os.path.relpath(os.path.join(d, f), ROOT)


def client_errors():
    errors = []
    for src in sorted(client_sources()):
        for line, kind, inc in includes(src):
            if kind == '"' and inc.split("/")[0] in TOP + ("tools",) and not inc.startswith(CLIENT_MAY):
                errors.append(f'{src}:{line}: #include "{inc}": the client speaks only the API '
                              "(util/ and tools/cli/ only)")
            for rx, owners, why in SYSTEM_OWNERS:
                if kind == "<" and rx.match(inc):
                    errors.append(f"{src}:{line}: #include <{inc}>: {why}")
    return errors


def cycles(edges):
    """Every elementary cycle reported once, by its smallest rotation."""
    found = set()
    out = []
    state = {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cyc = stack[stack.index(nxt):]
                k = min(range(len(cyc)), key=lambda i: cyc[i])
                key = tuple(cyc[k:] + cyc[:k])
                if key not in found:
                    found.add(key)
                    out.append("cycle: " + " -> ".join(key + (key[0],)))
            elif state.get(nxt) is None:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for n in sorted(edges):
        if state.get(n) is None:
            visit(n, [])
    return out


def main():
    errors = check()
    for e in errors:
        print(e)
    nsrc = sum(1 for _ in sources())
    if errors:
        print(f"layers: {len(errors)} violation(s) in {nsrc} files")
        return 1
    print(f"layers: ok ({nsrc} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
