"""Benchmark: the attachments mirror against `rclone sync`, side by side on one SeaweedFS server.

    .venv/bin/python bench/bench_mirror.py [--objects 5000] [--size 65536] [--runs 3]

Starts its own SeaweedFS (testbed.seaweedfs), fills a source bucket with
`--objects` random objects of `--size` bytes, then in each run mirrors it into a
fresh destination twice with each tool: a first full copy, and a re-run with
nothing changed (which must copy zero objects). Ours writes into an s3://
repository on the same server (so it copies server-side); rclone runs exactly
as the issue names it, `rclone sync --transfers 16 --checkers 16 --fast-list
src:bucket dst:bucket`, and, as a second and stronger peer, with
`--server-side-across-configs` so that it copies server-side too. The order of
the tools alternates between runs. Prints every figure, the ratio ours/rclone
(below 1.0 means ours is faster), and the medians.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anyio

from engram_recovery.core.progress import silent
from engram_recovery.core.repository.mirror import MirrorOptions, mirror_attachments
from engram_recovery.core.repository.s3 import S3Repository
from engram_recovery.core.stores import s3
from engram_recovery.core.stores.s3 import S3Location
from engram_recovery.testbed.seaweedfs import SeaweedFS, seaweedfs

RCLONE = str(Path(sys.executable).with_name("rclone"))


def location(weed: SeaweedFS, bucket: str) -> S3Location:
    return S3Location(weed.endpoint, weed.access_key_id, weed.secret_access_key, weed.region, bucket)


async def fill(source: S3Location, objects: int, size: int) -> None:
    async with s3.client(source) as c:
        await c.create_bucket(Bucket=source.bucket)
        limiter = anyio.Semaphore(32)

        async def one(i: int) -> None:
            async with limiter:
                key = f"u{i % 7}/v{i % 3}/objects/{secrets.token_hex(8)}-{i}"
                await c.put_object(Bucket=source.bucket, Key=key, Body=secrets.token_bytes(size))

        async with anyio.create_task_group() as tg:
            for i in range(objects):
                tg.start_soon(one, i)


async def create_bucket(target: S3Location) -> None:
    async with s3.client(target) as c:
        await c.create_bucket(Bucket=target.bucket)


async def count(target: S3Location) -> int:
    async with s3.client(target) as c:
        return sum([1 async for _ in s3.list_objects(c, target.bucket)])


async def ours(source: S3Location, target: S3Location, backup_id: str) -> tuple[float, int]:
    started = time.perf_counter()
    async with S3Repository(target, "") as repo:
        report = await mirror_attachments(source, repo, backup_id, silent, MirrorOptions(concurrency=16))
    seconds = time.perf_counter() - started
    assert report.server_side_copy
    return seconds, report.copied_objects


def rclone(weed: SeaweedFS, source: str, target: str, *extra: str) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    for remote in ("SRC", "DST"):
        env |= {
            f"RCLONE_CONFIG_{remote}_TYPE": "s3",
            f"RCLONE_CONFIG_{remote}_PROVIDER": "Other",
            f"RCLONE_CONFIG_{remote}_ENDPOINT": weed.endpoint,
            f"RCLONE_CONFIG_{remote}_ACCESS_KEY_ID": weed.access_key_id,
            f"RCLONE_CONFIG_{remote}_SECRET_ACCESS_KEY": weed.secret_access_key,
            f"RCLONE_CONFIG_{remote}_REGION": weed.region,
        }
    argv = [
        RCLONE, "sync", "--transfers", "16", "--checkers", "16", "--fast-list", *extra,
        "--stats", "0", "-v",
        f"src:{source}", f"dst:{target}",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"rclone failed: {done.stderr[-2000:]}")
    return seconds, _transferred(done.stderr)


def _transferred(log: str) -> int:
    # With -v rclone logs one "INFO  : <key>: Copied (new|replaced|server-side copy)" line per object.
    return sum(1 for line in log.splitlines() if ": Copied (" in line)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=5000)
    parser.add_argument("--size", type=int, default=64 * 1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, list[float]] = {}
    with seaweedfs() as weed:
        source = location(weed, "bench-source")
        started = time.perf_counter()
        await fill(source, args.objects, args.size)
        print(f"source: {args.objects} objects of {args.size} bytes, filled in {time.perf_counter() - started:.1f} s")
        for run in range(1, args.runs + 1):
            tag = secrets.token_hex(3)
            names = {"ours": f"ours-{tag}", "rclone": f"rclone-{tag}", "rclone_ss": f"rclone-ss-{tag}"}
            for name in names.values():
                await create_bucket(location(weed, name))
            order = ["ours", "rclone", "rclone_ss"] if run % 2 else ["rclone_ss", "rclone", "ours"]
            row: dict[str, float] = {}
            for phase in ("first", "rerun"):
                for tool in order:
                    if tool == "ours":
                        seconds, copied = await ours(source, location(weed, names[tool]), f"{phase}-{run}")
                    else:
                        extra = ("--server-side-across-configs",) if tool == "rclone_ss" else ()
                        seconds, copied = rclone(weed, source.bucket, names[tool], *extra)
                    expected = args.objects if phase == "first" else 0
                    if copied != expected:
                        raise SystemExit(f"{tool} {phase}: copied {copied} objects, expected {expected}")
                    row[f"{tool}_{phase}"] = seconds
            assert await count(location(weed, names["rclone"])) == args.objects
            for key, value in row.items():
                figures.setdefault(key, []).append(value)
            print(
                f"run {run}: first copy  ours {row['ours_first']:.2f} s | rclone {row['rclone_first']:.2f} s "
                f"(ratio {ratio(row['ours_first'], row['rclone_first'])}) | rclone server-side "
                f"{row['rclone_ss_first']:.2f} s (ratio {ratio(row['ours_first'], row['rclone_ss_first'])})"
            )
            print(
                f"run {run}: re-run      ours {row['ours_rerun']:.2f} s | rclone {row['rclone_rerun']:.2f} s "
                f"(ratio {ratio(row['ours_rerun'], row['rclone_rerun'])}) | rclone server-side "
                f"{row['rclone_ss_rerun']:.2f} s (ratio {ratio(row['ours_rerun'], row['rclone_ss_rerun'])})"
            )
    med = {key: statistics.median(values) for key, values in figures.items()}

    def run_ratio(ours: str, peer: str) -> float:
        return statistics.median(a / b for a, b in zip(figures[ours], figures[peer], strict=True))

    print(
        f"median of {args.runs} runs ({args.objects} x {args.size} B); ratio = ours/peer, median of the per-run ratios:"
    )
    for phase in ("first", "rerun"):
        print(
            f"  {phase:5}  ours {med[f'ours_{phase}']:.2f} s  rclone {med[f'rclone_{phase}']:.2f} s  "
            f"ratio {run_ratio(f'ours_{phase}', f'rclone_{phase}'):.2f}  |  rclone --server-side-across-configs "
            f"{med[f'rclone_ss_{phase}']:.2f} s  ratio {run_ratio(f'ours_{phase}', f'rclone_ss_{phase}'):.2f}"
        )


if __name__ == "__main__":
    anyio.run(main)
