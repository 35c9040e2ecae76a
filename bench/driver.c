/* The benchmark's guest driver: keeps `depth` virtio-blk reads or writes in
 * flight on a split virtqueue and times each one, in C so that the front end
 * is never the bottleneck. The Python harness sets the device up over
 * vhost-user and hands over the ring, the guest RAM mapping and the two
 * eventfds; one driver runs per queue, each on its own thread.
 *
 * Each request slot i owns descriptors 3i (header), 3i+1 (data), 3i+2
 * (status) and `slot_bytes` of guest RAM: the header and status in the
 * first 4 KiB, the data after it.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench_loop.h"

struct desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
struct used_elem { uint32_t id; uint32_t len; };

#define F_NEXT 1
#define F_WRITE 2
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1

struct bench_args {
    void *desc, *avail, *used;   /* ring areas, in our mapping of guest RAM */
    uint16_t queue_size;
    int kick_fd, call_fd;
    uint8_t *ram;                /* our mapping of guest RAM ... */
    uint64_t ram_gpa;            /* ... which starts at this guest address */
    uint64_t slots_gpa;          /* per-request buffers */
    uint64_t capacity_sectors;
    uint32_t block_size;
    uint32_t depth;
    uint64_t duration_ns;
    uint64_t seed;
    uint32_t slot_bytes;         /* 4 KiB + block_size, rounded up */
    int write;                   /* OUT requests instead of IN */
    int sequential;              /* consecutive blocks instead of random ones */
    uint64_t next_block;         /* sequential: where the next request goes */
    uint64_t *latencies;         /* out: one entry per completed request ... */
    uint64_t max_latencies;      /* ... up to this many */
    uint64_t completed;          /* out */
    uint64_t errors;             /* out */
    uint64_t elapsed_ns;         /* out */
};

static void prepare(struct bench_args *a, uint32_t slot, uint64_t *rng, uint64_t *stamp)
{
    struct desc *d = a->desc;
    uint64_t base = a->slots_gpa + (uint64_t)slot * a->slot_bytes;
    uint8_t *host = a->ram + (base - a->ram_gpa);
    uint64_t blocks = a->capacity_sectors / (a->block_size / 512);
    uint64_t block = a->sequential ? a->next_block++ % blocks : next_random(rng) % blocks;
    uint64_t sector = block * (a->block_size / 512);
    uint32_t type = a->write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    uint32_t header[4] = {type, 0, (uint32_t)sector, (uint32_t)(sector >> 32)};

    memcpy(host, header, 16);
    host[16] = 0xff;
    d[3 * slot] = (struct desc){base, 16, F_NEXT, (uint16_t)(3 * slot + 1)};
    d[3 * slot + 1] = (struct desc){base + 4096, a->block_size,
                                    (uint16_t)(F_NEXT | (a->write ? 0 : F_WRITE)),
                                    (uint16_t)(3 * slot + 2)};
    d[3 * slot + 2] = (struct desc){base + 16, 1, F_WRITE, 0};
    *stamp = now_ns();
}

int run_reads(struct bench_args *a)
{
    volatile uint16_t *avail = a->avail;      /* flags, idx, ring[] */
    volatile uint16_t *used16 = a->used;      /* flags, idx */
    volatile struct used_elem *used = (void *)((uint8_t *)a->used + 4);
    uint64_t stamps[1024];
    uint64_t rng = a->seed | 1;
    uint16_t avail_idx = avail[1], last_used = used16[1];
    uint64_t value = 1, start, deadline;
    struct pollfd call = {a->call_fd, POLLIN, 0};

    if (a->depth == 0 || a->depth > 1024 || 3 * a->depth > a->queue_size)
        return -EINVAL;
    start = now_ns();
    deadline = start + a->duration_ns;
    for (uint32_t slot = 0; slot < a->depth; slot++) {
        prepare(a, slot, &rng, &stamps[slot]);
        avail[2 + avail_idx++ % a->queue_size] = (uint16_t)(3 * slot);
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    avail[1] = avail_idx;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (write(a->kick_fd, &value, 8) != 8)
        return -errno;

    for (;;) {
        int collected = 0;
        if (poll(&call, 1, 5000) <= 0)
            return -ETIMEDOUT;
        if (read(a->call_fd, &value, 8) < 0 && errno != EAGAIN)
            return -errno;
        while (last_used != used16[1]) {
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            uint32_t head = used[last_used % a->queue_size].id;
            uint32_t slot = head / 3;
            uint64_t done = now_ns();
            uint8_t *status = a->ram + (a->slots_gpa + (uint64_t)slot * a->slot_bytes + 16
                                        - a->ram_gpa);
            if (head % 3 || slot >= a->depth || *status != 0)
                a->errors++;
            else if (a->completed < a->max_latencies)
                a->latencies[a->completed] = done - stamps[slot];
            a->completed++;
            last_used++;
            collected++;
            if (done < deadline) {
                prepare(a, slot, &rng, &stamps[slot]);
                avail[2 + avail_idx++ % a->queue_size] = (uint16_t)(3 * slot);
            }
        }
        if (now_ns() >= deadline && (uint16_t)(avail_idx - last_used) == 0)
            break;
        if (collected) {
            __atomic_thread_fence(__ATOMIC_RELEASE);
            avail[1] = avail_idx;
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (!(used16[0] & 1) && write(a->kick_fd, &value, 8) != 8)
                return -errno;
        }
    }
    a->elapsed_ns = now_ns() - start;
    return 0;
}
