"""``raysim submit``: run a scenario as a Ray job through a cluster's job server (Ray Jobs SDK).

The scenario is loaded and validated here, on the submitting machine, before
anything is contacted. It is then staged, resolved (every default and ``--set``
override filled in), into a temporary directory together with any data files it
reads (Parquet shards, availability traces); that directory becomes the job's
``working_dir`` and this very ``raysim`` package its ``py_modules``, so the
cluster runs exactly the code and scenario that were validated. The job's
entrypoint is ``python -m raysim.cli run SCENARIO --out RUN_DIR --address auto``:
``python`` must be an interpreter on the cluster that has raysim's dependencies
(torch, pyarrow, ...) installed.

The run directory is written by the job's driver, which Ray Jobs runs on the
head node, so ``--out`` is an absolute path *on the head node* (default
``/tmp/raysim-runs/<name>-<timestamp>``); a path inside the job's working
directory would vanish with its runtime environment.

Auth: a Ray cluster started with ``RAY_AUTH_MODE=token`` wants
``Authorization: Bearer TOKEN`` on every request. The token is ``--token``, else
``RAYSIM_RAY_TOKEN``, else ``RAY_AUTH_TOKEN``; with none of them, Ray's own
lookup (``RAY_AUTH_MODE=token`` with ``~/.ray/auth_token`` or
``RAY_AUTH_TOKEN_PATH``) still applies. ``RAYSIM_CACHE``, when set here, is
passed to the job (it then names a directory on the cluster's nodes).

Every problem the user can fix (bad scenario, unreachable address, missing or
wrong token, unknown job id) is a :class:`RaysimError`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO, TypeVar

from raysim.errors import ClusterError, DataError, ScenarioError

DEFAULT_RUNS_ROOT = Path("/tmp/raysim-runs")
TOKEN_ENV_VARS = ("RAYSIM_RAY_TOKEN", "RAY_AUTH_TOKEN")
PASSED_ENV_VARS = ("RAYSIM_CACHE",)
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
CONNECT_TIMEOUT_S = 10.0
POLL_S = 1.0

T = TypeVar("T")

DESCRIPTION = ("Run a scenario as a Ray job through a cluster's job server (Ray Jobs SDK): validated here, shipped "
               "with its data files and this raysim as the job's runtime environment. The run directory is written "
               "on the head node. --status / --logs / --stop manage a submitted job.")


@dataclass(frozen=True)
class JobServer:
    """A connected Jobs SDK client and the normalized address it talks to."""

    client: Any  # ray.job_submission.JobSubmissionClient
    address: str
    sent_token: bool  # an Authorization header goes with every request


@dataclass(frozen=True)
class Submission:
    job_id: str
    run_dir: str  # on the node that runs the job's driver (the head node)
    address: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", nargs="?", help="scenario YAML file (not with --status / --logs / --stop)")
    parser.add_argument("--address", required=True, metavar="http://HEAD:8265",
                        help="the Ray job server (the dashboard address); HOST:PORT means http://HOST:PORT")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=value",
                        help="override a scenario key, e.g. --set training.rounds=3 (repeatable)")
    parser.add_argument("--out", metavar="RUN_DIR", help="absolute run directory on the head node "
                        f"(default {DEFAULT_RUNS_ROOT}/<name>-<timestamp>)")
    parser.add_argument("--follow", action="store_true",
                        help="print the job's logs until it ends; exit 0 if it succeeded, 1 if not")
    parser.add_argument("--token", help="Ray auth token (default: $RAYSIM_RAY_TOKEN, then $RAY_AUTH_TOKEN)")
    manage = parser.add_mutually_exclusive_group()
    manage.add_argument("--status", metavar="JOB_ID", help="print a submitted job's status")
    manage.add_argument("--logs", metavar="JOB_ID", help="print a submitted job's logs (with --follow: until it ends)")
    manage.add_argument("--stop", metavar="JOB_ID", help="stop a submitted job")
    parser.set_defaults(submit_parser=parser)


def run_from_args(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """The ``raysim submit`` command; returns its exit status."""
    out = out or sys.stdout
    job_id = args.status or args.logs or args.stop
    if job_id is not None:
        if args.scenario is not None:
            args.submit_parser.error("give either SCENARIO or one of --status / --logs / --stop, not both")
        server = connect(args.address, args.token)
        client = server.client
        if args.status:
            info = _job_call(server, job_id, "read the status of", lambda: client.get_job_info(job_id))
            print(describe(job_id, info), file=out)
            return 0
        if args.stop:
            stopped = _job_call(server, job_id, "stop", lambda: client.stop_job(job_id))
            print(f"job {job_id}: {'stop requested' if stopped else 'already finished'}", file=out)
            return 0
        if args.follow:
            return 0 if follow(server, job_id, out) == "SUCCEEDED" else 1
        print(_job_call(server, job_id, "read the logs of", lambda: client.get_job_logs(job_id)), end="", file=out)
        return 0
    if args.scenario is None:
        args.submit_parser.error("SCENARIO is required unless --status, --logs or --stop is given")
    submission = submit(args.scenario, args.address, args.overrides, args.out, args.token)
    print(f"submitted job {submission.job_id} to {submission.address}", file=out)
    print(f"run directory (on the head node): {submission.run_dir}", file=out)
    if not args.follow:
        where = f"--address {submission.address}"
        print(f"follow it:  raysim submit --logs {submission.job_id} --follow {where}\n"
              f"status:     raysim submit --status {submission.job_id} {where}\n"
              f"stop it:    raysim submit --stop {submission.job_id} {where}", file=out)
        return 0
    server = connect(submission.address, args.token)
    return 0 if follow(server, submission.job_id, out) == "SUCCEEDED" else 1


def submit(
    scenario_path: str | Path,
    address: str,
    overrides: Sequence[str] = (),
    out_dir: str | None = None,
    token: str | None = None,
) -> Submission:
    """Validate the scenario, stage it with its data files, and submit it as a Ray job."""
    from raysim.scenario import load_scenario

    scenario = load_scenario(scenario_path, list(overrides))
    run_dir = _run_dir(scenario.name, out_dir)
    with tempfile.TemporaryDirectory(prefix="raysim-submit-") as staging:
        scenario_file = stage(scenario, Path(staging))
        server = connect(address, token)
        job_id = f"raysim-{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        entrypoint = shlex.join(["python", "-m", "raysim.cli", "run", scenario_file, "--out", run_dir,
                                 "--address", "auto"])
        runtime_env: dict[str, Any] = {"working_dir": staging, "py_modules": [str(Path(__file__).resolve().parent)]}
        env_vars = {name: os.environ[name] for name in PASSED_ENV_VARS if os.environ.get(name)}
        if env_vars:
            runtime_env["env_vars"] = env_vars
        # The working dir and py_modules are uploaded inside submit_job, so the staging dir may go after it.
        _call(server, lambda: server.client.submit_job(
            entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env,
            metadata={"raysim_scenario": scenario.name, "raysim_run_dir": run_dir}))
    return Submission(job_id=job_id, run_dir=run_dir, address=server.address)


def stage(scenario: Any, staging: Path) -> str:
    """Write the resolved scenario into ``staging`` with copies of the files it reads; return its file name.

    Paths in the staged scenario are relative to ``staging``, which is where
    the job finds them (its working directory). The staged file is loaded
    again here, so what the cluster gets is known to be valid.
    """
    from raysim.scenario import load_scenario

    raw = scenario.to_dict()
    data = raw["fleet"]["data"]
    if data.get("kind") == "parquet":
        for key, prefix in (("path", "train"), ("test_path", "test")):
            data[key] = _copy_in(scenario, data[key], staging / "data", prefix, f"fleet.data.{key}")
    for index, tier in enumerate(raw["fleet"]["tiers"]):
        availability = tier.get("availability") or {}
        if availability.get("kind") == "trace":
            availability["path"] = _copy_in(scenario, availability["path"], staging / "traces", f"tier{index}",
                                             f"fleet.tiers[{index}].availability.path")
    import yaml

    name = f"{scenario.name}.yaml"
    (staging / name).write_text(yaml.safe_dump(raw, sort_keys=False))
    load_scenario(staging / name)
    return name


def _copy_in(scenario: Any, path: str, folder: Path, prefix: str, field: str) -> str:
    source = scenario.resolve_path(path)
    if not source.exists():
        raise DataError(f"{scenario.source}: {field}: {source} does not exist, so it cannot be shipped with the job.")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{prefix}-{source.name}"
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)
    return str(target.relative_to(folder.parent))


def _run_dir(name: str, out_dir: str | None) -> str:
    if out_dir is None:
        return str(DEFAULT_RUNS_ROOT / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not os.path.isabs(os.path.expanduser(out_dir)):
        raise ScenarioError(
            f"--out {out_dir!r}: a submitted run's directory must be an absolute path on the head node (e.g. "
            f"{DEFAULT_RUNS_ROOT / name}); a relative one would land in the job's temporary working directory.")
    return os.path.expanduser(out_dir)


def normalize_address(address: str) -> str:
    """``http(s)://HOST:PORT`` as given; ``HOST:PORT`` becomes ``http://HOST:PORT``; anything else is rejected."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    scheme = address.split("://", 1)[0]
    if scheme not in ("http", "https") or not address.split("://", 1)[1]:
        raise ClusterError(
            f"--address {address!r}: raysim submit talks to the Ray job server, the dashboard's HTTP address "
            f"(http://HEAD:8265), not a {scheme}:// address. `raysim run --address` is for ray:// and GCS addresses.")
    return address


def resolve_token(token: str | None) -> str | None:
    if token:
        return token
    for name in TOKEN_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _auth_headers(token: str | None) -> dict[str, str]:
    if token:
        return {"Authorization": f"Bearer {token}"}
    try:  # Ray's own lookup: RAY_AUTH_MODE=token with ~/.ray/auth_token or RAY_AUTH_TOKEN_PATH
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

        return dict(get_auth_headers_if_auth_enabled({}))
    except Exception:  # noqa: BLE001 - an older or minimal Ray has no token auth: send no header
        return {}


def connect(address: str, token: str | None = None) -> JobServer:
    """A ``JobSubmissionClient`` for ``address``, once the job server has answered (with a timeout)."""
    import requests

    address = normalize_address(address)
    token = resolve_token(token)
    headers = _auth_headers(token)
    # The SDK's own check has no timeout (an unroutable host would hang), so ask once here.
    try:
        response = requests.get(f"{address}/api/version", headers=headers, timeout=CONNECT_TIMEOUT_S)
    except requests.exceptions.Timeout:
        raise _unreachable(address, f"no answer within {CONNECT_TIMEOUT_S:g} s") from None
    except requests.exceptions.InvalidURL as exc:
        raise ClusterError(f"--address {address!r} is not a valid URL ({exc}); expected http://HEAD:8265.") from None
    except requests.exceptions.RequestException as exc:
        raise _unreachable(address, _reason(exc)) from None
    if response.status_code in (401, 403):
        raise _refused(address, bool(headers))
    if response.status_code != 200 or "ray_version" not in _json(response):
        raise ClusterError(
            f"{address} answered HTTP {response.status_code} to /api/version, so it is not a Ray job server; "
            f"give the head node's dashboard address (port 8265 by default).")
    from ray.job_submission import JobSubmissionClient

    server = JobServer(None, address, bool(headers))
    return JobServer(_call(server, lambda: JobSubmissionClient(address, headers=headers)), address, bool(headers))


def _json(response: Any) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _reason(exc: Exception) -> str:
    text = str(exc)
    for hint in ("Connection refused", "Name or service not known", "nodename nor servname", "No route to host",
                 "Temporary failure in name resolution", "Network is unreachable"):
        if hint in text:
            return hint.lower()
    return type(exc).__name__


def _unreachable(address: str, reason: str) -> ClusterError:
    return ClusterError(
        f"cannot reach the Ray job server at {address} ({reason}). Check that the cluster is up (`ray status` on "
        f"the head node), that the dashboard is running and listens on that host and port (8265 by default; "
        f"`ray start --head --dashboard-host=0.0.0.0` to reach it from other machines), and that no firewall "
        f"blocks it.")


def _refused(address: str, sent_token: bool) -> ClusterError:
    detail = "the token sent was rejected" if sent_token else "no token was sent"
    return ClusterError(
        f"the Ray job server at {address} refused the request: missing or wrong auth token ({detail}; set --token "
        f"or RAYSIM_RAY_TOKEN to the cluster's token, e.g. from `ray get-auth-token` on the head node).")


def _call(server: JobServer, request: Callable[[], T]) -> T:
    """Run one Jobs SDK request, turning what the user can fix into a :class:`ClusterError`."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        return request()
    except AuthenticationError:
        raise _refused(server.address, server.sent_token) from None
    except (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise _unreachable(server.address, _reason(exc)) from None
    except RuntimeError as exc:
        raise ClusterError(f"the Ray job server at {server.address} failed the request: {exc}") from None


def _job_call(server: JobServer, job_id: str, what: str, request: Callable[[], T]) -> T:
    try:
        return _call(server, request)
    except ClusterError as exc:
        if "status code 404" in str(exc) or "does not exist" in str(exc):
            raise ClusterError(
                f"cannot {what} job {job_id!r}: the Ray job server at {server.address} has no such job "
                f"(`ray job list --address {server.address}` lists them).") from None
        raise


def describe(job_id: str, info: Any) -> str:
    status = getattr(info.status, "value", str(info.status))
    lines = [f"job {job_id}: {status}"]
    if info.message:
        lines.append(f"  {info.message}")
    run_dir = (info.metadata or {}).get("raysim_run_dir")
    if run_dir:
        lines.append(f"  run directory (on the head node): {run_dir}")
    return "\n".join(lines)


def follow(server: JobServer, job_id: str, out: TextIO | None = None, poll_s: float = POLL_S) -> str:
    """Print the job's logs as they grow until it ends; print and return its final status."""
    out = out or sys.stdout
    client = server.client
    printed = 0
    try:
        while True:
            info = _job_call(server, job_id, "follow", lambda: client.get_job_info(job_id))
            status = getattr(info.status, "value", str(info.status))
            logs = _job_call(server, job_id, "read the logs of", lambda: client.get_job_logs(job_id))
            if len(logs) > printed:
                out.write(logs[printed:])
                out.flush()
                printed = len(logs)
            if status in TERMINAL_STATUSES:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (raysim submit --stop {job_id} --address {server.address} "
              f"stops it)", file=sys.stderr)
        raise
    print(describe(job_id, info), file=out)
    return status
