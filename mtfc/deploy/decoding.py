"""Crash-isolated entropy decoding for the server, in a pool of worker processes that heals itself.

The entropy decoder is memory-safe (:mod:`mtfc.entropy_coding`), so a forged stream ends as a
:class:`~mtfc.bitstream.BitstreamError`; the worker processes are the second line of defence and the
way to cancel a decode: a worker that dies anyway (killed on a deadline or because its client left, out
of memory) takes only its own request with it (400 ``DecoderCrashed``) while every other request goes
on. Workers are forked from a ``forkserver`` that has imported torch and CompressAI once, so a
replacement starts in milliseconds.

A worker that dies (crash, or killed because its request ran out of time or its client left) never
goes back into the pool; its replacement is started in the background, retrying with exponential
back-off while it cannot start (e.g. out of file descriptors). Until then the pool is short
(:attr:`DecoderPool.alive` < :attr:`DecoderPool.size`), which ``/health`` reports as degraded.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import tempfile
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from mtfc import bitstream
from mtfc.codec import Codec, load_codec, save_codec

_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "compressai", "mtfc.codec"])
log = logging.getLogger("mtfc.server")


class DecoderCrashed(bitstream.CorruptStreamError):
    """The decoder's worker process died while decoding the stream."""


def _serve_decodes(codec_path: str, conn: Connection, threads: int) -> None:
    torch.set_num_threads(threads)
    codec = load_codec(codec_path)
    conn.send("ready")
    while True:
        try:
            parsed = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", codec.decode_unpacked([parsed]).numpy()))
        except bitstream.BitstreamError as e:
            conn.send(("error", type(e).__name__, str(e)))


class _Worker:
    """One decoder process; raises ``OSError`` or ``RuntimeError`` if it cannot start within ``timeout``."""

    def __init__(self, codec_path: str, threads: int, timeout: float = 60.0) -> None:
        self.conn, child = _CONTEXT.Pipe()
        try:
            self.process = _CONTEXT.Process(target=_serve_decodes, args=(codec_path, child, threads), daemon=True)
            self.process.start()
        except BaseException:
            self.conn.close()
            raise
        finally:
            child.close()
        try:
            ready = self.conn.poll(timeout) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.close()
            raise RuntimeError(f"decoder worker did not start within {timeout:.0f} s")

    def decode(self, parsed: tuple[bitstream.Header, list[bytes]]) -> torch.Tensor:
        self.conn.send(parsed)
        reply = self.conn.recv()  # EOFError if the stream killed the worker
        if reply[0] == "ok":
            return torch.from_numpy(reply[1])
        error = getattr(bitstream, reply[1], bitstream.BitstreamError)
        raise error(reply[2])

    def kill(self) -> None:
        """Stop the process now (a decode blocked on it then sees end-of-file); :meth:`close` reaps it."""
        self.process.kill()

    def close(self) -> None:
        self.conn.close()
        self.process.kill()
        self.process.join(timeout=5)


class DecoderPool:
    """``await pool.decode(stream)`` → ŷ (1, C, h, w), decoded by one of ``workers`` processes. The
    stream is parsed once: pass what :func:`mtfc.bitstream.unpack` returned for it (with the codec's
    fingerprint), and the worker entropy-decodes its payloads (:meth:`mtfc.Codec.decode_unpacked`).

    Raises the stream's :class:`~mtfc.BitstreamError`, or :class:`DecoderCrashed` if it killed its worker.
    Cancelling ``decode`` (a deadline, a client gone) kills the worker doing it, so no work outlives its
    request. Dead workers are replaced in the background, first after ``backoff[0]`` seconds, then
    doubling up to ``backoff[1]`` while a replacement fails to start. Create the pool inside the event
    loop that will use it.
    """

    def __init__(self, codec: Codec, workers: int = 2, threads: int = 1,
                 backoff: tuple[float, float] = (0.05, 5.0)) -> None:
        if workers < 1:
            raise ValueError(f"a decoder pool needs at least 1 worker, got {workers}")
        self._dir = tempfile.TemporaryDirectory(prefix="mtfc-decoders-")
        self.codec_path = str(save_codec(codec, Path(self._dir.name) / "codec.pt"))
        self.size, self.threads, self.backoff = workers, threads, backoff
        self.crashes = self.start_failures = 0
        self._closed = False
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._workers: set[_Worker] = set()
        self._restarts: set[asyncio.Task] = set()
        # one thread per decode in flight, plus one per worker being killed that has not yet seen EOF
        self._threads = ThreadPoolExecutor(2 * workers, thread_name_prefix="mtfc-decode")
        for _ in range(workers):
            self._add(_Worker(self.codec_path, threads))  # at start-up a failure is fatal: raise it

    @property
    def alive(self) -> int:
        """Workers running (idle or decoding)."""
        return len(self._workers)

    def _add(self, worker: _Worker) -> None:
        self._workers.add(worker)
        self._idle.put_nowait(worker)

    async def decode(self, parsed: tuple[bitstream.Header, list[bytes]]) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        worker = await self._idle.get()
        while not worker.process.is_alive():  # died while idle (e.g. killed by the OOM killer)
            self._retire(worker)
            worker = await self._idle.get()
        try:
            latent = await loop.run_in_executor(self._threads, worker.decode, parsed)
        except (EOFError, OSError):
            self.crashes += 1
            self._retire(worker)
            raise DecoderCrashed("entropy decoding of this stream crashed the decoder (a forged payload); "
                                 "the stream was rejected") from None
        except asyncio.CancelledError:
            self._retire(worker)
            raise
        except BaseException:
            self._idle.put_nowait(worker)
            raise
        self._idle.put_nowait(worker)
        return latent

    def _retire(self, worker: _Worker) -> None:
        """Take a dead (or doomed) worker out of the pool for good and start its replacement."""
        worker.kill()
        self._workers.discard(worker)
        task = asyncio.get_running_loop().create_task(self._replace(worker))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _replace(self, dead: _Worker) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._threads, dead.close)
        delay = self.backoff[0]
        while not self._closed:
            try:
                worker = await loop.run_in_executor(self._threads, _Worker, self.codec_path, self.threads)
            except (OSError, RuntimeError, EOFError) as e:
                self.start_failures += 1
                log.warning("decoder worker failed to start (%s: %s); retrying in %.2f s (%d of %d workers alive)",
                            type(e).__name__, e, delay, self.alive, self.size)
                await asyncio.sleep(delay)
                delay = min(2 * delay, self.backoff[1])
                continue
            if self._closed:
                worker.close()
            else:
                self._add(worker)
            return

    def close(self) -> None:
        self._closed = True
        for task in self._restarts:
            task.cancel()
        for w in self._workers:
            w.close()
        self._workers.clear()
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._dir.cleanup()
