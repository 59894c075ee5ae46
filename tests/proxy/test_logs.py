"""Log lines go out whole, the lines of one event-loop turn in one write (TurnBufferedStream)."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading

import orjson
import structlog

from sidegate.proxy.logs import TurnBufferedStream, configure_logging, flush_logs


class Recorder(io.StringIO):
    """A stream that keeps each write and counts flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1


async def _end_of_turn() -> None:
    """Wait until the callbacks scheduled so far have run (the loop runs them in order)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon(done.set_result, None)
    await done


async def test_the_lines_of_a_turn_go_out_together_at_its_end() -> None:
    out = Recorder()
    stream = TurnBufferedStream(out)
    for line in ("a\n", "b\n", "c\n"):
        stream.write(line)
        stream.flush()  # what a logger does after each line: nothing yet
    assert out.writes == []
    await _end_of_turn()
    assert (out.writes, out.flushes) == (["a\nb\nc\n"], 1)
    stream.write("d\n")
    await _end_of_turn()
    assert out.writes == ["a\nb\nc\n", "d\n"]


async def test_past_the_limit_what_waits_goes_out_at_once() -> None:
    out = Recorder()
    stream = TurnBufferedStream(out, limit=10)
    stream.write("12345\n")
    assert out.writes == []
    stream.write("67890\n")
    assert out.writes == ["12345\n67890\n"]
    await _end_of_turn()  # the scheduled flush finds nothing to write
    assert out.writes == ["12345\n67890\n"]


def test_without_a_running_loop_lines_go_out_at_once_after_those_waiting() -> None:
    out = Recorder()
    stream = TurnBufferedStream(out)

    loop = asyncio.new_event_loop()
    loop.call_soon(loop.stop)  # the loop's last turn: its end's flush never runs
    loop.call_soon(stream.write, "in the loop\n")
    loop.run_forever()
    loop.close()
    assert out.writes == []  # waiting: the loop closed with the flush still scheduled
    stream.write("after\n")  # no loop: written at once, behind what waited
    assert out.writes == ["in the loop\nafter\n"]

    async def log_in_a_new_loop() -> None:
        stream.write("next loop\n")
        await _end_of_turn()

    asyncio.run(log_in_a_new_loop())  # a flush scheduled on the closed loop does not hold it
    assert out.writes == ["in the loop\nafter\n", "next loop\n"]


async def test_a_thread_without_a_loop_writes_at_once_and_in_order() -> None:
    out = Recorder()
    stream = TurnBufferedStream(out)
    stream.write("loop\n")
    thread = threading.Thread(target=stream.write, args=("thread\n",))
    thread.start()
    thread.join()
    assert out.writes == ["loop\nthread\n"]
    await _end_of_turn()
    assert out.writes == ["loop\nthread\n"]


async def test_flush_logs_writes_what_waits(log_output: io.StringIO) -> None:
    configure_logging("info", "json", stream=log_output, cache=False)
    structlog.get_logger("t").info("one", n=1)
    structlog.get_logger("t").info("two", n=2)
    assert log_output.getvalue() == ""
    flush_logs()
    events = [orjson.loads(line)["event"] for line in log_output.getvalue().splitlines()]
    assert events == ["one", "two"]


def test_lines_waiting_at_exit_are_written() -> None:
    program = (
        "import asyncio, structlog\n"
        "from sidegate.proxy.logs import configure_logging\n"
        "configure_logging('info', 'json')\n"
        "loop = asyncio.new_event_loop()\n"
        "loop.call_soon(loop.stop)\n"  # the loop's last turn: its end's flush never runs
        "loop.call_soon(structlog.get_logger('t').info, 'last words')\n"
        "loop.run_forever()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=60
    )
    assert orjson.loads(done.stderr)["event"] == "last words"


async def test_lines_for_an_output_that_is_gone_are_dropped_not_raised() -> None:
    out = Recorder()
    stream = TurnBufferedStream(out)
    out.close()  # writing to it now raises ValueError
    stream.write("lost\n")
    stream.flush_now()  # what the end of the turn runs: no error escapes into the loop
    stream.write("also lost\n")
    await _end_of_turn()
    assert out.writes == ["lost\n", "also lost\n"]  # tried, once each
