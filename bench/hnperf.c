/* hnperf: a tiny iperf-like bulk TCP tool that can speak the HomeNet preamble.
 *
 * Build: gcc -O2 -Wall -o hnperf hnperf.c
 *
 *   hnperf sink HOST PORT
 *       The "home service": accepts any number of connections (single-threaded epoll).
 *       The first byte a client sends picks the mode:
 *         'S'  the client sends; the sink reads and discards, and when the client
 *              half-closes it answers with the byte count it received (8 bytes, big endian).
 *         'R'  the sink sends 128 KiB blocks until the client closes.
 *         'M'  like 'S', but the end is an in-band marker instead of a half-close: the
 *              client sends only 'z' bytes, then one 'E'; when a read ends with 'E' the
 *              sink answers with the count of bytes before it. For relays that do not
 *              carry a half-close (frp closes both directions on the client's FIN).
 *
 *   hnperf client HOST:PORT [-P streams] [-t seconds] [-R|-M] [--homenet TARGET]
 *                           [--homenet-route HOP/HOP/...] [--label TEXT] [-l blocksize]
 *       Opens P streams to HOST:PORT. With --homenet, each stream first writes
 *       "HN/1 CONNECT TARGET\n" and its mode byte in ONE write (pipelined), then waits
 *       for the node's "HN/1 200 ..." reply line. --homenet-route sends one
 *       "HN/1 CONNECT HOP\n" line per hop (e.g. home/127.0.0.1:5301: relay -> listener
 *       "home" -> sink), all in the same single write, and waits for one reply line per
 *       hop (--homenet T = --homenet-route T). Then all streams move bytes for t
 *       seconds from one epoll thread (like iperf3 3.12, which is single-threaded).
 *       Default direction public -> home ('S'); -R is home -> public; -M = public -> home
 *       ending with the marker ('M') instead of a half-close.
 *       Receiver-side figure: 'S' uses the byte counts reported by the sink, divided by
 *       the time from the start of streaming to the arrival of the last count; 'R' uses
 *       the bytes the client received during the t seconds.
 *       Prints one JSON line (fields compatible with bench_tput.py: gbit_s, P, t, ...).
 *
 * Loopback use only; no dependency beyond libc. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXS 256
static char *buf;
static size_t blk = 128 * 1024;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}
static void nb(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }
static void die(const char *label, const char *what) {
    /* one JSON line, like bench_tput.py on error */
    printf("{\"label\": \"%s\", \"error\": \"%s: %s\"}\n", label, what, strerror(errno));
    exit(1);
}
static int parse_addr(const char *s, struct sockaddr_in *a) {
    char host[64];
    const char *c = strrchr(s, ':');
    if (!c || c - s >= (long)sizeof host) return -1;
    memcpy(host, s, c - s);
    host[c - s] = 0;
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_port = htons(atoi(c + 1));
    return inet_pton(AF_INET, host, &a->sin_addr) == 1 ? 0 : -1;
}

/* ------------------------------------------------------------------ sink */
struct conn { int mode; uint64_t n; };

static int sink(const char *host, const char *port) {
    struct sockaddr_in a;
    char hp[128];
    snprintf(hp, sizeof hp, "%s:%s", host, port);
    if (parse_addr(hp, &a)) { fprintf(stderr, "bad address %s\n", hp); return 2; }
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 1024)) { perror("bind/listen"); return 1; }
    nb(ls);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls}, evs[64];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    static struct conn cs[65536];
    for (;;) {
        int k = epoll_wait(ep, evs, 64, -1);
        for (int i = 0; i < k; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c;
                while ((c = accept(ls, NULL, NULL)) >= 0) {
                    if (c >= 65536) { close(c); continue; }
                    nb(c);
                    cs[c].mode = 0;
                    cs[c].n = 0;
                    struct epoll_event ce = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                }
                continue;
            }
            struct conn *cn = &cs[fd];
            int closeit = 0;
            if (cn->mode == 'R' && (evs[i].events & EPOLLOUT)) {
                ssize_t w = write(fd, buf, blk);
                if (w < 0 && errno != EAGAIN) closeit = 1;
            }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                ssize_t r = read(fd, buf, blk);
                if (r > 0) {
                    int first = cn->mode == 0;
                    if (first) {
                        cn->mode = buf[0];
                        cn->n = r - 1;
                        if (cn->mode == 'R') {
                            struct epoll_event ce = {.events = EPOLLIN | EPOLLOUT, .data.fd = fd};
                            epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ce);
                        }
                    } else {
                        cn->n += r;
                    }
                    if (cn->mode == 'M' && (r > 1 || !first) && buf[r - 1] == 'E') {
                        uint64_t v = cn->n - 1;  /* bytes before the marker */
                        uint8_t be[8];
                        for (int b = 0; b < 8; b++) be[b] = (uint8_t)(v >> (56 - 8 * b));
                        ssize_t w = write(fd, be, 8);  /* 8 bytes into an idle socket */
                        (void)w;
                        cn->n = 0;
                    }
                } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                    if (r == 0 && cn->mode == 'S') {
                        uint64_t be = ((uint64_t)htonl(cn->n & 0xffffffffu) << 32) | htonl(cn->n >> 32);
                        ssize_t w = write(fd, &be, 8);
                        (void)w;
                    }
                    closeit = 1;
                }
            }
            if (closeit) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
            }
        }
    }
}

/* ---------------------------------------------------------------- client */
struct stream { int fd; uint64_t sent, recvd, reported; int done; };

static int client(int argc, char **argv) {
    const char *target = NULL, *homenet = NULL, *label = "";
    int P = 1, reverse = 0, marker = 0;
    double T = 10;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "-P") && i + 1 < argc) P = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-t") && i + 1 < argc) T = atof(argv[++i]);
        else if (!strcmp(argv[i], "-l") && i + 1 < argc) blk = (size_t)atol(argv[++i]);
        else if (!strcmp(argv[i], "-R")) reverse = 1;
        else if (!strcmp(argv[i], "-M")) marker = 1;
        else if (!strcmp(argv[i], "--homenet") && i + 1 < argc) homenet = argv[++i];
        else if (!strncmp(argv[i], "--homenet=", 10)) homenet = argv[i] + 10;
        else if (!strcmp(argv[i], "--homenet-route") && i + 1 < argc) homenet = argv[++i];
        else if (!strncmp(argv[i], "--homenet-route=", 16)) homenet = argv[i] + 16;
        else if (!strcmp(argv[i], "--label") && i + 1 < argc) label = argv[++i];
        else if (argv[i][0] != '-' && !target) target = argv[i];
        else { fprintf(stderr, "unknown argument %s\n", argv[i]); return 2; }
    }
    if (!target || P < 1 || P > MAXS || T <= 0 || blk < 1 || blk > (64 << 20)) {
        fprintf(stderr, "usage: hnperf client HOST:PORT [-P n] [-t s] [-R|-M] [--homenet HOST:PORT]"
                        " [--homenet-route HOP/HOP/...] [--label X]\n");
        return 2;
    }
    buf = realloc(buf, blk);
    memset(buf, 'z', blk);
    struct sockaddr_in a;
    if (parse_addr(target, &a)) { fprintf(stderr, "bad address %s\n", target); return 2; }
    struct stream st[MAXS];
    char pre[2048];
    int prelen = 0, hops = 0;
    if (homenet) {  /* one request line per hop of the route, all pipelined */
        const char *h = homenet;
        while (*h) {
            size_t len = strcspn(h, "/");
            if (len > 0) {
                if (len > 255 || prelen + len + 16 > sizeof pre) { fprintf(stderr, "route too long\n"); return 2; }
                prelen += snprintf(pre + prelen, sizeof pre - prelen, "HN/1 CONNECT %.*s\n", (int)len, h);
                hops++;
            }
            h += len + (h[len] == '/');
        }
        if (!hops) { fprintf(stderr, "empty route\n"); return 2; }
    }
    if (reverse && marker) { fprintf(stderr, "-R and -M are exclusive\n"); return 2; }
    pre[prelen++] = reverse ? 'R' : marker ? 'M' : 'S';
    for (int i = 0; i < P; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&a, sizeof a)) die(label, "connect");
        if (write(fd, pre, prelen) != prelen) die(label, "write preamble");  /* one write */
        for (int h = 0; h < hops; h++) {  /* read each reply line byte by byte: no payload is eaten */
            char line[256];
            int n = 0;
            while (n < (int)sizeof line - 1) {
                ssize_t r = read(fd, line + n, 1);
                if (r <= 0) die(label, "reading reply");
                if (line[n++] == '\n') break;
            }
            line[n] = 0;
            if (strncmp(line, "HN/1 200", 8)) {
                line[strcspn(line, "\r\n\"\\")] = 0;
                printf("{\"label\": \"%s\", \"error\": \"refused at hop %d: %s\"}\n", label, h + 1, line);
                return 1;
            }
        }
        nb(fd);
        st[i] = (struct stream){.fd = fd};
    }
    int ep = epoll_create1(0);
    for (int i = 0; i < P; i++) {
        struct epoll_event ev = {.events = reverse ? EPOLLIN : EPOLLOUT, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, st[i].fd, &ev);
    }
    struct epoll_event evs[MAXS];
    double t0 = now(), tend = t0 + T, tstop = 0;
    int phase = 0;  /* 0 streaming, 1 waiting for counts ('S') */
    int left = P;
    while (left > 0) {
        double tn = now();
        if (phase == 0 && tn >= tend) {
            tstop = tn;
            if (reverse) break;
            phase = 1;
            for (int i = 0; i < P; i++) {  /* half-close (or marker), then wait for each count */
                if (marker) {
                    int fl = fcntl(st[i].fd, F_GETFL);  /* blocking: the marker must go out whole */
                    fcntl(st[i].fd, F_SETFL, fl & ~O_NONBLOCK);
                    if (write(st[i].fd, "E", 1) != 1) die(label, "write marker");
                    fcntl(st[i].fd, F_SETFL, fl);
                } else {
                    shutdown(st[i].fd, SHUT_WR);
                }
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
                epoll_ctl(ep, EPOLL_CTL_MOD, st[i].fd, &ev);
            }
        }
        if (phase == 1 && tn > tstop + 30) { errno = ETIMEDOUT; die(label, "waiting for counts"); }
        int ms = phase == 0 ? (int)((tend - tn) * 1000) + 1 : 1000;
        int k = epoll_wait(ep, evs, MAXS, ms);
        for (int j = 0; j < k; j++) {
            struct stream *s = &st[evs[j].data.u32];
            if (s->done) continue;
            if (phase == 0 && !reverse) {
                ssize_t w = write(s->fd, buf, blk);
                if (w > 0) s->sent += w;
                else if (w < 0 && errno != EAGAIN) die(label, "write");
            } else if (phase == 0) {
                ssize_t r = read(s->fd, buf, blk);
                if (r > 0) s->recvd += r;
                else if (r == 0) { errno = EPIPE; die(label, "stream closed early"); }
                else if (errno != EAGAIN) die(label, "read");
            } else {
                uint8_t cnt[8];
                ssize_t r = recv(s->fd, cnt, 8, MSG_WAITALL);
                if (r == 8) {
                    uint64_t v = 0;
                    for (int b = 0; b < 8; b++) v = (v << 8) | cnt[b];
                    s->reported = v;
                    s->done = 1;
                    left--;
                    epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
                } else if (r == 0 || (r < 0 && errno != EAGAIN)) {
                    errno = EPIPE;
                    die(label, "no count from sink");
                }
            }
        }
    }
    double tfin = now();
    uint64_t sent = 0, rcv = 0;
    for (int i = 0; i < P; i++) {
        sent += reverse ? 0 : st[i].sent;
        rcv += reverse ? st[i].recvd : st[i].reported;
        close(st[i].fd);
    }
    double el = reverse ? tstop - t0 : tfin - t0;
    printf("{\"tool\": \"hnperf\", \"target\": \"%s\", \"homenet\": \"%s\", \"label\": \"%s\", \"P\": %d, "
           "\"t\": %g, \"reverse\": %s, \"marker\": %s, \"gbit_s\": %.3f, \"sender_gbit_s\": %.3f, \"bytes\": %llu, "
           "\"elapsed_s\": %.3f, \"drain_s\": %.3f}\n",
           target, homenet ? homenet : "", label, P, T, reverse ? "true" : "false", marker ? "true" : "false",
           rcv * 8 / el / 1e9, reverse ? rcv * 8 / el / 1e9 : sent * 8 / (tstop - t0) / 1e9,
           (unsigned long long)rcv, el, reverse ? 0.0 : tfin - tstop);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    buf = malloc(blk);
    memset(buf, 'z', blk);
    if (argc >= 4 && !strcmp(argv[1], "sink")) return sink(argv[2], argv[3]);
    if (argc >= 3 && !strcmp(argv[1], "client")) return client(argc, argv);
    fprintf(stderr, "usage: hnperf sink HOST PORT | hnperf client HOST:PORT [-P n] [-t s] [-R|-M] [--homenet HOST:PORT]"
                    " [--homenet-route HOP/HOP/...]\n");
    return 2;
}
