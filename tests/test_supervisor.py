"""The supervisor restarts a crashing actor with backoff and escalates a crash loop."""

import pytest
import structlog
import trio
import trio.testing

from sendd.supervisor import CrashLoop, Supervisor


class Boom(Exception):
    pass


async def test_a_crashing_actor_is_restarted_and_keeps_its_channel(autojump_clock):
    supervisor = Supervisor(structlog.get_logger(), max_restarts=10, window=60)
    send, receive = trio.open_memory_channel(10)
    crashes = 2

    async def actor(out, task_status=trio.TASK_STATUS_IGNORED):
        nonlocal crashes
        async with out:
            task_status.started()
            await out.send("work")
            if crashes:
                crashes -= 1
                raise Boom("wedged connection")

    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: supervisor.supervise(
            "writer", actor, channels=(send,), task_status=task_status))
    # Three incarnations each did their work; the channel stayed open across the crashes and
    # closed only when the actor finished for good.
    assert [item async for item in receive] == ["work"] * 3
    assert supervisor.restarts["writer"] == 2
    assert "writer" in supervisor.crashed_at


async def test_a_crash_loop_escalates(autojump_clock):
    supervisor = Supervisor(structlog.get_logger(), max_restarts=3, window=60)

    async def actor(task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        raise Boom("always")

    with pytest.raises(CrashLoop, match="4 actor restarts within 60s"):
        await supervisor.supervise("poller", actor)
    assert supervisor.restarts["poller"] == 4


async def test_fatal_errors_are_not_restarted(autojump_clock):
    supervisor = Supervisor(structlog.get_logger(), fatal=(Boom,))

    async def actor(task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        raise Boom("lease lost")

    with pytest.raises(BaseExceptionGroup) as raised:  # as it leaves the actor's nursery
        await supervisor.supervise("heartbeat", actor)
    assert raised.group_contains(Boom, match="lease lost")
    assert supervisor.restarts["heartbeat"] == 0
