"""Build script for vfiouserd._native, the small C part of the daemon.

Compiled once at install time (cffi API mode) so that nothing is compiled
after the daemon drops into its jail.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    #define PROT_READ ...
    #define PROT_WRITE ...
    #define MAP_SHARED ...
    #define FALLOC_FL_KEEP_SIZE ...
    #define FALLOC_FL_PUNCH_HOLE ...
    #define FALLOC_FL_ZERO_RANGE ...

    void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset);
    int munmap(void *addr, size_t length);
    int fallocate(int fd, int mode, int64_t offset, int64_t len);

    void vfu_fence_full(void);
    void vfu_fence_acquire(void);
    void vfu_fence_release(void);
    """
)

ffibuilder.set_source(
    "vfiouserd._native",
    """
    #define _GNU_SOURCE
    #include <fcntl.h>
    #include <stdint.h>
    #include <sys/mman.h>

    /* Virtqueue ordering points: the driver runs on another CPU, so the
       device needs real fences where the virtio spec asks for barriers. */
    void vfu_fence_full(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    void vfu_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    void vfu_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
