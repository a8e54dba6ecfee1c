"""The ``raysim`` command: run, validate and report on scenarios.

Any :class:`RaysimError` becomes a one-paragraph message on stderr and exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from raysim.errors import RaysimError, RaysimWarning, RunInterrupted, ScenarioError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    return guarded(lambda: args.handler(args))


def guarded(command: Callable[[], int]) -> int:
    """Run a command's body: raysim's warnings as one line, a :class:`RaysimError` as one paragraph
    and exit status 2, an interrupt as status 130."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return command()
    except RaysimError as exc:
        message = textwrap.fill(str(exc), width=100, subsequent_indent="  ", break_on_hyphens=False)
        print(f"raysim: error: {message}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        saved = f"; round {stop.round} is saved" if stop.round is not None else ""
        print(f"raysim: interrupted{saved}. Continue with: raysim run --resume {stop.run_dir}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("raysim: interrupted", file=sys.stderr)
        return 130


_PYTHON_SHOWWARNING = warnings.showwarning


def _show_warning(message, category, *args, **kwargs) -> None:
    """raysim's own warnings as one line, like its errors; any other warning as Python shows it."""
    if issubclass(category, RaysimWarning):
        print(f"raysim: warning: {message}", file=sys.stderr)
    else:
        _PYTHON_SHOWWARNING(message, category, *args, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysim", description="Federated-learning simulation over sensor fleets, on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a scenario end to end")
    run.add_argument("scenario", nargs="?", help="scenario YAML file (optional with --resume)")
    run.add_argument("--out", metavar="RUN_DIR", help="run directory to create (default runs/<name>-<timestamp>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=value",
                     help="override a scenario key, e.g. --set training.rounds=3 (repeatable)")
    run.add_argument("--address", help="existing Ray cluster to run on (auto, ray://HOST:10001, HOST:PORT)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    run.set_defaults(handler=_run)

    validate = commands.add_parser("validate", help="load and validate a scenario, print it resolved")
    validate.add_argument("scenario")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=value")
    validate.add_argument("--quiet", action="store_true", help="print nothing on success")
    validate.set_defaults(handler=_validate)

    report = commands.add_parser("report", help="summarize a finished run directory")
    report.add_argument("run_dir")
    report.set_defaults(handler=_report)

    from raysim import submit as submit_module  # imports Ray only when it runs

    submit = commands.add_parser("submit", help="run a scenario as a Ray job on a cluster (Jobs SDK); manage it",
                                 description=submit_module.DESCRIPTION)
    submit_module.add_arguments(submit)
    submit.set_defaults(handler=_submit)

    from raysim import bench as bench_module  # imports Ray and torch only when it runs

    bench = commands.add_parser("bench", help="benchmark throughput, memory and communication; JSON + PNG plots",
                                description=bench_module.DESCRIPTION)
    bench_module.add_arguments(bench)
    bench.set_defaults(handler=_bench)
    return parser


def _submit(args: argparse.Namespace) -> int:
    from raysim.submit import run_from_args

    return run_from_args(args)


def _bench(args: argparse.Namespace) -> int:
    from raysim.bench import run_from_args

    return run_from_args(args)


def _validate(args: argparse.Namespace) -> int:
    from raysim.scenario import load_scenario

    scenario = load_scenario(args.scenario, args.overrides)
    if not args.quiet:
        print(scenario.to_yaml(), end="")
        print(f"# {args.scenario}: valid", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    from raysim.api import run
    from raysim.scenario import load_scenario

    if args.scenario is None and args.resume is None:
        raise ScenarioError("raysim run needs a SCENARIO file, or --resume RUN_DIR to continue a run.")
    if args.resume is not None:
        if args.overrides:
            raise ScenarioError(f"--resume {args.resume} continues the run as it was; --set cannot change it.")
        scenario = load_scenario(args.scenario) if args.scenario is not None else None
        saved = Path(args.resume) / "scenario.yaml"  # run() checks it; here it only sizes the progress bar
        shown = load_scenario(saved) if saved.is_file() else scenario
    else:
        scenario = shown = load_scenario(args.scenario, args.overrides)
    with _Progress(shown.training.rounds if shown else 0, enabled=shown is not None and shown.logging.progress) as bar:
        result = run(scenario, out_dir=args.out, address=args.address, progress=bar.update, resume=args.resume)
    _print_summary(result.summary, result.run_dir)
    return 0


class _Progress:
    """A live bar: rounds done, last accuracy, sensor updates per wall-clock second."""

    def __init__(self, rounds: int, enabled: bool) -> None:
        self.rounds = rounds
        self.enabled = enabled
        self.bar = None
        self.accuracy = float("nan")

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(), transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("run", total=self.rounds, status="starting Ray and client actors")
        return self

    def update(self, row: dict[str, Any]) -> None:
        if not math.isnan(row["accuracy"]):
            self.accuracy = row["accuracy"]
        if self.bar is not None:
            status = (f"accuracy {self.accuracy:.3f}  {row['updates_per_s']:,.0f} updates/s  "
                      f"virtual {row['virtual_time_s']:,.0f} s")
            self.bar.update(self.task, completed=row["round"], status=status)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    from rich.console import Console

    console = Console()
    console.print(_summary_table(summary))
    console.print(f"run directory: {run_dir}\nTensorBoard:   tensorboard --logdir {run_dir / 'tb'}")


def _summary_table(summary: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"raysim run: {summary.get('name', '')}", show_header=False)
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("sensors / cohort", f"{summary.get('sensors', '?'):,} / {summary.get('cohort', '?'):,}"),
        ("model", f"{summary.get('model', '?')} ({summary.get('parameters', 0):,} parameters)"),
        ("aggregation", f"{summary.get('mode', 'sync')} {summary.get('strategy', 'fedavg')}, "
                        f"{summary.get('aggregator', 'mean')}, server {summary.get('server_optimizer', 'sgd')}"),
        ("client actors × sensors each", f"{summary.get('client_actors', '?')} × {summary.get('sensors_per_actor', '?')}"),
        ("rounds", f"{summary.get('rounds', 0)}"),
        ("accuracy: first → final (best)", _accuracy_text(summary)),
        *_architecture_rows(summary),
        ("final test loss", _fmt(summary.get("final_loss"), ".4f")),
        ("updates applied / dropped", f"{summary.get('updates_applied', 0):,} / {summary.get('updates_dropped', 0):,}"),
        ("  dropped: late / lost / offline / rejected",
         f"{summary.get('updates_late', 0):,} / {summary.get('updates_lost', 0):,} / {summary.get('updates_offline', 0):,}"
         f" / {summary.get('updates_rejected', 0):,}"),
        ("trainings skipped (saved)", f"{summary.get('trainings_skipped', 0):,} ({_fmt(summary.get('compute_saved_s'), ',.1f', ' s')} virtual compute)"),
        ("rounds skipped", f"{summary.get('rounds_skipped', 0):,}"),
        ("bytes up / down", f"{_bytes(summary.get('bytes_up'))} / {_bytes(summary.get('bytes_down'))}"),
        ("compression up / down (vs float32)", f"{_fmt(summary.get('uplink_compression'), ',.1f', '×')} / "
                                               f"{_fmt(summary.get('downlink_compression'), ',.1f', '×')}"),
        *_privacy_rows(summary.get("privacy")),
        ("virtual time", _fmt(summary.get("virtual_time_s"), ",.1f", " s")),
        ("wall time", _fmt(summary.get("wall_time_s"), ",.1f", " s")),
        *_target_rows(summary),
        ("throughput", _fmt(summary.get("updates_per_s"), ",.0f", " sensor updates/s")),
        *_memory_rows(summary.get("memory")),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _architecture_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """With several architectures, each one's final accuracy and bytes per task; with personalization, the
    sensors' own models on their held-out samples."""
    rows = []
    groups = summary.get("architectures", [])
    if len(groups) > 1:
        for g in groups:
            rows.append((f"  {g['name']} ({g['model']['name']}, {g['parameters']:,} parameters)",
                         f"final {_fmt(g.get('final_accuracy'), '.3f')}, {_bytes(g['bytes_up_per_update'])} up / "
                         f"{_bytes(g['bytes_down_per_task'])} down per task"))
    personal = summary.get("personalization")
    if personal:
        layers = sorted({name for g in groups for name in g.get("personal_layers", [])})
        rows.append(("personalized accuracy: mean ± std (p10)",
                     f"{_fmt(personal.get('accuracy_mean'), '.3f')} ± {_fmt(personal.get('accuracy_std'), '.3f')} "
                     f"({_fmt(personal.get('accuracy_p10'), '.3f')}) over {_fmt(personal.get('sensors'), ',.0f')} sensors"))
        if layers:
            rows.append(("personal layers (never uploaded)", ", ".join(layers)))
    return rows


def _memory_rows(memory: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Peak resident memory (summed per-process peaks), for runs that recorded it."""
    if not memory:
        return []
    actors = memory.get("client_actors_peak_mb", [])
    return [("peak memory: total (driver / coordinator / actors)",
             f"{memory['total_peak_mb'] / 1024:,.1f} GB ({memory['driver_peak_mb']:,.0f} / "
             f"{memory['coordinator_peak_mb']:,.0f} / {sum(actors):,.0f} MB)")]


def _privacy_rows(privacy: dict[str, Any] | None) -> list[tuple[str, str]]:
    if privacy is None:
        return []
    budget = privacy.get("target_epsilon")
    text = f"ε = {privacy['epsilon']:.3g} at δ = {privacy['delta']:g} ({privacy['mode']}, z = {privacy['noise_multiplier']:g})"
    if budget is not None:
        text += f", budget {budget:g}"
    rows = [("privacy", text)]
    if privacy.get("stopped_before_round") is not None:
        rows.append(("privacy budget", f"spent: stopped before round {privacy['stopped_before_round']}"))
    elif privacy.get("exceeded_at_round") is not None:
        rows.append(("privacy budget", f"exceeded at round {privacy['exceeded_at_round']} (on_budget: warn)"))
    return rows


def _target_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    if summary.get("target_accuracy") is None:
        return []
    name = f"time / bytes to {summary['target_accuracy']:.0%} accuracy"
    if summary.get("time_to_target_s") is None:
        return [(name, "not reached")]
    return [(name, f"{summary['time_to_target_s']:,.1f} s / {_bytes(summary['bytes_to_target'])}, "
                   f"{_bytes(summary.get('bytes_up_to_target'))} of it up "
                   f"(round {summary['round_to_target']})")]


def _accuracy_text(summary: dict[str, Any]) -> str:
    if "final_accuracy" not in summary:
        return "not evaluated"
    return (f"{summary['first_accuracy']:.3f} → {summary['final_accuracy']:.3f} "
            f"({summary['best_accuracy']:.3f} at round {summary['best_accuracy_round']})")


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    return "-" if _is_nan(value) else f"{value:{spec}}{unit}"


def _bytes(value: Any) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:,.1f} {unit}" if unit != "B" else f"{value} B"
        value /= 1000
    return str(value)


def _report(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq
    from rich.console import Console
    from rich.table import Table

    run_dir = Path(args.run_dir)
    summary_path = run_dir / "summary.json"
    metrics_path = run_dir / "metrics.parquet"
    for path in (summary_path, metrics_path):
        if not path.is_file():
            raise ScenarioError(f"{run_dir} is not a finished raysim run directory: {path.name} is missing.")
    try:
        summary = json.loads(summary_path.read_text())
        metrics = pq.read_table(metrics_path).to_pylist()
    except (ValueError, OSError) as exc:
        raise ScenarioError(f"{run_dir}: cannot read the run's outputs ({exc}).") from None
    console = Console()
    console.print(_summary_table(summary))
    rounds = Table(title="per round")
    private = summary.get("privacy") is not None
    groups = [g["name"] for g in summary.get("architectures", [])] if len(summary.get("architectures", [])) > 1 else []
    personal = summary.get("personalization") is not None
    columns = ["round", "virtual time s", "accuracy", *[f"acc. {g}" for g in groups], *(["personal"] if personal else []),
               "loss", "applied", "dropped", "bytes up", "MB up total", *(["ε"] if private else []), "updates/s"]
    for name in columns:
        rounds.add_column(name, justify="right")
    shown = _rows_to_show(metrics, 25)
    for row in shown:
        rounds.add_row(
            str(row["round"]), f"{row['virtual_time_s']:,.1f}", _fmt(row["accuracy"], ".4f"),
            *[_fmt(row.get(f"accuracy.{g}"), ".4f") for g in groups],
            *([_fmt(row.get("personal_accuracy_mean"), ".4f")] if personal else []), _fmt(row["loss"], ".4f"),
            str(row["updates_applied"]), str(row["updates_dropped"]), _bytes(row["bytes_up"]),
            f"{row['cumulative_bytes_up'] / 1e6:,.2f}", *([_fmt(row.get("epsilon"), ".3g")] if private else []),
            f"{row['updates_per_s']:,.0f}",
        )
    console.print(rounds)
    contribution = summary.get("contribution")
    if contribution:
        console.print(_contributors_table(contribution))
    return 0


def _contributors_table(contribution: dict[str, Any]):
    """The sensors with the highest and lowest mean contribution scores (contributions.parquet has them all)."""
    from rich.table import Table

    table = Table(title=f"contributors ({contribution['method']}{', trust-weighted' if contribution.get('trust') else ''}"
                        f", {contribution['scored_updates']:,} updates scored)")
    for name in ("", "sensor", "mean score", "rounds scored"):
        table.add_column(name, justify="right")
    for label in ("top", "bottom"):
        for entry in contribution[label]:
            table.add_row(label, str(entry["sensor"]), f"{entry['mean_score']:.4g}", str(entry["rounds"]))
    return table


def _rows_to_show(metrics: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most about ``limit`` evenly spaced rows, taken from the evaluated ones if some were not, and the last."""
    evaluated = [row for row in metrics if not _is_nan(row["accuracy"])]
    rows = evaluated if 2 <= len(evaluated) < len(metrics) else metrics
    step = max(1, math.ceil(len(rows) / limit))
    shown = rows[::step]
    return shown if shown[-1] is metrics[-1] else [*shown, metrics[-1]]


def _is_nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


if __name__ == "__main__":
    sys.exit(main())
