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

/* preadv/pwritev of all of iov at offset (iov is consumed); a read past the
   end of the file gives zeros. 0, or -1 on an I/O error (errno). Also the
   NVMe loop's (devices/nvme/fastpath.c). */
int vfu_blk_transfer(int fd, struct iovec *iov, int count, uint64_t offset, int writing);
