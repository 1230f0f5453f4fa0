#!/usr/bin/env python3
"""Upload sink for scenario 3 of bench/run: nginx's /upload streams request bodies here.

Listens on 127.0.0.1:PORT, reads each request's body (Content-Length or chunked), throws it away
and answers 200 with the number of body bytes received; also appends that number to LOG.
Usage: upload_sink.py PORT LOG
"""
import socket
import sys
import threading

BUF = 1 << 20


def read_head(conn, pending):
    while b"\r\n\r\n" not in pending:
        data = conn.recv(65536)
        if not data:
            return None, b""
        pending += data
    head, rest = pending.split(b"\r\n\r\n", 1)
    return head.decode("latin-1"), rest


def serve(conn, log):
    pending = b""
    buf = bytearray(BUF)
    view = memoryview(buf)
    with conn:
        while True:
            head, pending = read_head(conn, pending)
            if head is None:
                return
            headers = {}
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            received = 0
            if "content-length" in headers:
                left = int(headers["content-length"])
                take = min(left, len(pending))
                received += take
                left -= take
                pending = pending[take:]
                while left > 0:
                    n = conn.recv_into(view[: min(BUF, left)])
                    if n == 0:
                        return
                    received += n
                    left -= n
            elif "chunked" in headers.get("transfer-encoding", "").lower():
                while True:
                    while b"\r\n" not in pending:
                        data = conn.recv(65536)
                        if not data:
                            return
                        pending += data
                    size_line, pending = pending.split(b"\r\n", 1)
                    size = int(size_line.split(b";")[0], 16)
                    need = size + 2  # chunk data and its CRLF (for size 0: the final CRLF)
                    take = min(need, len(pending))
                    pending = pending[take:]
                    need -= take
                    while need > 0:
                        n = conn.recv_into(view[: min(BUF, need)])
                        if n == 0:
                            return
                        need -= n
                    received += size
                    if size == 0:
                        break
            body = f"{received}\n".encode()
            with open(log, "a") as f:
                f.write(f"{received}\n")
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )


def main():
    port, log = int(sys.argv[1]), sys.argv[2]
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn, log), daemon=True).start()


if __name__ == "__main__":
    main()
