"""`moda ui` (`make ui`): the Prefect server on the demo's database, its address printed."""

import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from pipelines.run.demo import free_port


@pytest.mark.slow
def test_moda_ui_serves_the_demo_database_at_the_address_it_prints(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.run.cli", "ui", "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line, line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=10) as response:
            assert response.status == 200
        assert (tmp_path / ".prefect" / "prefect.db").is_file()  # the database make demo writes
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
