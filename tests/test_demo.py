"""Smoke runs of `python -m jax_moe.demo`: a few training steps, in process, with a falling loss.

conftest.py has already split the CPU into 4 devices, so --devices 4 runs expert parallel here.
"""
import importlib.util

import jax
import numpy as np
import pytest

from jax_moe import demo


def assert_loss_falls(history, by):
  first, last = np.mean(history["ce"][:3]), np.mean(history["ce"][-3:])
  assert last < first - by, f"loss {first:.3f} -> {last:.3f}"


def test_demo_trains_and_reports(capsys, tmp_path):
  plot = tmp_path / "moe.png"
  history = demo.main(["--steps", "30", "--log-every", "10", "--plot", str(plot)])
  assert_loss_falls(history, by=0.5)
  assert history["tokens_per_s"] > 0 and len(history["load"]) == 30
  out = capsys.readouterr().out
  for what in ("best possible loss", "compiled and ran step 1", "step 30/30", "tok/s", "load max/mean", "done in"):
    assert what in out, what
  if importlib.util.find_spec("matplotlib"):  # an optional dependency: without it the demo says so
    assert plot.stat().st_size > 10_000


def test_demo_expert_parallel_counts_dropped_tokens(capsys):
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices")
  history = demo.main(["--devices", "4", "--preset", "mixtral", "--capacity-factor", "1.0", "--steps", "15",
                       "--log-every", "5"])
  assert_loss_falls(history, by=0.3)
  assert sum(history["dropped"]) > 0  # a capacity of exactly the mean load drops the excess
  out = capsys.readouterr().out
  assert "expert parallel over 4" in out and "dropped" in out
