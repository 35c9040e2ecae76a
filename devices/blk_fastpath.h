/* virtio-blk's native handler: the interface, shared by blk_fastpath.c and
   cffi's declarations (vfiouserd/_native_build.py). */

struct vfu_blk {
    int fd;
    int read_only;
    int writeback;
    uint64_t capacity;  /* sectors */
};

int vfu_blk_check(void *device, const struct vfu_request *r);
int vfu_blk_serve(void *device, struct vfu_request *r, uint32_t *written);
