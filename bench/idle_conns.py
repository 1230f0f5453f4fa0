#!/usr/bin/env python3
"""Open idle client connections to a forward proxy, for scenario 6 of bench/run.

Opens COUNT connections to 127.0.0.1:PORT and sends one request on each
(`GET http://bench.local/`, absolute form, keep-alive), BATCH connections at a time, reads each
response, and keeps every connection open. Then prints one JSON line
({"opened": N, "ok": N_200, "statuses": {...}, "closed": N_closed_by_proxy}) and waits until it
is killed, holding the connections open and idle.
Usage: idle_conns.py PORT COUNT [BATCH]
"""
import json
import signal
import socket
import sys

REQUEST = b"GET http://bench.local/ HTTP/1.1\r\nHost: bench.local\r\n\r\n"


def read_response(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status


def main():
    port, count = int(sys.argv[1]), int(sys.argv[2])
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    socks, statuses, ok = [], {}, 0
    for start in range(0, count, batch):
        group = []
        for _ in range(min(batch, count - start)):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(REQUEST)
            group.append(s)
        for s in group:
            status = read_response(s)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            ok += status == 200
        socks.extend(group)
    # A connection the proxy closed after its response reads as EOF now.
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
    print(json.dumps({"opened": len(socks), "ok": ok, "statuses": statuses, "closed": closed}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
