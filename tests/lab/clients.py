"""Client programs the tests run inside the lab (python -c SOURCE ARGS...)."""

# Shared by the programs below: read one whole response (the head, then Content-Length
# bytes), so that the next request on the connection starts on a clean stream.
READ_RESPONSE = r"""
def read_response(f):
    length = 0
    while True:
        line = f.readline()
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
        if line in (b"\r\n", b""):
            break
    f.read(length)
"""

# A keep-alive client: one request, then waits for a line on stdin, then two more on the same
# connection (for "the agent started after the connection was opened" tests).
KEEPALIVE_CLIENT = READ_RESPONSE + r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 80))
f = s.makefile("rb")
def get(path):
    s.sendall(("GET %s HTTP/1.1\r\nHost: k\r\n\r\n" % path).encode())
    read_response(f)
get("/latest/meta-data/instance-id")
print("first", flush=True)
sys.stdin.readline()
get("/latest/meta-data/ami-id")
get("/latest/meta-data/hostname")
print("done", flush=True)
"""
