"""Shared by the experiment, report and CLI tests: one smoke-scale suite (seconds), run once per session."""

import pytest
import torch

from sgdstab.experiments import reproduce


@pytest.fixture(scope="session")
def smoke_suite(tmp_path_factory):
    """A suite folder holding E1-E5 at the "smoke" scale and its report; returns (root, analyses)."""
    threads = torch.get_num_threads()
    # Tiny tensors: extra threads only add synchronisation, and CI shares its cores.
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("smoke_suite")
        return root, reproduce(root, scale="smoke")
    finally:
        torch.set_num_threads(threads)
