"""All-reduce and all-gather bandwidth on loopback: PyTorch's gloo beside albef-dist's TCP ring.

Usage: python bench_gloo.py [--sizes-mib 1,16,64] [--iters 5] [--skip-ours]

Two gloo ranks (processes) on 127.0.0.1, f32 tensors, one intra-op thread each; then the same
sizes through `cargo run --release -p albef-dist --example bench_tcp` (two ranks as threads), and
a table of both. Each figure is the mean time per operation on the slower rank after one warm-up
call; GB/s is the per-rank tensor size over that time. Both all-gathers allocate their output on
every call, as albef-dist's API (which returns a new tensor) must.
"""

import argparse
import json
import socket
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(op, iters: int) -> float:
    """Mean seconds per call on the slower rank."""
    op()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        op()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item() / iters


def worker(rank: int, port: int, sizes_mib: list, iters: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    for mib in sizes_mib:
        t = torch.ones((mib << 20) // 4)
        all_reduce = timed(lambda: dist.all_reduce(t), iters)
        all_gather = timed(lambda: dist.all_gather_into_tensor(torch.empty(WORLD * t.numel()), t), iters)
        if rank == 0:
            results.put(("all_reduce", mib << 20, all_reduce))
            results.put(("all_gather", mib << 20, all_gather))
    dist.destroy_process_group()


def bench_gloo(sizes_mib: list, iters: int) -> dict:
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(free_port(), sizes_mib, iters, results), nprocs=WORLD)
    out = {}
    while not results.empty():
        op, size, seconds = results.get()
        out[op, size] = seconds
    return out


def bench_ours(sizes_mib: list, iters: int) -> dict:
    cmd = ["cargo", "run", "--release", "-q", "-p", "albef-dist", "--example", "bench_tcp", "--"]
    cmd += ["--json", "--sizes-mib", ",".join(map(str, sizes_mib)), "--iters", str(iters)]
    lines = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout.splitlines()
    return {(r["op"], r["bytes"]): r["seconds"] for r in map(json.loads, lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="1,16,64")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--skip-ours", action="store_true", help="only run gloo")
    args = parser.parse_args()
    sizes_mib = [int(s) for s in args.sizes_mib.split(",")]

    gloo = bench_gloo(sizes_mib, args.iters)
    ours = {} if args.skip_ours else bench_ours(sizes_mib, args.iters)

    header = f"{'op':<11} {'MiB':>4} {'gloo ms':>9} {'ours ms':>9} "
    header += f"{'gloo GB/s':>10} {'ours GB/s':>10} {'ours/gloo':>10}"
    print(header)
    print("-" * len(header))
    for mib in sizes_mib:
        for op in ("all_reduce", "all_gather"):
            size = mib << 20
            g, o = gloo[op, size], ours.get((op, size))
            row = f"{op:<11} {mib:>4} {g * 1e3:>9.2f} "
            if o is None:
                row += f"{'-':>9} {size / g / 1e9:>10.2f} {'-':>10} {'-':>10}"
            else:
                # Speed ratio: above 1 means albef-dist is faster.
                row += f"{o * 1e3:>9.2f} {size / g / 1e9:>10.2f} {size / o / 1e9:>10.2f} {g / o:>10.2f}"
            print(row)


if __name__ == "__main__":
    main()
