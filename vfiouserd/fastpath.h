/* The fast path's interface: shared by fastpath.c and cffi's declarations
   (vfiouserd/_native_build.py), so it is written in the C subset cffi reads. */

#define VFU_FAST_STOPPED 0
#define VFU_FAST_PUNT 1
#define VFU_FAST_FAULT 2
#define VFU_FAST_BROKEN_FD 3

struct vfu_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *hva;
    int writable;
};

/* Where [gpa, gpa + length) lies in our mapping, or NULL when it is not all
   in one mapped region (writable: in a region the device may write). Every
   native loop's guest access goes through it. */
uint8_t *vfu_region_find(const struct vfu_region *regions, int nregions, uint64_t gpa,
                         uint64_t length, int writable);

struct vfu_request;  /* a walked descriptor chain; its layout is fastpath.c's */

/* check: 0 if the handler serves this request, anything else to leave it to
   Python (nothing done yet). serve: 0 and the bytes written, or non-zero to
   leave it to Python after all (the request must be safe to serve again). */
typedef int (*vfu_check_fn)(void *device, const struct vfu_request *request);
typedef int (*vfu_serve_fn)(void *device, struct vfu_request *request, uint32_t *written);
/* A host-fed queue's (receive): 1 if the host has something for the next
   buffer; the loop waits on host_fd until it has. NULL: every request is
   served when the driver makes it available. */
typedef int (*vfu_ready_fn)(void *device);
/* After each batch, before the driver is notified (NULL: nothing). */
typedef void (*vfu_batch_fn)(void *device);

struct vfu_split_queue {
    uint8_t *desc;
    uint16_t *avail;
    uint8_t *used;
    uint32_t size;
    int event_idx;
    int indirect;
    uint16_t last_avail_idx;
    uint16_t used_idx;
    uint8_t *inflight;          /* this queue's INFLIGHT_SHMFD part, or NULL */
    uint64_t inflight_counter;
    int kick_fd, call_fd, stop_fd;
    int stop;
    const struct vfu_region *regions;
    int nregions;
    vfu_check_fn check;
    vfu_serve_fn serve;
    vfu_ready_fn ready;
    vfu_batch_fn batch_done;
    int host_fd;                /* an eventfd signalled when ready() may have changed */
    void *device;
    uint64_t faults_at_start;
    /* Counters (vfiouserd/stats.py reads them while the loop runs). */
    uint64_t served;
    uint64_t bytes;             /* read and written in the guest's buffers */
    uint64_t notified, suppressed;
    uint64_t latency_max;       /* ns from taking a request to publishing it */
    uint64_t latency[64];       /* log2 buckets of the same, in ns */
};

/* Every native loop's sleep: until wake_fd or stop_fd is signalled (wake_fd's
   count consumed); 0, or -1 if the fds cannot be polled. */
int vfu_wait(int wake_fd, int stop_fd);

/* Serve until stopped or until a request needs Python; returns why. */
int vfu_split_serve(struct vfu_split_queue *q, struct vfu_request *r);
