"""One model trained over several hosts: torchrun's c10d rendezvous, its address agreed through a file.

Why a file: torchrun's c10d rendezvous needs an endpoint (host:port) that
every node knows before it starts, and one node to serve it; under SLURM, a
Dask cluster or Kubernetes, which host a node lands on is known only once it
runs. The run folder is on a filesystem every training host mounts (the
trainer writes its checkpoints there), so each node process first runs this
module: the first to arrive publishes its own address and a free port in a
file unique to the launch (`os.link`, atomic even over NFS) and serves the
rendezvous (`is_host=1`); the others read it and join (`is_host=0`). Then
each becomes torchrun (`exec`), which gives ranks, sets RANK / WORLD_SIZE /
MASTER_ADDR, and starts `nproc_per_node` trainer processes.

Launching the node processes is the node launcher's job: `srun --nodes=N
--ntasks-per-node=1` under SLURM (`train.node_launcher`), or with none,
`--copies N` here, which starts N on this host (loopback: how the tests
check it, gloo on CPU).

    python -m experts.nodes --copies 2 RDZV_FILE -- torchrun --nnodes=2 ... {rendezvous} -m experts.trainer_main ...
    srun --nodes=2 --ntasks-per-node=1 python -m experts.nodes RDZV_FILE -- torchrun --nnodes=2 ... {rendezvous} ...
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ADDRESS_VAR = "MODA_NODE_ADDRESS"  # this host's address as the other nodes reach it (default: its hostname)
TIMEOUT_VAR = "MODA_RENDEZVOUS_TIMEOUT"
TIMEOUT_S = 900.0
RENDEZVOUS = "{rendezvous}"  # where in the torchrun command the node's endpoint and role go


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def rendezvous(path: Path, address: str | None = None, timeout: float | None = None) -> tuple[str, bool]:
    """(the endpoint every node of this launch uses, whether this node serves it)."""
    address = address or os.environ.get(ADDRESS_VAR) or socket.gethostname()
    path.parent.mkdir(parents=True, exist_ok=True)
    offer = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}")
    offer.write_text(f"{address}:{free_port()}\n")
    try:
        os.link(offer, path)  # fails if another node published first
        return offer.read_text().strip(), True
    except FileExistsError:
        pass
    finally:
        offer.unlink(missing_ok=True)
    deadline = time.monotonic() + (timeout or float(os.environ.get(TIMEOUT_VAR, TIMEOUT_S)))
    while time.monotonic() < deadline:
        text = path.read_text().strip() if path.is_file() else ""
        if text:
            return text, False
        time.sleep(0.2)
    raise TimeoutError(f"{path}: no rendezvous address appeared in time")


def join(path: Path, command: list[str]) -> list[str]:
    """`command` (a torchrun command line) with its RENDEZVOUS placeholder replaced by this node's
    endpoint and role."""
    if RENDEZVOUS not in command:
        raise SystemExit(f"experts.nodes: the command has no {RENDEZVOUS} placeholder for the rendezvous")
    endpoint, hosting = rendezvous(path)
    print(f"experts.nodes: {socket.gethostname()} {'serves' if hosting else 'joins'} the rendezvous at "
          f"{endpoint} (is_host={int(hosting)})", flush=True)
    at = command.index(RENDEZVOUS)
    return [*command[:at], f"--rdzv_endpoint={endpoint}", f"--rdzv_conf=is_host={int(hosting)}", *command[at + 1:]]


def copies(count: int, argv: list[str]) -> int:
    """Run `count` node processes of `argv` on this host; their output merged; the first failure's
    exit code (the others are stopped), else 0."""
    procs = [subprocess.Popen([sys.executable, "-m", "experts.nodes", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, bufsize=1) for _ in range(count)]
    lock = threading.Lock()

    def forward(proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with lock:
                sys.stdout.write(line)
                sys.stdout.flush()

    threads = [threading.Thread(target=forward, args=(p,), daemon=True) for p in procs]
    for thread in threads:
        thread.start()
    code = 0
    while any(p.poll() is None for p in procs):
        failed = [p.returncode for p in procs if p.returncode]
        if failed:
            code = failed[0]
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    for thread in threads:
        thread.join()
    return code or next((p.returncode for p in procs if p.returncode), 0)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--copies"]:
        return copies(int(argv[1]), argv[2:])
    path, separator, *command = argv
    if separator != "--" or not command:
        raise SystemExit("usage: python -m experts.nodes [--copies N] RDZV_FILE -- torchrun ...")
    command = join(Path(path), command)
    os.execvp(command[0], command)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
