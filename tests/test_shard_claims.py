"""Work pools: a shard's copy taken for lost must stop sending before another copy starts (issue 25, item 9).

Before, a shard flow run whose heartbeat went still was marked Crashed and run again without stopping the old
copy, and failed heartbeat writes were swallowed: two copies could send. Now each attempt's id is written to
the shard's claim, the copy confirms it with every beat, and the client's fence lets a request leave only
within a margin of the last confirmed beat. The claim logic runs here on real storage (a local output
directory), with a clock the test moves (a paused process), and the fence through a real client against the
emulator."""

from __future__ import annotations

import asyncio

import pytest

from conftest import message_body
from prefect_anthropic.dataset.inputs import Shard
from prefect_anthropic.dataset.shard_store import ShardStore
from prefect_anthropic.engine import AnthropicClient, RequestItem
from prefect_anthropic.engine.errors import OutputLost
from prefect_anthropic.orchestration.fanout import ShardClaim, _heartbeat_name, wait_until_stopped, write_claim
from prefect_anthropic.settings import ClientSettings, RunOptions
from prefect_anthropic.storage import Storage

SHARD = Shard(index=3, start=0, end=100, first_line=1, line_count=10, digest="d")


class Clock:
    """A clock the test moves: a process paused for N seconds is `clock.now += N`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    return ShardStore.for_run(str(tmp_path / "out"), RunOptions(), Storage.from_environment())


def test_a_superseded_copy_stops_at_its_next_beat(store):
    clock = Clock()
    old = ShardClaim(store, SHARD, write_claim(store, SHARD), margin_s=30, clock=clock)
    assert old.beat()
    asyncio.run(old.fence())  # holds the claim: it may send
    new = write_claim(store, SHARD)  # the parent took the old copy for lost
    assert not old.beat() and old.superseded_by == new
    with pytest.raises(OutputLost, match="taken over"):
        asyncio.run(old.fence())
    # Superseded before it ever beat: a copy started late never confirms, so it never sends.
    late = ShardClaim(store, SHARD, "an-older-attempt", margin_s=30, clock=clock)
    assert not late.beat()
    with pytest.raises(OutputLost):
        asyncio.run(late.fence())


def test_a_paused_copy_sends_nothing_until_a_beat_proves_it_still_holds_the_claim(store):
    clock = Clock()
    copy = ShardClaim(store, SHARD, write_claim(store, SHARD), margin_s=30, clock=clock)
    with pytest.raises(OutputLost, match="not confirmed"):
        asyncio.run(copy.fence())  # nothing before the first beat
    assert copy.beat()
    clock.now += 31  # SIGSTOP, a VM suspend: the margin passed while it could not beat
    with pytest.raises(OutputLost, match="not confirmed for 31 s"):
        asyncio.run(copy.fence())
    assert copy.beat()  # nobody took it over: confirmed again, it goes on
    asyncio.run(copy.fence())
    clock.now += 31
    write_claim(store, SHARD)  # ...but had it been taken over while paused, its next beat stops it for good
    assert not copy.beat()
    with pytest.raises(OutputLost, match="taken over"):
        asyncio.run(copy.fence())


async def test_failing_heartbeat_writes_stop_the_copy_once_the_margin_has_passed(store):
    clock = Clock()
    copy = ShardClaim(store, SHARD, write_claim(store, SHARD), margin_s=30, clock=clock)
    assert copy.beat()
    # A real write failure: the heartbeat's path is now a directory.
    beat_path = store.staging / _heartbeat_name(SHARD)  # a local output: its small files beside the results
    beat_path.unlink()
    beat_path.mkdir()
    keeper = asyncio.create_task(copy.keep(0.01))
    while copy.failures < 3:
        await asyncio.sleep(0.01)
    await copy.fence()  # a few missed beats within the margin: it goes on
    clock.now += 31
    with pytest.raises(OutputLost, match="not confirmed"):
        await copy.fence()  # were the beats swallowed as before, it would send on
    keeper.cancel()


async def test_the_parent_waits_until_the_old_copy_stopped_or_went_still(store):
    clock = Clock()
    old_id = write_claim(store, SHARD)
    old = ShardClaim(store, SHARD, old_id, margin_s=30, clock=clock)
    assert old.beat()
    write_claim(store, SHARD)
    stopped = asyncio.Event()

    async def old_copy_finishing() -> None:
        for _ in range(6):  # still beating (its requests in flight end), then says it stopped
            await asyncio.to_thread(store.write_text, _heartbeat_name(SHARD), f"w {old_id} {_} -")
            await asyncio.sleep(0.05)
        stopped.set()
        old.stopped()

    finishing = asyncio.create_task(old_copy_finishing())
    await wait_until_stopped(store, SHARD, old_id, timeout_s=30, poll_s=0.02)
    assert stopped.is_set()  # not before the old copy said it stopped (its 15 s margin never ran out)
    await finishing
    # A copy that never says it stopped: its margin since it was superseded (half the timeout) is waited out,
    # after which its fence lets nothing leave.
    assert old.beat() is False  # superseded: writes its beat, sees the new claim
    await wait_until_stopped(store, SHARD, old_id, timeout_s=0.1, poll_s=0.02)


async def test_the_fence_stops_a_real_client_once_its_shard_is_taken_over(store, start_emulator):
    emu = start_emulator()
    copy = ShardClaim(store, SHARD, write_claim(store, SHARD), margin_s=30)
    assert copy.beat()
    settings = ClientSettings(base_url=emu.base_url, max_attempts=1)
    async with AnthropicClient("sk-ant-fake", settings, fence=copy.fence) as client:
        first = await client.send(RequestItem(line=1, custom_id=None, body=message_body("one")))
        assert first.succeeded
        write_claim(store, SHARD)
        assert not copy.beat()
        with pytest.raises(OutputLost, match="taken over"):
            await client.send(RequestItem(line=2, custom_id=None, body=message_body("two")))
    assert emu.stats()["requests_total"] == 1  # the superseded copy sent nothing more


async def test_a_new_parent_waits_for_the_copy_a_killed_parent_left_before_its_first_launch(store):
    """Review of issue 25, item 4: the first claim of a new parent superseded the attempt the claim named before
    (a copy left by a killed parent, or by one that lost its output) without waiting for it to stop."""
    from prefect_anthropic.orchestration.fanout import take_over

    clock = Clock()
    left_id = write_claim(store, SHARD)  # the killed parent's attempt, still running on a worker
    left = ShardClaim(store, SHARD, left_id, margin_s=30, clock=clock)
    assert left.beat()
    stopped = asyncio.Event()

    async def left_copy_finishing() -> None:
        while left.beat():  # beats until it sees the new claim...
            await asyncio.sleep(0.02)
        for count in range(5):  # ...its requests in flight end, then it says it stopped
            await asyncio.to_thread(store.write_text, _heartbeat_name(SHARD), f"w {left_id} x{count} -")
            await asyncio.sleep(0.02)
        stopped.set()
        left.stopped()

    finishing = asyncio.create_task(left_copy_finishing())
    new_id = await take_over(store, SHARD, timeout_s=60, poll_s=0.02)
    assert stopped.is_set()  # launched only once the earlier copy stopped (its 30 s margin never ran out)
    assert new_id != left_id and left.superseded_by == new_id
    await finishing


async def test_a_new_parent_also_waits_for_a_copy_only_the_heartbeat_names(store):
    """A parent killed between superseding a copy and launching the next leaves a claim naming an attempt that
    never ran, while the superseded copy may still be sending (its margin not out): the heartbeat names it."""
    from prefect_anthropic.orchestration.fanout import take_over

    running = write_claim(store, SHARD)
    await asyncio.to_thread(store.write_text, _heartbeat_name(SHARD), f"w {running} 7 -")
    write_claim(store, SHARD)  # the killed parent's next attempt, never launched
    stopped = asyncio.Event()

    async def running_copy_stops() -> None:
        await asyncio.sleep(0.2)
        stopped.set()
        await asyncio.to_thread(store.write_text, _heartbeat_name(SHARD), f"w {running} stopped -")

    stopping = asyncio.create_task(running_copy_stops())
    await take_over(store, SHARD, timeout_s=60, poll_s=0.02)
    assert stopped.is_set()
    await stopping
    # Nothing to wait for on a fresh output, nor once the last copy said it stopped: no delay.
    await asyncio.wait_for(take_over(store, SHARD, timeout_s=60, poll_s=0.02), 5)
