#!/usr/bin/env python3
"""A TCP forwarder on asyncio with uvloop: the fastest mainstream Python design, as a peer.

    python benchmarks/uvloop_forwarder.py LISTEN TARGET

Same command line and ``listening on HOST:PORT -> TARGET`` line as gproxy. Protocols,
not streams (the lean way to write it on asyncio): each side's data_received writes to
the other transport, with pause_reading/resume_reading for backpressure and
write_eof for half-close. SIGTERM stops it with exit status 0.
"""

import asyncio
import signal
import socket
import sys

import uvloop


def parse(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


class Side(asyncio.Protocol):
    def __init__(self):
        self.transport = None
        self.peer = None       # the other Side
        self.pending = []      # bytes that arrived before the peer connected
        self.eof = False

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        if self.peer is None or self.peer.transport is None:
            self.pending.append(data)
            self.transport.pause_reading()
        else:
            self.peer.transport.write(data)

    def eof_received(self):
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None:
            if peer.eof:  # both directions are done
                peer.transport.close()
                return False
            peer.transport.write_eof()
        return True  # keep our own write half open: the half-close dance

    def pause_writing(self):
        if self.peer and self.peer.transport:
            self.peer.transport.pause_reading()

    def resume_writing(self):
        if self.peer and self.peer.transport:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc):
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()


async def main():
    listen, target = parse(sys.argv[1]), parse(sys.argv[2])
    loop = asyncio.get_running_loop()

    async def on_client(client):
        upstream = Side()
        upstream.peer, client.peer = client, upstream
        try:
            await loop.create_connection(lambda: upstream, *target)
        except OSError:
            client.transport.close()
            return
        for data in client.pending:
            upstream.transport.write(data)
        client.pending.clear()
        if client.eof:
            upstream.transport.write_eof()
        client.transport.resume_reading()

    def factory():
        side = Side()
        original = side.connection_made

        def made(transport):
            original(transport)
            loop.create_task(on_client(side))
        side.connection_made = made
        return side

    server = await loop.create_server(factory, *listen, backlog=1024)
    host, port = server.sockets[0].getsockname()[:2]
    print("listening on %s:%d -> %s:%d" % (host, port, *target), file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    uvloop.run(main())
