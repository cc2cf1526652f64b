"""One address in front of several Prefect API servers: a TCP proxy with failover.

Workers, the webhook receiver and the CLI take one ``PREFECT_API_URL``. With two API
servers on one PostgreSQL database, this proxy is that URL: each new connection goes to
the next server in turn (round-robin, so the load is split), and a server that refuses the
connection (dead, restarting) is skipped for the next one. It works on TCP, not HTTP, so
Prefect's websockets (events in and out, log streaming) pass through unchanged; a
connection whose server dies is closed, and the client's reconnect lands on a live one.

    python -m rollback_runbook.api_proxy --listen 127.0.0.1:4200 \
        --upstream 127.0.0.1:4201 --upstream 127.0.0.1:4202
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import time

log = logging.getLogger("rollback_runbook.api_proxy")

#: a server that refused a connection is not tried again for this long (unless all are down)
RETRY_AFTER = 2.0
CONNECT_TIMEOUT = 3.0


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a host:port address: {text!r}")
    return host, int(port)


class Proxy:
    def __init__(self, upstreams: list[tuple[str, int]]):
        if not upstreams:
            raise ValueError("the proxy needs at least one upstream server")
        self.upstreams = upstreams
        self._turn = itertools.cycle(range(len(upstreams)))
        self._down_until = [0.0] * len(upstreams)
        self.connections = [0] * len(upstreams)  # served connections per upstream

    def _order(self) -> list[int]:
        first = next(self._turn)
        order = [(first + i) % len(self.upstreams) for i in range(len(self.upstreams))]
        now = time.monotonic()
        return sorted(order, key=lambda i: self._down_until[i] > now)  # live ones first

    async def _connect(self) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
        errors = []
        for i in self._order():
            host, port = self.upstreams[i]
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError) as e:
                self._down_until[i] = time.monotonic() + RETRY_AFTER
                errors.append(f"{host}:{port}: {e}")
                continue
            self._down_until[i] = 0.0
            self.connections[i] += 1
            return i, reader, writer
        raise ConnectionError("no API server answered: " + "; ".join(errors))

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        try:
            _i, up_r, up_w = await self._connect()
        except ConnectionError as e:
            log.warning("%s", e)
            client_w.close()
            return
        try:
            await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))
        finally:
            for w in (up_w, client_w):
                with contextlib.suppress(Exception):
                    w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()


async def serve(listen: tuple[str, int], upstreams: list[tuple[str, int]]) -> None:
    proxy = Proxy(upstreams)
    server = await asyncio.start_server(proxy.handle, *listen)
    log.info("proxy on %s:%s -> %s", *listen, upstreams)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", required=True, help="host:port to listen on")
    parser.add_argument("--upstream", action="append", required=True, help="host:port")
    args = parser.parse_args(argv)
    try:
        listen = parse_address(args.listen)
        upstreams = [parse_address(u) for u in args.upstream]
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(listen, upstreams))


if __name__ == "__main__":
    main()
