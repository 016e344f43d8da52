"""`grpo-ds plot`: reading metrics.jsonl, the trailing mean, the PNG, and the missing-extra message."""

import json
import subprocess
import sys

import pytest

from grpo_ds.plot import main, moving_average, read_series


def write_run(run_dir, steps=30):
    """A small run directory in the format the trainer writes: eval lines at 0, 10, ..., 30."""
    run_dir.mkdir()
    rows = [{"step": 0, "eval/accuracy": 0.5}]
    for step in range(1, steps + 1):
        rows.append({"step": step, "reward": step / steps, "reward_std": 0.1, "kl": 0.01 * step,
                     "completions/mean_length": 4.0, "completions/min_length": 2.0,
                     "completions/max_length": 8.0, "time/generation": 0.2,
                     "time/reference": 0.1, "time/update": 0.4, "time/step": 0.7})
        if step % 10 == 0:
            rows.append({"step": step, "eval/accuracy": 0.5 + step / 100})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"accuracy_before": 0.5, "accuracy_after": 0.8, "steps": steps,
               "warmup_curve": [{"step": 0, "accuracy": 0.0}, {"step": 100, "accuracy": 0.5}]}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_moving_average_is_a_trailing_mean():
    # window 2: 1, (1+2)/2, (2+3)/2, (3+4)/2
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]


def test_read_series_keeps_the_last_value_of_a_repeated_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "reward": 0.1}\n{"step": 2, "reward": 0.2}\n\n'
        '{"step": 2, "reward": 0.3, "eval/accuracy": 0.9}\n')  # a resumed run re-logs step 2
    series = read_series(tmp_path / "metrics.jsonl")
    assert series == {"reward": {1: 0.1, 2: 0.3}, "eval/accuracy": {2: 0.9}}


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "run")
    out = tmp_path / "figs" / "curves.png"
    assert main([str(tmp_path / "run"), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 50_000  # six panels of curves, not an empty canvas


def test_plot_default_output_is_inside_the_run_dir_and_needs_metrics(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "run", steps=3)
    (tmp_path / "run" / "summary.json").unlink()  # a run that stopped early has no summary
    assert main([str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "curves.png").is_file()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(tmp_path):
    write_run(tmp_path / "run")
    # A fresh interpreter in which `import matplotlib` fails, as on an install without [plot].
    code = ("import sys; sys.modules['matplotlib'] = None; from grpo_ds.cli import main; "
            f"sys.exit(main(['plot', {str(tmp_path / 'run')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2
    assert "pip install -e .[plot]" in result.stderr


def test_a_multiturn_run_plots_its_tool_call_rate_beside_the_accuracy(tmp_path):
    pytest.importorskip("matplotlib")
    from grpo_ds.plot import TOOL_RATE, draw

    write_run(tmp_path / "run")
    series = read_series(tmp_path / "run" / "metrics.jsonl")
    without = draw(series, None, "run").axes[4]
    series[TOOL_RATE] = {step: step / 30 for step in range(1, 31)}
    with_tools = draw(series, None, "run").axes[4]
    labels = [line.get_label() for line in with_tools.get_lines()]
    assert any("calling a tool" in label for label in labels), labels
    assert not any("calling a tool" in line.get_label() for line in without.get_lines())
    assert "tool-call rate" in with_tools.get_title()
