# mitmproxy addon for scenario 4 of bench/run: connect to 127.0.0.1 when a client asks for
# bench.local (which has no DNS entry), keeping bench.local as the TLS server name. The port is
# the one the client asked for.


def server_connect(data):
    address = data.server.address
    if address and address[0] == "bench.local":
        data.server.sni = data.server.sni or "bench.local"
        data.server.address = ("127.0.0.1", address[1])
