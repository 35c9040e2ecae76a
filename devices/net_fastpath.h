/* virtio-net's frame buffers and native handlers: the interface, shared by
   net_fastpath.c and cffi's declarations (vfiouserd/_native_build.py). */

struct vfu_net;  /* the two byte queues and their lock: net_fastpath.c's */

/* Numbers net.py reads (logs, tests, benchmarks) and settings it keeps
   current; read and written without the lock (single words). */
struct vfu_net_settings {
    uint32_t mtu;
    uint32_t active_pairs;
    int peer_fd;          /* -1 without a peer; changed with vfu_net_set_peer only */
    uint64_t dropped_from_peer;
    uint32_t last_dropped_size;
    uint64_t frames_to_guest, frames_to_peer;
};

/* One queue's handle: the fast path's "device" argument. */
struct vfu_net_queue {
    struct vfu_net *net;
    uint32_t index;
};

struct vfu_net *vfu_net_new(uint32_t mtu, int wake_fd);
void vfu_net_free(struct vfu_net *net);
struct vfu_net_settings *vfu_net_settings(struct vfu_net *net);
/* The peer's socket (-1: none). Under the lock: once it returns, no thread
   uses the old fd any more, so it may be closed. */
void vfu_net_set_peer(struct vfu_net *net, int fd);

/* From the peer: read what the socket has (non-blocking) into the queue for
   the guest. Returns the bytes read, 0 at the end of the stream, -errno, or
   VFU_NET_VIOLATION for a length no frame has (the peer must go). */
#define VFU_NET_VIOLATION -100000
int64_t vfu_net_pull(struct vfu_net *net);
/* Whether the queue for the guest has room to read more. */
int vfu_net_wants_peer(struct vfu_net *net);
/* The oldest frame for the guest, copied to dst and taken if it fits in
   room: 0 and its length; 1 and its length if it does not fit (kept); -1
   if there is none. */
int vfu_net_take(struct vfu_net *net, uint8_t *dst, uint32_t room, uint32_t *length);
void vfu_net_drop_oldest(struct vfu_net *net);
/* To the peer: a frame appended (length prefix added); 0, or -1 if there is
   no room. Then send what the socket takes: the bytes left, or -errno. */
int vfu_net_queue_frame(struct vfu_net *net, const uint8_t *frame, uint32_t size);
int64_t vfu_net_flush(struct vfu_net *net);
void vfu_net_to_peer_clear(struct vfu_net *net);

/* Either queue as bytes (state, backpressure): its size, a copy of up to
   room bytes (the size copied), and its contents replaced (-1 if they do
   not fit, or are not a stream of frames for the guest). The peer's: the
   whole frames waiting for the guest, then the part of the next one read
   so far (vfu_net_whole_size says where the part starts). */
#define VFU_NET_TO_GUEST 0
#define VFU_NET_TO_PEER 1
uint32_t vfu_net_whole_size(struct vfu_net *net);
uint32_t vfu_net_size(struct vfu_net *net, int direction);
uint32_t vfu_net_copy(struct vfu_net *net, int direction, uint8_t *dst, uint32_t room);
int vfu_net_load(struct vfu_net *net, int direction, const uint8_t *data, uint32_t size);

/* The fast path's handlers: transmit (request-driven) and receive (fed by
   the peer: ready says whether a frame waits for this queue). */
int vfu_net_tx_check(void *queue, const struct vfu_request *r);
int vfu_net_tx_serve(void *queue, struct vfu_request *r, uint32_t *written);
void vfu_net_tx_batch_done(void *queue);
int vfu_net_rx_ready(void *queue);
int vfu_net_rx_check(void *queue, const struct vfu_request *r);
int vfu_net_rx_serve(void *queue, struct vfu_request *r, uint32_t *written);
