"""Test settings: one torch thread per pytest worker so that parallel workers share the cores."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
