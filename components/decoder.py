"""A generation replica's decoder: the continuous batching of `components.generation` (the same
`Decoding`, the same events) in a process of its own, or on a thread of the replica.

Inside a Serve replica a decoding thread shares one GIL with the event loop (HTTP, JSON), Ray's
core worker and Serve's own threads: a step there took 5-9 ms against 4.5 ms for the same batch in a
plain process (docs/performance.md). So by default the replica keeps the HTTP side and a child
process decodes, with asks, cancellations and each step's events passed over two pipes. The thread
decoder (`serve.generation_decoder: thread`: no second copy of the model, no process to start) runs
the same loop over the same pipes, so both behave alike but for where the steps run.

    python -m components.decoder MODEL_DIR THREADS MAX_BATCH_SIZE WAIT_S READ_FD WRITE_FD
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path

from components.generation import Ask, Decoding, TextDelta, paced, step_events
from components.scratch import ScratchFolder

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # where `python -m components...` finds the package
# After a start that failed, the next waits this long, doubled at each failure in a row up to the
# most: a model that cannot load (memory, a full disk) is not loaded again for every request.
FIRST_BACKOFF_S, MOST_BACKOFF_S = 1.0, 60.0
logger = logging.getLogger(__name__)


class DecoderLost(RuntimeError):
    """The decoding process died: the requests it held are lost (the replica answers 503)."""


class Decoder:
    """Asks decoded together (continuous batching): each ask goes to the decoding loop with an id,
    each step comes back as one message holding every row's event. The loop runs in a child process
    (`where="process"`) or on a thread of this process (`"thread"`); it is started here (the
    replica is ready once it is) and again as soon as it dies (its requests get an error), so the
    next request does not wait for a process to start. After a start that failed, the next waits
    (`FIRST_BACKOFF_S`, doubled at each failure in a row): meanwhile requests fail at once with
    when to retry (503), instead of each waiting for a model that does not load. A client that
    leaves before its answer cancels its row."""

    def __init__(self, model, tokenizer, threads: int, max_batch_size: int, wait_s: float, where: str = "process"):
        self.model, self.tokenizer = model, tokenizer
        self.where = where
        self.threads, self.max_batch_size, self.wait_s = threads, max_batch_size, wait_s
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # rows of the latest steps (the tests read them)
        self.readers: dict[int, asyncio.Queue] = {}  # request id -> its events, until the last one
        self.ids = itertools.count()
        self.child: subprocess.Popen | threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listening = False  # a thread reads the running loop's messages
        self.restart = asyncio.Lock()
        self.restarting: asyncio.Task | None = None  # held: the loop keeps only a weak reference
        self.closed = False
        self.failed_starts = 0
        self.next_start_at = 0.0  # time.monotonic() before which no start is tried
        self.start_failure = ""
        self._start()

    def _start(self) -> None:
        """The decoding loop, with a pipe each way; returns once it is ready. A child process gets
        the model as a folder it loads (removed once it has)."""
        child_reads, parent_writes = os.pipe()
        parent_reads, child_writes = os.pipe()
        self.outbox = Connection(parent_writes, readable=False)
        self.inbox = Connection(parent_reads, writable=False)
        with contextlib.ExitStack() as cleanup:
            if self.where == "thread":
                self.child = threading.Thread(
                    target=_decode_on_thread,
                    args=(self.model, self.tokenizer, self.max_batch_size, self.wait_s, child_reads, child_writes),
                    name="decoding",
                    daemon=True,
                )
                self.child.start()
            else:
                folder = cleanup.enter_context(ScratchFolder("decoding"))
                self.model.save_pretrained(folder)
                self.tokenizer.save_pretrained(folder)
                settings = [str(self.threads), str(self.max_batch_size), str(self.wait_s)]
                self.child = subprocess.Popen(
                    [sys.executable, "-m", __name__, str(folder), *settings, str(child_reads), str(child_writes)],
                    pass_fds=(child_reads, child_writes),
                    cwd=PACKAGE_ROOT,
                )
                os.close(child_reads)
                os.close(child_writes)
            try:
                self.inbox.recv()  # "ready": the model is loaded
            except EOFError:
                code = self._exit_code(wait=True)
                raise RuntimeError(f"the decoding {self.where} exited ({code}) while loading the model") from None
        self.listening = False

    def _running(self) -> bool:
        if isinstance(self.child, threading.Thread):
            return self.child.is_alive()
        return self.child is not None and self.child.poll() is None

    def _exit_code(self, wait: bool = False) -> int | None:
        """The child process's exit status (None for a thread, or a process still running)."""
        if not isinstance(self.child, subprocess.Popen):
            return None
        return self.child.wait() if wait else self.child.poll()

    def _lost_error(self) -> DecoderLost:
        return DecoderLost(f"the decoding {self.where} exited ({self._exit_code()}); retry: another is starting")

    def _reap(self) -> None:
        """Wait a moment for a child whose pipe closed: its end is seen before its exit status."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            if isinstance(self.child, threading.Thread):
                self.child.join(timeout=1)
            elif self.child is not None:
                self.child.wait(timeout=1)

    async def events(self, ask: Ask, interval_s: float = 0.0, whole: bool = False):
        """The ask's events: {"token"} per step, the last also {"text", "tokens", "finish_reason"}.
        Events come at most every `interval_s` (and no faster than the reader takes them): the
        tokens made meanwhile come in one. `whole`: the last event only."""
        await self._ready()
        request = next(self.ids)
        out: asyncio.Queue = asyncio.Queue()
        self.readers[request] = out
        try:
            self.outbox.send(("ask", request, ask, whole))
        except OSError:  # the decoder died just now: another is starting
            del self.readers[request]
            raise self._lost_error() from None
        try:
            async for event in paced(out, interval_s):
                yield event
        finally:
            if self.readers.pop(request, None) is not None:  # not answered: the client left
                try:
                    self.outbox.send(("cancel", request))
                except OSError:
                    pass  # the decoder is gone, and the row with it

    async def _ready(self) -> None:
        """The decoding loop running (started if it is not) and its messages listened to."""
        self.loop = loop = asyncio.get_running_loop()  # where messages go (a replica's one loop; each test's own)
        async with self.restart:
            if not self._running():
                await self._start_unless_backing_off(loop)
            if not self.listening:
                self.listening = True
                threading.Thread(target=self._listen, args=(self.inbox,), daemon=True, name="decoding").start()

    async def _start_unless_backing_off(self, loop: asyncio.AbstractEventLoop) -> None:
        """Raises DecoderLost, saying when to retry, while backing off after a failed start, and when
        this start fails."""
        if (wait_s := self.next_start_at - time.monotonic()) > 0:
            raise DecoderLost(f"{self.start_failure}; the next start is in {wait_s:.0f} s: retry then")
        try:
            await loop.run_in_executor(None, self._start)
        except Exception as error:
            self.failed_starts += 1
            backoff_s = min(MOST_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (self.failed_starts - 1))
            self.next_start_at = time.monotonic() + backoff_s
            self.start_failure = f"the decoding {self.where} did not start ({error})"
            raise DecoderLost(f"{self.start_failure}; the next start is in {backoff_s:.0f} s: retry then") from error
        self.failed_starts = 0

    async def _start_again(self, code: int | None) -> None:
        logger.warning("the decoding %s exited (%s): starting another", self.where, code)
        try:
            await self._ready()
        except Exception as error:  # noqa: BLE001 - exited while loading, a full disk: a later request tries again
            logger.error("%s; a request after the back-off tries again", error)

    def _listen(self, inbox: Connection) -> None:
        """The decoder's messages handed to the event loop, until its pipe closes."""
        try:
            while True:
                message = inbox.recv()
                self.loop.call_soon_threadsafe(self._deliver, message)
        except (EOFError, OSError):
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                self.loop.call_soon_threadsafe(self._lost, inbox)

    def _deliver(self, message: tuple) -> None:
        kind, *body = message
        if kind == "step":
            size, events = body
            self.batch_sizes.append(size)
            for request, event in events:
                out = self.readers.get(request)
                if out is not None:
                    out.put_nowait(event)
                    if "finish_reason" in event:
                        del self.readers[request]
        elif kind == "failed":
            requests, detail = body
            for request in requests:
                out = self.readers.pop(request, None)
                if out is not None:
                    out.put_nowait(RuntimeError(detail))

    def _lost(self, inbox: Connection) -> None:
        if inbox is not self.inbox:
            return  # an earlier decoder's pipe
        self._reap()
        for out in self.readers.values():
            out.put_nowait(self._lost_error())
        self.readers.clear()
        self.outbox.close()
        code, self.child = self._exit_code(), None  # gone, whatever poll() says yet: its pipe is closed
        if not self.closed:  # a request coming meanwhile waits for this start, not one of its own
            self.restarting = self.loop.create_task(self._start_again(code))

    def close(self) -> None:
        self.closed = True
        if self.child is not None:
            self.outbox.close()  # the loop ends at the end of its input
            if isinstance(self.child, threading.Thread):
                self.child.join(timeout=30)
            else:
                self.child.wait(timeout=30)
            self.child = None


class Requests:
    """The decoding loop's side of the asks: those waiting to join the batch, and every live one by id."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.waiting: deque[tuple[int, Ask, bool]] = deque()
        self.live: dict[int, Ask] = {}
        self.open = True

    def read(self, timeout: float | None) -> None:
        """Every message that arrives within `timeout` (None: until one does)."""
        try:
            ready = self.connection.poll(timeout)
            while ready:
                self._take(self.connection.recv())
                ready = self.connection.poll(0)
        except EOFError:
            self.open = False  # the replica is gone: nothing more will come

    def take(self, wait: bool, room: int, wait_s: float) -> list[tuple[int, Ask, bool]]:
        """Asks to start now, at most `room`: when nothing runs (`wait`), the first to come and what
        follows within `wait_s`; else what is waiting."""
        self.read(0)
        while wait and self.open and not self.waiting:
            self.read(None)
        until = time.monotonic() + (wait_s if wait else 0.0)
        while self.open and len(self.waiting) < room and (left := until - time.monotonic()) > 0:
            self.read(left)
        return [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]

    def _take(self, message: tuple) -> None:
        if message[0] == "ask":
            _, request, ask, whole = message
            self.live[request] = ask
            self.waiting.append((request, ask, whole))
        else:  # ("cancel", request): its row ends at the next step, or never starts
            ask = self.live.pop(message[1], None)
            if ask is not None:
                ask.deadline = float("-inf")
                self.waiting = deque(item for item in self.waiting if item[0] != message[1])


def decode_forever(model, tokenizer, max_batch_size: int, wait_s: float, requests: Requests, outbox: Connection):
    """Continuous batching: a request that arrives while a batch runs has its prompt read in one
    forward and joins the batch at the next step (at most `max_batch_size` rows); an ended row
    leaves at once; when nothing runs, the first request waits at most `wait_s` for others to start
    with. The asks come from `requests`, each step's events go to `outbox`, until the replica
    closes the pipe."""
    running, readers = None, []  # the Decoding, and per row (request id, whole, TextDelta)
    while True:
        arrived = requests.take(wait=running is None, room=max_batch_size - len(readers), wait_s=wait_s)
        if not requests.open:
            return
        try:
            if arrived:
                started = Decoding(model, tokenizer, [ask for _, ask, _ in arrived])
                started.step()
                if running is None:
                    running = started
                else:
                    running.absorb(started)
                readers += [(request, whole, TextDelta()) for request, _, whole in arrived]
            else:
                running.step()
        except Exception as error:  # noqa: BLE001 - every reader of the batch gets it
            failed = [request for request, _, _ in readers] + [request for request, _, _ in arrived]
            outbox.send(("failed", failed, f"decoding failed: {error!r}"))
            for request in failed:
                requests.live.pop(request, None)
            running, readers = None, []
            continue
        kept, events = step_events(running, readers)
        outbox.send(("step", len(readers), events))
        for index in set(range(len(readers))) - set(kept):
            requests.live.pop(readers[index][0], None)
        readers = [readers[i] for i in kept]
        if readers:
            running.keep(kept)
        else:
            running = None


def _decode_on_thread(model, tokenizer, max_batch_size: int, wait_s: float, read_fd: int, write_fd: int) -> None:
    """`decode_forever` on a thread of the replica, over the same pipes as a child process; its end
    closes them, so the replica sees it go as it sees a process exit. The model is the replica's:
    a generation model has no /explain (the one call that changes a model's settings), and its
    /predict forwards run beside the steps as inference does."""
    requests, outbox = Requests(Connection(read_fd, writable=False)), Connection(write_fd, readable=False)
    try:
        outbox.send(("ready",))
        decode_forever(model, tokenizer, max_batch_size, wait_s, requests, outbox)
    finally:
        requests.connection.close()
        outbox.close()


def main(argv: list[str]) -> None:
    folder, threads, max_batch_size, wait_s, read_fd, write_fd = argv
    import torch

    from components.tasks import load_model_folder

    torch.set_num_threads(int(threads))
    model, tokenizer = load_model_folder(folder)
    model.eval()
    outbox = Connection(int(write_fd), readable=False)
    outbox.send(("ready",))
    decode_forever(model, tokenizer, int(max_batch_size), float(wait_s), Requests(Connection(int(read_fd))), outbox)


if __name__ == "__main__":
    main(sys.argv[1:])
