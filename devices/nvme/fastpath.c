/* The NVMe controller's native I/O loop: the C half of queues.py, prp.py
   and io.py's rules for the commands a disk sees all the time.

   One worker thread runs vfu_nvme_serve with the GIL released over the
   I/O queues Python hands it (each SQ with a CQ of its own, all in mapped
   memory, MSI-X or no interrupts). It takes Read and Write commands whose
   namespace, blocks and PRPs are in order, moves the data between the
   image and guest memory with preadv/pwritev, posts the completion (the
   dword with the phase tag last) and signals the CQ's MSI-X eventfd once
   per batch. Anything else (another opcode, flags, a field Python would
   refuse, memory it cannot reach, an I/O error) stops it *before* that
   command is taken: Python, which has the whole rule book and the error
   reporting, runs it, then starts the loop again.

   New tails and heads come from the registers (Python stores the value
   and signals doorbell_fd) or, once the driver set up shadow doorbells,
   from the shadow page; before sleeping the loop writes each EventIdx so
   that the driver rings the register for the next command. */

#include "nvme/fastpath.h"

#define VFU_NVME_PAGE 4096u
#define VFU_NVME_LBA 512u
#define VFU_NVME_MAX_TRANSFER (VFU_NVME_PAGE << 6)  /* MDTS 6, as io.py */
#define VFU_NVME_MAX_IOV (VFU_NVME_MAX_TRANSFER / VFU_NVME_PAGE + 1)
#define VFU_NVME_MAX_LIST_PAGES 4
#define VFU_NVME_BURST 16          /* commands from one SQ before the next one's turn */
#define VFU_NVME_WRITE 0x01
#define VFU_NVME_READ 0x02
#define VFU_NVME_FUA (1u << 30)
#define VFU_NVME_PSDT_SGL 0x40     /* flags: PSDT 01b, an SGL for the data */
#define VFU_NVME_POLL_NS 200000

struct vfu_nvme_sqe {
    uint8_t opcode, flags;
    uint16_t cid;
    uint32_t nsid;
    uint64_t cdw2_3, mptr, prp1, prp2;
    uint32_t cdw10, cdw11, cdw12, cdw13, cdw14, cdw15;
};

struct vfu_nvme_data {
    struct iovec iov[VFU_NVME_MAX_IOV];
    int count;
};

static uint64_t vfu_nvme_now(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

static int vfu_nvme_add(const struct vfu_nvme_loop *l, struct vfu_nvme_data *d, uint64_t gpa,
                        uint64_t length, int writable)
{
    uint8_t *host = vfu_region_find(l->regions, l->nregions, gpa, length, writable);
    if (!host || d->count == (int)VFU_NVME_MAX_IOV)
        return -1;
    d->iov[d->count].iov_base = host;
    d->iov[d->count].iov_len = length;
    d->count++;
    return 0;
}

/* prp.segments: PRP1 anywhere dword aligned, then PRP2 as the one more
   page or a PRP list (qword aligned) whose last slot chains to the next
   list page. -1 for anything Python must judge: misalignment, a list page
   met twice, memory out of reach. */
static int vfu_nvme_prps(const struct vfu_nvme_loop *l, const struct vfu_nvme_sqe *c,
                         uint64_t length, int writable, struct vfu_nvme_data *d)
{
    uint64_t prp1 = c->prp1, prp2 = c->prp2;
    d->count = 0;
    if (prp1 & 3)
        return -1;
    uint64_t first = VFU_NVME_PAGE - prp1 % VFU_NVME_PAGE;
    if (first > length)
        first = length;
    if (vfu_nvme_add(l, d, prp1, first, writable) != 0)
        return -1;
    uint64_t remaining = length - first;
    if (remaining == 0)
        return 0;
    if (remaining <= VFU_NVME_PAGE)
        return prp2 % VFU_NVME_PAGE ? -1 : vfu_nvme_add(l, d, prp2, remaining, writable);
    if (prp2 & 7)
        return -1;
    uint64_t entries = (remaining + VFU_NVME_PAGE - 1) / VFU_NVME_PAGE, address = prp2;
    uint64_t seen[VFU_NVME_MAX_LIST_PAGES];
    int pages = 0;
    while (entries) {
        if (pages == VFU_NVME_MAX_LIST_PAGES)
            return -1;
        for (int i = 0; i < pages; i++)
            if (seen[i] == address / VFU_NVME_PAGE)
                return -1;
        seen[pages++] = address / VFU_NVME_PAGE;
        uint64_t slots = (VFU_NVME_PAGE - address % VFU_NVME_PAGE) / 8;
        uint64_t wanted = entries <= slots ? entries : slots;
        const uint8_t *list = vfu_region_find(l->regions, l->nregions, address, wanted * 8, 0);
        if (!list)
            return -1;
        int chained = entries > slots;
        uint64_t values = chained ? wanted - 1 : wanted;
        for (uint64_t i = 0; i < values; i++) {
            uint64_t value;
            memcpy(&value, list + 8 * i, sizeof value);  /* once: the guest may change it */
            if (value % VFU_NVME_PAGE)
                return -1;
            uint64_t size = remaining < VFU_NVME_PAGE ? remaining : VFU_NVME_PAGE;
            if (vfu_nvme_add(l, d, value, size, writable) != 0)
                return -1;
            remaining -= size;
            entries--;
        }
        if (chained) {
            memcpy(&address, list + 8 * (wanted - 1), sizeof address);
            if (address % VFU_NVME_PAGE)
                return -1;
        }
    }
    return 0;
}

/* prp.py's SGLs, the layouts drivers use: SGL1 a Data Block, or a Segment
   or Last Segment descriptor of a segment of Data Blocks. -1 for the rest
   (bit buckets, chained segments, anything Python would refuse or must
   read through the VMM). Descriptors past the data are not looked at, as
   there. */
#define VFU_NVME_SGL_DATA 0x00
#define VFU_NVME_SGL_SEGMENT 0x20
#define VFU_NVME_SGL_LAST_SEGMENT 0x30

static int vfu_nvme_data_block(const struct vfu_nvme_loop *l, const uint8_t *descriptor,
                               uint64_t *remaining, int writable, struct vfu_nvme_data *d)
{
    uint64_t address;
    uint32_t size;
    memcpy(&address, descriptor, sizeof address);
    memcpy(&size, descriptor + 8, sizeof size);
    if (descriptor[15] != VFU_NVME_SGL_DATA || ((address | size) & 3) ||
        address > UINT64_MAX - size)
        return -1;
    uint64_t taken = size < *remaining ? size : *remaining;
    if (taken && vfu_nvme_add(l, d, address, taken, writable) != 0)
        return -1;
    *remaining -= taken;
    return 0;
}

static int vfu_nvme_sgl(const struct vfu_nvme_loop *l, const struct vfu_nvme_sqe *c,
                        uint64_t length, int writable, struct vfu_nvme_data *d)
{
    uint8_t sgl1[16];
    memcpy(sgl1, &c->prp1, 8);
    memcpy(sgl1 + 8, &c->prp2, 8);
    uint64_t remaining = length;
    d->count = 0;
    if (sgl1[15] == VFU_NVME_SGL_DATA)
        return vfu_nvme_data_block(l, sgl1, &remaining, writable, d) == 0 && !remaining ? 0 : -1;
    if (sgl1[15] != VFU_NVME_SGL_SEGMENT && sgl1[15] != VFU_NVME_SGL_LAST_SEGMENT)
        return -1;
    uint64_t address;
    uint32_t size;
    memcpy(&address, sgl1, sizeof address);
    memcpy(&size, sgl1 + 8, sizeof size);
    if (!size || size % 16 || address % 8 || size / 16 > VFU_NVME_MAX_IOV)
        return -1;
    /* All of the segment reachable, as prp.py reads it (in one piece). */
    const uint8_t *segment = vfu_region_find(l->regions, l->nregions, address, size, 0);
    if (!segment)
        return -1;
    for (uint32_t i = 0; i < size / 16 && remaining; i++) {
        uint8_t copy[16];
        memcpy(copy, segment + 16 * i, sizeof copy);  /* once: the guest may change it */
        if (vfu_nvme_data_block(l, copy, &remaining, writable, d) != 0)
            return -1;
    }
    return remaining ? -1 : 0;
}

/* io.py's Read and Write, for what they would run without an error; 0 and
   the blocks moved, or -1 to leave the command to Python (nothing the
   guest could tell from a first try is left behind: reads and writes are
   safe to run again). */
static int vfu_nvme_rw(const struct vfu_nvme_loop *l, const struct vfu_nvme_sqe *c,
                       uint32_t *blocks, int *sgl)
{
    int writing = c->opcode == VFU_NVME_WRITE;
    if ((c->flags & ~VFU_NVME_PSDT_SGL) || (!writing && c->opcode != VFU_NVME_READ))
        return -1;  /* fused, reserved bits, SGL in MPTR; other commands */
    if (c->nsid == 0 || c->nsid > l->nnamespaces || (c->cdw12 & ~(0xFFFFu | VFU_NVME_FUA)))
        return -1;
    const struct vfu_nvme_namespace *ns = &l->namespaces[c->nsid - 1];
    uint64_t slba = (uint64_t)c->cdw11 << 32 | c->cdw10;
    uint32_t nlb = (c->cdw12 & 0xFFFF) + 1;
    if (slba > ns->blocks || nlb > ns->blocks - slba ||
        (uint64_t)nlb * VFU_NVME_LBA > VFU_NVME_MAX_TRANSFER)
        return -1;
    if (writing && ns->read_only)
        return -1;
    struct vfu_nvme_data d;
    uint64_t length = (uint64_t)nlb * VFU_NVME_LBA;
    if ((c->flags ? vfu_nvme_sgl(l, c, length, !writing, &d)
                  : vfu_nvme_prps(l, c, length, !writing, &d)) != 0)
        return -1;
    if (vfu_blk_transfer(ns->fd, d.iov, d.count, slba * VFU_NVME_LBA, writing) != 0)
        return -1;
    if (writing && (!l->write_cache || (c->cdw12 & VFU_NVME_FUA)) && fdatasync(ns->fd) != 0)
        return -1;
    *blocks = nlb;
    *sgl = c->flags != 0;
    return 0;
}

static uint32_t vfu_nvme_load(const uint32_t *slot)
{
    return __atomic_load_n(slot, __ATOMIC_ACQUIRE);
}

/* The tail the driver gave last: the shadow doorbell's when there is one
   (a value out of range there is ignored, as queues.py does). */
static uint32_t vfu_nvme_tail(struct vfu_nvme_queue *q)
{
    if (q->shadow_sq) {
        uint32_t tail = vfu_nvme_load(q->shadow_sq);
        if (tail < q->sq_size)
            q->sq_tail = tail;
        return q->sq_tail;
    }
    return vfu_nvme_load(&q->sq_tail);
}

/* Room for one more completion; a shadow head moves only within what was
   posted (as queues.py: anything else is ignored). */
static int vfu_nvme_cq_room(struct vfu_nvme_queue *q)
{
    if (q->shadow_cq) {
        uint32_t head = vfu_nvme_load(q->shadow_cq);
        uint32_t posted = (q->cq_tail + q->cq_size - q->cq_head) % q->cq_size;
        if (head < q->cq_size && (head + q->cq_size - q->cq_head) % q->cq_size <= posted)
            __atomic_store_n(&q->cq_head, head, __ATOMIC_RELAXED);
    }
    return (q->cq_tail + 1) % q->cq_size != vfu_nvme_load(&q->cq_head);
}

static void vfu_nvme_post(struct vfu_nvme_queue *q, uint16_t cid)
{
    uint8_t *entry = q->cq + 16 * (size_t)q->cq_tail;
    uint32_t dw[3] = {0, 0, q->sq_head | (uint32_t)q->sqid << 16};
    memcpy(entry, dw, sizeof dw);
    uint32_t last = cid | (uint32_t)(q->phase & 1) << 16;  /* status 0: success */
    uint32_t tail = (q->cq_tail + 1) % q->cq_size;
    if (tail == 0)
        q->phase = !q->phase;
    /* The tail Python checks head doorbells against moves before the driver
       can see the entry. */
    __atomic_store_n(&q->cq_tail, tail, __ATOMIC_RELEASE);
    __atomic_store_n((uint32_t *)(entry + 12), last, __ATOMIC_RELEASE);
}

static void vfu_nvme_count(struct vfu_nvme_queue *q, int writing, uint32_t blocks,
                           uint64_t latency)
{
    q->served++;
    q->bytes += (uint64_t)blocks * VFU_NVME_LBA;
    if (writing) {
        q->writes++;
        q->blocks_written += blocks;
    } else {
        q->reads++;
        q->blocks_read += blocks;
    }
    q->latency[63 - __builtin_clzll(latency | 1)]++;
    if (latency > q->latency_max)
        q->latency_max = latency;
}

/* Serve up to a burst of one queue; 1 if it took anything, 0 if not, -1
   when the command at its head is Python's. */
static int vfu_nvme_burst(struct vfu_nvme_loop *l, struct vfu_nvme_queue *q)
{
    uint32_t tail = vfu_nvme_tail(q), taken = 0;
    uint64_t since = vfu_nvme_now();
    int outcome = 0;
    while (q->sq_head != tail && taken < VFU_NVME_BURST) {
        if (__atomic_load_n(&l->stop, __ATOMIC_ACQUIRE) || !vfu_nvme_cq_room(q))
            break;
        struct vfu_nvme_sqe c;
        memcpy(&c, q->sq + 64 * (size_t)q->sq_head, sizeof c);
        uint32_t blocks = 0;
        int sgl = 0;
        if (vfu_nvme_rw(l, &c, &blocks, &sgl) != 0) {
            outcome = -1;
            break;
        }
        q->sq_head = (q->sq_head + 1) % q->sq_size;
        vfu_nvme_post(q, c.cid);
        uint64_t now = vfu_nvme_now();
        vfu_nvme_count(q, c.opcode == VFU_NVME_WRITE, blocks, now - since);
        q->sgl_commands += sgl;
        since = now;
        taken++;
    }
    if (taken) {
        if (q->irq_fd >= 0) {
            uint64_t one = 1;
            ssize_t done = write(q->irq_fd, &one, sizeof one);
            (void)done;  /* EAGAIN: saturated, the vector fires anyway */
            q->notified++;
        } else {
            q->suppressed++;
        }
    }
    return outcome < 0 ? -1 : taken > 0;
}

/* Work for the loop: a new tail, where the CQ has room. */
static int vfu_nvme_pending(struct vfu_nvme_loop *l)
{
    for (int i = 0; i < l->nqueues; i++) {
        struct vfu_nvme_queue *q = &l->queues[i];
        if (q->sq_head != vfu_nvme_tail(q) && vfu_nvme_cq_room(q))
            return 1;
    }
    return 0;
}

static int vfu_nvme_watch(struct vfu_nvme_loop *l)
{
    uint64_t deadline = vfu_nvme_now() + VFU_NVME_POLL_NS;
    do {
        for (int i = 0; i < 16; i++) {
            if (__atomic_load_n(&l->stop, __ATOMIC_ACQUIRE) || vfu_nvme_pending(l))
                return 1;
            __builtin_ia32_pause();
        }
    } while (vfu_nvme_now() < deadline);
    return 0;
}

/* Ask for the register doorbell on the next command (EventIdx = where the
   SQ stands), and on a head that frees a full CQ; then look once more. */
static int vfu_nvme_arm(struct vfu_nvme_loop *l)
{
    for (int i = 0; i < l->nqueues; i++) {
        struct vfu_nvme_queue *q = &l->queues[i];
        if (q->event_sq)
            __atomic_store_n(q->event_sq, q->sq_head, __ATOMIC_RELAXED);
        if (q->event_cq && (q->cq_tail + 1) % q->cq_size == q->cq_head)
            __atomic_store_n(q->event_cq, q->cq_head, __ATOMIC_RELAXED);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);  /* our EventIdx before the driver's values */
    return vfu_nvme_pending(l);
}

int vfu_nvme_serve(struct vfu_nvme_loop *l)
{
    l->punted = -1;
    for (;;) {
        int progressed = 0;
        for (int i = 0; i < l->nqueues; i++) {
            if (__atomic_load_n(&l->stop, __ATOMIC_ACQUIRE))
                return VFU_FAST_STOPPED;
            int outcome = vfu_nvme_burst(l, &l->queues[i]);
            if (vfu_guard_hits() != l->faults_at_start)
                return VFU_FAST_FAULT;
            if (outcome < 0) {
                l->punted = i;
                return VFU_FAST_PUNT;
            }
            progressed |= outcome;
        }
        if (progressed || vfu_nvme_watch(l) || vfu_nvme_arm(l))
            continue;
        if (vfu_wait(l->doorbell_fd, l->stop_fd) != 0)
            return VFU_FAST_BROKEN_FD;
    }
}
