"""Shard specs -> URLs, and streaming samples out of (parts of) tar shards.

A sample is ``{"__key__": str, "__url__": str, "<ext>": bytes, ...}`` exactly as
WebDataset groups tar members (``key.ext``). Local files are opened seekable, so
skipping to the middle of a shard jumps over data instead of reading it; URLs and
``pipe:`` commands go through webdataset's ``gopen`` (curl / a shell pipe).
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Container, Iterator
from pathlib import Path
from typing import Any

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from launch.errors import DataError

log = logging.getLogger(__name__)

Sample = dict[str, Any]
BROKEN = "__broken__"  # key of the last item a broken shard yields: {"__broken__": reason}


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def expand_spec(spec: str) -> list[str]:
    """``a-{000..009}.tar`` / ``a.tar::b.tar`` / a folder of ``*.tar`` -> shard URLs, in order."""
    if not is_remote(spec) and Path(spec).is_dir():
        urls = sorted(str(p) for p in Path(spec).glob("*.tar"))
        if not urls:
            raise DataError(f"shard folder {spec} holds no *.tar files")
        return urls
    urls = expand_urls(spec)
    missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if missing:
        raise DataError(f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if not urls:
        raise DataError(f"shard spec '{spec}' names no shard")
    return urls


def _members(url: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    if is_remote(url):
        stream = gopen(url, "rb")
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                yield from ((tar, m) for m in tar if m.isfile())
        finally:
            _close_quietly(stream)
    else:
        with tarfile.open(url, mode="r:") as tar:
            yield from ((tar, m) for m in tar if m.isfile())


def _close_quietly(stream: Any) -> None:
    # a pipe closed before its end exits with SIGPIPE: that is us stopping early, not an error
    try:
        stream.close()
    except OSError:
        pass


def _split_name(name: str) -> tuple[str, str] | None:
    parts = base_plus_ext(name)
    return None if parts is None or parts[0] is None else (parts[0], parts[1].lower())


def read_samples(url: str, start: int = 0, stop: int | None = None, keep: Container[int] | None = None) -> Iterator[Sample]:
    """Samples ``[start, stop)`` of one shard (only those whose index is in ``keep``, if given),
    member bytes read only for those.

    A shard that cannot be opened or ends early (truncated tar) ends the iteration
    with one ``{BROKEN: reason}`` item instead of raising, so the reader can count
    the samples it lost and go on.
    """
    index, current, key = -1, None, None
    try:
        for tar, member in _members(url):
            parts = _split_name(member.name)
            if parts is None:
                continue
            if parts[0] != key:
                if current is not None:
                    yield current
                index, key, current = index + 1, parts[0], None
                if stop is not None and index >= stop:
                    return
                if index >= start and (keep is None or index in keep):
                    current = {"__key__": key, "__url__": url}
            if current is not None:
                current[parts[1]] = tar.extractfile(member).read()
        if current is not None:
            yield current
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        log.warning("shard %s is unreadable after %d samples (%s); skipping the rest of it", url, max(index, 0), err)
        yield {BROKEN: str(err)}


def count_samples(url: str) -> int:
    """Samples in one shard (member headers only for local files); DataError if unreadable."""
    count, key = 0, None
    try:
        for _, member in _members(url):
            parts = _split_name(member.name)
            if parts is not None and parts[0] != key:
                count, key = count + 1, parts[0]
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise DataError(f"cannot count the samples of shard {url}: {err}") from None
    return count
