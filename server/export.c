/* export.c - see export.h. One thread serves one client at a time; a request
 * is a few bytes and an answer one sendmsg, so that is plenty. */
#include "server/export.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "loader/residents/residents.h"

struct export_server {
    mp_server *srv;
    int listen_fd, stop_fd;
    pthread_t thread;
    char path[108];
};

static int send_all(int fd, const char *buf, size_t len, const int *fds, int nfds) {
    struct msghdr msg = {0};
    struct iovec iov = {(void *)buf, len};
    char ctrl[CMSG_SPACE(sizeof(int) * GPU_MAX_DEVICES)];
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 0) {
        memset(ctrl, 0, sizeof ctrl);
        msg.msg_control = ctrl;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n < 0) return -1;
    size_t sent = (size_t)n;
    while (sent < len) { /* the fds went with the first bytes */
        n = send(fd, buf + sent, len - sent, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        sent += (size_t)n;
    }
    return 0;
}

static void serve_client(export_server *e, int c) {
    char req[128];
    size_t len = 0;
    struct pollfd p = {c, POLLIN, 0};
    while (len < sizeof req - 1) {
        if (poll(&p, 1, 5000) <= 0) return; /* a silent client does not hold the thread */
        ssize_t n = read(c, req + len, sizeof req - 1 - len);
        if (n <= 0) return;
        len += (size_t)n;
        if (memchr(req, '\n', len)) break;
    }
    req[len] = 0;
    req[strcspn(req, "\r\n")] = 0;
    json_t *desc = NULL;
    int fds[GPU_MAX_DEVICES], nfds = 0;
    mp_error err = {0};
    if (!e->srv->residents || res_export(e->srv->residents, req, &desc, fds, &nfds, &err) != 0)
        desc = json_pack("{s:s,s:s}", "error", err.code[0] ? err.code : "unavailable", "message",
                         err.message);
    char *text = desc ? json_dumps(desc, JSON_COMPACT) : NULL;
    json_decref(desc);
    if (text) {
        size_t tl = strlen(text);
        char *line = realloc(text, tl + 2);
        if (line) {
            line[tl] = '\n';
            line[tl + 1] = 0;
            send_all(c, line, tl + 1, fds, nfds);
            text = line;
        }
    }
    free(text);
    for (int i = 0; i < nfds; i++)
        close(fds[i]);
}

static void *export_main(void *arg) {
    export_server *e = arg;
    for (;;) {
        struct pollfd p[2] = {{e->listen_fd, POLLIN, 0}, {e->stop_fd, POLLIN, 0}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (p[1].revents) break;
        if (!(p[0].revents & POLLIN)) continue;
        int c = accept4(e->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) continue;
        serve_client(e, c);
        close(c);
    }
    return NULL;
}

int export_start(mp_server *srv, const char *path, export_server **out, mp_error *err) {
    *out = NULL;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path)
        return mp_err(err, "bad_flag", "--export-socket path too long");
    export_server *e = calloc(1, sizeof *e);
    if (!e) return mp_err(err, "no_memory", "out of memory");
    e->srv = srv;
    snprintf(e->path, sizeof e->path, "%s", path);
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
    unlink(path); /* a stale socket from a dead process */
    e->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    e->stop_fd = eventfd(0, EFD_CLOEXEC);
    /* Only this user may connect: the arenas are the model's weights. */
    mode_t old = umask(0077);
    int bound = e->listen_fd >= 0 && bind(e->listen_fd, (struct sockaddr *)&addr, sizeof addr) == 0;
    umask(old);
    if (!bound || e->stop_fd < 0 || listen(e->listen_fd, 16) != 0 ||
        pthread_create(&e->thread, NULL, export_main, e) != 0) {
        int saved = errno;
        if (e->listen_fd >= 0) close(e->listen_fd);
        if (e->stop_fd >= 0) close(e->stop_fd);
        free(e);
        return mp_err(err, "listen_failed", "--export-socket %s: %s", path, strerror(saved));
    }
    *out = e;
    return 0;
}

void export_stop(export_server *e) {
    if (!e) return;
    uint64_t one = 1;
    if (write(e->stop_fd, &one, sizeof one) !=
        (ssize_t)sizeof one) { /* the thread then stays blocked; joining would hang */
        return;
    }
    pthread_join(e->thread, NULL);
    close(e->listen_fd);
    close(e->stop_fd);
    unlink(e->path);
    free(e);
}
