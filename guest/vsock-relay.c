/* vsock-relay: a netcat for AF_VSOCK in the test guest (busybox has none).
 *
 *   vsock-relay connect CID PORT   connect, then relay stdin/stdout
 *   vsock-relay listen PORT        accept one connection, then relay
 *
 * Relaying copies stdin to the socket and the socket to stdout; at the end
 * of stdin the socket's sending side is shut down, and the program exits
 * once the peer has shut its side (or reset the connection). Exit status:
 * 0 after a clean end, 1 on an error (the message says which), 2 on usage.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int fail(const char *what)
{
	fprintf(stderr, "vsock-relay: %s: %s\n", what, strerror(errno));
	return 1;
}

static int write_all(int fd, const char *data, ssize_t size)
{
	while (size > 0) {
		ssize_t done = write(fd, data, size);
		if (done < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		data += done;
		size -= done;
	}
	return 0;
}

static int relay(int sock)
{
	static char buffer[65536];
	struct pollfd fds[2] = {{.fd = 0, .events = POLLIN}, {.fd = sock, .events = POLLIN}};
	int input_open = 1;

	for (;;) {
		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return fail("poll");
		}
		if (input_open && fds[0].revents) {
			ssize_t got = read(0, buffer, sizeof buffer);
			if (got < 0)
				return fail("reading stdin");
			if (got == 0) {
				input_open = 0;
				fds[0].fd = -1;
				if (shutdown(sock, SHUT_WR) < 0)
					return fail("shutdown");
			} else if (write_all(sock, buffer, got) < 0) {
				return fail("sending");
			}
		}
		if (fds[1].revents) {
			ssize_t got = read(sock, buffer, sizeof buffer);
			if (got < 0)
				return fail("receiving");
			if (got == 0)
				return 0;
			if (write_all(1, buffer, got) < 0)
				return fail("writing stdout");
		}
	}
}

int main(int argc, char **argv)
{
	struct sockaddr_vm address = {.svm_family = AF_VSOCK};
	int sock = socket(AF_VSOCK, SOCK_STREAM, 0);

	if (sock < 0)
		return fail("socket");
	if (argc == 4 && strcmp(argv[1], "connect") == 0) {
		address.svm_cid = strtoul(argv[2], NULL, 10);
		address.svm_port = strtoul(argv[3], NULL, 10);
		if (connect(sock, (struct sockaddr *)&address, sizeof address) < 0)
			return fail("connect");
		return relay(sock);
	}
	if (argc == 3 && strcmp(argv[1], "listen") == 0) {
		int peer;
		address.svm_cid = VMADDR_CID_ANY;
		address.svm_port = strtoul(argv[2], NULL, 10);
		if (bind(sock, (struct sockaddr *)&address, sizeof address) < 0)
			return fail("bind");
		if (listen(sock, 64) < 0)
			return fail("listen");
		peer = accept(sock, NULL, NULL);
		if (peer < 0)
			return fail("accept");
		close(sock);
		return relay(peer);
	}
	fprintf(stderr, "usage: vsock-relay connect CID PORT | vsock-relay listen PORT\n");
	return 2;
}
