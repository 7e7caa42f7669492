/*
 * ztna-harness: drives the ztna-apple C ABI on Linux exactly as the macOS Network Extension
 * does, using nothing but include/ztna.h and the static library.
 *
 *   ztna-harness --config FILE --tun NAME --status FILE
 *
 * It opens a TUN device itself (the extension's packetFlow), reads packets from it in batches
 * into ztna_send_packets, writes the batches the packets callback hands over back to it, and
 * applies the settings callback (address, MTU, one route per included route) with `ip`, from
 * its main loop (the extension applies them asynchronously too). Every 500 ms it writes the
 * status JSON to FILE (written to FILE.tmp, then renamed). On SIGTERM or SIGINT it writes the
 * status one last time, calls ztna_stop and ztna_free, checks that no callback runs after stop
 * returned, closes the device and exits 0 (1 on any failure).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "ztna.h"

#define PKT_MAX 2048

static volatile sig_atomic_t stop_requested = 0;
static int tun_fd = -1;
static const char *tun_name = NULL;

/* Counters the callbacks update (they run on the library's thread). */
static atomic_ulong to_tun_packets = 0;
static atomic_ulong to_tun_dropped = 0;
static atomic_ulong callbacks_after_stop = 0;
static atomic_int stopped = 0;

/* The latest settings JSON, handed from the callback to the main loop. */
static pthread_mutex_t settings_lock = PTHREAD_MUTEX_INITIALIZER;
static char *pending_settings = NULL;

static void on_signal(int sig) {
    (void)sig;
    stop_requested = 1;
}

static void note_callback(void) {
    if (atomic_load(&stopped)) {
        atomic_fetch_add(&callbacks_after_stop, 1);
    }
}

static void on_packets(void *ctx, const uint8_t *const *packets, const size_t *lengths, size_t count) {
    (void)ctx;
    note_callback();
    for (size_t i = 0; i < count; i++) {
        if (write(tun_fd, packets[i], lengths[i]) == (ssize_t)lengths[i]) {
            atomic_fetch_add(&to_tun_packets, 1);
        } else {
            atomic_fetch_add(&to_tun_dropped, 1);
        }
    }
}

static void on_settings(void *ctx, const char *json) {
    (void)ctx;
    note_callback();
    char *copy = strdup(json);
    if (copy == NULL) {
        return;
    }
    pthread_mutex_lock(&settings_lock);
    free(pending_settings);
    pending_settings = copy;
    pthread_mutex_unlock(&settings_lock);
}

static void on_log(void *ctx, int32_t level, const char *message) {
    (void)ctx;
    note_callback();
    static const char *names[] = {"?", "ERROR", "WARN", "INFO", "DEBUG", "TRACE"};
    fprintf(stderr, "ztna[%s] %s\n", (level >= 1 && level <= 5) ? names[level] : "?", message);
}

static int fail(const char *what, int32_t rc) {
    char msg[1024];
    ztna_last_error_message(msg, sizeof msg);
    fprintf(stderr, "harness: %s failed with %d: %s\n", what, rc, msg);
    return 1;
}

static int run(const char *cmd) {
    int rc = system(cmd);
    if (rc != 0) {
        fprintf(stderr, "harness: `%s` exited with %d\n", cmd, rc);
    }
    return rc;
}

/* The value of the string key `key` at or after `from` (our own compact serde JSON). */
static int json_string(const char *from, const char *end, const char *key, char *out, size_t cap) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":\"", key);
    const char *p = strstr(from, pat);
    if (p == NULL || (end != NULL && p >= end)) {
        return -1;
    }
    p += strlen(pat);
    const char *q = strchr(p, '"');
    if (q == NULL || (size_t)(q - p) >= cap) {
        return -1;
    }
    memcpy(out, p, (size_t)(q - p));
    out[q - p] = 0;
    return 0;
}

static long json_number(const char *from, const char *end, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(from, pat);
    if (p == NULL || (end != NULL && p >= end)) {
        return -1;
    }
    return strtol(p + strlen(pat), NULL, 10);
}

/* Applies a settings document: address, MTU, and the included routes (replacing the old ones).
 * Excluded routes need nothing here: only the included /32s point into the device. */
static int apply_settings(const char *json) {
    char addr[64], cmd[512];
    long mtu = json_number(json, NULL, "mtu");
    if (json_string(json, NULL, "ipv4_address", addr, sizeof addr) != 0 || mtu <= 0) {
        fprintf(stderr, "harness: settings without address or MTU: %s\n", json);
        return -1;
    }
    int rc = 0;
    snprintf(cmd, sizeof cmd, "ip link set dev %s mtu %ld up", tun_name, mtu);
    rc |= run(cmd);
    snprintf(cmd, sizeof cmd, "ip addr replace %s/32 dev %s", addr, tun_name);
    rc |= run(cmd);
    snprintf(cmd, sizeof cmd, "ip -4 route flush dev %s scope link", tun_name);
    run(cmd);
    /* IPv6 is best effort: a host without it still runs the IPv4 tests. */
    char addr6[64];
    int v6 = json_string(json, NULL, "ipv6_address", addr6, sizeof addr6) == 0;
    if (v6) {
        snprintf(cmd, sizeof cmd, "ip -6 addr replace %s/128 dev %s nodad", addr6, tun_name);
        v6 = run(cmd) == 0;
        snprintf(cmd, sizeof cmd, "ip -6 route flush dev %s proto boot", tun_name);
        run(cmd);
    }
    const char *inc = strstr(json, "\"included_routes\":[");
    const char *inc_end = inc ? strchr(inc, ']') : NULL;
    int routes = 0;
    for (const char *p = inc; p != NULL && inc_end != NULL && p < inc_end;) {
        char dst[64];
        const char *a = strstr(p, "\"address\":\"");
        if (a == NULL || a >= inc_end || json_string(a, inc_end, "address", dst, sizeof dst) != 0) {
            break;
        }
        long prefix = json_number(a, inc_end, "prefix");
        snprintf(cmd, sizeof cmd, "ip route replace %s/%ld dev %s", dst, prefix, tun_name);
        if (strchr(dst, ':') == NULL) {
            rc |= run(cmd);
            routes++;
        } else if (v6 && run(cmd) == 0) {
            routes++;
        }
        p = a + 1;
    }
    printf("harness: settings applied: address %s, mtu %ld, %d routes\n", addr, mtu, routes);
    fflush(stdout);
    return rc == 0 ? 0 : -1;
}

static int open_tun(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        perror("harness: open /dev/net/tun");
        return -1;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        perror("harness: TUNSETIFF");
        close(fd);
        return -1;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        perror("harness: O_NONBLOCK");
        close(fd);
        return -1;
    }
    return fd;
}

static char *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        perror(path);
        return NULL;
    }
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    size_t n;
    while (buf != NULL && (n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (cap - len - 1 == 0) {
            char *bigger = realloc(buf, cap * 2);
            if (bigger == NULL) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = bigger;
            cap *= 2;
        }
    }
    fclose(f);
    if (buf != NULL) {
        buf[len] = 0;
    }
    return buf;
}

/* Writes the status JSON to `path` atomically; grows the buffer as the library asks. */
static int write_status(ZtnaHandle h, const char *path, char **buf, size_t *cap) {
    size_t len = 0;
    int32_t rc = ztna_status_json(h, *buf, *cap, &len);
    if (rc == ZTNA_ERR_BUFFER_TOO_SMALL) {
        char *bigger = realloc(*buf, len + 1024);
        if (bigger == NULL) {
            return -1;
        }
        *buf = bigger;
        *cap = len + 1024;
        rc = ztna_status_json(h, *buf, *cap, &len);
    }
    if (rc != ZTNA_OK) {
        return fail("ztna_status_json", rc);
    }
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (f == NULL) {
        perror(tmp);
        return -1;
    }
    fwrite(*buf, 1, len, f);
    fputc('\n', f);
    fclose(f);
    return rename(tmp, path);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    const char *config_path = NULL, *status_path = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--config") == 0) {
            config_path = argv[i + 1];
        } else if (strcmp(argv[i], "--tun") == 0) {
            tun_name = argv[i + 1];
        } else if (strcmp(argv[i], "--status") == 0) {
            status_path = argv[i + 1];
        }
    }
    if (config_path == NULL || tun_name == NULL || status_path == NULL) {
        fprintf(stderr, "usage: %s --config FILE --tun NAME --status FILE\n", argv[0]);
        return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    printf("harness: ztna-apple %s\n", ztna_version());
    char *config = read_file(config_path);
    if (config == NULL) {
        return 1;
    }
    tun_fd = open_tun(tun_name);
    if (tun_fd < 0) {
        free(config);
        return 1;
    }
    ZtnaCallbacks cb = {.context = NULL, .packets = on_packets, .settings = on_settings, .log = on_log};
    ZtnaHandle h = 0;
    int32_t rc = ztna_create(config, &cb, &h);
    free(config);
    if (rc != ZTNA_OK) {
        close(tun_fd);
        return fail("ztna_create", rc);
    }
    if ((rc = ztna_start(h)) != ZTNA_OK) {
        ztna_free(h);
        close(tun_fd);
        return fail("ztna_start", rc);
    }
    printf("harness: tunnel started on %s\n", tun_name);
    fflush(stdout);

    /* One buffer pool for a whole batch, reused: no allocation per packet on this side. */
    static uint8_t pool[ZTNA_MAX_BATCH][PKT_MAX];
    const uint8_t *ptrs[ZTNA_MAX_BATCH];
    size_t lens[ZTNA_MAX_BATCH];
    char *status_buf = NULL;
    size_t status_cap = 0;
    unsigned long from_tun = 0, batches = 0;
    int failed = 0;
    double next_status = 0;
    struct pollfd pfd = {.fd = tun_fd, .events = POLLIN};

    while (!stop_requested) {
        char *settings = NULL;
        pthread_mutex_lock(&settings_lock);
        settings = pending_settings;
        pending_settings = NULL;
        pthread_mutex_unlock(&settings_lock);
        if (settings != NULL) {
            if (apply_settings(settings) != 0) {
                failed = 1;
            }
            free(settings);
        }
        if (now_s() >= next_status) {
            if (write_status(h, status_path, &status_buf, &status_cap) != 0) {
                failed = 1;
            }
            next_status = now_s() + 0.5;
        }
        if (poll(&pfd, 1, 100) <= 0) {
            continue;
        }
        size_t n = 0;
        while (n < ZTNA_MAX_BATCH) {
            ssize_t r = read(tun_fd, pool[n], PKT_MAX);
            if (r <= 0) {
                break;
            }
            ptrs[n] = pool[n];
            lens[n] = (size_t)r;
            n++;
        }
        if (n > 0) {
            from_tun += n;
            batches++;
            rc = ztna_send_packets(h, ptrs, lens, n);
            if (rc != ZTNA_OK) {
                failed = fail("ztna_send_packets", rc);
            }
        }
    }

    printf("harness: stopping\n");
    if (write_status(h, status_path, &status_buf, &status_cap) != 0) {
        failed = 1;
    }
    if ((rc = ztna_stop(h)) != ZTNA_OK) {
        failed = fail("ztna_stop", rc);
    }
    atomic_store(&stopped, 1);
    usleep(200 * 1000);
    if ((rc = ztna_stop(h)) != ZTNA_OK) {
        failed = fail("second ztna_stop", rc);
    }
    if ((rc = ztna_free(h)) != ZTNA_OK) {
        failed = fail("ztna_free", rc);
    }
    if ((rc = ztna_free(h)) != ZTNA_ERR_BAD_HANDLE) {
        fprintf(stderr, "harness: a second ztna_free returned %d, not ZTNA_ERR_BAD_HANDLE\n", rc);
        failed = 1;
    }
    if ((rc = ztna_send_packets(h, ptrs, lens, 0)) != ZTNA_ERR_BAD_HANDLE) {
        fprintf(stderr, "harness: ztna_send_packets on a freed handle returned %d\n", rc);
        failed = 1;
    }
    unsigned long late = atomic_load(&callbacks_after_stop);
    if (late != 0) {
        fprintf(stderr, "harness: %lu callbacks ran after ztna_stop returned\n", late);
        failed = 1;
    }
    free(status_buf);
    pthread_mutex_lock(&settings_lock);
    free(pending_settings);
    pending_settings = NULL;
    pthread_mutex_unlock(&settings_lock);
    close(tun_fd);
    printf("harness: stopped %s: %lu packets from the device in %lu batches, %lu to it (%lu dropped), "
           "%lu callbacks after stop\n",
           failed ? "WITH ERRORS" : "cleanly", from_tun, batches, atomic_load(&to_tun_packets),
           atomic_load(&to_tun_dropped), late);
    return failed;
}
