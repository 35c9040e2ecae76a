/* The NVMe controller's native I/O loop: the interface, shared by
   fastpath.c beside it and cffi's declarations (vfiouserd/_native_build.py);
   devices/nvme/native.py fills it from the Python queues and folds it back. */

#define VFU_NVME_MAX_QUEUES 64

struct vfu_nvme_namespace {
    int fd;
    int read_only;
    uint64_t blocks;            /* of 512 bytes */
};

/* One I/O submission queue with the completion queue only it uses. */
struct vfu_nvme_queue {
    uint8_t *sq, *cq;           /* the entries, in our mapping of guest memory */
    uint32_t sq_size, cq_size;
    uint16_t sqid;
    uint32_t sq_head, sq_tail;  /* sq_tail and cq_head: the registers' last values */
    uint32_t cq_head, cq_tail;  /* (Python stores them while the loop runs) */
    int phase;
    int irq_fd;                 /* the CQ's MSI-X eventfd; -1: interrupts off */
    uint32_t *shadow_sq, *shadow_cq;  /* shadow doorbells (NULL: none) ... */
    uint32_t *event_sq, *event_cq;    /* ... and their EventIdx slots */
    /* Counters, as vfu_split_queue's (vfiouserd/stats.py reads them live). */
    uint64_t served;
    uint64_t bytes;
    uint64_t notified, suppressed;
    uint64_t latency_max;
    uint64_t latency[64];
    uint64_t blocks_read, blocks_written, reads, writes;  /* SMART's */
    uint64_t sgl_commands;      /* of them, with an SGL (statistics) */
};

struct vfu_nvme_loop {
    struct vfu_nvme_queue *queues;
    int nqueues;
    const struct vfu_region *regions;
    int nregions;
    const struct vfu_nvme_namespace *namespaces;
    uint32_t nnamespaces;
    int write_cache;            /* off: writes reach the disk before they complete */
    int doorbell_fd, stop_fd;   /* eventfds: a register doorbell came; stop */
    int stop;
    int punted;                 /* out: the queue whose next command is Python's */
    uint64_t faults_at_start;
};

/* Serve the queues until stopped or until a command needs Python (its
   queue in punted, the command still at its SQ head); returns why, as
   vfu_split_serve (VFU_FAST_*). */
int vfu_nvme_serve(struct vfu_nvme_loop *l);
