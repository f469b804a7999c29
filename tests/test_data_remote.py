"""Remote shards over a flaky network: retries, Range resume, skip / fail after the last retry.

The server is stdlib ``http.server`` on 127.0.0.1 with Range support; it drops connections at
random points mid-body (a close or a reset) and answers 503 at random, seeded per request and
bounded (at most ``FAULTS`` faults in a row for one (file, first byte)), so a reader with more
retries than that must see every sample exactly once.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import itertools
import logging
import random
import socket
import struct
import tarfile
import threading
import urllib.error
from pathlib import Path
from typing import Self

import pytest

from launch.data import DataConfig, build_loader, stream
from launch.data.prepare import prepare
from launch.data.remote import ReadPolicy, RemoteTar
from launch.data.shards import BROKEN, read_samples
from launch.errors import DataError

FAULTS = 2
FAST = ReadPolicy(retries=FAULTS + 1, retry_wait=0.01)


class FlakyServer:
    """Serves ``root`` under any first path component (``/<alias>/<file>``: separate byte counts for
    separate readers); ``faults``: fail tar requests at random (503, or a cut mid-body) up to FAULTS
    times per (path, first byte); ``ranges``: answer Range requests with 206 (else a full 200)."""

    def __init__(self, root: Path, *, faults: bool, ranges: bool = True, seed: int = 0) -> None:
        self.root, self.faults, self.ranges, self.seed = root, faults, ranges, seed
        self.requests: list[tuple[str, int, int]] = []  # (path, first byte, body bytes sent or cut at)
        self.attempts: dict[tuple[str, int], int] = {}
        self.faults_made = 0
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, self))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fault(self, path: str, start: int, size: int) -> tuple[str, int]:
        """("503" | "close" | "reset" | "", cut) for this request, seeded by (seed, path, start, attempt)."""
        with self.lock:
            attempt = self.attempts[path, start] = self.attempts.get((path, start), -1) + 1
        rng = random.Random(f"{self.seed}/{path}/{start}/{attempt}")
        if not self.faults or not path.endswith(".tar") or attempt >= FAULTS or rng.random() < 0.25:
            return "", size
        with self.lock:
            self.faults_made += 1
        return rng.choice(["503", "close", "close", "reset"]), rng.randrange(size)

    def sent(self, path: str | None = None) -> int:
        return sum(n for p, _, n in self.requests if path is None or p == path)


class _Handler(http.server.BaseHTTPRequestHandler):
    def __init__(self, owner: FlakyServer, *args, **kw) -> None:
        self.owner = owner
        super().__init__(*args, **kw)

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        owner, path = self.owner, self.path.lstrip("/")
        file = owner.root / path.partition("/")[2]
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        asked = self.headers.get("Range", "")
        first, _, last = (
            asked[len("bytes=") :].partition("-") if asked.startswith("bytes=") and owner.ranges else ("", "", "")
        )
        start, stop = int(first or 0), int(last) + 1 if last else len(data)
        body = data[start:stop]
        kind, cut = owner.fault(path, start, len(body))
        if kind == "503":
            self.send_error(503)
            with owner.lock:
                owner.requests.append((path, start, 0))
            return
        self.send_response(206 if first else 200)
        if first:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with owner.lock:  # counted before writing: a reader may close once it has what it needs
            owner.requests.append((path, start, cut))
        try:
            self.wfile.write(body[:cut])
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return
        if kind == "reset":  # RST instead of FIN: the client sees ConnectionResetError
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if kind:
            self.close_connection = True


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sklearn digits as shards: train 1,497 samples in 4 shards (3 x 400 + 297), val 300."""
    out = tmp_path_factory.mktemp("remote") / "digits"
    prepare("digits", out, shard_samples=400)
    return out


def _keys(samples) -> list[str]:
    return [s.get("__key__", BROKEN) for s in samples]


def _starts(shard: Path) -> list[int]:
    """Byte offset of each sample's first member header."""
    starts, key = [], None
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.split(".")[0] != key:
                key = member.name.split(".")[0]
                starts.append(member.offset)
    return starts


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_faulty_server_gives_every_sample_once(digits: Path, ranges: bool) -> None:
    shard = digits / "train-000000.tar"
    local = list(read_samples(str(shard)))
    with FlakyServer(digits, faults=True, ranges=ranges, seed=1) as server:
        remote = list(read_samples(f"{server.url}/digits/{shard.name}", policy=FAST))
    assert [dict(s, __url__="") for s in remote] == [dict(s, __url__="") for s in local]
    assert len(server.requests) >= 2  # seed 1: the first request fails (503), whatever the timing of later cuts
    if ranges:  # every re-request starts where a sample starts
        starts = set(_starts(shard))
        assert all(start in starts for _, start, _ in server.requests)


def test_read_resumed_mid_shard_requests_only_its_bytes(digits: Path) -> None:
    shard = digits / "train-000001.tar"
    starts = _starts(shard)
    with FlakyServer(digits, faults=False) as server:
        url = f"{server.url}/digits/{shard.name}"
        middle = list(read_samples(url, 150, 160, span=(starts[150], starts[160])))
        tail = list(read_samples(url, 390, None, span=(starts[390], None)))
    assert _keys(middle) == _keys(read_samples(str(shard), 150, 160))
    assert _keys(tail) == _keys(read_samples(str(shard), 390)) and len(tail) == 10
    assert server.requests == [
        (f"digits/{shard.name}", starts[150], starts[160] - starts[150]),
        (f"digits/{shard.name}", starts[390], shard.stat().st_size - starts[390]),
    ]


@pytest.mark.parametrize("cut", ["boundary", "mid-member"])
def test_pipe_command_that_fails_once_is_rerun(
    digits: Path, tmp_path: Path, cut: str, caplog: pytest.LogCaptureFixture
) -> None:
    shard = digits / "train-000002.tar"
    size = _starts(shard)[37] + (0 if cut == "boundary" else 700)
    flag = tmp_path / "failed-once"
    cmd = f"pipe:if [ -e {flag} ]; then cat {shard}; else touch {flag}; head -c {size} {shard}; exit 3; fi"
    with caplog.at_level(logging.WARNING):
        samples = list(read_samples(cmd, policy=FAST))
    assert _keys(samples) == _keys(read_samples(str(shard)))
    assert "command exited with status 3" in caplog.text and "retry 1/3" in caplog.text


def test_after_the_last_retry_the_rest_is_skipped_or_the_run_stops(digits: Path) -> None:
    shard = digits / "train-000000.tar"
    cmd = f"pipe:head -c {_starts(shard)[10]} {shard}; exit 1"
    samples = list(read_samples(cmd, policy=ReadPolicy(retries=2, retry_wait=0.01)))
    # sample 9 ends where the output stops, but the command failed: it may have lost members, so it is not handed on
    assert len(samples) == 10 and BROKEN in samples[-1] and "status 1" in samples[-1][BROKEN]
    with pytest.raises(
        DataError, match=r"shard pipe:head .* at sample 9 after 2 retries: command exited with status 1"
    ):
        list(read_samples(cmd, policy=ReadPolicy(retries=2, retry_wait=0.01, fail=True)))


def test_loader_over_a_faulty_server_matches_local_files(digits: Path) -> None:
    """Two epochs through 2 workers: the same batches (keys, order, pixels) as from local files."""
    common = {"workers": 2, "shuffle_buffer": 50, "retries": FAULTS + 1, "retry_wait": 0.01}

    def make(source: str):
        return build_loader(
            DataConfig(source=source, **common), "train", preset="pretrain", batch_size=64, img_size=8, seed=0
        )

    local = make(str(digits))
    with FlakyServer(digits, faults=True, seed=2) as server:
        remote = make(f"{server.url}/digits/dataset.json")
        for epoch in range(2):
            pairs = list(zip(remote, local, strict=True))
            assert all(a["key"] == b["key"] and (a["image"] == b["image"]).all() for a, b in pairs), epoch
    assert remote.corrupt_samples() == 0 and sum(len(b["key"]) for b, _ in pairs) == 1497
    assert server.faults_made >= 8  # 2 epochs x 4 shards, most first requests fail (seed 2: the same every run)


def _sample_bytes(digits: Path) -> dict[str, int]:
    """key -> bytes of its tar members (the last sample of a shard also carries the end-of-archive blocks)."""
    sizes = {}
    for shard in sorted(digits.glob("train-*.tar")):
        starts = _starts(shard) + [shard.stat().st_size]
        keys = _keys(read_samples(str(shard)))
        sizes.update({k: starts[i + 1] - starts[i] for i, k in enumerate(keys)})
    return sizes


def _tar_bytes(server: FlakyServer, alias: str) -> int:
    return sum(n for path, _, n in server.requests if path.startswith(alias + "/") and path.endswith(".tar"))


@pytest.mark.parametrize("buffer", [0, 50])
def test_http_epoch_downloads_each_byte_once_and_a_resume_only_what_is_left(
    digits: Path, buffer: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 ranks x 2 workers enter shards mid-way (the sample index gives the bytes); a loader restored
    after 5 batches asks for exactly the samples it has not yielded (with a shuffle buffer: still
    buffered or unread), and yields the same batches as the uninterrupted one."""
    # one request per run of needed samples; the policy travels to the workers with the stream
    policy = stream.read_policy
    monkeypatch.setattr(stream, "read_policy", lambda cfg: dataclasses.replace(policy(cfg), read_through=1))
    sizes = _sample_bytes(digits)
    with FlakyServer(digits, faults=False) as server:

        def make(alias: str, rank: int = 0):
            cfg = DataConfig(source=f"{server.url}/{alias}/dataset.json", workers=2, shuffle_buffer=buffer)
            return build_loader(
                cfg, "train", preset="pretrain", batch_size=32, img_size=8, seed=1, rank=rank, world_size=2
            )

        full = [[b["key"] for b in make("full", rank)] for rank in range(2)]
        first, resumed = make("first"), make("resumed")
        before = [b["key"] for b in itertools.islice(first, 5)]
        resumed.load_state_dict(first.state_dict())
        after = [b["key"] for b in resumed]
    assert _tar_bytes(server, "full") == sum(sizes.values())  # every byte once, over 2 x 2 readers
    assert before + after == full[0]
    assert _tar_bytes(server, "resumed") == sum(sizes[k] for batch in after for k in batch)


def test_without_retries_faults_are_skipped_and_counted_or_stop_the_loader(digits: Path) -> None:
    def make(url: str, on_error: str):
        cfg = DataConfig(source=f"{url}/dataset.json", workers=0, shuffle_buffer=0, retries=0, on_error=on_error)
        return build_loader(cfg, "train", preset="pretrain", batch_size=100, img_size=8, seed=0)

    with FlakyServer(digits, faults=True, seed=3) as server:
        skipping = make(f"{server.url}/skip", "skip")
        batches = [b["key"] for b in skipping]
        with pytest.raises(DataError) as err:
            list(make(f"{server.url}/fail", "fail"))
    # a batch that lost every sample holds one stand-in (a sample read before), so count distinct keys
    assert len(batches) == len(skipping) and 0 < skipping.corrupt_samples() == 1497 - len(
        {k for b in batches for k in b}
    )
    assert skipping.last_skip().startswith(f"{server.url}/skip/train-")
    message = str(err.value)
    assert (
        "\n" not in message
        and message.startswith(f"shard {server.url}/fail/train-")
        and "data.on_error=fail" in message
    )


def test_only_transient_faults_are_retried(digits: Path, caplog: pytest.LogCaptureFixture) -> None:
    reader = RemoteTar("http://host/x.tar")
    status = {
        code: reader.transient(urllib.error.HTTPError("u", code, "", None, None)) for code in (404, 416, 429, 500, 503)
    }
    assert status == {404: False, 416: False, 429: True, 500: True, 503: True}
    assert reader.transient(ConnectionResetError()) and reader.transient(TimeoutError())
    assert not reader.transient(tarfile.ReadError("bad header"))
    with FlakyServer(digits, faults=False) as server, caplog.at_level(logging.WARNING):
        (gone,) = read_samples(f"{server.url}/digits/no-such.tar", policy=FAST)
    assert "HTTP Error 404" in gone[BROKEN] and "retry" not in caplog.text
