"""A worker's per-request output stream: outputs put by the engine thread reach the streaming task
complete, in order, and several at a time when the reader falls behind (tiny model)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from baton.actors.engine import Engine
from baton.actors.output_stream import OutputStream
from baton.outputs import RequestOutput
from baton.sampling import SamplingParams
from tests.conftest import assert_no_leaks


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("tiny:llama", dtype="float32", max_model_len=256, num_kv_blocks=64)


def _outputs(engine: Engine, max_tokens: int) -> list[RequestOutput]:
    outs = list(engine.stream([5, 6, 7, 8], SamplingParams(max_tokens=max_tokens,
                                                           ignore_eos=True)))
    assert len(outs) == max_tokens and outs[-1].finished
    return outs


def _put_from_a_thread(stream: OutputStream, outs: list[RequestOutput]) -> threading.Thread:
    thread = threading.Thread(target=lambda: [stream.put(o) for o in outs])
    thread.start()
    return thread


def test_a_reader_behind_the_engine_gets_every_token_since_its_last_read_in_one_item(engine):
    outs = _outputs(engine, 12)

    async def read() -> list[RequestOutput]:
        stream = OutputStream(asyncio.get_running_loop())
        stream.put(outs[0])
        first = await stream.get()
        # The engine runs ahead: the other eleven land before the reader comes back.
        await asyncio.to_thread(_put_from_a_thread(stream, outs[1:]).join)
        return [first, await stream.get()]

    first, rest = asyncio.run(read())
    assert first.delta_token_ids == outs[0].delta_token_ids
    final = outs[-1]
    assert first.delta_token_ids + rest.delta_token_ids == final.token_ids
    assert first.delta_text + rest.delta_text == final.text
    assert rest.delta_text == "".join(o.delta_text for o in outs[1:])
    assert rest.finished and rest.finish_reason == "length"
    assert rest.token_ids == final.token_ids and rest.text == final.text
    assert_no_leaks(engine)


def test_a_parked_reader_wakes_for_outputs_put_from_another_thread(engine):
    outs = _outputs(engine, 6)

    async def read() -> list[int]:
        loop = asyncio.get_running_loop()
        stream = OutputStream(loop)
        # Runs once the reader below is parked on the empty stream.
        loop.call_soon(_put_from_a_thread, stream, outs)
        got, finished = [], False
        async with asyncio.timeout(30):
            while not finished:
                out = await stream.get()
                got += out.delta_token_ids
                finished = out.finished
        return got

    assert asyncio.run(read()) == outs[-1].token_ids
