/* relay: a netcat for the test guest, for AF_VSOCK (busybox has none) and
 * TCP (busybox's nc does not shut its sending side down at end of input).
 *
 *   relay vsock-connect CID PORT   connect, then relay stdin/stdout
 *   relay vsock-listen PORT        accept one connection, then relay
 *   relay tcp-connect IPV4 PORT    the same over TCP
 *   relay tcp-listen PORT
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
#include <arpa/inet.h>
#include <netinet/in.h>
#include <linux/vm_sockets.h>

static int fail(const char *what)
{
	fprintf(stderr, "relay: %s: %s\n", what, strerror(errno));
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

static int serve_one(int sock, struct sockaddr *address, socklen_t size)
{
	int peer, yes = 1;

	setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
	if (bind(sock, address, size) < 0)
		return fail("bind");
	if (listen(sock, 64) < 0)
		return fail("listen");
	peer = accept(sock, NULL, NULL);
	if (peer < 0)
		return fail("accept");
	close(sock);
	return relay(peer);
}

int main(int argc, char **argv)
{
	struct sockaddr_vm vsock = {.svm_family = AF_VSOCK};
	struct sockaddr_in tcp = {.sin_family = AF_INET};
	const char *mode = argc > 1 ? argv[1] : "";
	int sock;

	if (strncmp(mode, "vsock-", 6) == 0)
		sock = socket(AF_VSOCK, SOCK_STREAM, 0);
	else
		sock = socket(AF_INET, SOCK_STREAM, 0);
	if (sock < 0)
		return fail("socket");
	if (argc == 4 && strcmp(mode, "vsock-connect") == 0) {
		vsock.svm_cid = strtoul(argv[2], NULL, 10);
		vsock.svm_port = strtoul(argv[3], NULL, 10);
		if (connect(sock, (struct sockaddr *)&vsock, sizeof vsock) < 0)
			return fail("connect");
		return relay(sock);
	}
	if (argc == 3 && strcmp(mode, "vsock-listen") == 0) {
		vsock.svm_cid = VMADDR_CID_ANY;
		vsock.svm_port = strtoul(argv[2], NULL, 10);
		return serve_one(sock, (struct sockaddr *)&vsock, sizeof vsock);
	}
	if (argc == 4 && strcmp(mode, "tcp-connect") == 0) {
		if (inet_pton(AF_INET, argv[2], &tcp.sin_addr) != 1)
			return fail("address");
		tcp.sin_port = htons(strtoul(argv[3], NULL, 10));
		if (connect(sock, (struct sockaddr *)&tcp, sizeof tcp) < 0)
			return fail("connect");
		return relay(sock);
	}
	if (argc == 3 && strcmp(mode, "tcp-listen") == 0) {
		tcp.sin_addr.s_addr = htonl(INADDR_ANY);
		tcp.sin_port = htons(strtoul(argv[2], NULL, 10));
		return serve_one(sock, (struct sockaddr *)&tcp, sizeof tcp);
	}
	fprintf(stderr, "usage: relay vsock-connect CID PORT | vsock-listen PORT | "
		"tcp-connect IPV4 PORT | tcp-listen PORT\n");
	return 2;
}
