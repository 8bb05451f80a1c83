"""One launcher for the tests that run a script of their own under ``torchrun`` (gloo ranks on
the CPU) and compare it with one process: the script takes ``--runs SPEC,... --root DIR --out
FILE`` and writes its results as JSON to FILE (rank 0)."""

import json
import os
import socket
import subprocess
import sys


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(target, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2`` of ``target`` (``["-m", MODULE]`` or ``[script]``) with
    ``args``, one thread per rank, captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *target, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def launch(script: str, root: str, nproc: int, specs) -> dict:
    """Runs ``script`` with ``--runs specs`` as one process (``nproc`` 1) or under torchrun with
    ``nproc`` ranks, one thread each, the repository on PYTHONPATH; asserts it exits 0 (its
    output's tail in the message) and returns the JSON it wrote to ``root/out{nproc}.json``."""
    out = os.path.join(root, f"out{nproc}.json")
    cmd = [sys.executable, script] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), script]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                          os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(cmd + ["--runs", ",".join(specs), "--root", root, "--out", out], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def main(worker) -> None:
    """The ``__main__`` of a worker file: ``worker(specs, root, out)`` from ``--runs SPEC,...
    --root DIR --out FILE``, the arguments :func:`launch` passes. A worker that returns its
    results (a JSON-able dict) has them written to FILE by rank 0, then the process group shut
    down and the process ended, as every worker must (a worker that returns None did it itself)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # one thread per rank, as launch() sets OMP_NUM_THREADS
    results = worker(a.runs.split(","), a.root, a.out)
    if results is None:
        return
    from rlhf_fast.distributed import exit_process, shutdown

    if int(os.environ.get("RANK", "0")) == 0:
        with open(a.out, "w") as f:
            json.dump(results, f)
    shutdown()
    exit_process(0)
