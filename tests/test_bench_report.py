"""benchmarks/report.py: re-rendering a results folder from its results.json, the run's
conditions and the disturbed flag in results.md and the plots, plain names for op ids."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import report  # noqa: E402

REFERENCE = BENCH / "results" / "cpu-amd-epyc-2c-fp16"  # the smallest committed run: 18 cases


@pytest.mark.parametrize("op, name", [
    ("ln_fwdbwd", "LayerNorm forward+backward"),
    ("bn_eval", "BatchNorm eval forward"),
    ("rms_fwd", "RMSNorm forward"),  # not in the table: read word by word
    ("add_ln_fwd", "add + LayerNorm forward"),
    ("odd_op", "odd op"),
])
def test_op_names(op, name):
    assert report.op_name(op) == name


def _folder(tmp_path, **env) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    run = json.loads((REFERENCE / "results.json").read_text())
    run["environment"].update(env)
    (folder / "results.json").write_text(json.dumps(run))
    return folder


def test_markdown_states_conditions_and_disturbance(tmp_path):
    run = json.loads((_folder(tmp_path, others_cpu_share=0.25, git_dirty=True) / "results.json").read_text())
    text = report.markdown(run)
    head = text.split("## How to read this")[0]
    assert head.count("Run disturbed: other processes used 25% of the CPU time") == 1
    for row in ("| device | AMD EPYC (2 threads) |", "| torch | 2.13.0+cpu |", "| fused_norm commit | 3ba3626+dirty |",
                "| threads | 2 (the machine has 2 CPUs) |", "| date | 2026-12-02 06:37 UTC |"):
        assert row in head
    quiet = report.markdown(json.loads((REFERENCE / "results.json").read_text()))
    assert "Run disturbed" not in quiet and "uncommitted changes: not recorded" in quiet


def test_rerender_writes_linked_plots(tmp_path):
    pytest.importorskip("matplotlib")
    folder = _folder(tmp_path, others_cpu_share=0.25)
    (folder / "stale.png").write_bytes(b"")
    run = json.loads((folder / "results.json").read_text())
    run["plots"] = ["stale.png"]
    (folder / "results.json").write_text(json.dumps(run))

    assert report.main([str(folder)]) == 0
    run = json.loads((folder / "results.json").read_text())
    text = (folder / "results.md").read_text()
    assert run["plots"][0] == report.SPEEDUP_PLOT and len(run["plots"]) == 7  # summary + 6 ops in fp16
    for name in run["plots"]:
        assert (folder / name).stat().st_size > 0 and f"]({name})" in text
    assert not (folder / "stale.png").exists()
    measured = json.loads((REFERENCE / "results.json").read_text())["results"]
    assert run["results"] == measured  # the numbers are not touched


def test_committed_reference_is_rendered_by_this_report():
    """The committed results.md is what this report.py makes of its results.json: after a change
    here, re-render the references (python benchmarks/report.py benchmarks/results/*)."""
    run = json.loads((REFERENCE / "results.json").read_text())
    assert report.markdown(run) + "\n" == (REFERENCE / "results.md").read_text()
