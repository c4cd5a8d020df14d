"""paradec.report: offline plots and tables of runs and sweeps."""

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import yaml

from paradec.report import find_jobs, main, speedups, variant_labels, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def eval_row(em, qps, forwards):
    return {"em": em, "f1": em + 0.05, "n_questions": 12, "wall_s": 12 / qps,
            "questions_per_s": qps, "new_tokens": 48, "forward_calls": forwards,
            "peak_kv_tokens": 300}


def make_job(path: Path, overrides: dict, *, stage="eval", report=None, losses=None):
    """A run directory as Hydra + paradec leave it: .hydra/, eval.json, metrics.jsonl."""
    (path / ".hydra").mkdir(parents=True)
    config = {"stage": {"name": stage}, "collator": {"branches_per_sample": 4,
                                                     "max_branches_per_sample": None,
                                                     "branch_stride": "${model.branch_stride}"},
              "model": {"branch_stride": 128}}
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    items = [f"stage={stage}"] + [f"{k}={json.dumps(v) if isinstance(v, list) else v}"
                                  for k, v in overrides.items()]
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(items))
    if report is not None:
        (path / "eval.json").write_text(json.dumps(report))
    if losses is not None:
        write_losses(path, losses)


def write_losses(path: Path, losses):
    with open(path / "metrics.jsonl", "w") as f:
        for step, loss in enumerate(losses, start=1):
            row = {"step": step, "train/loss": loss, "train/lr": 1e-3,
                   "train/tokens_per_s": 1000.0}
            if step % 2 == 0:
                row["val/loss"] = loss + 0.1
            f.write(json.dumps(row) + "\n")
        f.write('{"step": 3, "train/lo')  # a line cut by a killed run is skipped


@pytest.fixture
def branch_sweep(tmp_path):
    """An eval sweep over branches_per_sample = 1, 2, 4 (jobs 0, 1, 2) plus a job 10."""
    for num, k in enumerate((1, 2, 4, 8)):
        make_job(tmp_path / str(num if k < 8 else 10), {"collator.branches_per_sample": k},
                 report={"parallel": eval_row(0.5 - 0.05 * num, 10.0 * k, 4),
                         "sequential": eval_row(0.6, 10.0, 4 * k),
                         "baseline": eval_row(0.55, 5.0, 16 * k)})
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    return tmp_path


def test_find_jobs_reads_a_sweep_in_job_order(branch_sweep):
    jobs = find_jobs(branch_sweep)
    assert [j.name for j in jobs] == ["0", "1", "2", "10"]  # numeric, not lexical, order
    assert [j.branches for j in jobs] == [1, 2, 4, 8]
    assert all(j.stage == "eval" and set(j.eval) == {"parallel", "sequential", "baseline"}
               for j in jobs)
    assert set(variant_labels(jobs).values()) == {""}  # only the plotted key varies


def test_speedup_is_over_sequential_of_the_same_run():
    ups = speedups({"parallel": eval_row(0.5, 40.0, 4), "sequential": eval_row(0.5, 10.0, 16)})
    assert ups == {"parallel": 4.0, "sequential": 1.0}
    assert speedups({"parallel": eval_row(0.5, 40.0, 4)}) == {}


def test_report_of_a_branch_sweep(branch_sweep):
    result = write_report(branch_sweep)
    assert [p.name for p in result["images"]] == ["eval_em.png", "eval_speedup.png",
                                                  "eval_questions_per_s.png"]
    for image in result["images"]:
        assert image.read_bytes()[:8] == PNG
        assert mpimg.imread(image).shape[1] > 600
    text = (branch_sweep / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "| parallel |" in line]
    assert len(rows) == 4
    assert rows[2].split(" | ")[1:3] == ["4", "-"]  # run 2: 4 branches, no other variant
    assert "| 4.00 |" in rows[2]  # 40 questions/s over sequential's 10
    assert "![eval_em](eval_em.png)" in text


def test_report_of_an_ablation_labels_the_variants(tmp_path):
    for num, (align, isolate) in enumerate([("left", False), ("left", True), ("right", False)]):
        make_job(tmp_path / str(num), {"collator.align_to": align,
                                       "collator.isolate_branches": isolate},
                 stage="pretrain", losses=[5.0 - 0.1 * num, 4.5, 4.2 - 0.1 * num])
    jobs = find_jobs(tmp_path)
    labels = variant_labels(jobs)
    assert labels["1"] == "align_to=left,isolate_branches=True"
    result = write_report(tmp_path)
    assert [p.name for p in result["images"]] == ["train_loss.png"]
    text = (tmp_path / "report.md").read_text()
    assert "| 0 | pretrain | 4 | align_to=left,isolate_branches=False | 3 | 4.2000 |" in text
    assert "4.6000" in text  # the last validation loss (step 2)


def test_a_single_branch_count_gives_bars_per_variant(tmp_path):
    for num, pairs in enumerate([[], [8, 9, 10, 11]]):
        make_job(tmp_path / str(num), {"model.pair_indices": pairs},
                 report={"parallel": eval_row(0.3 + 0.2 * num, 40.0, 4),
                         "sequential": eval_row(0.6, 10.0, 16)})
    result = write_report(tmp_path)
    assert {p.name for p in result["images"]} == {"eval_em.png", "eval_speedup.png",
                                                  "eval_questions_per_s.png"}


def test_a_pipeline_run_counts_its_evaluation_once(tmp_path):
    report = {"parallel": eval_row(0.5, 40.0, 4), "sequential": eval_row(0.5, 10.0, 16)}
    make_job(tmp_path, {}, stage="pipeline", report=report)
    for stage in ("pretrain", "finetune"):  # the stages share the pipeline's .hydra/
        (tmp_path / stage).mkdir()
        write_losses(tmp_path / stage, [3.0, 2.0])
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text(json.dumps(report))
    jobs = find_jobs(tmp_path)
    assert sum(j.eval is not None for j in jobs) == 1
    assert {j.stage for j in jobs if j.train_records} == {"pretrain", "finetune"}


def test_report_of_nothing_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no eval.json" in capsys.readouterr().err


def test_cli_report(branch_sweep, capsys):
    """``python -m paradec.report <sweep>``, in-process: the table printed and report.md written."""
    assert main([str(branch_sweep)]) == 0
    assert "| parallel |" in capsys.readouterr().out and (branch_sweep / "report.md").is_file()
