"""scripts/gpu_check.py: honest without a GPU (nothing run, exit 3), and its report parsing."""

import importlib.util
import xml.etree.ElementTree as ET

import pytest
import torch

from tests.test_cli import ROOT


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_a_gpu_nothing_runs_and_the_exit_code_says_so(gpu_check, capsys):
    assert gpu_check.main([]) == gpu_check.EXIT_NO_CUDA == 3
    out = capsys.readouterr().out
    assert "no CUDA device: nothing run" in out and "passed" not in out
    rows = [line for line in out.splitlines() if line.startswith("| test_")]
    assert rows and all("| not run |" in line for line in rows)
    assert "test_fsdp_through_accelerate_saves_and_resumes_exactly" in out
    assert "| stage=bench | not run |" in out


def test_a_test_counts_as_passed_only_when_it_ran_and_passed(gpu_check):
    cases = ET.fromstring(
        '<testsuite><testcase name="a" time="1.5"/>'
        '<testcase name="b" time="2"><failure message="assert 1 == 2&#10;more"/></testcase>'
        '<testcase name="c" time="0"><skipped message="needs a CUDA device"/></testcase>'
        '<testcase name="d" time="3"><error message="boom"/></testcase></testsuite>')
    rows = [gpu_check._row(case) for case in cases.iter("testcase")]
    assert [(r["check"], r["result"]) for r in rows] == [
        ("a", "passed"), ("b", "FAILED"), ("c", "SKIPPED"), ("d", "ERROR")]
    assert rows[1]["detail"] == "assert 1 == 2" and rows[0]["s"] == 1.5
    assert "| b | FAILED | 2.0 | assert 1 == 2 |" in gpu_check.table(rows)
