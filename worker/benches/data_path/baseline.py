#!/usr/bin/env python3
"""Data-path baseline: the submitter workload run on Ray or on Dask, for comparison.

    baseline.py {ray|dask} [--inputs DIR] [--runs 3]

The driver reads 100 input files of 10 MiB and ships each one's bytes to one of two worker
processes, which return its CRC-32. Throughput is input bytes / wall time from the first read to
the last result, in MB/s (10^6 bytes/s), timed on a cluster that is already up and has run a
warm-up task. Without --inputs the inputs are made in a temporary directory; with --inputs DIR
they are made there if missing and reused, so Ray and Dask can be run on the same files.
"""

import argparse
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

FILES = 100
FILE_BYTES = 10 * 1024 * 1024
WORKERS = 2


def checksum(data):
    return zlib.crc32(data), len(data)


def make_inputs(directory):
    paths = [directory / f"input-{i:03}.bin" for i in range(FILES)]
    for path in paths:
        if not path.exists() or path.stat().st_size != FILE_BYTES:
            path.write_bytes(os.urandom(FILE_BYTES))
    return paths


def require(module, extra=""):
    try:
        return __import__(module)
    except ImportError:
        sys.exit(
            f"error: Python package '{module}' is not installed for {sys.executable}; "
            f"run worker/benches/data_path/setup.sh and use target/data-path-venv/bin/python{extra}"
        )


class RayCluster:
    def __init__(self):
        ray = require("ray")
        self.ray = ray
        # The dashboard and log forwarding are off so they take no CPU from the two workers.
        ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
        self.task = ray.remote(num_cpus=1)(checksum)

    def warm_up(self):
        # One task per worker, so both worker processes are started before timing.
        self.ray.get([self.task.remote(b"warm-up") for _ in range(WORKERS)])

    def run(self, paths):
        # ray.put copies the bytes into the node's object store; the worker reads them from there.
        refs = [self.task.remote(self.ray.put(path.read_bytes())) for path in paths]
        return self.ray.get(refs)

    def close(self):
        self.ray.shutdown()


class DaskCluster:
    def __init__(self):
        distributed = require("distributed", " (dask[distributed])")
        self.cluster = distributed.LocalCluster(
            n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None
        )
        self.client = distributed.Client(self.cluster)

    def warm_up(self):
        warm_up = [self.client.submit(checksum, b"warm-up", pure=False) for _ in range(WORKERS)]
        self.client.gather(warm_up)

    def run(self, paths):
        # direct=True sends the bytes straight to a worker over TCP (round-robin between the two)
        # instead of through the scheduler; hash=False skips hashing 10 MiB just to name the key.
        futures = []
        for path in paths:
            [data] = self.client.scatter([path.read_bytes()], direct=True, hash=False)
            futures.append(self.client.submit(checksum, data, pure=False))
        return self.client.gather(futures)

    def close(self):
        self.client.close()
        self.cluster.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("system", choices=["ray", "dask"])
    parser.add_argument("--inputs", type=Path, help="directory of the inputs (made if missing)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    cluster_type = {"ray": RayCluster, "dask": DaskCluster}[args.system]
    require(args.system)

    with tempfile.TemporaryDirectory(prefix="data-path-") as scratch:
        directory = args.inputs or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        paths = make_inputs(directory)
        # Outside the timing: what each result must be, and the files into the page cache.
        expected = [checksum(path.read_bytes()) for path in paths]
        total = FILES * FILE_BYTES

        cluster = cluster_type()
        try:
            cluster.warm_up()
            rates = []
            for run in range(1, args.runs + 1):
                gc.collect()
                start = time.perf_counter()
                results = cluster.run(paths)
                seconds = time.perf_counter() - start
                if list(map(tuple, results)) != expected:
                    sys.exit(f"error: {args.system} run {run} returned wrong checksums")
                rates.append(total / seconds / 1e6)
                line = f"{total} bytes in {seconds:.3f} s = {rates[-1]:.1f} MB/s"
                print(f"{args.system} run {run}: {line}", flush=True)
                del results
        finally:
            cluster.close()

    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.system} driver peak RSS: {rss_mib:.0f} MiB")
    runs = ",".join(f"{rate:.1f}" for rate in rates)
    print(f"RESULT {args.system} median_mb_s={statistics.median(rates):.1f} runs={runs}")


if __name__ == "__main__":
    main()
