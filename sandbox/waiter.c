/*
 * The jail's waiter: the process that stays outside the jailed daemon's PID
 * namespace (sandbox/jail.py starts it).
 *
 * Were the daemon's parent to stay a Python interpreter, it would keep a
 * copy of the daemon's whole heap, which turns into private memory as the
 * daemon writes its own. So it gives up what the daemon alone needs and
 * executes this program by fd; its root is empty by then, so the program
 * is linked statically (no loader, no library to find there). It
 *
 *   - relays SIGTERM, SIGINT and SIGHUP to the daemon,
 *   - tells systemd READY=1 (with its own pid as MAINPID) once the daemon
 *     writes "1" on the readiness pipe ("0": nothing to tell, an upgrade's
 *     successor that took over: the daemon it succeeded named it the main
 *     process; with successor=1 the socket files stay unless it did),
 *   - passes the daemon's notifications (the fd store) on to systemd, which
 *     listens to the main process only,
 *   - at the end removes the daemon's socket files, unless a notification
 *     stored one of the sockets named "keep" (the next daemon listens there)
 *     or named a successor as the main process (an upgrade in place),
 *   - exits with the daemon's status (128 + the signal that killed it),
 *   - drops its read-only pages whenever it goes back to waiting,
 *
 * under the seccomp filter the daemon built for it (seccomp.reaper_policy),
 * loaded before any of the daemon's messages is read. It never allocates:
 * that filter has no mmap or brk.
 *
 * Arguments, one key=value each (child, ready and pidfd are required):
 *   child=PID ready=FD pidfd=FD relay=FD notify=FD filter=FD utc_offset=S
 *   successor=0|1
 *   socket=DIRFD:DEV:INO:NAME (repeated)  keep=FDNAME (repeated)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_SOCKETS 8
#define MAX_KEPT 8
#define MAX_FDS 253 /* SCM_MAX_FD: the most one message carries */
#define MESSAGE_MAX 4096

struct socket_file {
    int directory;
    unsigned long long device, inode;
    const char *name;
};

static struct {
    pid_t child;
    int ready, pidfd, relay, notify, filter;
    long utc_offset;
    struct socket_file sockets[MAX_SOCKETS];
    int socket_count;
    const char *kept[MAX_KEPT];
    int kept_count;
    int successor; /* the socket files are another daemon's until the readiness byte */
    bool ready_seen;
} w = {.child = -1, .ready = -1, .pidfd = -1, .relay = -1, .notify = -1, .filter = -1};

static const int stop_signals[] = {SIGTERM, SIGINT, SIGHUP};

/* -- logfmt lines on stderr, as vfiouserd.log writes them (no stdio: it may
 * allocate, and the filter has no mmap) --------------------------------- */

struct line {
    char text[1024];
    size_t used;
};

static void put(struct line *line, const char *text)
{
    size_t length = strlen(text);
    size_t room = sizeof(line->text) - 1 - line->used;
    if (length > room)
        length = room;
    memcpy(line->text + line->used, text, length);
    line->used += length;
}

static void put_number(struct line *line, long long value, int width)
{
    char digits[24];
    int count = 0;
    unsigned long long magnitude = value < 0 ? -(unsigned long long)value : (unsigned long long)value;
    do {
        digits[count++] = (char)('0' + magnitude % 10);
        magnitude /= 10;
    } while (magnitude);
    while (count < width)
        digits[count++] = '0';
    if (value < 0)
        put(line, "-");
    char text[24];
    for (int i = 0; i < count; i++)
        text[i] = digits[count - 1 - i];
    text[count] = '\0';
    put(line, text);
}

static bool is_leap(long long year)
{
    return (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
}

/* The local time as the daemon saw its offset: glibc's own conversion
 * would read /etc/localtime, which is neither there nor allowed. */
static void put_time(struct line *line)
{
    static const int month_days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    long long seconds = (long long)now.tv_sec + w.utc_offset;
    long long days = seconds / 86400, in_day = seconds % 86400;
    if (in_day < 0) {
        in_day += 86400;
        days--;
    }
    long long year = 1970;
    while (days < 0)
        days += is_leap(--year) ? 366 : 365;
    while (days >= (is_leap(year) ? 366 : 365))
        days -= is_leap(year++) ? 366 : 365;
    int month = 0;
    while (days >= month_days[month] + (month == 1 && is_leap(year))) {
        days -= month_days[month] + (month == 1 && is_leap(year));
        month++;
    }
    put(line, "ts=");
    put_number(line, year, 4);
    put(line, "-");
    put_number(line, month + 1, 2);
    put(line, "-");
    put_number(line, days + 1, 2);
    put(line, "T");
    put_number(line, in_day / 3600, 2);
    put(line, ":");
    put_number(line, in_day / 60 % 60, 2);
    put(line, ":");
    put_number(line, in_day % 60, 2);
    put(line, ".");
    put_number(line, now.tv_nsec / 1000000, 3);
}

/* key=value, quoted when the value has more than vfiouserd.log leaves bare. */
static void put_field(struct line *line, const char *key, const char *value)
{
    bool bare = *value != '\0';
    for (const char *c = value; *c; c++)
        if (!(('a' <= *c && *c <= 'z') || ('A' <= *c && *c <= 'Z') || ('0' <= *c && *c <= '9') ||
              strchr("._-/:+,[]", *c)))
            bare = false;
    put(line, " ");
    put(line, key);
    put(line, bare ? "=" : "=\"");
    if (bare) {
        put(line, value);
        return;
    }
    for (const char *c = value; *c; c++) {
        char one[3] = {*c, '\0', '\0'};
        if (*c == '\\' || *c == '"')
            one[0] = '\\', one[1] = *c;
        else if (*c == '\n')
            one[0] = '\\', one[1] = 'n';
        put(line, one);
    }
    put(line, "\"");
}

/* One event with up to two fields (NULL keys end the list). */
static void log_event(const char *level, const char *event, const char *key, const char *value,
                      const char *key2, const char *value2)
{
    int saved = errno;
    struct line line = {.used = 0};
    put_time(&line);
    put(&line, " level=");
    put(&line, level);
    put(&line, " event=");
    put(&line, event);
    if (key)
        put_field(&line, key, value);
    if (key2)
        put_field(&line, key2, value2);
    line.text[line.used++] = '\n';
    ssize_t ignored = write(STDERR_FILENO, line.text, line.used);
    (void)ignored;
    errno = saved;
}

/* As Python words an OSError: "[Errno 1] Operation not permitted". */
static const char *os_error(int error, char *buffer, size_t size)
{
    struct line line = {.used = 0};
    put(&line, "[Errno ");
    put_number(&line, error, 1);
    put(&line, "] ");
    const char *description = strerrordesc_np(error);
    put(&line, description ? description : "Unknown error");
    line.text[line.used] = '\0';
    size_t length = line.used < size - 1 ? line.used : size - 1;
    memcpy(buffer, line.text, length);
    buffer[length] = '\0';
    return buffer;
}

static const char *signal_name(int signum, char buffer[static 32])
{
    const char *abbreviation = sigabbrev_np(signum);
    struct line line = {.used = 0};
    if (abbreviation) {
        put(&line, "SIG");
        put(&line, abbreviation);
    } else {
        put_number(&line, signum, 1);
    }
    size_t length = line.used < 31 ? line.used : 31;
    memcpy(buffer, line.text, length);
    buffer[length] = '\0';
    return buffer;
}

/* -- the daemon's signals, readiness and notifications ------------------- */

static void relay_signal(int signum)
{
    if (kill(w.child, signum) < 0) { /* the daemon is gone already */
        char name[32], error[128];
        log_event("warning", "signal.relay_failed", "signal", signal_name(signum, name), "error",
                  os_error(errno, error, sizeof(error)));
    }
}

static void hold_signals(bool hold)
{
    sigset_t set;
    sigemptyset(&set);
    for (size_t i = 0; i < sizeof(stop_signals) / sizeof(*stop_signals); i++)
        sigaddset(&set, stop_signals[i]);
    sigprocmask(hold ? SIG_BLOCK : SIG_UNBLOCK, &set, NULL);
}

static void notify_ready(void)
{
    struct line message = {.used = 0};
    put(&message, "READY=1\nMAINPID=");
    put_number(&message, getpid(), 1);
    if (w.notify >= 0 && write(w.notify, message.text, message.used) < 0) {
        char error[128];
        log_event("warning", "sd_notify.failed", "error", os_error(errno, error, sizeof(error)),
                  NULL, NULL);
    }
}

/* Whether the daemon's sockets live on after it: it put one of the kept
 * sockets in the fd store, or handed everything to a successor daemon
 * (vfiouserd.upgrade), now the service's main process (MAINPID=). */
static bool stores_a_kept_socket(const char *message, size_t length)
{
    if (memmem(message, length, "MAINPID=", 8))
        return true;
    for (int i = 0; i < w.kept_count; i++) {
        struct line wanted = {.used = 0};
        put(&wanted, "FDNAME=");
        put(&wanted, w.kept[i]);
        put(&wanted, "\n");
        if (memmem(message, length, wanted.text, wanted.used))
            return true;
    }
    return false;
}

/* Pass every notification waiting on the relay on to systemd. Returns
 * whether one put a kept socket in the fd store; *broken when the relay
 * fails otherwise than by being empty (not to be polled again). */
static bool pass_on(bool *broken)
{
    bool stored = false;
    for (;;) {
        char message[MESSAGE_MAX];
        union {
            struct cmsghdr align;
            char space[CMSG_SPACE(MAX_FDS * sizeof(int))];
        } control;
        struct iovec vector = {.iov_base = message, .iov_len = sizeof(message)};
        struct msghdr header = {.msg_iov = &vector,
                                .msg_iovlen = 1,
                                .msg_control = control.space,
                                .msg_controllen = sizeof(control.space)};
        ssize_t length = recvmsg(w.relay, &header, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (length < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                *broken = true;
            return stored;
        }
        int fds[MAX_FDS], count = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&header); c; c = CMSG_NXTHDR(&header, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            if (n > MAX_FDS - count)
                n = MAX_FDS - count;
            memcpy(fds + count, CMSG_DATA(c), (size_t)n * sizeof(int));
            count += n;
        }
        if (w.notify >= 0) {
            union {
                struct cmsghdr align;
                char space[CMSG_SPACE(MAX_FDS * sizeof(int))];
            } rights;
            struct iovec out_vector = {.iov_base = message, .iov_len = (size_t)length};
            struct msghdr out = {.msg_iov = &out_vector, .msg_iovlen = 1};
            if (count) {
                memset(&rights, 0, sizeof(rights));
                out.msg_control = rights.space;
                out.msg_controllen = CMSG_SPACE((size_t)count * sizeof(int));
                struct cmsghdr *c = CMSG_FIRSTHDR(&out);
                c->cmsg_level = SOL_SOCKET;
                c->cmsg_type = SCM_RIGHTS;
                c->cmsg_len = CMSG_LEN((size_t)count * sizeof(int));
                memcpy(CMSG_DATA(c), fds, (size_t)count * sizeof(int));
            }
            if (sendmsg(w.notify, &out, MSG_NOSIGNAL) < 0) {
                char error[128];
                log_event("warning", "sd_notify.failed", "error",
                          os_error(errno, error, sizeof(error)), NULL, NULL);
            } else {
                stored |= stores_a_kept_socket(message, (size_t)length);
            }
        }
        for (int i = 0; i < count; i++)
            close(fds[i]);
    }
}

/* Linked statically, the program is mostly glibc's start-up code and data,
 * which never run or are read again; mapped, their pages would count against
 * the device for as long as it runs (0.6 of its 0.7 MiB). Each time it goes
 * back to waiting, the pages of its read-only segments are dropped (read
 * again from the page cache when used). Never those of a writable segment:
 * they hold what the program wrote. Nor the pages of wait_quietly, which
 * drops the others and waits: code that ran after the drop would fault its
 * pages back, and the kernel maps up to 64 KiB around each fault (0.2 MiB
 * stayed when the C library's poll() and the loop around it did). */
#define MAX_DROPPED 16
static struct {
    uintptr_t start, end;
} dropped[MAX_DROPPED];
static size_t dropped_count;

/* wait_quietly's own section: the linker names where it starts and ends. */
#define QUIET_SECTION __attribute__((section("waiter_quiet"), noinline))
extern const char __start_waiter_quiet[], __stop_waiter_quiet[];

static void plan_dropping(void)
{
    const ElfW(Phdr) *headers = (const ElfW(Phdr) *)getauxval(AT_PHDR);
    size_t count = getauxval(AT_PHNUM);
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), bias = 0;
    if (headers == NULL)
        return;
    for (size_t i = 0; i < count; i++)
        if (headers[i].p_type == PT_PHDR) /* where it was loaded (position independent) */
            bias = (uintptr_t)headers - headers[i].p_vaddr;
    uintptr_t kept_start = (uintptr_t)__start_waiter_quiet & ~(page - 1);
    uintptr_t kept_end = ((uintptr_t)__stop_waiter_quiet + page - 1) & ~(page - 1);
    for (size_t i = 0; i < count; i++) {
        if (headers[i].p_type != PT_LOAD || headers[i].p_flags & PF_W)
            continue;
        /* Whole pages only: a page shared with a writable segment stays. */
        uintptr_t start = (bias + headers[i].p_vaddr + page - 1) & ~(page - 1);
        uintptr_t end = (bias + headers[i].p_vaddr + headers[i].p_memsz) & ~(page - 1);
        uintptr_t pieces[2][2] = {{start, end}, {0, 0}};
        if (kept_start < end && kept_end > start) { /* the segment around the kept pages */
            pieces[0][1] = kept_start > start ? kept_start : start;
            pieces[1][0] = kept_end < end ? kept_end : end;
            pieces[1][1] = end;
        }
        for (size_t j = 0; j < 2; j++)
            if (pieces[j][1] > pieces[j][0] && dropped_count < MAX_DROPPED) {
                dropped[dropped_count].start = pieces[j][0];
                dropped[dropped_count].end = pieces[j][1];
                dropped_count++;
            }
    }
}

#if defined(__x86_64__)
/* A system call without the C library, whose code is on pages dropped. */
static inline long direct_syscall(long number, long a, long b, long c)
{
    long result;
    __asm__ volatile("syscall"
                     : "=a"(result)
                     : "a"(number), "D"(a), "S"(b), "d"(c)
                     : "rcx", "r11", "memory");
    return result;
}

/* Drop the pages planned, then poll(fds, count, -1), touching no other page
 * of code: the wait costs the device none of them. */
static QUIET_SECTION int wait_quietly(struct pollfd *fds, nfds_t count)
{
    for (size_t i = 0; i < dropped_count; i++)
        direct_syscall(SYS_madvise, (long)dropped[i].start,
                       (long)(dropped[i].end - dropped[i].start), MADV_DONTNEED);
    long result = direct_syscall(SYS_poll, (long)fds, (long)count, -1);
    if (result < 0) {
        errno = (int)-result;
        return -1;
    }
    return (int)result;
}
#else
static QUIET_SECTION int wait_quietly(struct pollfd *fds, nfds_t count)
{
    for (size_t i = 0; i < dropped_count; i++)
        madvise((void *)dropped[i].start, dropped[i].end - dropped[i].start, MADV_DONTNEED);
    return poll(fds, count, -1);
}
#endif

/* Until the daemon exits: readiness and notifications. Returns whether it
 * put a kept socket in the fd store (then its files must stay). */
static bool watch(void)
{
    enum { READY, EXITED, RELAY };
    struct pollfd polled[3] = {
        [READY] = {.fd = w.ready, .events = POLLIN},
        [EXITED] = {.fd = w.pidfd, .events = POLLIN},
        [RELAY] = {.fd = w.relay, .events = POLLIN},
    };
    bool stored = false, broken = false;
    for (;;) {
        if (wait_quietly(polled, 3) < 0) { /* with the pages the last round used dropped */
            if (errno == EINTR || errno == ENOMEM) /* a relayed signal; try again */
                continue;
            break; /* cannot wait any more: reap (blocking) below */
        }
        if (polled[READY].revents) {
            char byte = 0;
            if (read(w.ready, &byte, 1) == 1) {
                w.ready_seen = true;
                if (byte == '1')
                    notify_ready();
            }
            close(w.ready);
            polled[READY].fd = -1;
        }
        bool exited = polled[EXITED].revents != 0;
        if (w.relay >= 0 && (polled[RELAY].revents || exited)) {
            stored |= pass_on(&broken);
            if (broken)
                polled[RELAY].fd = -1;
        }
        if (exited)
            break;
    }
    return stored;
}

static void remove_socket_files(void)
{
    for (int i = 0; i < w.socket_count; i++) {
        const struct socket_file *s = &w.sockets[i];
        struct stat info;
        /* only while it is the file this daemon created, not a successor's */
        if (fstatat(s->directory, s->name, &info, AT_SYMLINK_NOFOLLOW) == 0 &&
            info.st_dev == s->device && info.st_ino == s->inode)
            unlinkat(s->directory, s->name, 0);
    }
}

static int load_filter(void)
{
    static struct sock_filter program[BPF_MAXINSNS + 1];
    size_t size = 0;
    for (;;) {
        ssize_t got = pread(w.filter, (char *)program + size, sizeof(program) - size, (off_t)size);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            return -1;
        if (got == 0)
            break;
        size += (size_t)got;
        if (size == sizeof(program))
            break;
    }
    close(w.filter);
    if (size == 0 || size % sizeof(*program) || size / sizeof(*program) > BPF_MAXINSNS) {
        errno = EINVAL;
        return -1;
    }
    struct sock_fprog filter = {.len = (unsigned short)(size / sizeof(*program)), .filter = program};
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &filter);
}

/* The daemon is a zombie once its pidfd polls readable: its pid cannot be
 * reused, so a relayed signal cannot reach another process. Hold the
 * signals, reap, clean up, and exit as the daemon did. */
static _Noreturn void reap_and_exit(bool keep_sockets)
{
    int status = 0;
    hold_signals(true);
    while (waitpid(w.child, &status, 0) < 0 && errno == EINTR)
        ;
    if (!keep_sockets)
        remove_socket_files();
    if (WIFSIGNALED(status)) {
        char name[32];
        log_event("error", "daemon.killed", "signal", signal_name(WTERMSIG(status), name), NULL,
                  NULL);
        _exit(128 + WTERMSIG(status));
    }
    _exit(WEXITSTATUS(status));
}

/* -- arguments ------------------------------------------------------------ */

static bool number(const char *text, long long *value, char stop)
{
    char *end;
    errno = 0;
    *value = strtoll(text, &end, 10);
    return end != text && *end == stop && errno == 0;
}

/* The value of "key=..." in argument, or NULL. (argv stays as it is: it
 * is what /proc/PID/cmdline shows.) */
static const char *value_of(const char *argument, const char *key)
{
    size_t length = strlen(key);
    return strncmp(argument, key, length) == 0 && argument[length] == '=' ? argument + length + 1
                                                                          : NULL;
}

static bool parse_socket(const char *value)
{
    if (w.socket_count == MAX_SOCKETS)
        return false;
    struct socket_file *s = &w.sockets[w.socket_count++];
    long long directory;
    char *end;
    if (!number(value, &directory, ':'))
        return false;
    s->directory = (int)directory;
    s->device = strtoull(strchr(value, ':') + 1, &end, 10);
    if (*end != ':')
        return false;
    s->inode = strtoull(end + 1, &end, 10);
    if (*end != ':' || !end[1])
        return false;
    s->name = end + 1;
    return true;
}

static bool parse(int argc, char **argv)
{
    static const struct {
        const char *key;
        int *value;
    } numbers[] = {
        {"child", &w.child}, {"ready", &w.ready},   {"pidfd", &w.pidfd},
        {"relay", &w.relay}, {"notify", &w.notify}, {"filter", &w.filter},
        {"successor", &w.successor},
    };
    for (int i = 1; i < argc; i++) {
        const char *value;
        long long n;
        bool known = false;
        if ((value = value_of(argv[i], "socket"))) {
            known = parse_socket(value);
        } else if ((value = value_of(argv[i], "keep"))) {
            known = w.kept_count < MAX_KEPT && strlen(value) <= 255;
            if (known)
                w.kept[w.kept_count++] = value;
        } else if ((value = value_of(argv[i], "utc_offset"))) {
            known = number(value, &n, '\0') && n > -86400 && n < 86400;
            w.utc_offset = (long)n;
        }
        for (size_t k = 0; k < sizeof(numbers) / sizeof(*numbers); k++) {
            if ((value = value_of(argv[i], numbers[k].key))) {
                known = number(value, &n, '\0') && n >= 0 && n <= INT32_MAX;
                *numbers[k].value = (int)n;
            }
        }
        if (!known)
            return false;
    }
    return w.child > 0 && w.ready >= 0 && w.pidfd >= 0;
}

static _Noreturn void fail(const char *step, const char *error, const char *way_out)
{
    struct line message = {.used = 0};
    put(&message, "cannot finish the jail: step '");
    put(&message, step);
    put(&message, "' failed: ");
    put(&message, error);
    put(&message, "; ");
    put(&message, way_out);
    put(&message, " runs the daemon without it (not recommended)");
    message.text[message.used] = '\0';
    log_event("error", "sandbox.failed", "error", message.text, NULL, NULL);
    hold_signals(true);
    if (w.child > 0) {
        kill(w.child, SIGKILL);
        while (waitpid(w.child, NULL, 0) < 0 && errno == EINTR)
            ;
    }
    remove_socket_files();
    _exit(1);
}

int main(int argc, char **argv)
{
    if (!parse(argc, argv))
        fail("parent: waiter arguments", "unexpected arguments", "--sandbox=none");
    prctl(PR_SET_DUMPABLE, 0); /* the exec made it dumpable again */
    prctl(PR_SET_NAME, "vfiouserd-wait");
    /* Not ignored (that would reap the daemon for us, and lose its status). */
    signal(SIGCHLD, SIG_DFL);
    struct sigaction relay = {.sa_handler = relay_signal};
    sigemptyset(&relay.sa_mask);
    for (size_t i = 0; i < sizeof(stop_signals) / sizeof(*stop_signals); i++)
        sigaddset(&relay.sa_mask, stop_signals[i]);
    for (size_t i = 0; i < sizeof(stop_signals) / sizeof(*stop_signals); i++)
        sigaction(stop_signals[i], &relay, NULL);
    plan_dropping();
    if (w.filter >= 0 && load_filter() < 0) {
        char error[128];
        fail("parent: seccomp filter", os_error(errno, error, sizeof(error)),
             "--sandbox=namespace (or --seccomp=none)");
    }
    /* Held since the daemon started: the ones that came meanwhile are
     * relayed now. */
    hold_signals(false);
    bool keep = watch();
    /* An upgrade's successor that never took over: the files are still the
     * running daemon's, which serves on. */
    reap_and_exit(keep || (w.successor && !w.ready_seen));
}
