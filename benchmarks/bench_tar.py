"""Tar shard reading cost per member: data/webdataset.py's reader against Python's `tarfile` stream mode.

    python benchmarks/bench_tar.py

Shards of small members (a 300-500 byte "image" and a caption per sample), written by `tarfile` in the
GNU, USTAR and PAX formats. "tarfile" iterates `tarfile.open(path, "r|")` and reads every member, as
the `wds:` reader did before it had its own; "ours" is `iter_tar_members`. Best of `--repeats` passes
over one shard, alternating; microseconds per member. On such shards the header parsing is the cost,
which at image_size 64 is a sizeable part of a sample's loading time (docs/results.md, "Data loading").
The limit beside them: reading the shard's bytes in 1 MiB chunks and nothing else (from the page cache), and each
reader's share of it (limit time / reader time): what is left is per-member work in Python.
"""
import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crossmodal.data.webdataset import iter_tar_members  # noqa: E402

FORMATS = {"GNU": tarfile.GNU_FORMAT, "USTAR": tarfile.USTAR_FORMAT, "PAX": tarfile.PAX_FORMAT}


def write_shard(path: str, samples: int, tar_format: int) -> None:
    with tarfile.open(path, "w", format=tar_format) as tar:
        for i in range(samples):
            for extension, data in (("jpg", bytes(300 + i % 200)), ("txt", b"a caption number %d" % i)):
                info = tarfile.TarInfo(f"{i:09d}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def read_with_tarfile(path: str) -> int:
    count = 0
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            if member.isfile():
                tar.extractfile(member).read()
                count += 1
    return count


def read_with_ours(path: str) -> int:
    with open(path, "rb", buffering=1 << 20) as f:
        return sum(1 for _ in iter_tar_members(f))


def read_bytes(path: str) -> int:
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    return -1  # not counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000, help="samples per shard (two members each)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    print(f"{2 * args.samples} members per shard, best of {args.repeats} passes, us per member")
    print("| format | tarfile | ours | speed-up | bytes alone (the limit) | share: tarfile / ours |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for name, tar_format in FORMATS.items():
            path = os.path.join(root, f"{name}.tar")
            write_shard(path, args.samples, tar_format)
            best = {"tarfile": float("inf"), "ours": float("inf"), "bytes": float("inf")}
            for _ in range(args.repeats):
                for reader, read in (("tarfile", read_with_tarfile), ("ours", read_with_ours), ("bytes", read_bytes)):
                    start = time.perf_counter()
                    members = read(path)
                    best[reader] = min(best[reader], time.perf_counter() - start)
                    assert reader == "bytes" or members == 2 * args.samples, (reader, members)
            per_member = {reader: seconds / (2 * args.samples) * 1e6 for reader, seconds in best.items()}
            print(f"| {name} | {per_member['tarfile']:.1f} | {per_member['ours']:.1f} | "
                  f"{per_member['tarfile'] / per_member['ours']:.1f}x | {per_member['bytes']:.2f} | "
                  f"{100 * best['bytes'] / best['tarfile']:.0f}% / {100 * best['bytes'] / best['ours']:.0f}% |")


if __name__ == "__main__":
    main()
