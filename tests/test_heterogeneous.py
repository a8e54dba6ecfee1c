"""Per-tier architectures, personal layers, distillation and alignment terms.

Unit tests (no Ray) check the regularized training paths against the per-sensor
oracle and the architecture bookkeeping; run tests check what leaves a sensor,
what the clock and byte counts charge, and that sync, async and resumed runs work.
"""

from __future__ import annotations

import signal

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import raysim
from helpers import assert_same_run, run_stopped_at, with_changes
from raysim.architectures import build_architectures, holdout_counts, work_factor
from raysim.cli import main
from raysim.client import ClientActor
from raysim.fleet import prepare_fleet
from raysim.models import DSCNNConfig, MLPConfig, ParamLayout, build_model
from raysim.models.base import training_flops_per_sample
from raysim.scenario import load_scenario
from raysim.training import LocalTraining, Regularizers, train_reference, train_vectorized

CNN = {"name": "dscnn", "channels": [4, 6], "kernel_size": 3}
MLP = {"name": "mlp", "hidden": [8]}


def tier(name: str, share: float, **extra) -> dict:
    return {"name": name, "share": share, "seconds_per_sample": 0.001, "up_mbps": 10, "down_mbps": 10, **extra}


def spec(**changes) -> dict:
    """A small fleet of 40 sensors: 12 a round, 4 rounds."""
    return with_changes({
        "name": "hetero",
        "seed": 3,
        "fleet": {"sensors": 40, "data": {"kind": "synthetic", "samples_per_sensor": 16, "test_samples": 120,
                                          "test_sensors": 4, "window": 16, "channels": 3},
                  "tiers": [tier("gateway", 0.5, model=CNN), tier("low_power", 0.5, model=MLP)]},
        "training": {"rounds": 4, "batch_size": 8, "lr": 0.1},
        "aggregation": {"cohort": 12},
        "proxy": {"samples": 40, "batch": 8},
        "cluster": {"num_cpus": 0.5, "client_actors": 2},
        "logging": {"progress": False, "tensorboard": False},
    }, changes)


def _cohort(seed: int, sizes: list[int], channels: int = 3, window: int = 16, classes: int = 4):
    rng = np.random.default_rng(seed)
    data = [(rng.normal(size=(n, channels, window)).astype(np.float32), rng.integers(classes, size=n)) for n in sizes]
    plans = [LocalTraining(epochs=2, batch_size=4, lr=0.1).plan(n, np.random.default_rng([seed, i]))
             for i, n in enumerate(sizes)]
    return data, plans


def _regularizers(plans, layout, start, seed: int, **weights) -> Regularizers:
    rng = np.random.default_rng(seed)
    proxy = rng.normal(size=(30, 3, 16)).astype(np.float32)
    return Regularizers(
        proxy_x=proxy, proxy_plans=[[rng.integers(30, size=5) for _ in plan] for plan in plans],
        teacher=rng.normal(size=(30, 4)).astype(np.float32) * 3, temperature=2.5,
        previous=(start[None, :] + rng.normal(scale=0.05, size=(len(plans), layout.size))).astype(np.float32),
        **weights)


# ---------------------------------------------------------------------- training with regularizers


@pytest.mark.parametrize("config", [MLPConfig(hidden=(12,)), DSCNNConfig(channels=(4, 6), kernel_size=3)],
                         ids=["mlp", "dscnn"])
@pytest.mark.parametrize("weights", [
    {"kd_weight": 0.7}, {"mmd_weight": 0.5}, {"moon_weight": 0.4, "moon_temperature": 0.3},
    {"kd_weight": 0.5, "mmd_weight": 0.3, "moon_weight": 0.2},
], ids=["kd", "mmd", "moon", "all"])
def test_vectorized_regularized_training_matches_the_reference(config, weights):
    model = build_model(config, 3, 16, 4, seed=1)
    layout = ParamLayout.of(model)
    start = layout.flatten(model)
    data, plans = _cohort(5, [7, 12, 4, 9])
    cfg = LocalTraining(epochs=2, batch_size=4, lr=0.1)
    reg = _regularizers(plans, layout, start, 6, **weights)
    fast = train_vectorized(model, layout, start, data, plans, cfg, regularizers=reg)
    slow = train_reference(model, layout, start, data, plans, cfg, regularizers=reg)
    plain = train_reference(model, layout, start, data, plans, cfg)
    np.testing.assert_allclose(fast.updates, slow.updates, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(fast.train_loss, slow.train_loss, rtol=1e-5)
    assert np.abs(slow.updates - plain.updates).max() > 1e-4  # the terms do change training


def test_moon_against_the_start_model_leaves_training_unchanged():
    # With the previous model equal to the start model, MOON is log 2 whatever the weights: no gradient.
    model = build_model(MLPConfig(hidden=(10,)), 3, 16, 4, seed=2)
    layout = ParamLayout.of(model)
    start = layout.flatten(model)
    data, plans = _cohort(8, [6, 10, 5])
    cfg = LocalTraining(epochs=2, batch_size=4, lr=0.1)
    reg = Regularizers(moon_weight=1.0, previous=np.tile(start, (3, 1)))
    plain = train_vectorized(model, layout, start, data, plans, cfg)
    with_moon = train_vectorized(model, layout, start, data, plans, cfg, regularizers=reg)
    np.testing.assert_allclose(with_moon.updates, plain.updates, atol=1e-6)


def test_distillation_pulls_the_student_toward_the_teacher():
    # Train on an empty-ish private set with a strong KD weight: the proxy logits move toward the teacher's.
    model = build_model(MLPConfig(hidden=(16,)), 3, 16, 4, seed=3)
    layout = ParamLayout.of(model)
    start = layout.flatten(model)
    data, plans = _cohort(9, [8])
    plans = [plans[0] * 8]  # many steps
    rng = np.random.default_rng(4)
    proxy = rng.normal(size=(30, 3, 16)).astype(np.float32)
    teacher = (rng.normal(size=(30, 4)) * 4).astype(np.float32)
    reg = Regularizers(proxy_x=proxy, proxy_plans=[[rng.integers(30, size=10) for _ in plans[0]]], teacher=teacher,
                       kd_weight=5.0, temperature=1.0)
    result = train_vectorized(model, layout, start, data, plans, LocalTraining(epochs=1, batch_size=4, lr=0.1),
                              regularizers=reg)

    def agreement(flat):
        with torch.no_grad():
            layout.load_into(model, flat)
            return float((model(torch.from_numpy(proxy)).argmax(1).numpy() == teacher.argmax(1)).mean())

    assert agreement(start + result.updates[0]) > agreement(start) + 0.2


# ---------------------------------------------------------------------- bookkeeping


def test_training_flops_count_the_linear_layers_by_hand():
    model = build_model(MLPConfig(hidden=(16, 8)), 6, 32, 5)
    forward = 2 * (6 * 32 * 16 + 16 * 8 + 8 * 5)
    assert training_flops_per_sample(model, 6, 32) == 3 * forward


def test_architectures_follow_the_tiers():
    scenario = load_scenario(spec(**{"fleet.tiers": [tier("a", 0.3, model=CNN), tier("b", 0.3, model=MLP),
                                                     tier("c", 0.4, model=CNN)]}))
    arch = build_architectures(scenario, 3, 16, 4)
    assert [g.name for g in arch.groups] == ["a+c", "b"]
    assert arch.tier_group.tolist() == [0, 1, 0]
    sizes = [ParamLayout.of(build_model(load_scenario({"model": m}).model, 3, 16, 4)).size for m in (CNN, MLP)]
    assert [g.size for g in arch.groups] == sizes and arch.size == sum(sizes)  # no consensus without distillation
    assert arch.groups[1].span == slice(sizes[0], sum(sizes))
    assert not arch.single and not any(g.personal.any() for g in arch.groups)


def test_head_means_each_models_classifier():
    scenario = load_scenario(spec(personalization={"layers": ["head"]}))
    arch = build_architectures(scenario, 3, 16, 4)
    assert arch.groups[0].personal_names == ("classifier.weight", "classifier.bias")
    assert arch.groups[1].personal_names == ("layers.3.weight", "layers.3.bias")  # flatten, linear, relu, linear
    for group in arch.groups:
        last = sum(n for name, n in zip(group.layout.names, group.layout.numels) if name in group.personal_names)
        assert group.personal.sum() == last and group.personal[-last:].all()  # the head is the last parameters
        assert len(group.shared) + last == group.size


def test_distillation_sources():
    both = build_architectures(load_scenario(spec(distillation={})), 3, 16, 4)
    assert both.sources == ((1,), (0,)) and both.logits_size == 40 * 4
    assert both.size == both.model_size + 2 * 40 * 4 + 2  # two consensus blocks and their flags
    one_way = build_architectures(load_scenario(spec(distillation={"teachers": ["gateway"]})), 3, 16, 4)
    assert one_way.sources == ((), (0,)) and one_way.teaching == {0}
    alone = build_architectures(load_scenario(spec(**{"fleet.tiers": [tier("x", 1.0)], "distillation": {}})), 3, 16, 4)
    assert alone.sources == ((0,),)  # one architecture learns from its own consensus


def test_holdout_keeps_at_least_one_sample_to_train_on():
    assert holdout_counts(np.array([1, 2, 5, 10, 11]), 0.2).tolist() == [0, 0, 1, 2, 2]
    assert holdout_counts(np.array([2, 3]), 0.9).tolist() == [1, 2]


def test_work_factor_adds_the_proxy_batches():
    scenario = load_scenario(spec(distillation={}, **{"training.batch_size": 8, "proxy.batch": 8}))
    n = np.array([16, 8])
    # 16 samples → 2 steps of 8 private + 8 proxy: twice the work; 8 samples → 1 step: twice too.
    np.testing.assert_allclose(work_factor(scenario, n), [2.0, 2.0])
    # uploading logits runs the 40 proxy samples forward once: 40 / 3 training samples per epoch of n.
    np.testing.assert_allclose(work_factor(scenario, n, np.array([True, False])), [2.0 + 40 / 3 / 16, 2.0])


# ---------------------------------------------------------------------- what leaves a sensor


@pytest.fixture(scope="module")
def personal_run(ray_session, tmp_path_factory):
    return raysim.run(spec(personalization={"layers": ["head"], "holdout": 0.25}),
                      out_dir=tmp_path_factory.mktemp("hetero") / "personal")


@pytest.mark.ray
def test_personal_layers_never_reach_the_coordinator(personal_run, tmp_path):
    scenario = load_scenario(personal_run.run_dir / "scenario.yaml")
    fleet = prepare_fleet(scenario, raysim.api.default_cache_dir())
    arch = build_architectures(scenario, fleet.channels, fleet.window, fleet.classes)
    initial = arch.init_weights(scenario.seed, fleet.channels, fleet.window, fleet.classes)
    final = personal_run.global_weights
    for group in arch.groups:
        span_initial, span_final = initial[group.span], final[group.span]
        np.testing.assert_array_equal(span_final[group.personal], span_initial[group.personal])
        assert not np.array_equal(span_final[~group.personal], span_initial[~group.personal])
    # What one client actor sends for its sensors: the personal columns carry nothing, while the sensors'
    # own personal layers did train.
    actor = ClientActor(scenario, fleet, fleet.profiles.sensor_id[:10])
    ids = fleet.profiles.sensor_id[:6]
    out = actor.train(np.ones(6, np.int64), ids, np.zeros(6, np.int64), np.full(6, 0.1), initial)
    for sid, update, position in zip(ids, out["updates"], range(6)):
        group = arch.groups[arch.group_of(fleet.profiles.tier[[position]])[0]]
        personal_columns = group.offset + np.flatnonzero(group.personal)
        assert not update[personal_columns].any()
        assert np.abs(update[group.columns]).max() > 0
        assert not np.allclose(actor.personal[int(sid)], initial[personal_columns])


@pytest.mark.ray
def test_personal_bytes_cover_the_shared_layers_only(personal_run):
    scenario = load_scenario(personal_run.run_dir / "scenario.yaml")
    arch = build_architectures(scenario, 3, 16, 6)
    events = pq.read_table(personal_run.run_dir / "events.parquet").to_pandas()
    applied = events[(events.outcome == "applied") & (events.retransmissions == 0)]
    for group in arch.groups:
        mine = applied[applied.tier.isin([scenario.fleet.tiers[t].name for t in group.tiers])]
        assert len(mine) and (mine.bytes_up == 4 * len(group.shared)).all() and (mine.bytes_down == 4 * len(group.shared)).all()
        assert len(group.shared) < group.size


@pytest.mark.ray
def test_personalized_accuracy_is_reported(personal_run):
    metrics = personal_run.metrics.to_pandas()
    assert metrics.personal_sensors.iloc[-1] > 0
    # It counts the sensors that have trained: each round adds at most a cohort.
    assert (metrics.personal_sensors.diff().dropna() <= 12).all() and metrics.personal_sensors.iloc[0] <= 12
    for column in ("personal_accuracy_mean", "personal_accuracy_p10"):
        assert 0.0 <= metrics[column].iloc[-1] <= 1.0
    assert metrics.personal_accuracy_p10.iloc[-1] <= metrics.personal_accuracy_mean.iloc[-1]
    summary = personal_run.summary["personalization"]
    assert summary["accuracy_mean"] == metrics.personal_accuracy_mean.iloc[-1]
    assert {"accuracy.gateway", "accuracy.low_power"} <= set(metrics.columns)


# ---------------------------------------------------------------------- architectures on the clock and the wire


@pytest.mark.ray
def test_each_tier_is_charged_for_its_own_model(ray_session, tmp_path):
    ops = {"gateway": 2e6, "low_power": 5e5}
    tiers = [{**tier(name, 0.5, model=m), "seconds_per_sample": None, "ops_per_s": ops[name]}
             for name, m in (("gateway", CNN), ("low_power", MLP))]
    run = raysim.run(spec(**{"fleet.tiers": tiers, "distillation": {}}), out_dir=tmp_path / "run")
    scenario = load_scenario(run.run_dir / "scenario.yaml")
    arch = build_architectures(scenario, 3, 16, 6)
    events = pq.read_table(run.run_dir / "events.parquet").to_pandas()
    received = events[events.compute_s > 0]
    logits = 40 * 6 * 4  # P·K float32, each way
    for group, name in zip(arch.groups, ("gateway", "low_power")):
        model = group.build(3, 16, 6)
        seconds = training_flops_per_sample(model, 3, 16) / ops[name]
        mine = received[received.tier == name]
        n = mine.num_samples.to_numpy()
        factor = work_factor(scenario, n, np.ones(len(n), dtype=bool))
        np.testing.assert_allclose(mine.compute_s, n * seconds * factor, rtol=1e-9)
        clean = mine[mine.retransmissions == 0]
        assert (clean.bytes_up == 4 * group.size + logits).all() and (clean.bytes_down == 4 * group.size + logits).all()
    assert run.summary["architectures"][0]["bytes_up_per_update"] == 4 * arch.groups[0].size + logits
    final = run.global_weights
    assert all(final[arch.flag(g)] == 1.0 for g in range(2))  # both consensus blocks formed


@pytest.mark.ray
def test_an_architecture_without_teachers_trains_as_if_alone(ray_session, tmp_path):
    # teachers: [gateway] — the CNN has nobody to learn from, so it must be exactly what it is without
    # distillation; the MLP learns from the CNN and so differs.
    alone = raysim.run(spec(), out_dir=tmp_path / "alone")
    taught = raysim.run(spec(distillation={"teachers": ["gateway"], "weight": 2.0}), out_dir=tmp_path / "taught")
    arch = build_architectures(load_scenario(taught.run_dir / "scenario.yaml"), 3, 16, 6)
    gateway, low_power = arch.groups
    np.testing.assert_array_equal(taught.global_weights[gateway.span], alone.global_weights[gateway.span])
    assert taught.metrics["accuracy.gateway"].to_pylist() == alone.metrics["accuracy.gateway"].to_pylist()
    assert not np.allclose(taught.global_weights[low_power.span], alone.global_weights[low_power.span])
    assert taught.global_weights[arch.flag(1)] == 1.0 and taught.global_weights[arch.flag(0)] == 0.0
    # Only the teaching tier uploads logits; only the taught tier downloads a consensus.
    events = pq.read_table(taught.run_dir / "events.parquet").to_pandas()
    clean = events[(events.outcome == "applied") & (events.retransmissions == 0)]
    logits = 40 * 6 * 4
    assert (clean[clean.tier == "gateway"].bytes_up == 4 * gateway.size + logits).all()
    assert (clean[clean.tier == "gateway"].bytes_down == 4 * gateway.size).all()
    assert (clean[clean.tier == "low_power"].bytes_up == 4 * low_power.size).all()
    assert (clean[clean.tier == "low_power"].bytes_down == 4 * low_power.size + logits).all()


@pytest.mark.ray
def test_no_consensus_during_the_warm_up(ray_session, tmp_path):
    alone = raysim.run(spec(), out_dir=tmp_path / "alone")
    warming = raysim.run(spec(distillation={"warmup": 10}), out_dir=tmp_path / "warming")  # longer than the run
    arch = build_architectures(load_scenario(warming.run_dir / "scenario.yaml"), 3, 16, 6)
    np.testing.assert_array_equal(warming.global_weights[: arch.model_size], alone.global_weights)
    assert warming.global_weights[arch.flag(0)] == warming.global_weights[arch.flag(1)] == 0.0
    started = raysim.run(spec(distillation={"warmup": 2}), out_dir=tmp_path / "started")
    assert started.global_weights[arch.flag(0)] == started.global_weights[arch.flag(1)] == 1.0
    assert not np.array_equal(started.global_weights[: arch.model_size], alone.global_weights)


def test_the_proxy_set_is_new_data_preprocessed_per_proxy_sensor():
    from raysim.fleet import load_proxy, synthetic

    scenario = load_scenario(spec(**{"fleet.data.preprocess": {"zscore": True}, "proxy.samples": 120}))
    data = scenario.fleet.data
    x, sensor = synthetic.proxy_set(data, scenario.seed, 120)
    assert x.shape == (120, 3, 16) and np.bincount(sensor).tolist() == [50, 50, 20]
    again, _ = synthetic.proxy_set(data, scenario.seed, 120)
    np.testing.assert_array_equal(x, again)
    test_x, _, _ = synthetic.test_set(data, scenario.seed)
    assert not np.isin(x[:, 0, 0], test_x[:, 0, 0]).any()  # not the held-out windows
    fleet = type("Fleet", (), {"channels": 3, "window": 16})()
    proxy = load_proxy(scenario, fleet)
    for s in range(3):  # each proxy sensor z-scored on its own windows, per channel
        np.testing.assert_allclose(proxy[sensor == s].mean(axis=(0, 2)), 0.0, atol=1e-5)


@pytest.mark.ray
@pytest.mark.parametrize("teacher", ["local", "global"])
def test_distillation_runs_asynchronously(ray_session, tmp_path, teacher):
    run = raysim.run(spec(**{"aggregation": {"mode": "async", "strategy": {"name": "fedbuff", "buffer_size": 4,
                                                                           "concurrency": 8}},
                             "training.rounds": 12, "distillation": {"teacher": teacher},
                             "alignment": {"mmd_weight": 0.1, "moon_weight": 0.1},
                             "personalization": {"layers": ["head"]}}),
                     out_dir=tmp_path / "async")
    arch = build_architectures(load_scenario(run.run_dir / "scenario.yaml"), 3, 16, 6)
    initial = arch.init_weights(3, 3, 16, 6)
    metrics = run.metrics.to_pandas()
    assert metrics["round"].tolist() == list(range(1, 13)) and metrics.updates_applied.sum() == 48
    for group in arch.groups:
        assert not np.array_equal(run.global_weights[group.columns], initial[group.columns])
        np.testing.assert_array_equal(run.global_weights[group.span][group.personal], initial[group.span][group.personal])
        assert run.global_weights[arch.flag(group.index)] == 1.0
    assert np.isfinite(metrics[["accuracy.gateway", "accuracy.low_power", "personal_accuracy_mean"]]).all().all()


@pytest.mark.ray
def test_an_async_step_moves_each_architecture_by_its_share_of_the_buffer(ray_session, tmp_path):
    # One FedBuff step of 6 updates from both architectures: each model moves by the mean of its own
    # sensors' updates times its share of the buffer (FedBuff's 1/K sum), recomputed here from the sensors.
    run = raysim.run(spec(**{"aggregation": {"mode": "async", "strategy": {
        "name": "fedbuff", "buffer_size": 6, "concurrency": 12, "staleness": {"function": "constant"}}},
        "training.rounds": 1}), out_dir=tmp_path / "one")
    scenario = load_scenario(run.run_dir / "scenario.yaml")
    fleet = prepare_fleet(scenario, raysim.api.default_cache_dir())
    arch = build_architectures(scenario, fleet.channels, fleet.window, fleet.classes)
    initial = arch.init_weights(scenario.seed, fleet.channels, fleet.window, fleet.classes)
    events = pq.read_table(run.run_dir / "events.parquet").to_pandas()
    applied = events[events.outcome == "applied"]
    assert len(applied) == 6 and (applied.base_version == 0).all()
    ids = applied.sensor.to_numpy()
    actor = ClientActor(scenario, fleet, np.sort(ids))
    out = actor.train(np.ones(6, np.int64), ids, np.zeros(6, np.int64), np.full(6, 0.1), initial)
    groups = arch.group_of(fleet.profiles.tier[fleet.profiles.positions(ids)])
    assert len(set(groups.tolist())) == 2  # both architectures in the buffer
    for group in arch.groups:
        mine = groups == group.index
        expected = initial[group.span] + mine.mean() * out["updates"][mine][:, group.span].mean(axis=0)
        np.testing.assert_allclose(run.global_weights[group.span], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.ray
def test_a_heterogeneous_run_killed_mid_way_resumes_to_the_uninterrupted_result(ray_session, tmp_path):
    # Personal layers, MOON's previous models, the consensus and error-feedback residuals: every kind of
    # per-sensor state, and per-architecture server state (Adam), must come back.
    changes = {"training.rounds": 60, "checkpoint.every": 3, "distillation": {},
               "alignment": {"moon_weight": 0.2}, "personalization": {"layers": ["head"]},
               "compression": {"uplink": {"name": "topk", "fraction": 0.3}, "error_feedback": True},
               "aggregation.server_optimizer": {"name": "adam", "lr": 0.01}}
    whole = raysim.run(spec(**changes), out_dir=tmp_path / "whole")
    run_dir = run_stopped_at(spec(**changes), tmp_path, at_least=6, sig=signal.SIGKILL)
    assert_same_run(raysim.run(None, resume=run_dir), whole)


# ---------------------------------------------------------------------- bad scenarios


@pytest.mark.parametrize("changes, expected", [
    ({"personalization": {"layers": ["decoder"]}}, "personalization.layers: 'decoder' names no parameter"),
    ({"fleet.tiers": [tier("x", 1.0, model=MLP)], "personalization": {"layers": ["layers"]}}, "covers every parameter"),
    ({"personalization": {}, "aggregation.strategy": {"name": "scaffold"}}, "strategy scaffold cannot be combined"),
    ({"distillation": {"teachers": ["gateways"]}}, "distillation.teachers: 'gateways' is not a tier"),
    ({"fleet.tiers": [{**tier("x", 1.0), "ops_per_s": 1e9}]}, "needs exactly one of seconds_per_sample"),
    ({"privacy": {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 1.0}}, "central DP cannot be combined"),
])
def test_bad_heterogeneous_scenarios_are_one_paragraph_and_status_2(tmp_path, capsys, changes, expected):
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(yaml.safe_dump(spec(**changes)))
    code = main(["run", str(scenario), "--out", str(tmp_path / "run")])
    err = " ".join(capsys.readouterr().err.split())  # the terminal wraps long messages
    assert code == 2 and expected in err and "Traceback" not in err and str(scenario) in err
    assert not (tmp_path / "run").exists()


def test_a_parquet_fleet_needs_a_proxy_file(tmp_path, capsys):
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(yaml.safe_dump(spec(**{"fleet.data": {"kind": "parquet", "path": "a.parquet",
                                                              "test_path": "b.parquet"}, "distillation": {}})))
    assert main(["validate", str(scenario)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "proxy.path: distillation and the MMD term need a public proxy set" in err
