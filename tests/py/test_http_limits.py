"""Connection limits against the real server: thousands of idle sockets
with half-sent request headers from one address must not starve other
clients (a per-address cap, --max-connections-per-ip), and a request whose
headers stall is closed quickly (--header-timeout), freeing its slot.

Loopback is one address for the server, so the flood comes from 127.0.0.2
and the well-behaved clients from 127.0.0.1 (both are loopback on Linux)."""
import errno
import resource
import select
import socket
import time
import urllib.parse
import urllib.request

import pytest

FLOOD = 3000
HALF = b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: "  # never finished


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip("RLIMIT_NOFILE hard limit %d < %d" % (hard, n))
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def addr(server):
    u = urllib.parse.urlsplit(server.base)
    return u.hostname, u.port


def second_loopback_ok():
    s = socket.socket()
    try:
        s.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


def flood(host, port, n):
    """n non-blocking connections from 127.0.0.2, each sending half a request."""
    socks = []
    for _ in range(n):
        c = socket.socket()
        c.setblocking(False)
        c.bind(("127.0.0.2", 0))
        e = c.connect_ex((host, port))
        assert e in (0, errno.EINPROGRESS), e
        socks.append(c)
    deadline = time.time() + 5
    pending = {c.fileno(): c for c in socks}
    p = select.poll()  # select() stops at fd 1024
    for fd in pending:
        p.register(fd, select.POLLOUT)
    while pending and time.time() < deadline:
        for fd, _ in p.poll(500):
            c = pending.pop(fd, None)
            p.unregister(fd)
            if c is None:
                continue
            try:
                c.send(HALF)
            except OSError:
                pass
    return socks


def still_open(socks):
    """How many the server has not closed (no EOF, no reset)."""
    n = 0
    for c in socks:
        try:
            if c.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b"":
                n += 1  # an answer: still open
        except BlockingIOError:
            n += 1  # nothing to read: still open
        except OSError:
            pass  # reset or never connected
    return n


def timed_get(base, path, timeout=10):
    t = time.time()
    with urllib.request.urlopen(base + path, timeout=timeout) as r:
        assert r.status == 200
        r.read()
    return time.time() - t


@pytest.mark.skipif(not second_loopback_ok(), reason="cannot bind 127.0.0.2")
def test_idle_flood_from_one_address_does_not_starve_others(make_server):
    raise_nofile(FLOOD + 1024)
    s = make_server()  # the defaults: --max-connections 1024
    host, port = addr(s)
    socks = flood(host, port, FLOOD)
    try:
        time.sleep(1.0)
        # every normal request is served, quickly, while the flood is connected
        slow = [timed_get(s.base, "/v1/jobs") for _ in range(20)]
        assert max(slow) < 5.0, slow  # without the cap: 10 s timeouts
        # the flooding address holds at most its cap (default 256) of the slots
        assert still_open(socks) <= 256
    finally:
        for c in socks:
            c.close()
    assert timed_get(s.base, "/healthz") < 2.0


@pytest.mark.skipif(not second_loopback_ok(), reason="cannot bind 127.0.0.2")
def test_per_ip_cap_and_header_timeout_flags(make_server):
    raise_nofile(2048)
    s = make_server(args=["--max-connections", "64", "--max-connections-per-ip", "16",
                          "--header-timeout", "2"])
    host, port = addr(s)
    socks = flood(host, port, 200)
    try:
        time.sleep(0.5)
        kept = still_open(socks)
        assert 0 < kept <= 16, kept
        # the rest of the slots are there for other clients
        assert all(timed_get(s.base, "/healthz") < 2.0 for _ in range(30))
        # stalled headers are dropped after --header-timeout, not the 60 s idle timeout
        time.sleep(4.5)
        assert still_open(socks) == 0
    finally:
        for c in socks:
            c.close()


def test_flags_are_checked(make_server):
    for bad in (["--max-connections-per-ip", "0"], ["--header-timeout", "0"],
                ["--max-connections", "8", "--max-connections-per-ip", "9"]):
        srv = make_server(args=bad, start=False)
        with pytest.raises(RuntimeError) as e:
            srv.start()
        assert bad[-2] in str(e.value), e.value
        srv.proc = None
