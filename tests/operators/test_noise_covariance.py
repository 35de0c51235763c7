"""NoiseCovarianceOperator against Sigma from dense per-sample gradients (tests/reference.py)."""

from reference import assert_matches, dense_noise_covariance, tiny_network_problem
from sgdstab.operators import noise_covariance


def test_noise_covariance_matches_per_sample_gradients(architecture, loss_name):
    problem = tiny_network_problem(architecture, loss_name)
    truth = dense_noise_covariance(problem)
    assert_matches(noise_covariance(problem).to_dense(), truth, rtol=1e-5, atol=1e-12)
