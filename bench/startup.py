#!/usr/bin/env python3
"""Start-up time to the first proxied response, for scenario 7 of bench/run.

RUNS times: starts COMMAND, then tries, every 0.5 ms, to connect to 127.0.0.1:PORT and send
`GET http://bench.local/` (absolute form) until a 200 comes back; the time from launching the
process to reading that 200 is one sample. The process is then stopped (SIGTERM, SIGKILL after
15 s) and the port must be free again before the next run. Prints one JSON line:
{"samples_ms": [...], "median_ms": M}. Exits 1 if a run gets no 200 within 20 s.
Usage: startup.py PORT RUNS LOG -- COMMAND...
"""
import json
import socket
import statistics
import subprocess
import sys
import time

REQUEST = b"GET http://bench.local/ HTTP/1.1\r\nHost: bench.local\r\nConnection: close\r\n\r\n"


def try_once(port):
    """Status of one request, or None if the proxy does not accept connections yet."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return None
    with s:
        try:
            s.sendall(REQUEST)
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return None
                data += chunk
        except OSError:
            return None
    return int(data.split(b"\r\n", 1)[0].split()[1])


def port_free(port):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
        return False
    except OSError:
        return True
    finally:
        s.close()


def main():
    port, runs, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    cmd = sys.argv[sys.argv.index("--") + 1 :]
    samples = []
    with open(log, "a") as logf:
        for run in range(runs):
            deadline = time.monotonic() + 10
            while not port_free(port):
                if time.monotonic() > deadline:
                    sys.exit(f"startup.py: port {port} still in use before run {run + 1}")
                time.sleep(0.05)
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
            statuses = set()
            try:
                while True:
                    status = try_once(port)
                    if status == 200:
                        samples.append((time.perf_counter() - t0) * 1000)
                        break
                    if status is not None:
                        statuses.add(status)
                    if proc.poll() is not None:
                        sys.exit(f"startup.py: {cmd[0]} exited with {proc.returncode} before a 200 (answers seen: {sorted(statuses)})")
                    if time.perf_counter() - t0 > 20:
                        sys.exit(f"startup.py: no 200 within 20 s (answers seen: {sorted(statuses)})")
                    time.sleep(0.0005)
            finally:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    print(json.dumps({"samples_ms": [round(x, 1) for x in samples], "median_ms": round(statistics.median(samples), 1)}))


if __name__ == "__main__":
    main()
