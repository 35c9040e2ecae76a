/* virtio-blk's native handler for the split-ring fast path (fastpath.c):
   reads, writes and flushes, the requests a disk sees all the time. What
   blk.py would answer with an error or a log line (a short header, a
   partial sector, beyond the end, a write to a read-only disk, other
   request types) is left to blk.py; so is an I/O error. The fields are the
   device's own, kept current by blk.py (SIGHUP resizes, the driver flips
   the cache mode). */

#include "blk_fastpath.h"

#define VFU_BLK_IN 0
#define VFU_BLK_OUT 1
#define VFU_BLK_FLUSH 4
#define VFU_BLK_S_OK 0
#define VFU_BLK_SECTOR 512

struct vfu_blk_header {
    uint32_t type;
    uint32_t ioprio;
    uint64_t sector;
};

static int vfu_blk_parse(const struct vfu_request *r, struct vfu_blk_header *h)
{
    if (r->readable == 0 || r->iov[0].iov_len < sizeof *h || r->writable_size < 1)
        return -1;
    memcpy(h, r->iov[0].iov_base, sizeof *h);
    return 0;
}

static int vfu_blk_in_range(const struct vfu_blk *blk, uint64_t sector, uint64_t bytes)
{
    return bytes % VFU_BLK_SECTOR == 0 && sector <= blk->capacity &&
           bytes / VFU_BLK_SECTOR <= blk->capacity - sector;
}

int vfu_blk_check(void *device, const struct vfu_request *r)
{
    const struct vfu_blk *blk = device;
    struct vfu_blk_header h;
    if (vfu_blk_parse(r, &h) != 0)
        return -1;
    /* The status byte is the last writable byte: it has an iovec of its own
       in every layout this path takes. */
    if (r->iov[r->count - 1].iov_len != 1 || r->count == r->readable)
        return -1;
    switch (h.type) {
    case VFU_BLK_IN:
        return r->readable == 1 && r->count - r->readable >= 2 &&
                       vfu_blk_in_range(blk, h.sector, r->writable_size - 1)
                   ? 0
                   : -1;
    case VFU_BLK_OUT:
        return !blk->read_only && r->iov[0].iov_len == sizeof h && r->readable >= 2 &&
                       r->count - r->readable == 1 &&
                       vfu_blk_in_range(blk, h.sector, r->readable_size - sizeof h)
                   ? 0
                   : -1;
    case VFU_BLK_FLUSH:
        return r->count - r->readable == 1 ? 0 : -1;
    default:
        return -1;
    }
}

int vfu_blk_transfer(int fd, struct iovec *iov, int count, uint64_t offset, int writing)
{
    while (count > 0) {
        ssize_t done = writing ? pwritev(fd, iov, count, (off_t)offset)
                               : preadv(fd, iov, count, (off_t)offset);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (done == 0) {
            if (writing)
                return -1;
            for (int i = 0; i < count; i++)  /* the file shrank: zeros, as blk.py */
                memset(iov[i].iov_base, 0, iov[i].iov_len);
            return 0;
        }
        offset += (uint64_t)done;
        while (count > 0 && (size_t)done >= iov->iov_len) {
            done -= (ssize_t)iov->iov_len;
            iov++;
            count--;
        }
        if (count > 0) {  /* a partial transfer: carry on inside this iovec */
            iov->iov_base = (uint8_t *)iov->iov_base + done;
            iov->iov_len -= (size_t)done;
        }
    }
    return 0;
}

int vfu_blk_serve(void *device, struct vfu_request *r, uint32_t *written)
{
    const struct vfu_blk *blk = device;
    struct vfu_blk_header h;
    memcpy(&h, r->iov[0].iov_base, sizeof h);
    uint8_t *status = r->iov[r->count - 1].iov_base;
    switch (h.type) {
    case VFU_BLK_IN:
        if (vfu_blk_transfer(blk->fd, &r->iov[r->readable], r->count - r->readable - 1,
                             h.sector * VFU_BLK_SECTOR, 0) != 0)
            return -1;
        *written = (uint32_t)r->writable_size;
        break;
    case VFU_BLK_OUT:
        if (vfu_blk_transfer(blk->fd, &r->iov[1], r->readable - 1, h.sector * VFU_BLK_SECTOR,
                             1) != 0)
            return -1;
        if (!blk->writeback && fdatasync(blk->fd) != 0)
            return -1;
        *written = 1;
        break;
    default: /* FLUSH */
        if (!blk->read_only && fdatasync(blk->fd) != 0)
            return -1;
        *written = 1;
        break;
    }
    *status = VFU_BLK_S_OK;
    return 0;
}
