"""Where models run: ``resolve_device`` names, the environment override, the CLI's --device.

The GPU side itself (parity of every pass with the CPU's, training, speed) is checked on a GPU
machine by ``benchmarks/gpu_check.py``; these tests hold wherever torch sees no GPU too.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routerretriever.cli import main
from routerretriever.devices import DEVICE_ENV, resolve_device
from routerretriever.encoder import Encoder
from tests.conftest import tiny_model_path

GPU = torch.cuda.is_available()


def test_auto_is_the_gpu_where_torch_sees_one_else_the_cpu(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert resolve_device("auto") == torch.device("cuda" if GPU else "cpu")
    assert resolve_device(" cpu ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_the_environment_names_what_auto_means_and_an_explicit_device_wins(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert Encoder.load(tiny_model_path()).device == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match=r"^\$ROUTERRETRIEVER_DEVICE must be auto, cpu, cuda or"):
        resolve_device("auto")  # the error names where the bad name came from
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(GPU, reason="checks the errors of a machine without a GPU")
def test_a_gpu_that_is_not_there_is_a_clear_error_before_any_weights_load(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device(name)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        Encoder.load("/no/such/folder", device="cuda")  # the device is checked first


@given(st.text(max_size=300))
def test_any_device_name_resolves_or_is_a_short_value_error(name):
    try:
        out = resolve_device(name)
    except ValueError as e:
        assert len(str(e)) < 200  # a long name is not echoed back in bulk
        return
    assert out.type in ("cpu", "cuda")


@pytest.mark.skipif(GPU, reason="checks the errors of a machine without a GPU")
def test_the_cli_says_a_missing_gpu_in_one_line_and_sets_nothing(tiny, monkeypatch, capsys):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert main(["evaluate", str(tiny), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device 'cuda': torch sees no CUDA GPU") and "Traceback" not in err
    assert DEVICE_ENV not in os.environ


def test_the_cli_runs_on_the_device_it_is_given(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # main() sets it for the whole run
    args = ["evaluate", str(tiny), "--cache-dir", str(tmp_path), "--model", str(tiny_model_path())]
    assert main([*args, "--device", "cpu", "--backend", "torch"]) == 0
    assert os.environ[DEVICE_ENV] == "cpu"
    assert "ndcg@10" in capsys.readouterr().out


def test_replicas_refuse_a_gpu_they_would_not_get(tiny, tmp_path, monkeypatch, capsys):
    """Ray gives a replica no GPU, so --device cuda with --replicas is refused before Ray
    starts (as if this machine had a GPU), not left to fail inside every replica."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    args = ["serve", "--store", str(tmp_path), "--corpus", str(tiny), "--replicas", "2"]
    assert main([*args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --replicas runs its engines on the CPU") and "Traceback" not in err
    )


def test_a_results_file_can_say_what_ran_the_models():
    from routerretriever.devices import describe, has_fast_bfloat16
    from routerretriever.report import environment_line

    env = describe("cpu")
    assert env["device"] == "cpu" and env["name"] and env["torch"] == torch.__version__
    assert env["bfloat16_native"] is has_fast_bfloat16("cpu") and env["cpu_threads"] >= 1
    line = environment_line(env | {"corpus_runtimes": ["torch"]})
    assert line.startswith(f"Ran on {env['name']} (cpu, ") and "corpus runtime: torch." in line
    assert environment_line({}).startswith("Ran on an unknown processor")  # an older file
