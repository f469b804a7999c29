"""Remote shards as tar streams that can be re-opened at a byte after a transient fault.

``http(s)://`` URLs are read with urllib and a ``Range: bytes=N-[E]`` header (E: the end of the
samples asked for, when known; a server that answers 200 instead of 206 is read from byte 0
and the first N bytes discarded); a ``pipe:`` command, or any other scheme of webdataset's
``gopen``, is run again and read up to byte N. N is always the start of a tar member header
(members are 512-byte aligned), and a tar stream that starts at a header is a valid tar, so
``tarfile`` reads the rest of the shard as is.
"""

from __future__ import annotations

import http.client
import logging
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

from webdataset.gopen import gopen

log = logging.getLogger(__name__)

#: every error a shard read can end with: a bad tar, the network, a command, an HTTP status
READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, http.client.HTTPException)
TIMEOUT = 60.0  # seconds to connect, or between two bytes, before a read fails (transiently)
_CHUNK = 1 << 20
_PIPE_CLOSED = (-13, 141)  # SIGPIPE: the command outlived our early close, which is us stopping, not it failing


@dataclass(frozen=True)
class ReadPolicy:
    """What a shard read does on a fault: ``retries`` re-opens after a transient one, waiting
    ``retry_wait * 2**k`` seconds before the k-th; then skip the rest, or raise when ``fail``."""

    retries: int = 0
    retry_wait: float = 1.0
    fail: bool = False
    # fewer unwanted samples than this between two wanted ones are read through rather than asked for
    # by another range request: a request costs about a round trip (~10 ms), about what 8 ImageNet-size
    # JPEGs take at 1 Gbit/s
    read_through: int = 8


NO_RETRY = ReadPolicy()


class CommandFailed(OSError):
    """A ``pipe:`` command exited non-zero."""


class RemoteTar:
    """The members of one remote tar from the sample being read: ``index`` and ``byte`` are where
    that sample starts (its first header), updated by ``mark`` as reading goes on; ``end``, when
    known, is the byte where the samples asked for end (HTTP reads stop there)."""

    def __init__(self, url: str, index: int = 0, byte: int = 0, end: int | None = None) -> None:
        self.url, self.index, self.byte, self.end = url, index, byte, end
        self.status: int | None = None  # exit status of the last pipe: command
        self._proc: subprocess.Popen | None = None
        self._base = byte

    def mark(self, index: int, offset: int) -> None:
        """Sample ``index`` starts at ``offset`` of the stream opened last."""
        self.index, self.byte = index, self._base + offset

    @contextmanager
    def open(self) -> Iterator[Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]]:
        """``(tar, member)`` pairs from ``self.byte`` on; errors propagate (see ``transient``)."""
        self._base, self.status, self._proc = self.byte, None, None
        stream = None
        try:
            stream = self._stream()
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                yield self._files(tar, stream)
        except CommandFailed:
            raise
        except READ_ERRORS as err:
            self._close(stream, strict=False)
            if self.status not in (None, 0, *_PIPE_CLOSED):  # the command died: its truncated output is not the fault
                raise CommandFailed(f"command exited with status {self.status} ({err})") from err
            raise
        finally:
            self._close(stream, strict=False)

    def read_all(self) -> bytes:
        """Every byte from ``self.byte`` on (for small files; a shard is read member by member)."""
        self._proc, stream = None, None
        try:
            stream = self._stream()
            data = stream.read()
            self._close(stream, strict=True)
            return data
        finally:
            self._close(stream, strict=False)

    def transient(self, err: BaseException) -> bool:
        """Worth a retry: connection reset / refused, timeout, early end, HTTP 429 / 5xx, a failed command."""
        if isinstance(err, urllib.error.HTTPError):
            return err.code == 429 or err.code >= 500
        return isinstance(
            err, (CommandFailed, ConnectionError, TimeoutError, urllib.error.URLError, http.client.HTTPException)
        )

    def _files(self, tar: tarfile.TarFile, stream: Any) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
        yield from ((tar, m) for m in tar if m.isfile())
        # a command that dies at a member boundary looks like the end of the archive: its exit
        # status decides, before the last sample is handed on
        self._close(stream, strict=True)

    def _stream(self) -> Any:
        if self.url.startswith(("http://", "https://")):
            return _http(self.url, self.byte, self.end)
        if self.url.startswith("pipe:"):
            self._proc = subprocess.Popen(self.url[5:], shell=True, stdout=subprocess.PIPE)
            stream = self._proc.stdout
        else:
            stream = gopen(self.url, "rb")
        _discard(stream, self.byte, self.url)
        return stream

    def _close(self, stream: Any, strict: bool) -> None:
        """Close the stream (idempotent); ``strict``: a failed command raises CommandFailed / OSError."""
        if self._proc is not None:
            self._proc.stdout.close()
            self.status = self._proc.wait()
            if strict and self.status not in (0, *_PIPE_CLOSED):
                raise CommandFailed(f"command exited with status {self.status}")
        elif stream is not None:
            try:
                stream.close()
            except OSError:  # gopen's pipes report our early close (SIGPIPE) as an error
                if strict:
                    raise


def fetch(url: str, policy: ReadPolicy) -> bytes:
    """The whole (small) file at ``url``, with ``policy.retries`` retries on transient faults."""
    failures = 0
    while True:
        reader = RemoteTar(url)
        try:
            return reader.read_all()
        except READ_ERRORS as err:
            if failures >= policy.retries or not reader.transient(err):
                raise
            failures += 1
            log.warning("%s: %s; retry %d/%d", url, err, failures, policy.retries)
            time.sleep(policy.retry_wait * 2 ** (failures - 1))


def _http(url: str, byte: int, end: int | None) -> BinaryIO:
    ranged = byte > 0 or end is not None
    headers = {"Range": f"bytes={byte}-{'' if end is None else end - 1}"} if ranged else {}
    response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    body = _Body(response)
    if byte and response.status != 206:
        log.info("%s ignores Range requests (HTTP %d): reading and discarding %d bytes", url, response.status, byte)
        _discard(body, byte, url)
    return body  # type: ignore[return-value]


class _Body:
    """An HTTP response body that raises when the connection closes before Content-Length
    (http.client then just returns b"", which tarfile could take for the end of the archive)."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.response = response

    def read(self, size: int = -1) -> bytes:
        data = self.response.read(size if size >= 0 else None)
        if not data and size and self.response.length:
            raise ConnectionError(f"connection closed {self.response.length} bytes before the end of the response")
        return data

    def close(self) -> None:
        self.response.close()


def _discard(stream: Any, size: int, url: str) -> None:
    while size > 0:
        data = stream.read(min(size, _CHUNK))
        if not data:
            raise ConnectionError(f"{url} ended {size} bytes before the byte to resume at")
        size -= len(data)
