"""The benchmark harness behind ``raysim bench`` and ``benchmarks/scale.py``.

Four suites, each selectable with ``--suite`` (default: all of them), measured
in one invocation on one Ray instance and written to one JSON file, with PNG
plots next to it when matplotlib (the ``plot`` extra) is installed:

``baseline``
    For the MLP and the CNN workload (1,000 sensors, all of them every round):
    raysim's steady-state round time against the same round done by a plain
    per-sensor PyTorch loop in this process, no federated framework involved.
    ratio = plain-loop round seconds / raysim steady-state round seconds.
``scaling``
    Throughput, in sensor updates per wall-clock second, against cohort size
    with fleet = cohort (full participation), and against the number of client
    actors at a fixed cohort (each actor gets Ray's CPUs / actors).
``memory``
    Peak memory against cohort size (the scaling runs' figures), and one run of
    a 100,000-sensor fleet with 10,000 sensors per round in a fresh driver process.
``communication``
    Bytes up and down per round and per second of virtual time, for every run.

Definitions (one place, used by every suite):

- steady state: round 1 pays one-off costs (first calls, allocator warm-up) and
  is skipped. With R rounds, updates = Σ updates_applied over rounds 2..R,
  seconds = wall_time_s[R] − wall_time_s[1], throughput = updates / seconds and
  the steady round time = seconds / (R − 1). The last round's evaluation on the
  test set is inside that window (the workload evaluates only at the end).
- makespan: ``train_wall_s``, from dispatching a round's training calls to
  having every result; each actor's busy time comes from ``actors.parquet``.
  Both are means over the steady rounds; balance = mean over actors of their
  busy time / the busiest actor's.
- memory: the engine's per-process peak RSS (high-water marks) of the driver,
  the coordinator and every client actor, summed: an upper bound of the peak
  of the total. Every run gets new actor processes (the engine's pool of idle
  actors is emptied first), and this process's high-water mark is reset before
  each run it drives (Linux), so its figure is its peak during that run,
  counted from what the harness itself already holds. The big fleet run is
  made by a fresh driver process connected to the same Ray instance, so its
  driver figure is raysim's alone (``fresh_driver``; the process is started
  through a shell, since Linux would carry this process's ``ru_maxrss`` into a
  child it forks directly). GB are 10^9 bytes, MB 2^20 bytes.

The ``acceptance`` section holds the issue's targets (MLP ratio ≥ 3, CNN ratio
≥ 1.5, throughput at cohort 10,000 ≥ 0.8 × that at 1,000, peak memory of the
100,000-sensor run < 8 GB) for whatever this invocation measured, each with
``at_spec``: whether its configuration is the one the target is set for. The
smoke configuration (``--smoke``) checks that the harness works, not that
raysim is fast.

Ray: an already initialized Ray is used as it is; otherwise one local instance
sized to the machine is started for the whole invocation and stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from raysim.errors import RaysimError, ScenarioError
from raysim.metrics import reset_peak_rss

SUITES = ("baseline", "scaling", "memory", "communication")
DESCRIPTION = ("Benchmark raysim: throughput against cohort size and client actors, a plain-PyTorch baseline, "
               "peak memory and communication; writes JSON results and PNG plots.")

SEED = 0
DATA = {"kind": "synthetic", "classes": 6, "channels": 6, "window": 32, "samples_per_sensor": 64,
        "quantity_sigma": 0, "label_alpha": 0.5}
TIER = {"name": "iot", "share": 1.0, "seconds_per_sample": 0.0057, "up_mbps": 0.25, "down_mbps": 1,
        "latency_ms": 200, "loss": 0.0}
TRAINING = {"local_epochs": 1, "batch_size": 16, "lr": 0.1}
# Workload name → scenario model section.
MODELS: dict[str, dict[str, Any]] = {"mlp": {"name": "mlp", "hidden": [64]}, "cnn": {"name": "dscnn"}}
SCALING_MODEL = "mlp"

# The targets, and the configuration each is set for.
FLOORS = {"mlp_ratio": 3.0, "cnn_ratio": 1.5, "scaling_10k_over_1k": 0.8}
CEILINGS = {"peak_memory_100k_gb": 8.0}
SPEC = {"baseline_sensors": 1000, "scaling_cohorts": (1000, 10_000), "memory_fleet": 100_000, "memory_cohort": 10_000}

# Full defaults, and the smoke configuration (every suite in well under a minute on 2 cores).
# The smoke's figures mean nothing, so it saves what it can: one client actor outside the actor sweep (each
# actor is a process to start), and a single-threaded plain loop (an intra-op thread pool on a busy machine
# can spend seconds per round waiting for its threads). client_actors None: one per CPU Ray has.
DEFAULTS = dict(cohorts=(100, 1000, 10_000), actors=(1, 2, 4), actor_cohort=1000, client_actors=None, rounds=5,
                models=("mlp", "cnn"), baseline_sensors=1000, baseline_rounds=2, plain_threads=None,
                memory_fleet=100_000, memory_cohort=10_000, memory_rounds=3)
SMOKE = dict(cohorts=(20, 40), actors=(1, 2), actor_cohort=40, client_actors=1, rounds=3, models=("mlp", "cnn"),
             baseline_sensors=40, baseline_rounds=2, plain_threads=1, memory_fleet=200, memory_cohort=40,
             memory_rounds=3)

GB = 1e9
MB = float(1 << 20)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser, default_out: Path | None = None) -> None:
    """The options of ``raysim bench`` (shared by the ``raysim`` command and :func:`main`).

    Values are kept as given and checked by :func:`config_from_args`, so a bad
    value is a one-paragraph :class:`ScenarioError` rather than argparse's usage dump.
    """
    out = default_out or Path("bench-results") / "scale.json"
    full, smoke = DEFAULTS, SMOKE
    add = parser.add_argument
    add("--suite", action="append", metavar="NAME[,NAME]",
        help=f"suites to run: {', '.join(SUITES)} (repeatable or comma-separated; default all)")
    add("--smoke", action="store_true",
        help="a tiny configuration of every suite, to check the harness works (explicit flags still win)")
    add("--cohorts", metavar="K,K,...",
        help=f"cohort sizes of the scaling sweep, fleet = cohort (default {_csv(full['cohorts'])}; smoke {_csv(smoke['cohorts'])})")
    add("--actors", metavar="A,A,...",
        help=f"client-actor counts of the actor sweep (default {_csv(full['actors'])}; smoke {_csv(smoke['actors'])})")
    add("--actor-cohort", metavar="K",
        help=f"cohort (= fleet) of the actor sweep (default {full['actor_cohort']}; smoke {smoke['actor_cohort']})")
    add("--client-actors", metavar="A",
        help="client actors of every run outside the actor sweep (default: one per CPU Ray has; smoke 1)")
    add("--rounds", metavar="R",
        help=f"rounds per raysim run, the first one is warm-up (default {full['rounds']}; smoke {smoke['rounds']})")
    add("--models", metavar="M,M",
        help=f"baseline workloads: {', '.join(MODELS)} (default {_csv(full['models'])})")
    add("--baseline-sensors", metavar="N",
        help=f"sensors of the baseline workload, all trained every round (default {full['baseline_sensors']}; "
             f"smoke {smoke['baseline_sensors']})")
    add("--baseline-rounds", metavar="R",
        help=f"rounds the plain PyTorch loop is timed for, the first one is warm-up (default {full['baseline_rounds']})")
    add("--plain-threads", metavar="N",
        help="torch threads of the plain PyTorch loop (default: torch's default, one per core; smoke 1)")
    add("--fleet-for-memory", dest="memory_fleet", metavar="N",
        help=f"fleet of the memory suite's big run (default {full['memory_fleet']:,}; smoke {smoke['memory_fleet']})")
    add("--memory-cohort", metavar="K",
        help=f"sensors per round of the memory suite's big run (default {full['memory_cohort']:,}; smoke {smoke['memory_cohort']})")
    add("--memory-rounds", metavar="R",
        help=f"rounds of the memory suite's big run (default {full['memory_rounds']})")
    add("--out", metavar="FILE", help=f"JSON results file; PNG plots go next to it (default {out}; smoke "
                                      f"{_default_out(out, True)})")
    add("--keep-runs", action="store_true",
        help="keep every run directory, under <out dir>/<out name>-runs-<time>/ (default: a temporary directory)")
    parser.set_defaults(default_out=str(out))


def build_parser(prog: str = "raysim bench", default_out: Path | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser, default_out)
    return parser


def main(argv: Sequence[str] | None = None, *, default_out: Path | None = None, prog: str = "raysim bench") -> int:
    """Run the harness from command-line arguments; 0 on success, 2 on bad input."""
    from raysim.cli import guarded

    args = build_parser(prog, default_out).parse_args(argv)
    return guarded(lambda: run_from_args(args))


def run_from_args(args: argparse.Namespace) -> int:
    """Check the parsed options, run the suites, write the results and print the tables."""
    config = config_from_args(args)
    report = run_bench(config)
    print_tables(report)
    print(f"results: {config.out}")
    return 0


@dataclass(frozen=True)
class BenchConfig:
    suites: tuple[str, ...]
    cohorts: tuple[int, ...]
    actors: tuple[int, ...]
    actor_cohort: int
    client_actors: int | None  # None: one per CPU Ray has
    rounds: int
    models: tuple[str, ...]
    baseline_sensors: int
    baseline_rounds: int
    plain_threads: int | None  # None: torch's default
    memory_fleet: int
    memory_cohort: int
    memory_rounds: int
    out: Path
    keep_runs: bool
    smoke: bool


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Resolve explicit flags over the smoke or full defaults; any bad value is a :class:`ScenarioError`."""
    base = SMOKE if args.smoke else DEFAULTS

    def pick(name: str, parse, flag: str | None = None) -> Any:
        value = getattr(args, name)
        return base[name] if value is None else parse(flag or f"--{name.replace('_', '-')}", value)

    suites: list[str] = []
    for item in args.suite or [",".join(SUITES)]:
        for name in _split(item):
            if name not in SUITES:
                raise ScenarioError(f"--suite: unknown suite {name!r}; choose from {', '.join(SUITES)}.")
            if name not in suites:
                suites.append(name)
    if not suites:
        raise ScenarioError(f"--suite: name at least one suite of {', '.join(SUITES)}.")
    config = BenchConfig(
        suites=tuple(name for name in SUITES if name in suites),
        cohorts=tuple(sorted(set(pick("cohorts", _int_list)))),
        actors=tuple(sorted(set(pick("actors", _int_list)))),
        actor_cohort=pick("actor_cohort", _positive_int),
        client_actors=None if args.client_actors == "auto" else pick("client_actors", _positive_int),
        rounds=pick("rounds", _positive_int),
        models=pick("models", _model_list),
        baseline_sensors=pick("baseline_sensors", _positive_int),
        baseline_rounds=pick("baseline_rounds", _positive_int),
        plain_threads=pick("plain_threads", _positive_int),
        memory_fleet=pick("memory_fleet", _positive_int, "--fleet-for-memory"),
        memory_cohort=pick("memory_cohort", _positive_int),
        memory_rounds=pick("memory_rounds", _positive_int),
        out=Path(args.out) if args.out is not None else _default_out(Path(args.default_out), args.smoke),
        keep_runs=bool(args.keep_runs),
        smoke=bool(args.smoke),
    )
    for flag, value in (("--rounds", config.rounds), ("--baseline-rounds", config.baseline_rounds),
                        ("--memory-rounds", config.memory_rounds)):
        if value < 2:
            raise ScenarioError(f"{flag}: needs at least 2 rounds, got {value}: the first round is warm-up and "
                                f"is not timed.")
    if config.memory_cohort > config.memory_fleet:
        raise ScenarioError(f"--memory-cohort ({config.memory_cohort:,}) is larger than --fleet-for-memory "
                            f"({config.memory_fleet:,}): a round cannot select more sensors than the fleet has.")
    if config.out.is_dir():
        raise ScenarioError(f"--out {config.out} is a directory; give the JSON file to write, e.g. {config.out / 'scale.json'}.")
    return config


def _default_out(out: Path, smoke: bool) -> Path:
    """The smoke configuration writes next to the real results, never over them: scale.json → scale-smoke.json."""
    return out.with_name(f"{out.stem}-smoke{out.suffix}") if smoke else out


def _split(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def _csv(values: Sequence[Any]) -> str:
    return ",".join(str(v) for v in values)


def _positive_int(flag: str, text: Any) -> int:
    try:
        value = int(str(text).strip().replace("_", ""))
    except ValueError:
        raise ScenarioError(f"{flag}: expected a positive whole number, got {text!r}.") from None
    if value < 1:
        raise ScenarioError(f"{flag}: expected a positive whole number, got {value}.")
    return value


def _int_list(flag: str, text: Any) -> tuple[int, ...]:
    parts = _split(text)
    if not parts:
        raise ScenarioError(f"{flag}: expected comma-separated positive whole numbers, e.g. 100,1000, got {text!r}.")
    try:
        values = tuple(int(part.replace("_", "")) for part in parts)
    except ValueError:
        raise ScenarioError(f"{flag}: expected comma-separated positive whole numbers, e.g. 100,1000, "
                            f"got {text!r}.") from None
    bad = [v for v in values if v < 1]
    if bad:
        raise ScenarioError(f"{flag}: every value must be a positive whole number, got {_csv(bad)} in {text!r}.")
    return values


def _model_list(flag: str, text: Any) -> tuple[str, ...]:
    names = _split(text)
    unknown = [name for name in names if name not in MODELS]
    if not names or unknown:
        raise ScenarioError(f"{flag}: expected workloads among {', '.join(MODELS)}, got {text!r}.")
    return tuple(dict.fromkeys(names))


# --------------------------------------------------------------------------- workloads


def cpu_share(cpus: float, actors: int) -> float:
    """CPUs per client actor so that ``actors`` of them fit in ``cpus``.

    Ray keeps resource amounts to four decimals, so the share is rounded down
    there: 2/3 would become 0.6667, and three of those do not fit in 2 CPUs.
    """
    return max(math.floor(cpus / actors * 10_000) / 10_000, 0.0001)


def workload(model: str, fleet: int, cohort: int, actors: int, cpus: float, rounds: int) -> dict[str, Any]:
    """The benchmark scenario: uniform IoT sensors, 64 samples each, batch 16, one local epoch, sync FedAvg.

    Only the final round is evaluated (``eval_every`` beyond the last round).
    """
    return {
        "name": f"bench-{model}-f{fleet}-k{cohort}-a{actors}-r{rounds}",
        "seed": SEED,
        "fleet": {"sensors": fleet, "data": dict(DATA), "tiers": [dict(TIER)]},
        "model": json.loads(json.dumps(MODELS[model])),
        "training": {"rounds": rounds, **TRAINING},
        "aggregation": {"mode": "sync", "strategy": {"name": "fedavg"}, "cohort": cohort,
                        "stragglers": {"policy": "wait-all"}},
        "cluster": {"client_actors": actors, "num_cpus": cpu_share(cpus, actors)},
        "logging": {"eval_every": rounds + 1, "tensorboard": False, "progress": False},
    }


@dataclass(frozen=True)
class RunKey:
    model: str
    fleet: int
    cohort: int
    actors: int
    rounds: int

    @property
    def label(self) -> str:
        return f"{self.model} fleet={self.fleet} cohort={self.cohort} actors={self.actors} rounds={self.rounds}"


class Runner:
    """Makes raysim runs on the Ray instance of this process, each configuration once.

    Suites ask for the runs they need; a configuration two suites share (the
    1,000-sensor MLP run is both a baseline and a scaling point) is run once.
    """

    def __init__(self, runs_dir: Path) -> None:
        import ray

        self.runs_dir = runs_dir
        self.cpus = float(ray.cluster_resources().get("CPU", 0))
        if self.cpus <= 0:
            raise RaysimError("the Ray instance has no CPUs to place client actors on.")
        self.gcs_address = ray.get_runtime_context().gcs_address
        self.records: dict[RunKey, dict[str, Any]] = {}  # runs of this driver, by configuration
        self.made: list[dict[str, Any]] = []  # every run made, in order (fresh-driver ones too)

    def run(self, key: RunKey, fresh_driver: bool = False) -> dict[str, Any]:
        """The record of the run ``key`` names (see :func:`analyze_run`), making it if not made yet."""
        if key in self.records and not fresh_driver:
            return self.records[key]
        import raysim
        from raysim import cluster

        spec = workload(key.model, key.fleet, key.cohort, key.actors, self.cpus, key.rounds)
        scenario = raysim.load_scenario(spec)  # checked before anything starts
        run_dir = self.runs_dir / (spec["name"] + ("-fresh" if fresh_driver else ""))
        print(f"  {key.label}{' (fresh driver process)' if fresh_driver else ''} ...", file=sys.stderr, flush=True)
        # Every run in new actor processes: a reloaded actor's peak memory would start from what the
        # previous run left in its heap, and idle actors' CPUs must be free for a fresh driver.
        cluster.release_idle()
        started, load_before = time.perf_counter(), _load_average()
        if fresh_driver:
            _run_in_fresh_driver(spec, run_dir, self.gcs_address)
        else:
            reset_peak_rss()  # this driver's figure: its peak during this run (Linux; else its whole life)
            raysim.run(scenario, out_dir=run_dir)
        record = analyze_run(run_dir, fresh_driver=fresh_driver)
        record.update(label=key.label + (" (fresh driver)" if fresh_driver else ""), workload=key.model,
                      run_wall_s=time.perf_counter() - started, load_average=[load_before, _load_average()],
                      run_dir=str(run_dir))
        print(f"    {record['throughput_updates_per_s']:,.0f} updates/s steady, round {record['steady_round_s']:.3f} s, "
              f"peak {record['memory']['total_peak_mb']:,.0f} MB, run {record['run_wall_s']:.1f} s",
              file=sys.stderr, flush=True)
        if not fresh_driver:
            self.records[key] = record
        self.made.append(record)
        return record


def _run_in_fresh_driver(spec: dict[str, Any], run_dir: Path, gcs_address: str) -> None:
    """``raysim.run(spec)`` by a new Python process connected to this Ray instance, so the driver's peak RSS is its own.

    The run directory is the result; a :class:`RaysimError` in the child is raised again here.
    """
    import raysim

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    request = run_dir.parent / f".{run_dir.name}.request.json"
    outcome = run_dir.parent / f".{run_dir.name}.outcome.json"
    request.write_text(json.dumps({"scenario": spec, "run_dir": str(run_dir), "address": gcs_address,
                                   "outcome": str(outcome)}))
    env = dict(os.environ)
    package_root = str(Path(raysim.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    code = "import sys, raysim.bench; sys.exit(raysim.bench._fresh_driver_main(sys.argv[1]))"
    command = [sys.executable, "-c", code, str(request)]
    if os.name == "posix" and Path("/bin/sh").exists():
        # Linux carries getrusage's ru_maxrss (the engine's figure where VmHWM is unavailable) across
        # fork + exec, so a child started from this large process would report at least its peak. A shell
        # in between forks the real child from itself, a few MB; "; exit $?" keeps it from exec-ing in place.
        command = ["/bin/sh", "-c", '"$0" "$@"; exit $?', *command]
    try:
        completed = subprocess.run(command, env=env)
        if outcome.is_file():
            result = json.loads(outcome.read_text())
            if result.get("error"):
                raise RaysimError(f"the fresh-driver run {spec['name']} failed: {result['error']}")
        if completed.returncode != 0:
            raise RuntimeError(f"the fresh-driver run {spec['name']} exited with status {completed.returncode} "
                               f"(its traceback is above)")
    finally:
        request.unlink(missing_ok=True)
        outcome.unlink(missing_ok=True)


def _fresh_driver_main(request_path: str) -> int:
    """Entry point of the fresh driver process (see :func:`_run_in_fresh_driver`)."""
    import ray

    import raysim

    request = json.loads(Path(request_path).read_text())
    outcome = Path(request["outcome"])
    ray.init(address=request["address"], logging_level=logging.ERROR)
    try:
        raysim.run(raysim.load_scenario(request["scenario"]), out_dir=request["run_dir"])
    except RaysimError as exc:
        outcome.write_text(json.dumps({"error": str(exc)}))
        return 2
    finally:
        ray.shutdown()
    outcome.write_text(json.dumps({"error": None}))
    return 0


# --------------------------------------------------------------------------- one run's figures


def analyze_run(run_dir: Path, fresh_driver: bool = False) -> dict[str, Any]:
    """Steady-state throughput, makespan and balance, memory and communication of one finished run.

    Reads only the run directory: ``summary.json``, ``metrics.parquet`` and ``actors.parquet``.
    """
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = pq.read_table(run_dir / "metrics.parquet")
    memory = summary["memory"]
    actors_path = run_dir / "actors.parquet"
    columns = metrics.to_pydict()
    rounds = len(columns["round"])
    if rounds < 2:
        raise RaysimError(f"{run_dir}: the run has {rounds} round(s); the steady state needs at least 2.")
    first_round = columns["round"][0]
    steady = slice(1, rounds)
    steady_rounds = rounds - 1
    steady_updates = int(sum(columns["updates_applied"][steady]))
    steady_wall = columns["wall_time_s"][-1] - columns["wall_time_s"][0]

    actors = pq.read_table(actors_path).to_pydict()
    busy: dict[int, float] = {}
    for round_index, actor, busy_s in zip(actors["round"], actors["actor"], actors["busy_s"]):
        if round_index > first_round:
            busy[int(actor)] = busy.get(int(actor), 0.0) + float(busy_s)
    hosting = summary.get("client_actors") or (max(busy) + 1 if busy else 0)
    # An actor with no sensor in a round has no row in it: it was idle, which counts in its mean.
    actor_busy = [busy.get(index, 0.0) / steady_rounds for index in range(int(hosting))]
    busiest = max(actor_busy, default=0.0)

    bytes_up = int(sum(columns["bytes_up"]))
    bytes_down = int(sum(columns["bytes_down"]))
    virtual_s = float(sum(columns["round_duration_s"]))
    applied = int(sum(columns["updates_applied"]))
    record = {
        "model": summary.get("model"),
        "parameters": summary.get("parameters"),
        "fleet": summary.get("sensors"),
        "cohort": summary.get("cohort"),
        "client_actors": summary.get("client_actors"),
        "sensors_per_actor": summary.get("sensors_per_actor"),
        "rounds": rounds,
        "rounds_not_ok": sum(status != "ok" for status in columns["status"]),
        "steady_rounds": steady_rounds,
        "steady_updates": steady_updates,
        "steady_wall_s": steady_wall,
        "steady_round_s": steady_wall / steady_rounds,
        "throughput_updates_per_s": steady_updates / steady_wall if steady_wall > 0 else None,
        "first_round_s": columns["wall_time_s"][0],
        "makespan_s": _mean(columns["train_wall_s"][steady]),
        "actor_busy_s": actor_busy,
        "actor_busy_max_s": _mean(columns["actor_busy_max_s"][steady]),
        "actor_busy_mean_s": _mean(columns["actor_busy_mean_s"][steady]),
        "balance": (sum(actor_busy) / len(actor_busy)) / busiest if busiest > 0 else None,
        "memory": {
            "driver_peak_mb": float(memory["driver_peak_mb"]),
            "coordinator_peak_mb": float(memory["coordinator_peak_mb"]),
            "client_actors_peak_mb": [float(v) for v in memory["client_actors_peak_mb"]],
            "total_peak_mb": float(memory["total_peak_mb"]),
            "fresh_driver": fresh_driver,
        },
        "communication": {
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "virtual_s": virtual_s,
            "bytes_up_per_round": bytes_up / rounds,
            "bytes_down_per_round": bytes_down / rounds,
            "bytes_up_per_virtual_s": bytes_up / virtual_s if virtual_s > 0 else None,
            "bytes_down_per_virtual_s": bytes_down / virtual_s if virtual_s > 0 else None,
            "bytes_up_per_update": bytes_up / applied if applied else None,
        },
        "final_accuracy": _finite(summary.get("final_accuracy")),
    }
    record["overhead_s"] = (record["steady_round_s"] - record["makespan_s"]
                            if record["makespan_s"] is not None else None)
    return record


def _mean(values: Sequence[Any]) -> float | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _finite(value: Any) -> Any:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


# --------------------------------------------------------------------------- the plain PyTorch baseline


def plain_fedavg_rounds(spec: dict[str, Any], rounds: int, threads: int | None = None) -> dict[str, Any]:
    """The workload's rounds done by a plain per-sensor PyTorch loop in this process, timed.

    No raysim training code: the same architecture (``build_model`` is just the
    ``nn.Module``) and the same sensors' samples, then per sensor: copy the
    global weights in, ``torch.optim.SGD``, shuffle with a torch generator,
    minibatches of ``batch_size`` (the last one smaller), one epoch of
    cross-entropy steps; the new global model is the sample-weighted mean of the
    local models. Torch keeps its default threading unless ``threads`` is given
    (and is restored afterwards). Every sensor trains every round (the
    workload's cohort is the whole fleet).
    """
    import numpy as np
    import torch

    import raysim
    from raysim.api import default_cache_dir
    from raysim.fleet import prepare_fleet, read_sensors
    from raysim.models import build_model

    scenario = raysim.load_scenario(spec)
    fleet = prepare_fleet(scenario, default_cache_dir())
    loaded = read_sensors(fleet.train_path, fleet.profiles.sensor_id)
    sensors = [(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, dtype=np.int64)))
               for _, (x, y) in sorted(loaded.items())]
    model = build_model(scenario.model, fleet.channels, fleet.window, fleet.classes, seed=scenario.seed)
    global_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    training = scenario.training
    seconds: list[float] = []
    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        used_threads = torch.get_num_threads()
        for round_index in range(1, rounds + 1):
            generator = torch.Generator().manual_seed(SEED * 1_000_003 + round_index)
            started = time.perf_counter()
            global_state = _plain_round(model, global_state, sensors, training, generator)
            seconds.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(default_threads)
    return {"rounds_s": seconds, "round_s": sum(seconds[1:]) / (rounds - 1), "sensors": len(sensors),
            "torch_threads": used_threads}


def _plain_round(model: Any, global_state: dict[str, Any], sensors: list[tuple[Any, Any]], training: Any,
                 generator: Any) -> dict[str, Any]:
    """One FedAvg round the way one would write it by hand: w ← Σ_i n_i w_i / Σ_i n_i over every sensor i."""
    import torch
    from torch.nn import functional as F

    batch = int(training.batch_size)
    summed = {name: torch.zeros_like(value) for name, value in global_state.items()}
    total = 0
    for x, y in sensors:
        model.load_state_dict(global_state)
        optimizer = torch.optim.SGD(model.parameters(), lr=training.lr)
        for _ in range(training.local_epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), batch):
                index = order[start:start + batch]
                optimizer.zero_grad()
                F.cross_entropy(model(x[index]), y[index]).backward()
                optimizer.step()
        with torch.no_grad():
            for name, value in model.state_dict().items():
                summed[name].add_(value, alpha=len(y))
        total += len(y)
    return {name: value / total for name, value in summed.items()}


# --------------------------------------------------------------------------- suites


def baseline_suite(config: BenchConfig, runner: Runner, actors: int) -> list[dict[str, Any]]:
    rows = []
    for model in config.models:
        sensors = config.baseline_sensors
        record = runner.run(RunKey(model, sensors, sensors, actors, config.rounds))
        print(f"  plain PyTorch loop, {model}, {sensors:,} sensors, {config.baseline_rounds} rounds ...",
              file=sys.stderr, flush=True)
        load_before = _load_average()
        plain = plain_fedavg_rounds(workload(model, sensors, sensors, actors, runner.cpus, config.rounds),
                                    config.baseline_rounds, config.plain_threads)
        print(f"    round {plain['round_s']:.3f} s", file=sys.stderr, flush=True)
        rows.append({
            "workload": model,
            "model": MODELS[model],
            "parameters": record["parameters"],
            "sensors": sensors,
            "run": record["label"],
            "raysim_round_s": record["steady_round_s"],
            "raysim_throughput_updates_per_s": record["throughput_updates_per_s"],
            "plain_round_s": plain["round_s"],
            "plain_rounds_s": plain["rounds_s"],
            "plain_throughput_updates_per_s": sensors / plain["round_s"],
            "plain_torch_threads": plain["torch_threads"],
            "plain_load_average": [load_before, _load_average()],
            "ratio": plain["round_s"] / record["steady_round_s"],
        })
    return rows


def scaling_suite(config: BenchConfig, runner: Runner, actors: int) -> list[dict[str, Any]]:
    rows = []
    for cohort in config.cohorts:
        rows.append({"sweep": "cohort", **runner.run(RunKey(SCALING_MODEL, cohort, cohort, actors, config.rounds))})
    for count in config.actors:
        key = RunKey(SCALING_MODEL, config.actor_cohort, config.actor_cohort, count, config.rounds)
        rows.append({"sweep": "actors", **runner.run(key)})
    return rows


def memory_suite(config: BenchConfig, runner: Runner, actors: int) -> list[dict[str, Any]]:
    rows = []
    for cohort in config.cohorts:
        rows.append(_memory_row("cohort", runner.run(RunKey(SCALING_MODEL, cohort, cohort, actors, config.rounds))))
    key = RunKey(SCALING_MODEL, config.memory_fleet, config.memory_cohort, actors, config.memory_rounds)
    rows.append(_memory_row("fleet", runner.run(key, fresh_driver=True)))
    return rows


def _memory_row(sweep: str, record: dict[str, Any]) -> dict[str, Any]:
    memory = record["memory"]
    return {
        "sweep": sweep,
        "run": record["label"],
        "fleet": record["fleet"],
        "cohort": record["cohort"],
        "client_actors": record["client_actors"],
        **{name: memory[name] for name in ("driver_peak_mb", "coordinator_peak_mb", "client_actors_peak_mb",
                                           "total_peak_mb")},
        "client_actors_total_mb": sum(memory["client_actors_peak_mb"]),
        "total_peak_gb": memory["total_peak_mb"] * MB / GB,
        "fresh_driver": memory["fresh_driver"],
    }


def communication_suite(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        rows.append({"run": record["label"], "model": record["model"], "parameters": record["parameters"],
                     "fleet": record["fleet"], "cohort": record["cohort"], "rounds": record["rounds"],
                     **record["communication"]})
    return rows


def acceptance(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, for what this invocation measured; each says if its configuration is the target's."""
    entries: dict[str, Any] = {}
    for row in report.get("baseline", []):
        name = f"{row['workload']}_ratio"
        floor = FLOORS[name]
        entries[name] = {"value": row["ratio"], "floor": floor, "pass": row["ratio"] >= floor,
                         "sensors": row["sensors"], "at_spec": row["sensors"] == SPEC["baseline_sensors"]}
    by_cohort = {row["cohort"]: row for row in report.get("scaling", []) if row["sweep"] == "cohort"}
    if len(by_cohort) >= 2:
        low, high = SPEC["scaling_cohorts"]
        if not (low in by_cohort and high in by_cohort):
            low, high = min(by_cohort), max(by_cohort)
        value = by_cohort[high]["throughput_updates_per_s"] / by_cohort[low]["throughput_updates_per_s"]
        floor = FLOORS["scaling_10k_over_1k"]
        entries["scaling_10k_over_1k"] = {
            "value": value, "floor": floor, "pass": value >= floor, "cohorts": [low, high],
            "throughputs_updates_per_s": [by_cohort[low]["throughput_updates_per_s"],
                                          by_cohort[high]["throughput_updates_per_s"]],
            "at_spec": (low, high) == SPEC["scaling_cohorts"]}
    big = [row for row in report.get("memory", []) if row["sweep"] == "fleet"]
    if big:
        row = big[-1]
        ceiling = CEILINGS["peak_memory_100k_gb"]
        entries["peak_memory_100k_gb"] = {
            "value": row["total_peak_gb"], "ceiling": ceiling, "pass": row["total_peak_gb"] < ceiling,
            "fleet": row["fleet"], "cohort": row["cohort"],
            "at_spec": (row["fleet"], row["cohort"]) == (SPEC["memory_fleet"], SPEC["memory_cohort"])}
    if entries:
        entries["all_pass"] = all(entry["pass"] for entry in entries.values())
        entries["all_at_spec"] = all(entry["at_spec"] for entry in entries.values() if isinstance(entry, dict))
    return entries


# --------------------------------------------------------------------------- the whole harness


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the selected suites and write the JSON (atomically) and the plots; return the report."""
    import ray

    from raysim import cluster

    started_ray = cluster.connect(None)
    scratch = None
    try:
        if config.keep_runs:
            runs_dir = config.out.parent / f"{config.out.stem}-runs-{time.strftime('%Y%m%d-%H%M%S')}"
        else:
            scratch = tempfile.mkdtemp(prefix="raysim-bench-")
            runs_dir = Path(scratch)
        runner = Runner(runs_dir)
        actors = config.client_actors or max(1, int(runner.cpus))
        report: dict[str, Any] = {
            "machine": machine_info(runner.cpus),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
                       "out": str(config.out), "client_actors": actors,
                       "workload": {"data": DATA, "tier": TIER, "training": TRAINING, "models": MODELS,
                                    "seed": SEED, "strategy": "fedavg", "mode": "sync", "stragglers": "wait-all"}},
        }
        for suite in config.suites:
            print(f"{suite}:", file=sys.stderr, flush=True)
            if suite == "baseline":
                report["baseline"] = baseline_suite(config, runner, actors)
            elif suite == "scaling":
                report["scaling"] = scaling_suite(config, runner, actors)
            elif suite == "memory":
                report["memory"] = memory_suite(config, runner, actors)
        if "communication" in config.suites:
            if not runner.made:  # communication alone: measure it on the cohort sweep
                scaling_suite(BenchConfig(**{**asdict(config), "actors": ()}), runner, actors)
            report["communication"] = communication_suite(runner.made)
        report["acceptance"] = acceptance(report)
        report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        report["machine"]["load_average_end"] = _load_average()
        report["plots"] = write_plots(report, config.out)
        _write_report(report, config.out)
        return report
    finally:
        cluster.release_idle()
        if started_ray:
            ray.shutdown()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _write_report(report: dict[str, Any], out: Path) -> None:
    from raysim.metrics import write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(_json_safe(report), out)


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def machine_info(ray_cpus: float | None = None) -> dict[str, Any]:
    import ray
    import torch

    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError, AttributeError):
        ram = None
    return {
        "cpus": os.cpu_count(),
        "ray_cpus": ray_cpus,
        "ram_gb": ram,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ray": ray.__version__,
        "platform": platform.platform(),
        "processor": _processor_name(),
        "load_average_start": _load_average(),
    }


def _load_average() -> float | None:
    """The 1-minute load average: timings taken while other processes compete for the CPUs say so here."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- plots and tables


def write_plots(report: dict[str, Any], out: Path) -> list[str]:
    """PNG plots next to ``out`` (``<stem>_<plot>.png``); the file names written. Skipped, with a line
    saying why, when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        print(f"plots skipped: matplotlib is not installed ({exc}); pip install 'raysim[plot]'", file=sys.stderr)
        return []
    out.parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        path = out.parent / f"{out.stem}_{name}.png"
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
        written.append(path.name)

    scaling = report.get("scaling", [])
    by_cohort = sorted((r for r in scaling if r["sweep"] == "cohort"), key=lambda r: r["cohort"])
    if by_cohort:
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        xs = [r["cohort"] for r in by_cohort]
        ax.plot(xs, [r["throughput_updates_per_s"] for r in by_cohort], "o-", label="raysim (steady state)")
        target = report.get("acceptance", {}).get("scaling_10k_over_1k")
        if target is not None:
            low = target["cohorts"][0]
            ax.axhline(target["floor"] * target["throughputs_updates_per_s"][0], linestyle="--", color="grey",
                       label=f"{target['floor']:.0%} of the throughput at cohort {low:,}")
        ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("cohort size = fleet (sensors per round)")
        ax.set_ylabel("sensor updates per wall-clock second")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Throughput vs cohort ({by_cohort[0]['model']}, {by_cohort[0]['client_actors']} client actors)")
        ax.grid(True, which="both", alpha=0.3)
        save(fig, "throughput_cohort")
    by_actors = sorted((r for r in scaling if r["sweep"] == "actors"), key=lambda r: r["client_actors"])
    if by_actors:
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        xs = [r["client_actors"] for r in by_actors]
        ax.plot(xs, [r["throughput_updates_per_s"] for r in by_actors], "o-")
        for r in by_actors:
            if r["balance"] is not None:
                ax.annotate(f"balance {r['balance']:.2f}", (r["client_actors"], r["throughput_updates_per_s"]),
                            textcoords="offset points", xytext=(4, 6), fontsize=8)
        ax.set_xticks(xs)
        ax.set_ylim(0, max(r["throughput_updates_per_s"] for r in by_actors) * 1.15)  # room for the labels
        ax.set_xlabel(f"client actors (sharing {report['machine'].get('ray_cpus', '?'):g} CPUs)")
        ax.set_ylabel("sensor updates per wall-clock second")
        ax.set_title(f"Throughput vs client actors (cohort {by_actors[0]['cohort']:,})")
        ax.grid(True, alpha=0.3)
        save(fig, "throughput_actors")
    memory = report.get("memory", [])
    by_cohort_mem = sorted((r for r in memory if r["sweep"] == "cohort"), key=lambda r: r["cohort"])
    big = [r for r in memory if r["sweep"] == "fleet"]
    if by_cohort_mem or big:
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        if by_cohort_mem:
            xs = [r["cohort"] for r in by_cohort_mem]
            for key, label in (("total_peak_mb", "total"), ("client_actors_total_mb", "client actors"),
                               ("driver_peak_mb", "driver"), ("coordinator_peak_mb", "coordinator")):
                ax.plot(xs, [r[key] * MB / GB for r in by_cohort_mem], "o-", label=f"{label}, fleet = cohort")
        for r in big:
            ax.plot([r["cohort"]], [r["total_peak_gb"]], "*", markersize=14,
                    label=f"total, fleet {r['fleet']:,} (fresh driver)")
        ax.set_xscale("log")
        ax.set_xlabel("cohort size (sensors per round)")
        ax.set_ylabel("peak RSS, GB (sum of per-process peaks)")
        ax.set_ylim(bottom=0)
        ax.set_title("Peak memory vs cohort")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "memory_cohort")
    baseline = report.get("baseline", [])
    if baseline:
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        positions = range(len(baseline))
        width = 0.38
        raysim_s = [r["raysim_round_s"] for r in baseline]
        plain_s = [r["plain_round_s"] for r in baseline]
        ax.bar([p - width / 2 for p in positions], raysim_s, width, label="raysim (steady-state round)")
        ax.bar([p + width / 2 for p in positions], plain_s, width, label="plain per-sensor PyTorch loop")
        for p, r in zip(positions, baseline):
            ax.annotate(f"{r['ratio']:.1f}× faster", (p, max(r["raysim_round_s"], r["plain_round_s"])),
                        textcoords="offset points", xytext=(0, 4), ha="center", fontsize=9)
        ax.set_xticks(list(positions))
        ax.set_xticklabels([f"{r['workload']} ({r['sensors']:,} sensors)" for r in baseline])
        ax.set_ylabel("seconds per round")
        ax.set_title("One round, all sensors: raysim vs a plain PyTorch loop")
        ax.margins(y=0.15)
        ax.legend(fontsize=8)
        save(fig, "baseline")
    return written


def print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.width = max(console.width, 120)  # the tables are wider than a pipe's default 80 columns

    def table(title: str, columns: list[str]) -> Table:
        t = Table(title=title)
        for index, name in enumerate(columns):
            t.add_column(name, justify="left" if index == 0 else "right")
        return t

    if report.get("baseline"):
        t = table("baseline: one round of every sensor", ["workload", "sensors", "raysim s/round", "plain loop s/round",
                                                           "ratio"])
        for r in report["baseline"]:
            t.add_row(r["workload"], f"{r['sensors']:,}", f"{r['raysim_round_s']:.3f}", f"{r['plain_round_s']:.3f}",
                      f"{r['ratio']:.2f}×")
        console.print(t)
    if report.get("scaling"):
        t = table("scaling (steady state)", ["sweep", "cohort", "actors", "s/round", "updates/s", "makespan s",
                                             "balance", "peak MB"])
        for r in report["scaling"]:
            t.add_row(r["sweep"], f"{r['cohort']:,}", str(r["client_actors"]), f"{r['steady_round_s']:.3f}",
                      f"{r['throughput_updates_per_s']:,.0f}", _fmt(r["makespan_s"], ".3f"), _fmt(r["balance"], ".2f"),
                      f"{r['memory']['total_peak_mb']:,.0f}")
        console.print(t)
    if report.get("memory"):
        t = table("memory: peak RSS, MB", ["fleet", "cohort", "driver", "coordinator", "client actors", "total",
                                           "fresh driver"])
        for r in report["memory"]:
            t.add_row(f"{r['fleet']:,}", f"{r['cohort']:,}", f"{r['driver_peak_mb']:,.0f}",
                      f"{r['coordinator_peak_mb']:,.0f}", f"{r['client_actors_total_mb']:,.0f}",
                      f"{r['total_peak_mb']:,.0f}", "yes" if r["fresh_driver"] else "no")
        console.print(t)
    if report.get("communication"):
        t = table("communication", ["model", "fleet", "cohort", "MB up/round", "MB down/round", "KB/s up (virtual)",
                                    "KB/s down (virtual)"])
        for r in report["communication"]:
            t.add_row(r["model"], f"{r['fleet']:,}", f"{r['cohort']:,}", f"{r['bytes_up_per_round'] / 1e6:,.2f}",
                      f"{r['bytes_down_per_round'] / 1e6:,.2f}",
                      _fmt(_div(r["bytes_up_per_virtual_s"], 1e3), ",.1f"),
                      _fmt(_div(r["bytes_down_per_virtual_s"], 1e3), ",.1f"))
        console.print(t)
    entries = {k: v for k, v in report.get("acceptance", {}).items() if isinstance(v, dict)}
    if entries:
        t = table("acceptance", ["target", "value", "target value", "pass", "at spec"])
        for name, e in entries.items():
            bound = f"≥ {e['floor']:g}" if "floor" in e else f"< {e['ceiling']:g}"
            t.add_row(name, f"{e['value']:.3f}", bound, "yes" if e["pass"] else "NO", "yes" if e["at_spec"] else "no (smaller)")
        console.print(t)
    if report.get("plots"):
        console.print("plots: " + ", ".join(report["plots"]))
    machine = report.get("machine", {})
    loads = [machine.get("load_average_start"), machine.get("load_average_end"),
             *(load for r in report.get("baseline", []) for load in r["plain_load_average"]),
             *(load for r in report.get("scaling", []) for load in r["load_average"])]
    busiest = max((load for load in loads if load is not None), default=None)
    if busiest is not None and machine.get("cpus") and busiest > machine["cpus"]:
        console.print(f"note: the 1-minute load average reached {busiest:g} on {machine['cpus']} CPUs during the "
                      f"measurements: other processes competed for the CPUs, so the timings are not reliable.")


def _div(value: float | None, by: float) -> float | None:
    return None if value is None else value / by


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else f"{value:{spec}}"


if __name__ == "__main__":
    sys.exit(main(prog="python -m raysim.bench"))
