"""Shard specs -> URLs, and streaming samples out of (parts of) tar shards.

A sample is ``{"__key__": str, "__url__": str, "<ext>": bytes, ...}`` exactly as
WebDataset groups tar members (``key.ext``). Local files are opened seekable, so
skipping to the middle of a shard jumps over data instead of reading it; URLs and
``pipe:`` commands are streamed (``remote``), re-opened after a transient fault at the
byte where the first sample not yet handed on starts.
"""

from __future__ import annotations

import itertools
import json
import logging
import tarfile
import time
from collections.abc import Container, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from launch.data.remote import NO_RETRY, READ_ERRORS, ReadPolicy, RemoteTar, fetch
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
        raise DataError(
            f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if not urls:
        raise DataError(f"shard spec '{spec}' names no shard")
    return urls


class ShardIndex:
    """Byte offsets of samples in remote shards, from the ``<shard><suffix>`` files that
    ``mae-prepare`` writes (a JSON list: where each sample's first tar header starts).
    Fetched on first need and kept per process; without one, a reader that starts mid-shard
    reads from byte 0 and discards the samples before."""

    def __init__(self, urls: list[str], suffixes: list[str], policy: ReadPolicy = NO_RETRY) -> None:
        self.urls, self.suffixes, self.policy = urls, suffixes, policy
        self._offsets: dict[int, list[int] | None] = {}

    def span(self, shard: int, start: int, stop: int | None) -> tuple[int | None, int | None]:
        """Bytes where samples ``[start, stop)`` of shard number ``shard`` begin and end, where known."""
        offsets = [] if start == 0 and stop is None else self._load(shard) or []  # a whole shard needs none
        begin = 0 if start == 0 else offsets[start] if start < len(offsets) else None
        return begin, offsets[stop] if stop is not None and stop < len(offsets) else None

    def indexed(self, shard: int) -> bool:
        """A remote shard whose samples can be fetched by byte range."""
        return self._load(shard) is not None

    def _load(self, shard: int) -> list[int] | None:
        if not is_remote(self.urls[shard]) or not self.suffixes[shard]:
            return None
        if shard not in self._offsets:
            self._offsets[shard] = self._fetch(self.urls[shard] + self.suffixes[shard])
        return self._offsets[shard]

    def _fetch(self, url: str) -> list[int] | None:
        try:
            offsets = json.loads(fetch(url, self.policy))
        except (*READ_ERRORS, json.JSONDecodeError) as err:
            log.warning(
                "no sample index %s (%s): reading its shard from byte 0 where it starts mid-way", url, _one_line(err)
            )
            return None
        return offsets if isinstance(offsets, list) else None


def _local_members(url: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    with tarfile.open(url, mode="r:") as tar:
        yield from ((tar, m) for m in tar if m.isfile())


def _split_name(name: str) -> tuple[str, str] | None:
    parts = base_plus_ext(name)
    return None if parts is None or parts[0] is None else (parts[0], parts[1].lower())


def read_samples(
    url: str,
    start: int = 0,
    stop: int | None = None,
    policy: ReadPolicy = NO_RETRY,
    span: tuple[int | None, int | None] = (None, None),
    keep: Container[int] | None = None,
) -> Iterator[Sample]:
    """Samples ``[start, stop)`` of one shard (only those whose index is in ``keep``, if given),
    member bytes read only for those.

    A remote shard that fails transiently is re-opened (``policy``) at the byte where the
    first sample not yet yielded starts. ``span``: the bytes where samples ``start`` and ``stop``
    begin, when the caller knows them (``ShardIndex``); else the reader starts at byte 0 and
    discards the samples before ``start``, and reads up to the next sample's header.
    A shard that stays unreadable ends the iteration with one ``{BROKEN: "url: error"}`` item
    instead of raising, so the reader can count the samples it lost and go on; with
    ``policy.fail`` it raises DataError instead.
    """
    if is_remote(url):
        yield from _read_remote(url, start, stop, policy, span, keep)
        return
    got = start
    try:
        for index, sample in _group(_local_members(url), url, start=start, stop=stop, keep=keep):
            got = index + 1
            yield sample
    except READ_ERRORS as err:
        yield _give_up(url, got, err, policy, retried=0)


def _group(
    members: Iterable[tuple[tarfile.TarFile, tarfile.TarInfo]],
    url: str,
    *,
    first: int = 0,
    start: int = 0,
    stop: int | None = None,
    keep: Container[int] | None = None,
    cursor: RemoteTar | None = None,
) -> Iterator[tuple[int, Sample]]:
    """``(index, sample)`` for samples ``[start, stop)`` (those in ``keep``, if given); the first key
    met is sample ``first``. Member bytes of other samples are not read (a local tar seeks over them). A sample is
    yielded once the next key's header has been read (or at the end), so a sample cut by a
    fault is never yielded; ``cursor`` learns the byte where each sample starts."""
    index, current, key = first - 1, None, None
    for tar, member in members:
        parts = _split_name(member.name)
        if parts is None:
            continue
        if parts[0] != key:
            if current is not None:
                yield index, current
            index, key = index + 1, parts[0]
            if stop is not None and index >= stop:
                return
            wanted = index >= start and (keep is None or index in keep)
            current = {"__key__": key, "__url__": url} if wanted else None
            if cursor is not None:
                cursor.mark(index, member.offset)
        if current is not None:
            current[parts[1]] = tar.extractfile(member).read()
    if current is not None:
        yield index, current


def _read_remote(
    url: str,
    start: int,
    stop: int | None,
    policy: ReadPolicy,
    span: tuple[int | None, int | None],
    keep: Container[int] | None,
) -> Iterator[Sample]:
    offset, end = span
    cursor = RemoteTar(url, start if offset is not None else 0, offset or 0, end)
    done, failures, failed_at = start, 0, -1  # done: the first sample not yet yielded
    while True:
        try:
            with cursor.open() as members:
                for index, sample in _group(
                    members, url, first=cursor.index, start=done, stop=stop, keep=keep, cursor=cursor
                ):
                    done = index + 1
                    yield sample
            return
        except READ_ERRORS as err:
            if cursor.index > failed_at:  # got further than at the last fault: a fresh series of retries
                failures, failed_at = 0, cursor.index
            if not cursor.transient(err) or failures >= policy.retries:
                yield _give_up(url, done, err, policy, retried=failures)
                return
            wait = policy.retry_wait * 2**failures
            failures += 1
            log.warning(
                "shard %s: %s; retry %d/%d in %.2g s from byte %d (sample %d)",
                url,
                _one_line(err),
                failures,
                policy.retries,
                wait,
                cursor.byte,
                cursor.index,
            )
            time.sleep(wait)


def _give_up(url: str, samples: int, err: BaseException, policy: ReadPolicy, retried: int) -> Sample:
    after = f" after {plural(retried, 'retry', 'retries')}" if retried else ""
    if policy.fail:
        raise DataError(
            f"shard {url} is unreadable at sample {samples}{after}: {_one_line(err)} "
            "(data.on_error=fail; set data.on_error=skip to skip the rest of the shard)"
        )
    log.warning(
        "shard %s is unreadable after %s%s (%s); skipping the rest of it",
        url,
        plural(samples, "sample"),
        after,
        _one_line(err),
    )
    return {BROKEN: f"{url}: {_one_line(err)}"}


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 sample``, ``2 samples`` (``nouns``: an irregular plural)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def _one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[-1]


def count_samples(url: str, policy: ReadPolicy = NO_RETRY) -> int:
    """Samples in one shard (member headers only for local files); DataError if unreadable."""
    try:
        if is_remote(url):
            return sum(1 for _ in read_samples(url, policy=replace(policy, fail=True)))
        names = (_split_name(m.name) for _, m in _local_members(url))
        return sum(1 for _ in itertools.groupby(parts[0] for parts in names if parts is not None))
    except (DataError, *READ_ERRORS) as err:
        raise DataError(f"cannot count the samples of shard {url}: {_one_line(err)}") from None
