"""The daemon's connection to Redis: redis-py's asyncio client under the trio-asyncio loop the
daemon already runs for PostgreSQL (sendd.db.connection). Why this client: load/redis_clients.md.

Scripts go by EVALSHA, loaded again on a Redis that forgot them (a restart).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
import trio_asyncio
from redis.commands.core import AsyncScript

from sendd.shared import scripts

# Connections: one per concurrent reservation (the senders, express senders, the watch).
MAX_CONNECTIONS = 64
SOCKET_TIMEOUT = 1.0  # the caller's own timeout (sendd.shared.limits) is shorter


class RedisLink:
    def __init__(self, url: str) -> None:
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT,
            max_connections=MAX_CONNECTIONS, decode_responses=False)
        self._scripts: dict[str, AsyncScript] = {
            body: self._client.register_script(body)
            for body in (scripts.RESERVE, scripts.PENALIZE, scripts.REWARD, scripts.REJOIN,
                         scripts.PROVIDER_DOWN, scripts.PROVIDER_UP)}

    async def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        call = self._scripts[script]
        return await trio_asyncio.aio_as_trio(call)(keys=keys, args=args)

    async def ping(self) -> None:
        await trio_asyncio.aio_as_trio(self._client.ping)()

    async def aclose(self) -> None:
        await trio_asyncio.aio_as_trio(self._client.aclose)()
