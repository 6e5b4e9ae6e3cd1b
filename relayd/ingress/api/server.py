"""The API on aiohttp's server, in the ingress process's event loop, on sockets the queue process
bound before the fork (as the SMTP listeners). aiohttp because its server embeds in a running
loop on a given socket without taking over signals, bounds request bodies itself, and is the
client relayd's webhooks use as well (see benchmarks/http_stack.md for the measured choice)."""

from __future__ import annotations

import socket
import ssl

from aiohttp import web

from relayd.ingress.api.service import Api, Refused, Reply, Request


class HttpServer:
    """Serves ``api`` on the given listening sockets until ``close``."""

    def __init__(self, api: Api, max_body_size: int, shutdown_timeout: float) -> None:
        self.api = api
        app = web.Application(client_max_size=max_body_size + 1, handler_args={"access_log": None})
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=shutdown_timeout
        )
        self.sites: list[web.SockSite] = []

    async def start(self, socks: list[tuple[socket.socket, ssl.SSLContext | None]]) -> None:
        await self.runner.setup()
        for sock, context in socks:
            site = web.SockSite(self.runner, sock, ssl_context=context, backlog=1024)
            await site.start()
            self.sites.append(site)

    async def close(self) -> None:
        """Stop listening; requests in flight finish (up to the shutdown timeout)."""
        await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            reply = Refused(413, "Content too large", "the body is over the limit", "body")
            return _response(reply.reply(request.path))
        peer = request.transport.get_extra_info("peername") if request.transport else None
        req = Request(
            request.method,
            request.path,
            dict(request.query),
            {k.lower(): v for k, v in request.headers.items()},
            body,
            peer[0] if peer else "",
        )
        return _response(await self.api.handle(req))


def _response(reply: Reply) -> web.Response:
    return web.Response(
        status=reply.status, body=reply.body, content_type=reply.content_type, headers=reply.headers
    )
