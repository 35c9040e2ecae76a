"""Build script for vfiouserd._native, the small C part of the daemon.

Compiled once at install time (cffi API mode) so that nothing is compiled
after the daemon drops into its jail.
"""

from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
# The split-ring fast path (vfiouserd/) and the device handlers it calls
# (devices/), each next to the Python it stands in for. Their headers are
# the interface: compiled in, and declared to cffi as they are.
FAST_PATH_DIRS = [ROOT / "vfiouserd", ROOT / "devices"]
FAST_PATH_HEADERS = "".join(
    (directory / name).read_text()
    for directory, name in (
        (FAST_PATH_DIRS[0], "fastpath.h"),
        (FAST_PATH_DIRS[1], "blk_fastpath.h"),
        (FAST_PATH_DIRS[1], "net_fastpath.h"),
        (FAST_PATH_DIRS[1], "nvme/fastpath.h"),
    )
)
FAST_PATH = "".join(
    (directory / name).read_text()
    for directory, name in (
        (FAST_PATH_DIRS[0], "fastpath.c"),
        (FAST_PATH_DIRS[1], "blk_fastpath.c"),
        (FAST_PATH_DIRS[1], "net_fastpath.c"),
        (FAST_PATH_DIRS[1], "nvme/fastpath.c"),
    )
)

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

    uint64_t vfu_bitmap_set(uint8_t *bitmap, size_t bytes, uint64_t first, uint64_t last);
    void vfu_bitmap_take(uint8_t *bitmap, uint8_t *out, size_t bytes);

    #define CLONE_NEWUSER ...
    #define CLONE_NEWNS ...
    #define CLONE_NEWNET ...
    #define CLONE_NEWIPC ...
    #define CLONE_NEWUTS ...
    #define CLONE_NEWPID ...
    #define CLONE_THREAD ...
    #define MS_RDONLY ...
    #define MS_NOSUID ...
    #define MS_NODEV ...
    #define MS_NOEXEC ...
    #define MS_REMOUNT ...
    #define MS_BIND ...
    #define MS_REC ...
    #define MS_PRIVATE ...
    #define MNT_DETACH ...
    int unshare(int flags);
    int mount(const char *source, const char *target, const char *fstype,
              unsigned long flags, const void *data);
    int umount2(const char *target, int flags);
    int vfu_pivot_root(const char *new_root, const char *put_old);
    int vfu_same_file(int a, int b);

    int vfu_guard_install(void);
    int vfu_guard_add(void *base, size_t length);
    void vfu_guard_remove(void *base);
    uint64_t vfu_guard_hits(void);
    """
    + FAST_PATH_HEADERS
    + "struct vfu_request { ...; };\n"
)

ffibuilder.set_source(
    "vfiouserd._native",
    """
    #define _GNU_SOURCE
    #include <fcntl.h>
    #include <sched.h>
    #include <stdint.h>
    #include <sys/mman.h>
    #include <sys/mount.h>
    #include <sys/syscall.h>
    #include <unistd.h>

    /* glibc has no wrapper for pivot_root. */
    int vfu_pivot_root(const char *new_root, const char *put_old)
    {
        return (int)syscall(SYS_pivot_root, new_root, put_old);
    }

    /* 1 if two fds of this process share one open file (as systemd's fd
       store judges, keeping only the first), 0 if not, -1 with errno. */
    int vfu_same_file(int a, int b)
    {
        pid_t self = getpid();
        long order = syscall(SYS_kcmp, self, self, 0 /* KCMP_FILE */, a, b);
        return order < 0 ? -1 : order == 0;
    }

    /* Virtqueue ordering points: the driver runs on another CPU, so the
       device needs real fences where the virtio spec asks for barriers. */
    void vfu_fence_full(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    void vfu_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    void vfu_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

    /* Dirty page bitmaps: bit n (least significant first in byte n / 8)
       stands for page n. Bits are set with atomic ORs, since another process
       (the VMM reading and clearing, other back ends sharing QEMU's log) may
       touch the same bytes. Sets first..last inclusive; returns how many of
       those pages lie beyond the bitmap (they are not recorded). */
    uint64_t vfu_bitmap_set(uint8_t *bitmap, size_t bytes, uint64_t first, uint64_t last)
    {
        uint64_t outside = 0;
        uint64_t limit = (uint64_t)bytes * 8;
        if (last >= limit) {
            outside = last - (first > limit ? first : limit) + 1;
            if (first >= limit)
                return outside;
            last = limit - 1;
        }
        uint64_t page = first;
        while (page <= last) {
            uint64_t byte = page / 8;
            uint8_t mask = 0;
            while (page <= last && page / 8 == byte) {
                mask |= (uint8_t)(1u << (page % 8));
                page++;
            }
            __atomic_fetch_or(&bitmap[byte], mask, __ATOMIC_RELAXED);
        }
        return outside;
    }

    /* Copy a bitmap out and clear it, byte by byte atomically, so a bit set
       meanwhile is either in the copy or still in the bitmap. */
    void vfu_bitmap_take(uint8_t *bitmap, uint8_t *out, size_t bytes)
    {
        for (size_t i = 0; i < bytes; i++)
            out[i] = __atomic_exchange_n(&bitmap[i], 0, __ATOMIC_RELAXED);
    }

    /* SIGBUS guard for guest mappings. A VMM that truncates a file it shared
       makes every later touch of the lost pages raise SIGBUS. For addresses
       inside a registered guest mapping, the handler puts a private zero page
       in place, so the access completes, and counts the event; Python then
       fails the session. Faults anywhere else keep the default action. */
    #include <signal.h>
    #include <string.h>
    #include <unistd.h>

    #define GUARD_SLOTS 4096
    static struct { char *base; size_t length; } guard_ranges[GUARD_SLOTS];
    static uint64_t guard_hits;

    static void guard_handler(int sig, siginfo_t *info, void *context)
    {
        char *address = info->si_addr;
        (void)context;
        for (int i = 0; i < GUARD_SLOTS; i++) {
            char *base = __atomic_load_n(&guard_ranges[i].base, __ATOMIC_ACQUIRE);
            size_t length = __atomic_load_n(&guard_ranges[i].length, __ATOMIC_ACQUIRE);
            if (base && address >= base && address < base + length) {
                long page = sysconf(_SC_PAGESIZE);
                char *start = (char *)((uintptr_t)address & ~(uintptr_t)(page - 1));
                if (mmap(start, page, PROT_READ | PROT_WRITE,
                         MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) != MAP_FAILED) {
                    __atomic_add_fetch(&guard_hits, 1, __ATOMIC_RELAXED);
                    return;
                }
                break;
            }
        }
        signal(sig, SIG_DFL);  /* not ours: fault again, the default way */
    }

    int vfu_guard_install(void)
    {
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_sigaction = guard_handler;
        action.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&action.sa_mask);
        return sigaction(SIGBUS, &action, NULL);
    }

    int vfu_guard_add(void *base, size_t length)
    {
        for (int i = 0; i < GUARD_SLOTS; i++) {
            char *expected = NULL;  /* a free slot has base NULL and length 0 */
            if (__atomic_compare_exchange_n(&guard_ranges[i].base, &expected, (char *)base, 0,
                                            __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                __atomic_store_n(&guard_ranges[i].length, length, __ATOMIC_RELEASE);
                return 0;
            }
        }
        return -1;
    }

    void vfu_guard_remove(void *base)
    {
        for (int i = 0; i < GUARD_SLOTS; i++) {
            if (__atomic_load_n(&guard_ranges[i].base, __ATOMIC_ACQUIRE) == base) {
                __atomic_store_n(&guard_ranges[i].length, 0, __ATOMIC_RELEASE);
                __atomic_store_n(&guard_ranges[i].base, NULL, __ATOMIC_RELEASE);
            }
        }
    }

    uint64_t vfu_guard_hits(void) { return __atomic_load_n(&guard_hits, __ATOMIC_RELAXED); }
    """
    + FAST_PATH,
    include_dirs=[str(directory) for directory in FAST_PATH_DIRS],
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
