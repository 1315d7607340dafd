"""Crash-isolated entropy decoding for the server.

CompressAI's range decoder (C++) does not bound-check its input: a stream with a valid header and
checksum but a forged payload (e.g. a 1024×1024 image announced with 4 payload bytes) makes it read
past its buffer and crash the process (measured: SIGSEGV). The checksum cannot prevent that — anyone
can compute a CRC. So the server decodes in worker processes: a stream that kills its worker gets a
400 and the worker is replaced, while every other request goes on. Workers are forked from a
``forkserver`` that has imported torch and CompressAI once, so a replacement starts in milliseconds.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from mtfc import bitstream
from mtfc.codec import Codec, load_codec, save_codec

_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "compressai", "mtfc.codec"])


class DecoderCrashed(bitstream.CorruptStreamError):
    """The stream crashed the entropy decoder's worker process (a forged payload)."""


def _serve_decodes(codec_path: str, conn: Connection, threads: int) -> None:
    torch.set_num_threads(threads)
    codec = load_codec(codec_path)
    conn.send("ready")
    while True:
        try:
            body = conn.recv_bytes()
        except EOFError:
            return
        try:
            conn.send(("ok", codec.decode([body]).numpy()))
        except bitstream.BitstreamError as e:
            conn.send(("error", type(e).__name__, str(e)))


class _Worker:
    def __init__(self, codec_path: str, threads: int) -> None:
        self.conn, child = _CONTEXT.Pipe()
        self.process = _CONTEXT.Process(target=_serve_decodes, args=(codec_path, child, threads), daemon=True)
        self.process.start()
        child.close()
        if self.conn.recv() != "ready":
            raise RuntimeError("decoder worker failed to start")

    def decode(self, body: bytes) -> torch.Tensor:
        self.conn.send_bytes(body)
        reply = self.conn.recv()  # EOFError if the stream killed the worker
        if reply[0] == "ok":
            return torch.from_numpy(reply[1])
        error = getattr(bitstream, reply[1], bitstream.BitstreamError)
        raise error(reply[2])

    def close(self) -> None:
        self.conn.close()
        self.process.kill()
        self.process.join(timeout=5)


class DecoderPool:
    """``await pool.decode(stream)`` → ŷ (1, C, h, w), decoded by one of ``workers`` processes.

    Raises the stream's :class:`~mtfc.BitstreamError`, or :class:`DecoderCrashed` if it killed its worker.
    """

    def __init__(self, codec: Codec, workers: int = 2, threads: int = 1) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="mtfc-decoders-")
        self.codec_path = str(save_codec(codec, Path(self._dir.name) / "codec.pt"))
        self.threads, self.crashes = threads, 0
        self.idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self.workers = [_Worker(self.codec_path, threads) for _ in range(workers)]
        for w in self.workers:
            self.idle.put_nowait(w)

    async def decode(self, body: bytes) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        worker = await self.idle.get()
        try:
            latent = await loop.run_in_executor(None, worker.decode, body)
        except (EOFError, OSError):
            self.crashes += 1
            worker.close()
            self.workers.remove(worker)
            worker = await loop.run_in_executor(None, _Worker, self.codec_path, self.threads)
            self.workers.append(worker)
            raise DecoderCrashed("entropy decoding of this stream crashed the decoder (a forged payload); "
                                 "the stream was rejected") from None
        finally:
            self.idle.put_nowait(worker)
        return latent

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self._dir.cleanup()
