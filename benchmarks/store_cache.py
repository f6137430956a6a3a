"""What reading a remote store's local-file artifacts costs: the local copy by checksum.

Training and evaluation read shards, checkpoints and tokenizer.json through local-file
APIs; on a remote store (s3://...) `ArtifactStore.local` downloads a version once, checks
every file against its manifest's sha256, and reuses the copy. This puts the newest
shard and train versions of a local store (default: artifacts/, as `c2m demo` leaves it)
into a bucket on moto's S3 server on 127.0.0.1, then times the first copy and a cached
one, against the reference: the train stage's own duration from its manifest.

    .venv/bin/python benchmarks/store_cache.py [--root artifacts]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit(f"error: moto's S3 server did not start on {endpoint}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="artifacts", help="a local store with shard and train versions")
    args = parser.parse_args()
    moto, endpoint = start_moto()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", C2M_STATE=tempfile.mkdtemp(prefix="c2m-cache-"))
    import boto3

    from flows.store import ArtifactStore

    boto3.client("s3").create_bucket(Bucket="bench")
    local, remote = ArtifactStore(args.root), ArtifactStore("s3://bench/artifacts")
    try:
        train_s = local.manifest("train", local.resolve("train"))["duration_s"]
        rows = []
        for stage in ("shard", "train"):
            version = local.resolve(stage)
            listed = local.manifest(stage, version)["files"]
            remote.root.fs.put(str(local.path(stage, version)), f"{remote.root.path}/{stage}/{version}",
                               recursive=True)
            started = time.perf_counter()
            remote.local(stage, version)
            first = time.perf_counter() - started
            started = time.perf_counter()
            remote.local(stage, version)
            cached = time.perf_counter() - started
            mb = sum(m["bytes"] for m in listed.values()) / 1e6
            rows.append({"stage": stage, "files": len(listed), "mb": round(mb, 1), "first_s": round(first, 3),
                         "mb_per_s": round(mb / first, 1), "cached_s": round(cached, 4),
                         "of_training": round(first / train_s, 5)})
            print(f"{stage:6s} {len(listed):3d} files {mb:8.1f} MB: first copy {first:6.3f} s "
                  f"({mb / first:6.1f} MB/s, {first / train_s:.2%} of the {train_s:.0f} s train stage), "
                  f"cached {cached:.4f} s")
        print(json.dumps({"train_stage_s": train_s, "rows": rows}))
    finally:
        moto.terminate()


if __name__ == "__main__":
    main()
