/* The native fast path of a split virtqueue (virtio 1.2 section 2.7).

   One worker thread per queue runs vfu_split_serve with the GIL released:
   it waits on the kick eventfd, takes requests off the available ring,
   walks and bounds-checks their descriptors against the memory table,
   hands them to the device's native handler, publishes them in the used
   ring (with the inflight region's bookkeeping) and signals the call
   eventfd. It serves only the common, well-formed case: anything else (a
   malformed chain, a request type the handler does not know, an I/O error)
   stops it *before* that request is taken, and the Python ring, which has
   the whole rule book and the error reporting, serves it. Python stops the
   loop (stop flag + stop eventfd) before it changes memory, the ring's
   parameters or its fds, and copies the indexes back afterwards.

   A host-fed queue (virtio-net's receive queues) is served the same way,
   one buffer per thing the host has for the guest: while the handler is
   not ready, the loop waits on the queue's host eventfd instead of the
   kick (Python signals it when the host side brings something). */

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "fastpath.h"

#define VFU_DESC_F_NEXT 1
#define VFU_DESC_F_WRITE 2
#define VFU_DESC_F_INDIRECT 4
#define VFU_AVAIL_F_NO_INTERRUPT 1
#define VFU_MAX_INDIRECT 1024
#define VFU_MAX_IOV 1024

/* Before sleeping on the kick eventfd, watch the ring this long: a driver
   that keeps the queue busy is served without two cross-CPU wake-ups per
   request (QEMU's iothreads poll the same way, 32 us by default). */
#define VFU_POLL_NS 32000

struct vfu_request {
    uint16_t head;
    int readable;   /* iov[0 .. readable) are device-readable ... */
    int count;      /* ... iov[readable .. count) device-writable */
    uint64_t readable_size, writable_size;
    struct iovec iov[VFU_MAX_IOV];
};

uint64_t vfu_guard_hits(void);

static uint64_t vfu_now_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

/* Spin until the driver makes a buffer available, the loop is stopped, or
   the time is up; non-zero if there is something to do. */
static int vfu_poll_ring(struct vfu_split_queue *q)
{
    uint64_t deadline = vfu_now_ns() + VFU_POLL_NS;
    do {
        for (int i = 0; i < 64; i++) {
            if (__atomic_load_n(&q->avail[1], __ATOMIC_ACQUIRE) != q->last_avail_idx ||
                __atomic_load_n(&q->stop, __ATOMIC_ACQUIRE))
                return 1;
            __builtin_ia32_pause();
        }
    } while (vfu_now_ns() < deadline);
    return 0;
}

uint8_t *vfu_region_find(const struct vfu_region *regions, int nregions, uint64_t gpa,
                         uint64_t length, int writable)
{
    for (int i = 0; i < nregions; i++) {
        const struct vfu_region *r = &regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size && length <= r->size - (gpa - r->gpa)) {
            if (writable && !r->writable)
                return NULL;
            return r->hva + (gpa - r->gpa);
        }
    }
    return NULL;  /* unmapped, or spanning regions: Python's business */
}

static uint8_t *vfu_translate(const struct vfu_split_queue *q, uint64_t gpa, uint64_t length,
                              int writable)
{
    return vfu_region_find(q->regions, q->nregions, gpa, length, writable);
}

struct vfu_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

static int vfu_walk(const struct vfu_split_queue *q, uint16_t head, struct vfu_request *r)
{
    const uint8_t *table = q->desc;
    uint32_t table_size = q->size, index = head, seen = 0;
    int in_indirect = 0;

    r->head = head;
    r->readable = r->count = 0;
    r->readable_size = r->writable_size = 0;
    for (;;) {
        struct vfu_desc d;
        if (++seen > table_size)
            return -1;
        memcpy(&d, table + 16 * (size_t)index, sizeof d);
        if (d.flags & VFU_DESC_F_INDIRECT) {
            if (in_indirect || !q->indirect || (d.flags & VFU_DESC_F_NEXT) || d.len == 0 ||
                d.len % 16 || d.len > VFU_MAX_INDIRECT * 16)
                return -1;
            table = vfu_translate(q, d.addr, d.len, 0);
            if (!table)
                return -1;
            table_size = d.len / 16;
            index = 0;
            seen = 0;
            in_indirect = 1;
            continue;
        }
        int writable = (d.flags & VFU_DESC_F_WRITE) != 0;
        if (!writable && r->count > r->readable)
            return -1;  /* readable after writable */
        if (d.len == 0 || r->count == VFU_MAX_IOV)
            return -1;
        uint8_t *host = vfu_translate(q, d.addr, d.len, writable);
        if (!host)
            return -1;
        r->iov[r->count].iov_base = host;
        r->iov[r->count].iov_len = d.len;
        r->count++;
        if (writable) {
            r->writable_size += d.len;
        } else {
            r->readable++;
            r->readable_size += d.len;
        }
        if (!(d.flags & VFU_DESC_F_NEXT))
            return 0;
        if (d.next >= table_size)
            return -1;
        index = d.next;
    }
}

/* INFLIGHT_SHMFD, split layout: a 16-byte header (features, version,
   desc_num, last_batch_head, used_idx) then 16 bytes per descriptor
   (inflight, padding, next, counter). The same steps as inflight.py. */
#define VFU_INFLIGHT_LAST_BATCH 12
#define VFU_INFLIGHT_USED_IDX 14
#define VFU_INFLIGHT_DESC(q, i) ((q)->inflight + 16 + 16 * (size_t)(i))

static void vfu_inflight_fetched(struct vfu_split_queue *q, uint16_t head)
{
    uint8_t *d = VFU_INFLIGHT_DESC(q, head);
    uint64_t counter = q->inflight_counter++;
    memcpy(d + 8, &counter, 8);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    d[0] = 1;
}

static void vfu_inflight_completing(struct vfu_split_queue *q, uint16_t head)
{
    uint8_t *d = VFU_INFLIGHT_DESC(q, head);
    memcpy(d + 6, q->inflight + VFU_INFLIGHT_LAST_BATCH, 2);
    memcpy(q->inflight + VFU_INFLIGHT_LAST_BATCH, &head, 2);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static void vfu_inflight_completed(struct vfu_split_queue *q, uint16_t head)
{
    __atomic_thread_fence(__ATOMIC_RELEASE);
    VFU_INFLIGHT_DESC(q, head)[0] = 0;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(q->inflight + VFU_INFLIGHT_USED_IDX, &q->used_idx, 2);
}

static void vfu_push(struct vfu_split_queue *q, uint16_t head, uint32_t written)
{
    uint32_t *element = (uint32_t *)(q->used + 4 + 8 * (size_t)(q->used_idx % q->size));
    element[0] = head;
    element[1] = written;
    if (q->inflight)
        vfu_inflight_completing(q, head);
    __atomic_thread_fence(__ATOMIC_RELEASE);  /* the element before the index */
    q->used_idx++;
    __atomic_store_n((uint16_t *)(q->used + 2), q->used_idx, __ATOMIC_RELAXED);
    if (q->inflight)
        vfu_inflight_completed(q, head);
}

static int vfu_need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

static void vfu_notify(struct vfu_split_queue *q, uint16_t mark)
{
    if (q->used_idx == mark)
        return;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);  /* our used index before the driver's flags */
    int needed;
    if (q->event_idx)
        needed = vfu_need_event(__atomic_load_n(&q->avail[2 + q->size], __ATOMIC_RELAXED),
                                q->used_idx, mark);
    else
        needed = !(__atomic_load_n(&q->avail[0], __ATOMIC_RELAXED) & VFU_AVAIL_F_NO_INTERRUPT);
    if (needed) {
        uint64_t one = 1;
        ssize_t done = write(q->call_fd, &one, sizeof one);
        (void)done;  /* EAGAIN: the counter is saturated, the driver wakes anyway */
        q->notified++;
    } else {
        q->suppressed++;
    }
}

static void vfu_count(struct vfu_split_queue *q, const struct vfu_request *r, uint32_t written,
                      uint64_t latency)
{
    q->served++;
    q->bytes += r->readable_size + written;
    q->latency[63 - __builtin_clzll(latency | 1)]++;
    if (latency > q->latency_max)
        q->latency_max = latency;
}

int vfu_wait(int wake_fd, int stop_fd)
{
    struct pollfd fds[2] = {{wake_fd, POLLIN, 0}, {stop_fd, POLLIN, 0}};
    if (poll(fds, 2, -1) < 0)
        return errno == EINTR ? 0 : -1;
    if ((fds[0].revents | fds[1].revents) & (POLLNVAL | POLLERR))
        return -1;
    if (fds[0].revents & POLLIN) {
        uint64_t count;
        ssize_t done = read(wake_fd, &count, sizeof count);
        (void)done;
    }
    return 0;
}

int vfu_split_serve(struct vfu_split_queue *q, struct vfu_request *r)
{
    for (;;) {
        uint16_t mark = q->used_idx;
        int outcome = -1, waits_for_host = 0;
        uint32_t taken = 0;
        uint64_t since = vfu_now_ns();  /* one clock read a request: each ends the last */
        while (taken < q->size) {  /* bounded, as in Python: other queues get their turn */
            if (__atomic_load_n(&q->stop, __ATOMIC_ACQUIRE)) {
                outcome = VFU_FAST_STOPPED;
                break;
            }
            if (q->ready && !q->ready(q->device)) {
                waits_for_host = 1;
                break;
            }
            uint16_t avail_idx = __atomic_load_n(&q->avail[1], __ATOMIC_ACQUIRE);
            uint16_t pending = (uint16_t)(avail_idx - q->last_avail_idx);
            if (pending == 0) {
                if (q->event_idx) {  /* ask for a kick on the next buffer */
                    __atomic_store_n((uint16_t *)(q->used + 4 + 8 * (size_t)q->size),
                                     q->last_avail_idx, __ATOMIC_RELAXED);
                    __atomic_thread_fence(__ATOMIC_SEQ_CST);
                    if (__atomic_load_n(&q->avail[1], __ATOMIC_ACQUIRE) != q->last_avail_idx)
                        continue;
                }
                break;
            }
            if (pending > q->size) {
                outcome = VFU_FAST_PUNT;
                break;
            }
            uint16_t head = __atomic_load_n(&q->avail[2 + q->last_avail_idx % q->size],
                                            __ATOMIC_RELAXED);
            if (head >= q->size || vfu_walk(q, head, r) != 0 || q->check(q->device, r) != 0) {
                outcome = VFU_FAST_PUNT;
                break;
            }
            if (q->inflight)
                vfu_inflight_fetched(q, head);
            uint32_t written = 0;
            if (q->serve(q->device, r, &written) != 0) {
                outcome = VFU_FAST_PUNT;  /* Python serves it again, and reports */
                break;
            }
            q->last_avail_idx++;
            vfu_push(q, head, written);
            uint64_t now = vfu_now_ns();
            vfu_count(q, r, written, now - since);
            since = now;
            taken++;
        }
        if (q->batch_done && taken)
            q->batch_done(q->device);
        vfu_notify(q, mark);
        if (vfu_guard_hits() != q->faults_at_start)
            return VFU_FAST_FAULT;
        if (outcome >= 0)
            return outcome;
        if (taken == q->size || (!waits_for_host && vfu_poll_ring(q)))
            continue;  /* more may be waiting */
        /* Waiting for the host: the driver's kicks stay unread until then
           (the buffers are there already). */
        if (vfu_wait(waits_for_host ? q->host_fd : q->kick_fd, q->stop_fd) != 0)
            return VFU_FAST_BROKEN_FD;
    }
}
