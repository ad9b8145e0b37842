/* A static musl C server for the kernel-session tests: binds 127.0.0.1:PORT (TCP) with
 * SO_REUSEADDR (as servers do, so connections of an earlier server in TIME_WAIT do not keep it
 * off the port), prints "listening ACTUAL", and answers every connection with NAME. No
 * LD_PRELOAD shim reaches it. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: server PORT NAME\n");
        return 2;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[1]));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("bind");
        return 1;
    }
    if (listen(fd, 16) != 0) {
        perror("listen");
        return 1;
    }
    socklen_t len = sizeof addr;
    getsockname(fd, (struct sockaddr *)&addr, &len);
    printf("listening %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) continue;
        char request[1024];
        (void)read(c, request, sizeof request);
        char reply[256];
        int n = snprintf(reply, sizeof reply, "HTTP/1.0 200 OK\r\nContent-Length: %zu\r\n\r\n%s", strlen(argv[2]), argv[2]);
        (void)write(c, reply, (size_t)n);
        close(c);
    }
}
