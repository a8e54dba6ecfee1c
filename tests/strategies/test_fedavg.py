import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from raysim.errors import AggregationError
from raysim.strategies import STRATEGIES, FedAvgConfig, UpdateBatch, weighted_mean

finite = st.floats(-1e3, 1e3, width=32)


@given(
    updates=arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 30)), elements=finite),
    data=st.data(),
)
def test_weighted_mean_ignores_row_order(updates, data):
    weights = data.draw(arrays(np.float64, updates.shape[0], elements=st.floats(0.1, 100)))
    order = data.draw(st.permutations(range(updates.shape[0])))
    np.testing.assert_allclose(
        weighted_mean(updates[order], weights[order]), weighted_mean(updates, weights), rtol=1e-6, atol=1e-4
    )


@given(row=arrays(np.float32, st.integers(1, 40), elements=finite), copies=st.integers(1, 9))
def test_identical_updates_average_to_themselves(row, copies):
    updates = np.tile(row, (copies, 1))
    weights = np.arange(1, copies + 1, dtype=np.float64)
    np.testing.assert_array_equal(weighted_mean(updates, weights), row)


def test_weighted_mean_weights_by_sample_count():
    updates = np.array([[0.0, 4.0], [3.0, 0.0]], dtype=np.float32)
    # 1 sample says (0, 4), 3 samples say (3, 0): mean = (9/4, 1)
    np.testing.assert_allclose(weighted_mean(updates, np.array([1, 3])), [2.25, 1.0])


@pytest.mark.parametrize(
    "updates, weights",
    [
        (np.zeros((0, 3), np.float32), np.zeros(0)),
        (np.ones((2, 3), np.float32), np.array([1.0])),
        (np.ones((2, 3), np.float32), np.array([-1.0, 2.0])),
        (np.ones((2, 3), np.float32), np.array([0.0, 0.0])),
        (np.ones(3, np.float32), np.array([1.0])),
    ],
)
def test_weighted_mean_rejects_bad_input(updates, weights):
    with pytest.raises(AggregationError):
        weighted_mean(updates, weights)


def test_fedavg_moves_global_model_by_weighted_delta():
    fedavg = STRATEGIES.build(FedAvgConfig())
    global_w = np.array([1.0, 1.0], dtype=np.float32)
    deltas = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    step = fedavg.pseudo_gradient(global_w, UpdateBatch(deltas, np.array([3, 1])))
    np.testing.assert_allclose(global_w + step, [1.75, 1.5])


def test_fedavg_uniform_weighting_and_server_lr():
    fedavg = STRATEGIES.build(FedAvgConfig(weighting="uniform", server_lr=0.5))
    step = fedavg.pseudo_gradient(np.zeros(2, np.float32),
                                  UpdateBatch(np.array([[2.0, 0.0], [0.0, 4.0]], np.float32), np.array([100, 1])))
    np.testing.assert_allclose(step, [0.5, 1.0])
