/* The benchmark's NVMe driver: keeps `depth` Read (or Write) commands in
 * flight on one I/O queue pair and times each, in C so that the front end is
 * never the bottleneck. The Python harness (bench/nvme.py) brings the
 * controller up with the project's driver over its vfio-user client and
 * hands over the queues, the guest RAM mapping, the CQ's MSI-X eventfd and
 * the vfio-user socket; one driver runs per queue pair, each on its own
 * thread.
 *
 * Doorbells reach the controller as a guest's MMIO writes reach it through
 * QEMU's vfio-user-pci: a posted REGION_WRITE of 4 bytes to BAR0, written
 * here straight on the socket (the Python client writes nothing meanwhile).
 * With shadow doorbells (Doorbell Buffer Config), the driver does what
 * Linux's nvme driver does: update the shadow value, and send the MMIO
 * write only when the controller's EventIdx asks for it.
 *
 * Each slot i owns `slot_bytes` of guest RAM from slots_gpa + i * slot_bytes:
 * a PRP list page, then the data buffer (page aligned, contiguous). CID = i.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bench_loop.h"

#define PAGE 4096u
#define DOORBELLS 0x1000u /* BAR0; CAP.DSTRD 0: 4 bytes a doorbell */
#define OPC_WRITE 0x01
#define OPC_READ 0x02
#define REGION_WRITE 10    /* vfio-user command */
#define FLAG_NO_REPLY 0x10 /* vfio-user header flag: posted */
#define PATTERN_MARK (0xABCDull << 48)

struct sqe {
    uint8_t opcode, flags;
    uint16_t cid;
    uint32_t nsid;
    uint64_t cdw2_3, mptr, prp1, prp2;
    uint32_t cdw10, cdw11, cdw12, cdw13, cdw14, cdw15;
};

struct cqe {
    uint32_t dw0, dw1;
    uint16_t sq_head, sq_id, cid, status; /* phase in status bit 0 */
};

/* A vfio-user REGION_WRITE of one 32-bit register: header, access, value. */
struct __attribute__((packed)) region_write {
    uint16_t msg_id, command;
    uint32_t msg_size, flags, error;
    uint64_t offset;
    uint32_t region, count, value;
};

struct nvme_args {
    uint8_t *ram;               /* our mapping of guest RAM ... */
    uint64_t ram_gpa;           /* ... which starts at this guest address */
    uint64_t sq_gpa, cq_gpa;    /* the queue pair, fresh: tail and head 0, phase 1 */
    uint32_t entries;           /* of each */
    uint16_t qid;
    uint32_t nsid;
    int sock_fd;                /* the vfio-user socket */
    int irq_fd;                 /* the CQ's MSI-X vector's eventfd */
    int shadow;                 /* Doorbell Buffer Config is set up: */
    uint64_t shadow_gpa, eventidx_gpa; /* its two pages */
    uint64_t slots_gpa;         /* per-command buffers */
    uint32_t slot_bytes;        /* 4 KiB (PRP list) + block_size */
    uint64_t capacity_sectors;  /* 512-byte LBAs */
    uint32_t block_size;
    uint32_t depth;
    uint64_t duration_ns;
    uint64_t seed;
    int write;                  /* Write commands instead of Read */
    int sequential;             /* consecutive blocks instead of random ones */
    uint64_t next_block;        /* sequential: where the next command goes */
    int verify;                 /* reads: poison each buffer, check the pattern */
    uint64_t *slot_lba;         /* out, if set: each slot's last completed SLBA */
    uint64_t *latencies;        /* out: one entry per completed command ... */
    uint64_t max_latencies;     /* ... up to this many */
    uint64_t completed;         /* out */
    uint64_t errors;            /* out: bad status, unknown or repeated CID */
    uint64_t bad_data;          /* out (verify): reads whose data was wrong */
    uint64_t elapsed_ns;        /* out */
    uint64_t doorbells;         /* out: REGION_WRITE messages sent */
    uint64_t doorbells_skipped; /* out: shadow updates that needed no message */
    uint64_t interrupts;        /* out: wake-ups on the eventfd */
};

/* Threads of one process share the socket: a message must go out whole. */
static pthread_mutex_t socket_lock = PTHREAD_MUTEX_INITIALIZER;
/* Message ids of our own, far from those the Python client has used. */
static uint16_t next_msg_id = 0x8000;

static void *host(struct nvme_args *a, uint64_t gpa)
{
    return a->ram + (gpa - a->ram_gpa);
}

/* The test's image pattern: each 8-byte word holds its byte offset, marked. */
uint64_t nvme_pattern(uint64_t offset)
{
    return offset | PATTERN_MARK;
}

/* Linux's nvme_dbbuf_need_event: has `new` moved past the controller's event index? */
int nvme_need_event(uint16_t event, uint16_t new_value, uint16_t old)
{
    return (uint16_t)(new_value - event - 1) < (uint16_t)(new_value - old);
}

static int send_posted_write(struct nvme_args *a, uint32_t offset, uint32_t value)
{
    struct region_write m = {
        .command = REGION_WRITE,
        .msg_size = sizeof m,
        .flags = FLAG_NO_REPLY,
        .offset = offset,
        .region = 0,
        .count = 4,
        .value = value,
    };
    size_t sent = 0;
    int result = 0;

    pthread_mutex_lock(&socket_lock);
    m.msg_id = next_msg_id;
    next_msg_id = next_msg_id == 0xFFFF ? 0x8000 : next_msg_id + 1;
    while (sent < sizeof m) {
        /* The socket is non-blocking (trio's): wait for room when it is full. */
        ssize_t n = send(a->sock_fd, (uint8_t *)&m + sent, sizeof m - sent, MSG_NOSIGNAL);
        if (n > 0) {
            sent += (size_t)n;
        } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd out = {a->sock_fd, POLLOUT, 0};
            if (poll(&out, 1, 5000) <= 0) {
                result = -ETIMEDOUT;
                break;
            }
        } else {
            result = n < 0 ? -errno : -EPIPE;
            break;
        }
    }
    pthread_mutex_unlock(&socket_lock);
    if (result == 0)
        a->doorbells++;
    return result;
}

/* The SQ tail (completion 0) or CQ head (1) doorbell of the queue pair. */
static int doorbell(struct nvme_args *a, int completion, uint16_t value)
{
    uint32_t index = 2u * a->qid + (uint32_t)completion;

    if (a->shadow) {
        volatile uint32_t *shadow = host(a, a->shadow_gpa);
        volatile uint32_t *eventidx = host(a, a->eventidx_gpa);
        uint16_t old, event;
        /* Queue entries before the shadow value (Linux: wmb). */
        __atomic_thread_fence(__ATOMIC_RELEASE);
        old = (uint16_t)shadow[index];
        shadow[index] = value;
        /* The shadow value before the EventIdx read (Linux: mb). */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        event = (uint16_t)eventidx[index];
        if (!nvme_need_event(event, value, old)) {
            a->doorbells_skipped++;
            return 0;
        }
    }
    return send_posted_write(a, DOORBELLS + 4 * index, value);
}

static uint8_t *slot_data(struct nvme_args *a, uint32_t slot)
{
    return host(a, a->slots_gpa + (uint64_t)slot * a->slot_bytes + PAGE);
}

/* PRP1, PRP2 and the PRP list of each slot, once: the buffers never move. */
static void build_prps(struct nvme_args *a, uint64_t *prp1, uint64_t *prp2, uint32_t slot)
{
    uint64_t list = a->slots_gpa + (uint64_t)slot * a->slot_bytes;
    uint64_t data = list + PAGE;
    uint32_t pages = a->block_size / PAGE;

    prp1[slot] = data;
    if (pages == 1) {
        prp2[slot] = 0;
    } else if (pages == 2) {
        prp2[slot] = data + PAGE;
    } else {
        uint64_t *entries = host(a, list);
        for (uint32_t i = 1; i < pages; i++)
            entries[i - 1] = data + (uint64_t)i * PAGE;
        prp2[slot] = list;
    }
}

static void submit(struct nvme_args *a, uint32_t slot, uint16_t *tail, uint64_t *rng,
                   const uint64_t *prp1, const uint64_t *prp2, uint64_t *slba)
{
    volatile struct sqe *sq = host(a, a->sq_gpa);
    uint32_t sectors = a->block_size / 512;
    uint64_t blocks = a->capacity_sectors / sectors;
    uint64_t block = a->sequential ? a->next_block++ % blocks : next_random(rng) % blocks;
    struct sqe cmd = {
        .opcode = a->write ? OPC_WRITE : OPC_READ,
        .cid = (uint16_t)slot,
        .nsid = a->nsid,
        .prp1 = prp1[slot],
        .prp2 = prp2[slot],
        .cdw12 = sectors - 1, /* NLB, 0-based */
    };

    slba[slot] = block * sectors;
    cmd.cdw10 = (uint32_t)slba[slot];
    cmd.cdw11 = (uint32_t)(slba[slot] >> 32);
    if (a->verify && !a->write)
        memset(slot_data(a, slot), 0xA5, a->block_size);
    sq[*tail] = cmd;
    *tail = (uint16_t)((*tail + 1) % a->entries);
}

static int data_is_right(struct nvme_args *a, uint32_t slot, uint64_t slba)
{
    const uint64_t *words = (const uint64_t *)slot_data(a, slot);
    for (uint32_t i = 0; i < a->block_size / 8; i++)
        if (words[i] != nvme_pattern(slba * 512 + 8ull * i))
            return 0;
    return 1;
}

int run_nvme(struct nvme_args *a)
{
    volatile struct cqe *cq = host(a, a->cq_gpa);
    uint64_t stamps[1024], prp1[1024], prp2[1024], slba[1024];
    uint8_t busy[1024] = {0};
    uint64_t rng = a->seed | 1, start, deadline, value;
    uint16_t tail = 0, head = 0, phase = 1;
    uint32_t in_flight = 0;
    struct pollfd irq = {a->irq_fd, POLLIN, 0};
    int rc;

    if (a->depth == 0 || a->depth > 1024 || a->depth >= a->entries || a->entries > 65536 ||
        a->block_size == 0 || a->block_size % PAGE || a->block_size / PAGE > PAGE / 8 + 1 ||
        a->slot_bytes < PAGE + a->block_size || a->capacity_sectors < a->block_size / 512)
        return -EINVAL;
    for (uint32_t slot = 0; slot < a->depth; slot++)
        build_prps(a, prp1, prp2, slot);

    start = now_ns();
    deadline = start + a->duration_ns;
    for (uint32_t slot = 0; slot < a->depth; slot++) {
        submit(a, slot, &tail, &rng, prp1, prp2, slba);
        busy[slot] = 1;
        stamps[slot] = now_ns();
    }
    in_flight = a->depth;
    if ((rc = doorbell(a, 0, tail)) < 0)
        return rc;

    while (in_flight) {
        uint32_t reaped = 0, submitted = 0;
        uint64_t done = 0;
        /* As an interrupt handler does: every new entry, then one CQ head doorbell. */
        while ((cq[head].status & 1) == phase) {
            struct cqe entry;
            __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the entry after its phase tag */
            entry = cq[head];
            done = now_ns();
            if (++head == a->entries) {
                head = 0;
                phase ^= 1;
            }
            reaped++;
            if (entry.cid >= a->depth || !busy[entry.cid] || entry.sq_id != a->qid) {
                a->errors++;
                continue;
            }
            busy[entry.cid] = 0;
            in_flight--;
            if (entry.status >> 1)
                a->errors++;
            else if (a->verify && !a->write && !data_is_right(a, entry.cid, slba[entry.cid]))
                a->bad_data++;
            if (a->slot_lba)
                a->slot_lba[entry.cid] = slba[entry.cid];
            if (a->completed < a->max_latencies)
                a->latencies[a->completed] = done - stamps[entry.cid];
            a->completed++;
            if (done < deadline) {
                submit(a, entry.cid, &tail, &rng, prp1, prp2, slba);
                busy[entry.cid] = 1;
                stamps[entry.cid] = now_ns();
                in_flight++;
                submitted++;
            }
        }
        if (reaped) {
            if ((rc = doorbell(a, 1, head)) < 0)
                return rc;
            if (submitted && (rc = doorbell(a, 0, tail)) < 0)
                return rc;
            continue;
        }
        /* Nothing new: wait for the interrupt at once, as the guest's driver
         * would (no polling first, as driver.c does not poll either). */
        if (poll(&irq, 1, 5000) <= 0)
            return -ETIMEDOUT;
        if (read(a->irq_fd, &value, 8) < 0 && errno != EAGAIN)
            return -errno;
        a->interrupts++;
    }
    a->elapsed_ns = now_ns() - start;
    return 0;
}
