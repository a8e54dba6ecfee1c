"""`raysim submit`: a real Ray head with its job server on 127.0.0.1, token auth on, and every failure path.

The head is a separate `ray start --head --block` process (this test process
never calls ray.init: the suite shares one Ray session elsewhere), started in
its own process group with token authentication enabled, and stopped through
its handle at the end.
"""

from __future__ import annotations

import http.server
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raysim.cli import main

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = str(REPO / "scenarios" / "quickstart.yaml")
SMALL = ["--set", "fleet.sensors=60", "--set", "aggregation.cohort=20", "--set", "training.rounds=2",
         "--set", "logging.progress=false"]
TOKEN = secrets.token_hex(16)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A local Ray head (2 CPUs, token auth) whose job server answers on 127.0.0.1; yields its address."""
    requests = pytest.importorskip("requests")
    temp_dir = tempfile.mkdtemp(prefix="rs-submit-", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard_port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this interpreter
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, RAY_USAGE_STATS_ENABLED="0")
    command = [
        str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
        "--node-ip-address=127.0.0.1", f"--port={_free_port()}", f"--temp-dir={temp_dir}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}", "--disable-usage-stats",
    ]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"ray start exited with {process.returncode}: {Path(log.name).read_text()[-3000:]}")
            try:
                answer = requests.get(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=2)
                if answer.status_code == 200:
                    break
            except requests.exceptions.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the job server at {address} did not answer within 90 s")
            time.sleep(0.5)
        yield address
    finally:
        # ray start --block shuts its node down on SIGTERM; whatever is left of its process group goes after.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def submitted(head, tmp_path_factory):
    """The small quickstart, submitted with --follow; its exit status, output and run directory."""
    run_dir = tmp_path_factory.mktemp("submitted") / "run"
    out = tmp_path_factory.mktemp("submit-out") / "stdout.txt"
    import contextlib

    with open(out, "w") as stream, contextlib.redirect_stdout(stream):
        status = main(["submit", QUICKSTART, "--address", head, *SMALL, "--out", str(run_dir), "--follow",
                       "--token", TOKEN])
    return status, out.read_text(), run_dir


def _job_id(output: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith("submitted job "))
    return line.split()[2]


def _one_paragraph_error(err: str, *words: str) -> None:
    assert err.startswith("raysim: error: ")
    assert "Traceback" not in err
    assert err.strip().count("\n\n") == 0
    flat = " ".join(err.split())  # the CLI wraps its paragraph
    for word in words:
        assert word in flat, err


def test_submitted_quickstart_succeeds_and_writes_its_run_directory(submitted):
    status, output, run_dir = submitted
    assert status == 0, output
    assert "SUCCEEDED" in output
    metrics = pq.read_table(run_dir / "metrics.parquet")
    assert metrics.num_rows == 2
    assert metrics.column("round").to_pylist() == [1, 2]
    for name in ("summary.json", "scenario.yaml", "events.parquet"):
        assert (run_dir / name).is_file(), name
    import json
    import yaml

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sensors"] == 60 and summary["rounds"] == 2
    assert yaml.safe_load((run_dir / "scenario.yaml").read_text())["fleet"]["sensors"] == 60


def test_status_logs_and_stop_of_the_finished_job(submitted, head, capsys):
    job_id = _job_id(submitted[1])
    assert main(["submit", "--status", job_id, "--address", head, "--token", TOKEN]) == 0
    out = capsys.readouterr().out
    assert f"job {job_id}: SUCCEEDED" in out
    assert str(submitted[2]) in out
    assert main(["submit", "--logs", job_id, "--address", head, "--token", TOKEN]) == 0
    assert "run directory:" in capsys.readouterr().out
    assert main(["submit", "--stop", job_id, "--address", head, "--token", TOKEN]) == 0
    assert "already finished" in capsys.readouterr().out


def test_token_from_the_environment(submitted, head, capsys, monkeypatch):
    monkeypatch.setenv("RAYSIM_RAY_TOKEN", TOKEN)
    assert main(["submit", "--status", _job_id(submitted[1]), "--address", head.removeprefix("http://")]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out


def test_missing_token_is_a_clear_error(head, capsys, monkeypatch):
    for name in ("RAYSIM_RAY_TOKEN", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # (If a ray.init earlier in this process turned Ray's own token lookup on, it sends this machine's
    # ~/.ray/auth_token, which is not the head's token either.)
    assert main(["submit", QUICKSTART, "--address", head, *SMALL]) == 2
    _one_paragraph_error(capsys.readouterr().err, head, "missing or wrong auth token", "RAYSIM_RAY_TOKEN")


def test_wrong_token_is_a_clear_error(head, capsys):
    assert main(["submit", "--status", "whatever", "--address", head, "--token", "not-the-token"]) == 2
    _one_paragraph_error(capsys.readouterr().err, "missing or wrong auth token", "the token sent was rejected")


def test_unknown_job_id(head, capsys):
    assert main(["submit", "--status", "raysim-no-such-job", "--address", head, "--token", TOKEN]) == 2
    _one_paragraph_error(capsys.readouterr().err, "raysim-no-such-job", "no such job")


def test_unreachable_address_submits_nothing(capsys, tmp_path):
    address = f"http://127.0.0.1:{_free_port()}"  # nobody listens there
    assert main(["submit", QUICKSTART, "--address", address, *SMALL, "--out", str(tmp_path / "run")]) == 2
    _one_paragraph_error(capsys.readouterr().err, address, "cannot reach", "8265", "ray status")
    assert not (tmp_path / "run").exists()


def test_bad_scenario_fails_before_contacting_anything(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntraining: {rounds: 0}\n")
    with _Recorder(401) as server:
        assert main(["submit", str(bad), "--address", server.address]) == 2
        assert server.requests == []
    _one_paragraph_error(capsys.readouterr().err, "training.rounds")


def test_a_missing_data_file_fails_before_contacting_anything(capsys, tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text("name: s\nfleet: {sensors: 10, data: {kind: parquet, path: nowhere.parquet, "
                        "test_path: nowhere.parquet}}\naggregation: {cohort: 5}\n")
    with _Recorder(200) as server:
        assert main(["submit", str(scenario), "--address", server.address]) == 2
        assert server.requests == []
    _one_paragraph_error(capsys.readouterr().err, "fleet.data.path", "nowhere.parquet")


def test_relative_out_is_rejected(capsys):
    assert main(["submit", QUICKSTART, "--address", "http://127.0.0.1:9", *SMALL, "--out", "runs/x"]) == 2
    _one_paragraph_error(capsys.readouterr().err, "absolute path on the head node")


def test_a_ray_client_address_is_rejected(capsys):
    assert main(["submit", "--status", "x", "--address", "ray://127.0.0.1:10001"]) == 2
    _one_paragraph_error(capsys.readouterr().err, "http://HEAD:8265")


def test_scenario_or_a_job_id_is_required(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["submit", "--address", "http://127.0.0.1:9"])
    assert exit_.value.code == 2
    assert "SCENARIO is required" in capsys.readouterr().err


def test_a_401_from_any_server_maps_to_the_token_message(capsys):
    with _Recorder(401) as server:
        assert main(["submit", "--logs", "x", "--address", server.address]) == 2
    _one_paragraph_error(capsys.readouterr().err, "missing or wrong auth token")


def test_a_server_that_is_not_ray(capsys):
    with _Recorder(404) as server:
        assert main(["submit", "--status", "x", "--address", server.address]) == 2
    _one_paragraph_error(capsys.readouterr().err, "not a Ray job server")


def test_parquet_data_and_traces_are_staged_with_the_scenario(tmp_path):
    import yaml

    from raysim.scenario import load_scenario
    from raysim.submit import stage

    (tmp_path / "d").mkdir()
    for name in ("train.parquet", "test.parquet", "trace.csv"):
        (tmp_path / "d" / name).write_text("x")
    spec = {"name": "staged", "fleet": {
        "sensors": 10,
        "data": {"kind": "parquet", "path": "d/train.parquet", "test_path": str(tmp_path / "d" / "test.parquet")},
        "tiers": [{"name": "a", "share": 1.0, "seconds_per_sample": 0.001, "up_mbps": 1, "down_mbps": 1,
                   "availability": {"kind": "trace", "path": "d/trace.csv"}}]},
        "aggregation": {"cohort": 5}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    staging = tmp_path / "staging"
    staging.mkdir()
    name = stage(load_scenario(tmp_path / "s.yaml"), staging)
    staged = load_scenario(staging / name)
    for path in (staged.fleet.data.path, staged.fleet.data.test_path, staged.fleet.tiers[0].availability.path):
        assert not Path(path).is_absolute()
        assert staged.resolve_path(path).is_file()
        assert staged.resolve_path(path).resolve().is_relative_to(staging.resolve())


class _Recorder:
    """A local HTTP server that answers every request with one status and records the paths asked for."""

    def __init__(self, status: int) -> None:
        recorder = self
        self.requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                recorder.requests.append(self.path)
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"no")

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "_Recorder":
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
