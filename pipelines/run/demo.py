"""`make demo`: the whole pipeline through a real local Prefect server and worker.

Steps: generate the synthetic data (once), start `prefect server` on a free
loopback port with its SQLite database under `.prefect/`, create the process
work pool, `prefect deploy --all`, start a worker, `prefect deployment run
moda/full --watch`, print the results table, and stop the server and worker
it started, also when something fails or the user presses Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipelines.core.config import load_config
from pipelines.core.layout import RunLayout
from pipelines.run.progress import Watcher
from pipelines.synth.generate import generate, is_generated

POOL = "moda-local"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def demo_env(root: Path, port: int) -> dict[str, str]:
    """Environment for every Prefect process of the demo: local, offline, quiet."""
    return dict(
        os.environ,
        PREFECT_HOME=str(root / ".prefect"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )


def prefect_cli() -> list[str]:
    return [str(Path(sys.executable).parent / "prefect")]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout:.0f} s; see {log}")


def stop(proc: subprocess.Popen | None, name: str) -> None:
    """Stop a process group: SIGTERM, then SIGINT (a worker wants two signals), then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGINT, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            print(f"[demo] stopped {name}")
            return
        except subprocess.TimeoutExpired:
            continue


def start_server(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """`prefect server start` on the port of env's PREFECT_API_URL, in its own process group; waits until healthy."""
    port = env["PREFECT_API_URL"].rsplit(":", 1)[1].split("/")[0]
    server = subprocess.Popen(prefect_cli() + ["server", "start", "--host", "127.0.0.1", "--port", port],
                              env=env, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    wait_healthy(env["PREFECT_API_URL"], server, log)
    return server


def run(cmd: list[str], env: dict[str, str], cwd: Path, log: Path | None = None) -> None:
    """A Prefect CLI command; its output to `log` when given (the last lines are shown if it fails)."""
    print("[demo] $ " + " ".join(cmd[-4:] if cmd[0].endswith("prefect") else cmd), flush=True)
    if log is None:
        subprocess.run(cmd, env=env, cwd=cwd, check=True)
        return
    with open(log, "w") as out:
        done = subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        print("\n".join(log.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
        raise subprocess.CalledProcessError(done.returncode, cmd)


def main(config_path: str = "configs/demo.yaml") -> int:
    root = Path.cwd()
    cfg = load_config(config_path)
    if not is_generated(cfg.synth):
        print("[demo] generating the synthetic demo data", flush=True)
        generate(cfg.synth)
    state = root / ".prefect"
    state.mkdir(exist_ok=True)
    port = free_port()
    env = demo_env(root, port)
    prefect = prefect_cli()
    server = worker = None
    started = time.time()
    try:
        server_log = state / "server.log"
        print(f"[demo] starting prefect server on 127.0.0.1:{port} (log {server_log})", flush=True)
        server = start_server(env, root, server_log)
        run(prefect + ["work-pool", "create", POOL, "--type", "process", "--overwrite"], env, root)
        run(prefect + ["--no-prompt", "deploy", "--all"], env, root)
        worker_log = state / "worker.log"
        print(f"[demo] starting worker for pool {POOL} (log {worker_log})", flush=True)
        worker = subprocess.Popen(prefect + ["worker", "start", "--pool", POOL], env=env, cwd=root,
                                  stdout=open(worker_log, "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        watch_log = state / "watch.log"
        print(f"[demo] running moda/full; Prefect's event stream goes to {watch_log}, the stages' progress "
              "below (read from the run folder)", flush=True)
        watcher = Watcher(RunLayout.of(cfg.name))
        watcher.start()
        try:
            run(prefect + ["deployment", "run", "moda/full", "--param", f"config_path={json.dumps(config_path)}",
                           "--watch"], env, root, log=watch_log)
        finally:
            watcher.stop()
    except subprocess.CalledProcessError as err:
        print(f"[demo] failed: {err}; logs in {state}/", file=sys.stderr)
        return 1
    finally:
        stop(worker, "worker")
        stop(server, "server")
    results = RunLayout.of(cfg.name).report_markdown  # the comparison with intervals (report stage)
    if not results.is_file():
        print(f"[demo] the flow finished but {results} is missing; see {state}/worker.log", file=sys.stderr)
        return 1
    print("\n" + results.read_text())
    print(f"[demo] done in {time.time() - started:.0f} s; run folder {results.parent.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))


def ui(port: int = 0) -> int:
    """`moda ui` / `make ui`: the Prefect server on the demo's database (`.prefect/` here), in the
    foreground, so the flow runs, logs and artifacts of `make demo` can be browsed; Ctrl-C stops it."""
    root = Path.cwd()
    state = root / ".prefect"
    state.mkdir(exist_ok=True)
    port = port or free_port()
    env = demo_env(root, port)
    log = state / "ui-server.log"
    server = start_server(env, root, log)
    print(f"[ui] Prefect UI at http://127.0.0.1:{port} (database {state}/, log {log}); Ctrl-C stops it",
          flush=True)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(server, "server")
