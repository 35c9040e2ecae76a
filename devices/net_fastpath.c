/* virtio-net's frame queues and its native handlers for the split-ring fast
   path (fastpath.c).

   Both directions of the wire are byte queues in the stream's own format (a
   4-byte big-endian length, then the frame), shared by net.py and the fast
   path's worker threads under one lock: the peer's bytes wait for the guest
   in one, the guest's frames wait for the peer in the other. net.py reads
   the peer's socket into the first (vfu_net_pull, a read of up to 64 KiB at
   a time) and owns the connection; the fast path does the per-frame work:
   a receive buffer filled with the oldest frame, a transmit buffer's frame
   appended and sent. What the fast path does not serve (a frame that needs
   several receive buffers, a transmit buffer with offload flags or the
   wrong size, no peer, a full queue) is left to net.py, which has the
   whole rule book and the logs. The rules for which frames pass are in one
   place for both: here. */

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "net_fastpath.h"

#define VFU_NET_HEADER 12         /* struct virtio_net_hdr_mrg_rxbuf */
#define VFU_NET_ETHERNET 18       /* an Ethernet header and a VLAN tag */
#define VFU_NET_MIN_FRAME 14
#define VFU_NET_MAX_STREAM_FRAME (1u << 18)  /* longer: not a frame, the peer goes */
#define VFU_NET_FOR_GUEST (256u << 10)       /* whole frames read ahead for the guest */
#define VFU_NET_FOR_PEER (256u << 10)        /* the guest's bytes waiting for the peer */
#define VFU_NET_READ (64u << 10)

struct vfu_net_bytes {
    uint8_t *data;
    uint32_t capacity, start, length;
};

struct vfu_net {
    pthread_mutex_t lock;
    struct vfu_net_settings settings;
    int wake_fd;  /* net.py's tasks wait on it: room for the peer's bytes, bytes left to send */
    struct vfu_net_bytes to_guest, to_peer;
    uint32_t whole;  /* to_guest's first bytes that are whole, checked frames */
};

static uint32_t vfu_net_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int vfu_net_frame_fits_mtu(const struct vfu_net *net, uint32_t size)
{
    return size >= VFU_NET_MIN_FRAME && size <= net->settings.mtu + VFU_NET_ETHERNET;
}

static void vfu_net_wake(struct vfu_net *net)
{
    uint64_t one = 1;
    ssize_t done = write(net->wake_fd, &one, sizeof one);
    (void)done;  /* EAGAIN: the counter is saturated, net.py wakes anyway */
}

static int vfu_net_bytes_init(struct vfu_net_bytes *b, uint32_t capacity)
{
    b->data = malloc(capacity);
    b->capacity = capacity;
    b->start = b->length = 0;
    return b->data ? 0 : -1;
}

/* Room for n more bytes at the end, moving the contents to the front if
   that makes it; NULL if the queue cannot take them. */
static uint8_t *vfu_net_bytes_tail(struct vfu_net_bytes *b, uint32_t n)
{
    if (n > b->capacity - b->length)
        return NULL;
    if (n > b->capacity - b->start - b->length) {
        memmove(b->data, b->data + b->start, b->length);
        b->start = 0;
    }
    return b->data + b->start + b->length;
}

static void vfu_net_bytes_consume(struct vfu_net_bytes *b, uint32_t n)
{
    b->start += n;
    b->length -= n;
    if (b->length == 0)
        b->start = 0;
}

struct vfu_net *vfu_net_new(uint32_t mtu, int wake_fd)
{
    struct vfu_net *net = calloc(1, sizeof *net);
    if (!net)
        return NULL;
    /* Whole frames up to the limit, what one read adds beyond it, and the
       longest partial frame a peer may send. */
    uint32_t for_guest = VFU_NET_FOR_GUEST + VFU_NET_READ + 4 + VFU_NET_MAX_STREAM_FRAME;
    uint32_t for_peer = VFU_NET_FOR_PEER + 4 + 65535 + VFU_NET_ETHERNET;
    if (vfu_net_bytes_init(&net->to_guest, for_guest) || vfu_net_bytes_init(&net->to_peer, for_peer) ||
        pthread_mutex_init(&net->lock, NULL)) {
        free(net->to_guest.data);
        free(net->to_peer.data);
        free(net);
        return NULL;
    }
    net->settings.mtu = mtu;
    net->settings.active_pairs = 1;
    net->settings.peer_fd = -1;
    net->wake_fd = wake_fd;
    return net;
}

void vfu_net_free(struct vfu_net *net)
{
    pthread_mutex_destroy(&net->lock);
    free(net->to_guest.data);
    free(net->to_peer.data);
    free(net);
}

struct vfu_net_settings *vfu_net_settings(struct vfu_net *net)
{
    return &net->settings;
}

void vfu_net_set_peer(struct vfu_net *net, int fd)
{
    pthread_mutex_lock(&net->lock);
    net->settings.peer_fd = fd;
    pthread_mutex_unlock(&net->lock);
}

/* -- the peer's bytes, for the guest ----------------------------------------- */

/* Check the frames completed since the last look: those of a size the
   guest may get stay, others are cut out and counted. VFU_NET_VIOLATION for
   a length prefix no frame has, as soon as its 4 bytes are there. */
static int vfu_net_check_new_frames(struct vfu_net *net)
{
    struct vfu_net_bytes *b = &net->to_guest;
    for (;;) {
        uint8_t *at = b->data + b->start + net->whole;
        uint32_t left = b->length - net->whole;
        if (left < 4)
            return 0;
        uint32_t size = vfu_net_be32(at);
        if (size > VFU_NET_MAX_STREAM_FRAME)
            return VFU_NET_VIOLATION;
        if (left - 4 < size)
            return 0;
        if (vfu_net_frame_fits_mtu(net, size)) {
            net->whole += 4 + size;
            continue;
        }
        net->settings.dropped_from_peer++;
        net->settings.last_dropped_size = size;
        memmove(at, at + 4 + size, left - 4 - size);
        b->length -= 4 + size;
    }
}

int vfu_net_wants_peer(struct vfu_net *net)
{
    pthread_mutex_lock(&net->lock);
    int wants = net->whole < VFU_NET_FOR_GUEST;
    pthread_mutex_unlock(&net->lock);
    return wants;
}

int64_t vfu_net_pull(struct vfu_net *net)
{
    pthread_mutex_lock(&net->lock);
    int64_t outcome = -EAGAIN;
    uint8_t *tail = vfu_net_bytes_tail(&net->to_guest, VFU_NET_READ);
    if (net->whole < VFU_NET_FOR_GUEST && tail && net->settings.peer_fd >= 0) {
        ssize_t got = recv(net->settings.peer_fd, tail, VFU_NET_READ, MSG_DONTWAIT);
        if (got > 0) {
            net->to_guest.length += (uint32_t)got;
            int checked = vfu_net_check_new_frames(net);
            outcome = checked ? checked : got;
        } else {
            outcome = got == 0 ? 0 : -errno;
        }
    }
    pthread_mutex_unlock(&net->lock);
    return outcome;
}

/* The oldest frame, with the lock held: its size, or -1 for none. */
static int64_t vfu_net_oldest(const struct vfu_net *net)
{
    if (net->whole == 0)
        return -1;
    return vfu_net_be32(net->to_guest.data + net->to_guest.start);
}

static void vfu_net_take_oldest(struct vfu_net *net, uint32_t size)
{
    int was_full = net->whole >= VFU_NET_FOR_GUEST;
    vfu_net_bytes_consume(&net->to_guest, 4 + size);
    net->whole -= 4 + size;
    net->settings.frames_to_guest++;
    if (was_full && net->whole < VFU_NET_FOR_GUEST)
        vfu_net_wake(net);  /* net.py's reader waits for room */
}

int vfu_net_take(struct vfu_net *net, uint8_t *dst, uint32_t room, uint32_t *length)
{
    pthread_mutex_lock(&net->lock);
    int64_t size = vfu_net_oldest(net);
    int outcome = -1;
    if (size >= 0) {
        *length = (uint32_t)size;
        outcome = 1;
        if ((uint32_t)size <= room) {
            memcpy(dst, net->to_guest.data + net->to_guest.start + 4, (size_t)size);
            vfu_net_take_oldest(net, (uint32_t)size);
            outcome = 0;
        }
    }
    pthread_mutex_unlock(&net->lock);
    return outcome;
}

void vfu_net_drop_oldest(struct vfu_net *net)
{
    pthread_mutex_lock(&net->lock);
    int64_t size = vfu_net_oldest(net);
    if (size >= 0) {
        vfu_net_take_oldest(net, (uint32_t)size);
        net->settings.frames_to_guest--;
    }
    pthread_mutex_unlock(&net->lock);
}

uint32_t vfu_net_whole_size(struct vfu_net *net)
{
    return net->whole;
}

/* -- the guest's frames, for the peer ---------------------------------------- */

static uint8_t *vfu_net_frame_tail(struct vfu_net *net, uint32_t size)
{
    uint8_t *tail = vfu_net_bytes_tail(&net->to_peer, 4 + size);
    if (tail) {
        tail[0] = (uint8_t)(size >> 24);
        tail[1] = (uint8_t)(size >> 16);
        tail[2] = (uint8_t)(size >> 8);
        tail[3] = (uint8_t)size;
    }
    return tail;
}

int vfu_net_queue_frame(struct vfu_net *net, const uint8_t *frame, uint32_t size)
{
    pthread_mutex_lock(&net->lock);
    uint8_t *tail = vfu_net_frame_tail(net, size);
    if (tail) {
        memcpy(tail + 4, frame, size);
        net->to_peer.length += 4 + size;
        net->settings.frames_to_peer++;
    }
    pthread_mutex_unlock(&net->lock);
    return tail ? 0 : -1;
}

static int64_t vfu_net_flush_locked(struct vfu_net *net)
{
    struct vfu_net_bytes *b = &net->to_peer;
    while (b->length) {
        if (net->settings.peer_fd < 0)
            return -ENOTCONN;
        ssize_t sent = send(net->settings.peer_fd, b->data + b->start, b->length,
                            MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK ? (int64_t)b->length : -errno;
        vfu_net_bytes_consume(b, (uint32_t)sent);
    }
    return 0;
}

int64_t vfu_net_flush(struct vfu_net *net)
{
    pthread_mutex_lock(&net->lock);
    int64_t outcome = vfu_net_flush_locked(net);
    pthread_mutex_unlock(&net->lock);
    return outcome;
}

void vfu_net_to_peer_clear(struct vfu_net *net)
{
    pthread_mutex_lock(&net->lock);
    net->to_peer.start = net->to_peer.length = 0;
    pthread_mutex_unlock(&net->lock);
}

/* -- both queues, as bytes (state) --------------------------------------------- */

static struct vfu_net_bytes *vfu_net_queue_of(struct vfu_net *net, int direction)
{
    return direction == VFU_NET_TO_PEER ? &net->to_peer : &net->to_guest;
}

uint32_t vfu_net_size(struct vfu_net *net, int direction)
{
    return vfu_net_queue_of(net, direction)->length;
}

uint32_t vfu_net_copy(struct vfu_net *net, int direction, uint8_t *dst, uint32_t room)
{
    pthread_mutex_lock(&net->lock);
    const struct vfu_net_bytes *b = vfu_net_queue_of(net, direction);
    uint32_t size = b->length < room ? b->length : room;
    memcpy(dst, b->data + b->start, size);
    pthread_mutex_unlock(&net->lock);
    return size;
}

int vfu_net_load(struct vfu_net *net, int direction, const uint8_t *data, uint32_t size)
{
    pthread_mutex_lock(&net->lock);
    struct vfu_net_bytes *b = vfu_net_queue_of(net, direction);
    b->start = b->length = 0;
    if (direction == VFU_NET_TO_GUEST)
        net->whole = 0;
    uint8_t *tail = vfu_net_bytes_tail(b, size);
    int outcome = -1;
    if (tail) {
        memcpy(tail, data, size);
        b->length = size;
        /* The peer's bytes: frames checked as if they had just been read. */
        outcome = direction == VFU_NET_TO_GUEST && vfu_net_check_new_frames(net) ? -1 : 0;
    }
    pthread_mutex_unlock(&net->lock);
    return outcome;
}

/* -- the fast path's handlers ---------------------------------------------- */

int vfu_net_tx_check(void *queue, const struct vfu_request *r)
{
    struct vfu_net *net = ((struct vfu_net_queue *)queue)->net;
    if (net->settings.peer_fd < 0 || r->count != r->readable || r->iov[0].iov_len < 2 ||
        r->readable_size < VFU_NET_HEADER)
        return -1;
    const uint8_t *header = r->iov[0].iov_base;
    if (header[0] || header[1])  /* checksum or segmentation: none was offered */
        return -1;
    uint64_t size = r->readable_size - VFU_NET_HEADER;
    if (size > UINT32_MAX || !vfu_net_frame_fits_mtu(net, (uint32_t)size))
        return -1;
    return net->to_peer.length < VFU_NET_FOR_PEER ? 0 : -1;
}

int vfu_net_tx_serve(void *queue, struct vfu_request *r, uint32_t *written)
{
    struct vfu_net *net = ((struct vfu_net_queue *)queue)->net;
    uint32_t size = (uint32_t)(r->readable_size - VFU_NET_HEADER);
    pthread_mutex_lock(&net->lock);
    uint8_t *tail = net->to_peer.length < VFU_NET_FOR_PEER ? vfu_net_frame_tail(net, size) : NULL;
    if (tail) {
        uint8_t *out = tail + 4;
        size_t skip = VFU_NET_HEADER;
        for (int i = 0; i < r->readable; i++) {
            size_t n = r->iov[i].iov_len;
            const uint8_t *from = r->iov[i].iov_base;
            if (skip >= n) {
                skip -= n;
                continue;
            }
            memcpy(out, from + skip, n - skip);
            out += n - skip;
            skip = 0;
        }
        net->to_peer.length += 4 + size;
        net->settings.frames_to_peer++;
    }
    pthread_mutex_unlock(&net->lock);
    *written = 0;
    return tail ? 0 : -1;
}

void vfu_net_tx_batch_done(void *queue)
{
    struct vfu_net *net = ((struct vfu_net_queue *)queue)->net;
    pthread_mutex_lock(&net->lock);
    int64_t left = vfu_net_flush_locked(net);
    pthread_mutex_unlock(&net->lock);
    if (left != 0)
        vfu_net_wake(net);  /* net.py waits until the peer takes more, or sees it gone */
}

static int vfu_net_rx_active(const struct vfu_net_queue *q)
{
    return q->index < 2 * q->net->settings.active_pairs;
}

int vfu_net_rx_ready(void *queue)
{
    const struct vfu_net_queue *q = queue;
    return vfu_net_rx_active(q) && __atomic_load_n(&q->net->whole, __ATOMIC_ACQUIRE) > 0;
}

int vfu_net_rx_check(void *queue, const struct vfu_request *r)
{
    const struct vfu_net_queue *q = queue;
    if (!vfu_net_rx_active(q) || r->readable != 0)
        return -1;
    pthread_mutex_lock(&q->net->lock);
    int64_t size = vfu_net_oldest(q->net);
    pthread_mutex_unlock(&q->net->lock);
    return size >= 0 && VFU_NET_HEADER + (uint64_t)size <= r->writable_size ? 0 : -1;
}

/* n bytes into the request's writable buffers, from byte *at of them on. */
static void vfu_net_scatter(struct vfu_request *r, uint64_t *at, const uint8_t *src, uint64_t n)
{
    uint64_t skip = *at;
    for (int i = r->readable; i < r->count && n; i++) {
        uint64_t length = r->iov[i].iov_len;
        if (skip >= length) {
            skip -= length;
            continue;
        }
        uint64_t chunk = length - skip < n ? length - skip : n;
        memcpy((uint8_t *)r->iov[i].iov_base + skip, src, chunk);
        src += chunk;
        n -= chunk;
        *at += chunk;
        skip = 0;
    }
}

int vfu_net_rx_serve(void *queue, struct vfu_request *r, uint32_t *written)
{
    struct vfu_net *net = ((struct vfu_net_queue *)queue)->net;
    /* flags, gso type, header length, gso size, checksum start and offset:
       nothing to say; one buffer (num_buffers, little-endian). */
    static const uint8_t header[VFU_NET_HEADER] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0};
    pthread_mutex_lock(&net->lock);
    int64_t size = vfu_net_oldest(net);
    int outcome = -1;  /* another queue took it meanwhile: Python looks again */
    if (size >= 0 && VFU_NET_HEADER + (uint64_t)size <= r->writable_size) {
        uint64_t at = 0;
        vfu_net_scatter(r, &at, header, VFU_NET_HEADER);
        vfu_net_scatter(r, &at, net->to_guest.data + net->to_guest.start + 4, (uint64_t)size);
        vfu_net_take_oldest(net, (uint32_t)size);
        *written = (uint32_t)at;
        outcome = 0;
    }
    pthread_mutex_unlock(&net->lock);
    return outcome;
}
