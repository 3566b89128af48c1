/* The TFTP transfer loop in C: every admitted transfer's lock-step (or RFC 7440 window) of DATA out and ACK in,
 * on one thread of its own that never holds Python's GIL. native.py loads this library with ctypes, hands each
 * admitted transfer over (its socket, its open file or bytes, the negotiated options) and reads back how each
 * ended. Admission, option negotiation, refusals and the record of every transfer stay in Python (server.py).
 *
 * Why: in Python a block costs the two system calls plus the event loop's dispatch, and the dispatch is most of
 * it (benchmarks/results, issue 20). Here one epoll_wait hands over every ready transfer at once, as dnsmasq's
 * loop does, and a block is recvfrom + pread + sendmsg.
 *
 * The behaviour is session.py's, rule for rule (tests/test_tftp.py runs every test against both): duplicate ACKs
 * are ignored (Sorcerer's Apprentice), an ACK inside a window restarts the window after it, a datagram from
 * another TID gets ERROR 5, a peer never heard from gets one retransmission of its first packet and no ERROR,
 * a heard peer gets `retries` and then ERROR "timed out". Block numbers wrap at 65536 on the wire only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum outcome { OK, CLIENT_ERROR, NEVER_ANSWERED, TIMED_OUT, READ_ERROR, CANCELLED };

/* How one transfer ended, as native.py reads it (its ctypes Structure mirrors this). */
struct done {
    uint64_t id;
    int64_t acked;   /* the highest block the client acknowledged (0: only the OACK, -1: nothing) */
    int32_t outcome; /* enum outcome */
    int32_t code;    /* CLIENT_ERROR: the client's error code; READ_ERROR: errno */
    char message[256];
};

struct transfer {
    uint64_t id;
    int sock, file;        /* file: -1 when the payload is in `data` */
    unsigned char *data;   /* a copy of an in-memory payload, or NULL */
    uint64_t size;
    struct sockaddr_storage peer;
    socklen_t peerlen;
    int blksize, windowsize, retries, unanswered_retries;
    double timeout;
    unsigned char *oack;   /* the OACK to send first, or NULL */
    int oack_len;
    int64_t acked, sent, next, window_end, last_block;
    int attempts, heard, blocked;
    double deadline;       /* monotonic seconds at which to retransmit; 0: none */
    struct transfer *prev, *after;
};

struct engine {
    int epoll, wake, done_fd;
    pthread_mutex_t lock;               /* guards everything below it, shared with Python's thread */
    struct transfer *added;             /* handed over, not yet started (linked by `after`) */
    uint64_t *cancels;
    size_t cancels_len, cancels_cap;
    int stop;
    struct done *dones;
    size_t dones_len, dones_cap;
    /* the engine thread's own */
    struct transfer *live;
    double sweep_interval, next_sweep;
    unsigned char block[4 + 65464];
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void signal_fd(int fd) {
    uint64_t one = 1;
    ssize_t ignored = write(fd, &one, sizeof one);
    (void)ignored;  /* an eventfd only fails when its counter would overflow: it is readable then anyway */
}

/* -- ending a transfer --------------------------------------------------------------------------------------- */

static void send_error(struct transfer *t, const struct sockaddr *to, socklen_t tolen, int code, const char *text) {
    unsigned char packet[4 + 128];
    size_t len = strlen(text);
    if (len > 120)
        len = 120;
    packet[0] = 0; packet[1] = 5; packet[2] = (unsigned char)(code >> 8); packet[3] = (unsigned char)code;
    memcpy(packet + 4, text, len);
    packet[4 + len] = 0;
    ssize_t ignored = sendto(t->sock, packet, 5 + len, 0, to, tolen);
    (void)ignored;  /* best effort, as session.py's: the client times out otherwise */
}

static void finish(struct engine *e, struct transfer *t, enum outcome outcome, int code, const char *message) {
    epoll_ctl(e->epoll, EPOLL_CTL_DEL, t->sock, NULL);
    close(t->sock);
    if (t->file >= 0)
        close(t->file);
    if (t->prev)
        t->prev->after = t->after;
    else
        e->live = t->after;
    if (t->after)
        t->after->prev = t->prev;
    pthread_mutex_lock(&e->lock);
    if (e->dones_len == e->dones_cap) {
        size_t cap = e->dones_cap ? e->dones_cap * 2 : 64;
        struct done *grown = realloc(e->dones, cap * sizeof *grown);
        if (grown) {
            e->dones = grown;
            e->dones_cap = cap;
        }
    }
    if (e->dones_len < e->dones_cap) {  /* out of memory: the report is lost, the transfer still ends */
        struct done *d = &e->dones[e->dones_len++];
        memset(d, 0, sizeof *d);
        d->id = t->id;
        d->acked = t->acked;
        d->outcome = outcome;
        d->code = code;
        if (message)
            strncpy(d->message, message, sizeof d->message - 1);
    }
    pthread_mutex_unlock(&e->lock);
    signal_fd(e->done_fd);
    free(t->data);
    free(t->oack);
    free(t);
}

static void fail(struct engine *e, struct transfer *t, enum outcome outcome, int code, const char *wire,
                 const char *message) {
    send_error(t, (struct sockaddr *)&t->peer, t->peerlen, 0, wire);
    finish(e, t, outcome, code, message);
}

/* -- sending ------------------------------------------------------------------------------------------------- */

static void arm(struct transfer *t) {
    t->deadline = now() + t->timeout;
}

/* 1: sent (or failed in a way only the deadline can mend), 0: the send buffer is full, -1: the file failed
 * (errno), -2: the file is shorter than it was at the start */
static int send_block(struct engine *e, struct transfer *t, int64_t block) {
    uint64_t offset = (uint64_t)(block - 1) * (uint64_t)t->blksize;
    size_t length = offset >= t->size ? 0 : (size_t)(t->size - offset < (uint64_t)t->blksize
                                                      ? t->size - offset : (uint64_t)t->blksize);
    unsigned char *packet = e->block;
    packet[0] = 0; packet[1] = 3; packet[2] = (unsigned char)((block >> 8) & 0xFF);
    packet[3] = (unsigned char)(block & 0xFF);
    struct iovec iov[2] = {{packet, 4}, {packet + 4, length}};
    if (t->data) {
        iov[1].iov_base = t->data + offset;
    } else if (length) {
        ssize_t got = pread(t->file, packet + 4, length, (off_t)offset);
        if (got != (ssize_t)length)
            return got < 0 ? -1 : -2;
    }
    struct msghdr msg = {.msg_name = &t->peer, .msg_namelen = t->peerlen, .msg_iov = iov, .msg_iovlen = 2};
    if (sendmsg(t->sock, &msg, 0) < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return 0;
    if (block > t->sent)
        t->sent = block;
    return 1;
}

static void pump(struct engine *e, struct transfer *t) {
    if (t->blocked)
        return;
    while (t->next <= t->window_end) {
        int sent = send_block(e, t, t->next);
        if (sent < 0) {
            int error = sent == -1 ? errno : EIO;
            char message[200];
            if (sent == -1)
                snprintf(message, sizeof message, "%s", strerror(error));
            else
                snprintf(message, sizeof message, "file shrank during the transfer (short read at offset %llu)",
                         (unsigned long long)(t->next - 1) * (unsigned long long)t->blksize);
            fail(e, t, READ_ERROR, error, "read error", message);
            return;
        }
        if (sent == 0) {
            struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = t};
            epoll_ctl(e->epoll, EPOLL_CTL_MOD, t->sock, &ev);
            t->blocked = 1;
            return;
        }
        t->next++;
    }
    arm(t);  /* the window is out: wait for its ACK */
}

static void start_window(struct engine *e, struct transfer *t, int64_t first) {
    t->next = first;
    t->window_end = first - 1 + t->windowsize < t->last_block ? first - 1 + t->windowsize : t->last_block;
    pump(e, t);
}

static void send_oack(struct transfer *t) {
    ssize_t ignored = sendto(t->sock, t->oack, (size_t)t->oack_len, 0, (struct sockaddr *)&t->peer, t->peerlen);
    (void)ignored;  /* a full buffer: the deadline resends */
    arm(t);
}

/* -- receiving ----------------------------------------------------------------------------------------------- */

static int same_peer(const struct transfer *t, const struct sockaddr_storage *from) {
    if (from->ss_family != t->peer.ss_family)
        return 0;
    if (from->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const void *)from, *b = (const void *)&t->peer;
        return a->sin_port == b->sin_port && a->sin_addr.s_addr == b->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *a = (const void *)from, *b = (const void *)&t->peer;
    return a->sin6_port == b->sin6_port && !memcmp(&a->sin6_addr, &b->sin6_addr, sizeof a->sin6_addr);
}

static void on_ack(struct engine *e, struct transfer *t, unsigned wire) {
    /* The one block in (sent - 65536, sent] whose number is `wire`; windows are < 65536 blocks. */
    int64_t block = t->sent - ((t->sent - (int64_t)wire) & 0xFFFF);
    if (block <= t->acked)
        return;  /* duplicate or stale: resending here is the Sorcerer's Apprentice bug */
    t->acked = block;
    t->attempts = 0;
    t->deadline = 0;
    if (block >= t->last_block)
        finish(e, t, OK, 0, NULL);
    else
        start_window(e, t, block + 1);  /* RFC 7440: an ACK inside the window restarts it after that block */
}

static void on_readable(struct engine *e, struct transfer *t) {
    unsigned char data[1024];
    struct sockaddr_storage from;
    socklen_t fromlen = sizeof from;
    ssize_t n = recvfrom(t->sock, data, sizeof data, 0, (struct sockaddr *)&from, &fromlen);
    if (n < 0)
        return;  /* EAGAIN, or an ICMP error queued on the socket: the deadline decides */
    if (!same_peer(t, &from)) {  /* RFC 1350: another TID gets ERROR 5, and the transfer goes on */
        if (!(n >= 2 && data[0] == 0 && data[1] == 5))  /* never answer an ERROR with an ERROR */
            send_error(t, (struct sockaddr *)&from, fromlen, 5, "unknown transfer ID");
        return;
    }
    t->heard = 1;
    if (n < 4)
        return;
    unsigned opcode = (unsigned)data[0] << 8 | data[1], number = (unsigned)data[2] << 8 | data[3];
    if (opcode == 4) {
        on_ack(e, t, number);
    } else if (opcode == 5) {
        char message[200];
        size_t len = (size_t)n - 4;
        const unsigned char *end = memchr(data + 4, 0, len);
        if (end)
            len = (size_t)(end - (data + 4));
        if (len > sizeof message - 1)
            len = sizeof message - 1;
        memcpy(message, data + 4, len);
        message[len] = 0;
        finish(e, t, CLIENT_ERROR, (int)number, message);
    }
}

static void on_deadline(struct engine *e, struct transfer *t) {
    t->deadline = 0;
    t->attempts++;
    int retries = t->heard || t->retries < t->unanswered_retries ? t->retries : t->unanswered_retries;
    if (t->attempts > retries && !t->heard)
        finish(e, t, NEVER_ANSWERED, retries, NULL);  /* maybe a forged source: no ERROR at someone who never asked */
    else if (t->attempts > retries)
        fail(e, t, TIMED_OUT, retries, "timed out", NULL);
    else if (t->acked < 0)
        send_oack(t);
    else
        start_window(e, t, t->acked + 1);
}

/* -- the loop ------------------------------------------------------------------------------------------------ */

static void start(struct engine *e, struct transfer *t) {
    t->prev = NULL;
    t->after = e->live;
    if (e->live)
        e->live->prev = t;
    e->live = t;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = t};
    if (epoll_ctl(e->epoll, EPOLL_CTL_ADD, t->sock, &ev) < 0) {
        fail(e, t, READ_ERROR, errno, "internal error", strerror(errno));
        return;
    }
    if (t->oack)
        send_oack(t);
    else
        start_window(e, t, 1);
}

static void take_handed_over(struct engine *e) {
    uint64_t counter;
    ssize_t ignored = read(e->wake, &counter, sizeof counter);
    (void)ignored;
    pthread_mutex_lock(&e->lock);
    struct transfer *added = e->added;
    e->added = NULL;
    uint64_t *cancels = e->cancels;
    size_t cancels_len = e->cancels_len;
    e->cancels = NULL;
    e->cancels_len = e->cancels_cap = 0;
    pthread_mutex_unlock(&e->lock);
    struct transfer *in_order = NULL;  /* `added` is newest first */
    while (added) {
        struct transfer *after = added->after;
        added->after = in_order;
        in_order = added;
        added = after;
    }
    while (in_order) {
        struct transfer *after = in_order->after;
        start(e, in_order);
        in_order = after;
    }
    for (size_t i = 0; i < cancels_len; i++)
        for (struct transfer *t = e->live; t; t = t->after)
            if (t->id == cancels[i]) {
                finish(e, t, CANCELLED, 0, NULL);
                break;
            }
    free(cancels);
}

static void sweep(struct engine *e, double at) {
    struct transfer *t = e->live;
    while (t) {
        struct transfer *after = t->after;  /* on_deadline may free t */
        if (t->deadline != 0 && t->deadline <= at)
            on_deadline(e, t);
        t = after;
    }
}

int engine_run(struct engine *e) {
    struct epoll_event events[256];
    for (;;) {
        pthread_mutex_lock(&e->lock);
        int stop = e->stop;
        pthread_mutex_unlock(&e->lock);
        if (stop)
            break;
        int wait_ms = e->live ? (int)(e->sweep_interval * 1000) : -1;
        int n = epoll_wait(e->epoll, events, 256, wait_ms);
        if (n < 0 && errno != EINTR)
            return errno;
        int woken = 0;
        for (int i = 0; i < n; i++) {
            /* One event per socket per batch, and a transfer only ends on its own event: no pointer below is
             * stale. What Python handed over (a cancel can end any transfer) is taken after the batch. */
            struct transfer *t = events[i].data.ptr;
            if (t == NULL) {
                woken = 1;
            } else if (events[i].events & EPOLLOUT) {  /* its ACK, if one waits too, comes in the next batch */
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = t};
                epoll_ctl(e->epoll, EPOLL_CTL_MOD, t->sock, &ev);
                t->blocked = 0;
                pump(e, t);
            } else {
                on_readable(e, t);
            }
        }
        if (woken)
            take_handed_over(e);
        double at = now();
        if (at >= e->next_sweep) {
            sweep(e, at);
            e->next_sweep = at + e->sweep_interval;
        }
    }
    pthread_mutex_lock(&e->lock);  /* handed over after the last look: ended unstarted, but reported */
    struct transfer *added = e->added;
    e->added = NULL;
    pthread_mutex_unlock(&e->lock);
    while (added) {
        struct transfer *after = added->after;
        added->prev = NULL;
        added->after = e->live;
        if (e->live)
            e->live->prev = added;
        e->live = added;
        added = after;
    }
    while (e->live)
        finish(e, e->live, CANCELLED, 0, NULL);
    return 0;
}

/* -- what Python calls (from its own thread, except engine_run) ---------------------------------------------- */

struct engine *engine_new(double sweep_interval) {
    struct engine *e = calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->epoll = epoll_create1(EPOLL_CLOEXEC);
    e->wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    e->done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (e->epoll < 0 || e->wake < 0 || e->done_fd < 0 || epoll_ctl(e->epoll, EPOLL_CTL_ADD, e->wake, &ev) < 0) {
        if (e->epoll >= 0) close(e->epoll);
        if (e->wake >= 0) close(e->wake);
        if (e->done_fd >= 0) close(e->done_fd);
        free(e);
        return NULL;
    }
    pthread_mutex_init(&e->lock, NULL);
    e->sweep_interval = sweep_interval;
    return e;
}

int engine_done_fd(struct engine *e) {
    return e->done_fd;
}

/* Hand a transfer over: from now on its socket and file are the engine's, closed when it ends. 0, or an errno
 * (nothing was taken: the caller still owns both). `host`: a numeric address of `family`. */
int engine_add(struct engine *e, uint64_t id, int sock, int file, const char *data, uint64_t size, int family,
               const char *host, int port, uint32_t scope_id, int blksize, int windowsize, double timeout,
               int retries, int unanswered_retries, const char *oack, int oack_len) {
    struct transfer *t = calloc(1, sizeof *t);
    if (!t)
        return ENOMEM;
    if (family == AF_INET) {
        struct sockaddr_in *a = (void *)&t->peer;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
            goto invalid;
        t->peerlen = sizeof *a;
    } else if (family == AF_INET6) {
        struct sockaddr_in6 *a = (void *)&t->peer;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        a->sin6_scope_id = scope_id;
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1)
            goto invalid;
        t->peerlen = sizeof *a;
    } else {
        goto invalid;
    }
    if (data) {
        t->data = malloc(size ? size : 1);
        if (!t->data)
            goto nomem;
        memcpy(t->data, data, size);
    }
    if (oack) {
        t->oack = malloc((size_t)oack_len);
        if (!t->oack)
            goto nomem;
        memcpy(t->oack, oack, (size_t)oack_len);
        t->oack_len = oack_len;
    }
    t->id = id;
    t->sock = sock;
    t->file = data ? -1 : file;
    t->size = size;
    t->blksize = blksize;
    t->windowsize = windowsize;
    t->timeout = timeout;
    t->retries = retries;
    t->unanswered_retries = unanswered_retries;
    t->last_block = (int64_t)(size / (uint64_t)blksize) + 1;  /* the last block is short, maybe empty */
    t->acked = oack ? -1 : 0;
    pthread_mutex_lock(&e->lock);
    t->after = e->added;
    e->added = t;
    pthread_mutex_unlock(&e->lock);
    signal_fd(e->wake);
    return 0;
invalid:
    free(t);
    return EINVAL;
nomem:
    free(t->data);
    free(t);
    return ENOMEM;
}

/* End a transfer now (it is reported CANCELLED); 0, or ENOMEM. */
int engine_cancel(struct engine *e, uint64_t id) {
    pthread_mutex_lock(&e->lock);
    if (e->cancels_len == e->cancels_cap) {
        size_t cap = e->cancels_cap ? e->cancels_cap * 2 : 16;
        uint64_t *grown = realloc(e->cancels, cap * sizeof *grown);
        if (!grown) {
            pthread_mutex_unlock(&e->lock);
            return ENOMEM;
        }
        e->cancels = grown;
        e->cancels_cap = cap;
    }
    e->cancels[e->cancels_len++] = id;
    pthread_mutex_unlock(&e->lock);
    signal_fd(e->wake);
    return 0;
}

/* engine_run returns soon after, every live transfer reported CANCELLED. */
void engine_stop(struct engine *e) {
    pthread_mutex_lock(&e->lock);
    e->stop = 1;
    pthread_mutex_unlock(&e->lock);
    signal_fd(e->wake);
}

/* Copy up to `max` reports of ended transfers into `out`, oldest first; how many. */
int engine_take_done(struct engine *e, struct done *out, int max) {
    uint64_t counter;
    ssize_t ignored = read(e->done_fd, &counter, sizeof counter);  /* first: a report added later signals again */
    (void)ignored;
    pthread_mutex_lock(&e->lock);
    size_t n = e->dones_len < (size_t)max ? e->dones_len : (size_t)max;
    memcpy(out, e->dones, n * sizeof *out);
    memmove(e->dones, e->dones + n, (e->dones_len - n) * sizeof *out);
    e->dones_len -= n;
    int more = e->dones_len > 0;
    pthread_mutex_unlock(&e->lock);
    if (more)
        signal_fd(e->done_fd);
    return (int)n;
}

/* After engine_run has returned (or when it never ran: then what was handed over is closed unreported). */
void engine_free(struct engine *e) {
    struct transfer *t = e->added;
    while (t) {
        struct transfer *after = t->after;
        close(t->sock);
        if (t->file >= 0)
            close(t->file);
        free(t->data);
        free(t->oack);
        free(t);
        t = after;
    }
    close(e->epoll);
    close(e->wake);
    close(e->done_fd);
    pthread_mutex_destroy(&e->lock);
    free(e->cancels);
    free(e->dones);
    free(e);
}

#ifndef SOURCE_SHA256
#define SOURCE_SHA256 "unknown"
#endif

/* The SHA-256 of the engine.c this library was built from (hatch_build.py passes it): native.py refuses a stale one. */
const char *engine_source(void) {
    return SOURCE_SHA256;
}
