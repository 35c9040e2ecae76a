/* The network benchmark's native halves, so that neither the guest driver
 * nor the peer is the bottleneck:
 *
 * - run_guest: a virtio-net driver on one receive and one transmit split
 *   ring (the Python harness sets them up over vhost-user and hands over
 *   the rings, the guest RAM mapping and the eventfds). It keeps `window`
 *   frames of `frame_size` bytes between sent and received back, posts
 *   every receive buffer once and again as they come back, and counts the
 *   frames that return with the right length and first bytes.
 * - run_echo: the peer on the stream socket, sending back what it reads.
 * - run_socket: the limit: the same frames, length-prefixed, written to a
 *   UNIX stream socket whose other end echoes them, read back and counted.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
struct used_elem { uint32_t id; uint32_t len; };

#define F_WRITE 2
#define HEADER 12
#define SLOT 2048

struct net_args {
    void *rx_desc, *rx_avail, *rx_used;
    void *tx_desc, *tx_avail, *tx_used;
    uint16_t queue_size;
    int rx_kick, rx_call, tx_kick, tx_call;
    uint8_t *ram;                /* our mapping of guest RAM, guest address 0 */
    uint64_t rx_gpa, tx_gpa;     /* queue_size slots of SLOT bytes each */
    uint32_t frame_size, window;
    uint64_t duration_ns;
    uint64_t sent, received, errors, elapsed_ns;  /* out */
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void publish(volatile uint16_t *avail, uint16_t idx, int kick_fd)
{
    uint64_t one = 1;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    avail[1] = idx;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (write(kick_fd, &one, 8) != 8)
        return;
}

int run_guest(struct net_args *a)
{
    volatile uint16_t *rx_avail = a->rx_avail, *tx_avail = a->tx_avail;
    volatile uint16_t *rx_used16 = a->rx_used, *tx_used16 = a->tx_used;
    volatile struct used_elem *rx_used = (void *)((uint8_t *)a->rx_used + 4);
    volatile struct used_elem *tx_used = (void *)((uint8_t *)a->tx_used + 4);
    struct desc *rx_desc = a->rx_desc, *tx_desc = a->tx_desc;
    uint16_t n = a->queue_size, rx_idx = rx_avail[1], tx_idx = tx_avail[1];
    uint16_t rx_last = rx_used16[1], tx_last = tx_used16[1];
    uint16_t free_slots[1024];
    uint32_t free_count = 0;
    uint64_t drain, deadline;

    if (n > 1024 || a->frame_size < 14 || a->frame_size + HEADER > SLOT || a->window == 0)
        return -EINVAL;
    for (uint16_t i = 0; i < n; i++) {
        rx_desc[i] = (struct desc){a->rx_gpa + (uint64_t)i * SLOT, SLOT, F_WRITE, 0};
        rx_avail[2 + rx_idx++ % n] = i;
        uint8_t *frame = a->ram + a->tx_gpa + (uint64_t)i * SLOT;
        memset(frame, 0, HEADER);
        memset(frame + HEADER, 0xff, 6);        /* broadcast */
        memset(frame + HEADER + 6, 0x52, 6);
        frame[HEADER + 12] = 0x88;              /* a local experimental ethertype */
        frame[HEADER + 13] = 0xb5;
        memset(frame + HEADER + 14, (uint8_t)i, a->frame_size - 14);
        tx_desc[i] = (struct desc){a->tx_gpa + (uint64_t)i * SLOT, HEADER + a->frame_size, 0, 0};
        free_slots[free_count++] = i;
    }
    publish(rx_avail, rx_idx, a->rx_kick);
    uint64_t start = now_ns();
    deadline = start + a->duration_ns;
    for (;;) {
        int progress = 0;
        uint64_t now = now_ns();
        uint16_t added = 0;
        while (now < deadline && free_count && a->sent - a->received < a->window) {
            tx_avail[2 + tx_idx++ % n] = free_slots[--free_count];
            a->sent++;
            added++;
        }
        if (added) {
            publish(tx_avail, tx_idx, a->tx_kick);
            progress = 1;
        }
        while (tx_last != tx_used16[1]) {
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            free_slots[free_count++] = (uint16_t)tx_used[tx_last++ % n].id;
            progress = 1;
        }
        uint16_t reposted = 0;
        while (rx_last != rx_used16[1]) {
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            struct used_elem e = rx_used[rx_last++ % n];
            uint8_t *got = a->ram + a->rx_gpa + (uint64_t)e.id * SLOT;
            if (e.id >= n || e.len != HEADER + a->frame_size || got[HEADER + 12] != 0x88)
                a->errors++;
            a->received++;
            rx_avail[2 + rx_idx++ % n] = (uint16_t)e.id;
            reposted++;
        }
        if (reposted) {
            publish(rx_avail, rx_idx, a->rx_kick);
            progress = 1;
        }
        if (now >= deadline && a->received + a->errors >= a->sent)
            break;
        if (!progress) {
            struct pollfd fds[2] = {{a->rx_call, POLLIN, 0}, {a->tx_call, POLLIN, 0}};
            int ready = poll(fds, 2, 2000);
            if (ready == 0)
                return -ETIMEDOUT;  /* frames lost on the way: reported */
            for (int i = 0; i < 2; i++)
                if (fds[i].revents & POLLIN && read(fds[i].fd, &drain, 8) < 0 && errno != EAGAIN)
                    return -errno;
        }
    }
    a->elapsed_ns = now_ns() - start;
    return 0;
}

int run_echo(int fd)
{
    static __thread uint8_t buffer[256 << 10];
    for (;;) {
        ssize_t got = read(fd, buffer, sizeof buffer);
        if (got <= 0)
            return got == 0 ? 0 : -errno;
        for (ssize_t done = 0; done < got;) {
            ssize_t sent = write(fd, buffer + done, (size_t)(got - done));
            if (sent < 0)
                return -errno;
            done += sent;
        }
    }
}

/* The limit: frames through a stream socket and back, no virtio on the way. */
int run_socket(struct net_args *a, int fd)
{
    static __thread uint8_t out[64 << 10], in[256 << 10];
    uint32_t record = 4 + a->frame_size, have = 0;
    if (a->frame_size < 14 || record > sizeof out || a->window == 0)
        return -EINVAL;
    uint64_t start = now_ns(), deadline = start + a->duration_ns;
    for (;;) {
        uint64_t now = now_ns();
        uint32_t batch = 0;
        while (now < deadline && a->sent - a->received < a->window && (batch + 1) * record <= sizeof out) {
            uint8_t *r = out + batch * record;
            r[0] = (uint8_t)(a->frame_size >> 24);
            r[1] = (uint8_t)(a->frame_size >> 16);
            r[2] = (uint8_t)(a->frame_size >> 8);
            r[3] = (uint8_t)a->frame_size;
            memset(r + 4, 0xff, 6);
            memset(r + 10, 0x52, 6);
            r[16] = 0x88;
            r[17] = 0xb5;
            memset(r + 18, (uint8_t)a->sent, a->frame_size - 14);
            batch++;
            a->sent++;
        }
        for (uint32_t done = 0; done < batch * record;) {
            ssize_t sent = write(fd, out + done, batch * record - done);
            if (sent < 0)
                return -errno;
            done += (uint32_t)sent;
        }
        if (now >= deadline && a->received >= a->sent)
            break;
        ssize_t got = read(fd, in + have, sizeof in - have);
        if (got <= 0)
            return got == 0 ? -EPIPE : -errno;
        have += (uint32_t)got;
        uint32_t at = 0;
        while (have - at >= record) {
            if (in[at + 3] != (uint8_t)a->frame_size || in[at + 16] != 0x88)
                a->errors++;
            a->received++;
            at += record;
        }
        memmove(in, in + at, have - at);
        have -= at;
    }
    a->elapsed_ns = now_ns() - start;
    return 0;
}
