/* A small AMQP client on rabbitmq-c: what one C process gets from the broker, the reference
 * bench/limit.py sets kzpool's rates against.
 *
 *     cc -O2 -o limit_client bench/limit_client.c -lrabbitmq
 *     limit_client [-u USER] [-p PASSWORD] [-v VHOST] HOST PORT QUEUE SIZE MODE N [ARG]
 *
 * MODE, on one channel of one connection, with SIZE-byte bodies (bytes 0, 1, .. 255, 0, ..):
 *
 *   publish N          N basic.publish to QUEUE through the default exchange, no confirms,
 *                      then a passive queue.declare (a round trip: the broker has them all);
 *   consume N PREFETCH basic.qos PREFETCH, basic.consume QUEUE, basic.ack each delivery on
 *                      its own, until N arrived (QUEUE must hold N messages already);
 *   confirm N WINDOW   confirm.select, then N publishes with at most WINDOW unconfirmed,
 *                      until every one is acked or nacked (acks with "multiple" count all
 *                      the tags they cover).
 *
 * The clock starts after the channel is open (and confirm.select done) and stops when the
 * mode is done.  Prints one JSON line: {"mode", "count", "seconds", "nacks", "rabbitmq_c"}
 * (the library's version).  Errors go to stderr with exit status 1.
 */

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#if defined(__has_include)
#if __has_include(<rabbitmq-c/amqp.h>)
#define KZ_NEW_HEADERS 1
#endif
#endif

#ifdef KZ_NEW_HEADERS
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/tcp_socket.h>
#else
#include <amqp.h>
#include <amqp_tcp_socket.h>
#endif

#define CHANNEL 1
#define DRAIN_EVERY 64 /* publishes between two non-blocking reads of confirms */

static void die(const char *what, const char *detail) {
    fprintf(stderr, "limit_client: %s: %s\n", what, detail);
    exit(1);
}

static void check_status(int status, const char *what) {
    if (status != AMQP_STATUS_OK) {
        die(what, amqp_error_string2(status));
    }
}

static void check_reply(amqp_rpc_reply_t reply, const char *what) {
    char detail[256];
    switch (reply.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        return;
    case AMQP_RESPONSE_NONE:
        die(what, "missing RPC reply");
        break;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        die(what, amqp_error_string2(reply.library_error));
        break;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (reply.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            amqp_connection_close_t *m = reply.reply.decoded;
            snprintf(detail, sizeof detail, "connection closed: %u %.*s", m->reply_code,
                     (int)m->reply_text.len, (char *)m->reply_text.bytes);
        } else if (reply.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            amqp_channel_close_t *m = reply.reply.decoded;
            snprintf(detail, sizeof detail, "channel closed: %u %.*s", m->reply_code,
                     (int)m->reply_text.len, (char *)m->reply_text.bytes);
        } else {
            snprintf(detail, sizeof detail, "server exception, method 0x%08X", reply.reply.id);
        }
        die(what, detail);
        break;
    }
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static long parse_count(const char *text, const char *what) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || *end != '\0' || value <= 0) {
        die(what, "not a positive whole number");
    }
    return value;
}

/* ----- publish ------------------------------------------------------------------------------ */

static long run_publish(amqp_connection_state_t conn, amqp_bytes_t queue, amqp_bytes_t body,
                        long count) {
    for (long i = 0; i < count; i++) {
        check_status(amqp_basic_publish(conn, CHANNEL, amqp_empty_bytes, queue, 0, 0, NULL, body),
                     "basic.publish");
    }
    amqp_queue_declare(conn, CHANNEL, queue, 1, 0, 0, 0, amqp_empty_table);
    check_reply(amqp_get_rpc_reply(conn), "queue.declare after the last publish");
    return 0;
}

/* ----- consume + ack ------------------------------------------------------------------------ */

static long run_consume(amqp_connection_state_t conn, amqp_bytes_t queue, long count,
                        long prefetch) {
    amqp_basic_qos(conn, CHANNEL, 0, (uint16_t)prefetch, 0);
    check_reply(amqp_get_rpc_reply(conn), "basic.qos");
    amqp_basic_consume(conn, CHANNEL, queue, amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    check_reply(amqp_get_rpc_reply(conn), "basic.consume");
    for (long received = 0; received < count;) {
        amqp_envelope_t envelope;
        amqp_maybe_release_buffers(conn);
        amqp_rpc_reply_t reply = amqp_consume_message(conn, &envelope, NULL, 0);
        check_reply(reply, "consume");
        check_status(amqp_basic_ack(conn, CHANNEL, envelope.delivery_tag, 0), "basic.ack");
        amqp_destroy_envelope(&envelope);
        received++;
    }
    return 0;
}

/* ----- pipelined confirms ------------------------------------------------------------------- */

struct confirms {
    unsigned char *done; /* done[tag]: acked or nacked */
    long floor;          /* every tag <= floor is settled */
    long settled;
    long nacks;
    long count;
};

static void settle(struct confirms *c, uint64_t tag, int multiple, int nack) {
    if (tag > (uint64_t)c->count) {
        die("confirm", "delivery tag beyond the publishes made");
    }
    long from = multiple ? c->floor + 1 : (long)tag;
    for (long t = from; t <= (long)tag; t++) {
        if (!c->done[t]) {
            c->done[t] = 1;
            c->settled++;
            c->nacks += nack;
        }
    }
    while (c->floor < c->count && c->done[c->floor + 1]) {
        c->floor++;
    }
}

/* Read one frame (blocking when timeout is NULL); 1 if one was read, 0 on timeout. */
static int read_confirm(amqp_connection_state_t conn, struct confirms *c, struct timeval *timeout) {
    amqp_frame_t frame;
    amqp_maybe_release_buffers(conn);
    int status = timeout ? amqp_simple_wait_frame_noblock(conn, &frame, timeout)
                         : amqp_simple_wait_frame(conn, &frame);
    if (status == AMQP_STATUS_TIMEOUT) {
        return 0;
    }
    check_status(status, "waiting for confirms");
    if (frame.frame_type != AMQP_FRAME_METHOD) {
        return 1;
    }
    switch (frame.payload.method.id) {
    case AMQP_BASIC_ACK_METHOD: {
        amqp_basic_ack_t *ack = frame.payload.method.decoded;
        settle(c, ack->delivery_tag, ack->multiple, 0);
        break;
    }
    case AMQP_BASIC_NACK_METHOD: {
        amqp_basic_nack_t *nack = frame.payload.method.decoded;
        settle(c, nack->delivery_tag, nack->multiple, 1);
        break;
    }
    case AMQP_CHANNEL_CLOSE_METHOD:
    case AMQP_CONNECTION_CLOSE_METHOD:
        die("confirm", "the broker closed the channel");
        break;
    default:
        break;
    }
    return 1;
}

static long run_confirm(amqp_connection_state_t conn, amqp_bytes_t queue, amqp_bytes_t body,
                        long count, long window, double *start) {
    amqp_confirm_select(conn, CHANNEL);
    check_reply(amqp_get_rpc_reply(conn), "confirm.select");
    struct confirms c = {calloc((size_t)count + 1, 1), 0, 0, 0, count};
    if (c.done == NULL) {
        die("confirm", "out of memory");
    }
    *start = now();
    for (long published = 0; published < count;) {
        while (published - c.settled >= window) {
            read_confirm(conn, &c, NULL);
        }
        check_status(amqp_basic_publish(conn, CHANNEL, amqp_empty_bytes, queue, 0, 0, NULL, body),
                     "basic.publish");
        published++;
        if (published % DRAIN_EVERY == 0) {
            struct timeval zero = {0, 0};
            while (read_confirm(conn, &c, &zero)) {
            }
        }
    }
    while (c.settled < count) {
        read_confirm(conn, &c, NULL);
    }
    free(c.done);
    return c.nacks;
}

/* ----- main --------------------------------------------------------------------------------- */

static void usage(void) {
    fprintf(stderr, "usage: limit_client [-u USER] [-p PASSWORD] [-v VHOST] HOST PORT QUEUE SIZE"
                    " (publish N | consume N PREFETCH | confirm N WINDOW)\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *user = "guest", *password = "guest", *vhost = "/";
    int opt;
    while ((opt = getopt(argc, argv, "u:p:v:")) != -1) {
        switch (opt) {
        case 'u': user = optarg; break;
        case 'p': password = optarg; break;
        case 'v': vhost = optarg; break;
        default: usage();
        }
    }
    argc -= optind;
    argv += optind;
    if (argc < 6) {
        usage();
    }
    const char *host = argv[0], *mode = argv[4];
    int port = (int)parse_count(argv[1], "PORT");
    amqp_bytes_t queue = amqp_cstring_bytes(argv[2]);
    long size = parse_count(argv[3], "SIZE");
    long count = parse_count(argv[5], "N");
    int publish = strcmp(mode, "publish") == 0, consume = strcmp(mode, "consume") == 0,
        confirm = strcmp(mode, "confirm") == 0;
    if (!(publish || consume || confirm) || (publish ? argc != 6 : argc != 7)) {
        usage();
    }
    long extra = publish ? 0 : parse_count(argv[6], consume ? "PREFETCH" : "WINDOW");
    if (consume && extra > 65535) {
        die("PREFETCH", "at most 65535");
    }

    unsigned char *bytes = malloc((size_t)size);
    if (bytes == NULL) {
        die("body", "out of memory");
    }
    for (long i = 0; i < size; i++) {
        bytes[i] = (unsigned char)(i & 0xff);
    }
    amqp_bytes_t body = {(size_t)size, bytes};

    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t *socket = amqp_tcp_socket_new(conn);
    if (socket == NULL) {
        die("socket", "cannot create a TCP socket");
    }
    check_status(amqp_socket_open(socket, host, port), "connect");
    check_reply(amqp_login(conn, vhost, 0, AMQP_DEFAULT_FRAME_SIZE, 0, AMQP_SASL_METHOD_PLAIN,
                           user, password),
                "login");
    amqp_channel_open(conn, CHANNEL);
    check_reply(amqp_get_rpc_reply(conn), "channel.open");

    double start = now();
    long nacks = 0;
    if (publish) {
        nacks = run_publish(conn, queue, body, count);
    } else if (consume) {
        nacks = run_consume(conn, queue, count, extra);
    } else {
        nacks = run_confirm(conn, queue, body, count, extra, &start);
    }
    double seconds = now() - start;

    check_reply(amqp_channel_close(conn, CHANNEL, AMQP_REPLY_SUCCESS), "channel.close");
    check_reply(amqp_connection_close(conn, AMQP_REPLY_SUCCESS), "connection.close");
    check_status(amqp_destroy_connection(conn), "destroy");
    free(bytes);
    printf("{\"mode\": \"%s\", \"count\": %ld, \"seconds\": %.6f, \"nacks\": %ld,"
           " \"rabbitmq_c\": \"%s\"}\n",
           mode, count, seconds, nacks, amqp_version());
    return 0;
}
