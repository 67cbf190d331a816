"""The demo's bookkeeping: the summary table, the plot's data and the --sync-every overlays (time to accuracy
itself: tests/test_benchmarks_common.py)."""

import pytest
import yaml

from recipes.demo import CONFIGS, format_table, overlay_for, parse_args, plot, summarize, verdict_line


def run(values, seconds, mb, syncs, source="library counter"):
    records = [
        {"value": v, "train_seconds": t, "MB_sent": m, "syncs": s, "step": 8 * (i + 1)}
        for i, (v, t, m, s) in enumerate(zip(values, seconds, mb, syncs))
    ]
    final = {"train_seconds": seconds[-1], "MB_sent": mb[-1], "syncs": syncs[-1], "step": 8 * len(values)}
    return {
        "records": records,
        "final": final,
        "bytes_source": source,
        "process_seconds": seconds[-1] + 20,
        "loadavg_before": 2.0,
        "loadavg_after": 2.5,
    }


def test_summary_speedup_against_ddps_final_accuracy():
    runs = {
        "ddp": run([0.90, 0.97, 0.980, 0.985], [10, 20, 30, 40], [100, 200, 300, 400], [8, 16, 24, 32], "closed form"),
        "localsgd": run([0.92, 0.981, 0.99, 0.99], [6, 12, 18, 24], [12, 25, 37, 50], [1, 2, 3, 4]),
        "diloco": run([0.5, 0.6, 0.7, 0.8], [6, 12, 18, 24], [12, 25, 37, 50], [1, 2, 3, 4]),
    }
    s = summarize(runs, slack=0.005)
    assert s["target_acc"] == 0.98  # DDP's final 0.985 − 0.005
    ddp, local, diloco = (s["rows"][k] for k in ("ddp", "localsgd", "diloco"))
    assert ddp["seconds_to_target"] == 30 and local["seconds_to_target"] == 12
    assert ddp["steps_to_target"] == 24 and local["steps_to_target"] == 16
    assert local["speedup_vs_ddp"] == 2.5 and ddp["speedup_vs_ddp"] == 1.0
    # held: DDP stays >= 0.98 from t=30; localsgd from t=12 (0.981, 0.99, 0.99)
    assert local["seconds_to_held"] == 12 and local["held_speedup_vs_ddp"] == 2.5
    assert diloco["seconds_to_target"] is None and diloco["speedup_vs_ddp"] is None
    assert (local["final_acc"], local["MB_sent"], local["syncs"]) == (0.99, 50, 4)
    table = format_table(s).splitlines()
    assert table.pop(0) == "link: loopback (unshaped)"
    assert "s to 98.0%" in table[0]
    # 24 s over 32 steps = 750 ms/step
    assert table[3].split() == [
        "localsgd",
        "99.00%",
        "24.0",
        "44",
        "50.0",
        "4",
        "12.0",
        "2.50x",
        "16",
        "2.50x",
        "750",
        "2.0>2.5",
    ]
    assert table[4].split()[-6:] == ["never", "-", "-", "-", "750", "2.0>2.5"]
    assert table[4].split()[0] == "diloco[1]" and table[5] == ""  # a footnote a user can act on
    assert table[6].startswith("[1] diloco: never reached 98.00% (best 80.00%, final 80.00%). To change: keep outer_lr")
    met, sentence = verdict_line(s, slack=0.005)
    assert met is True and "reached it 2.50x sooner" in sentence and "(98.00%)" in sentence


def test_verdict_needs_the_speedup_not_just_the_accuracy():
    runs = {
        "ddp": run([0.97, 0.985], [10, 20], [1, 2], [1, 2], "closed form"),
        "localsgd": run([0.95, 0.984], [8, 16], [1, 2], [1, 2]),  # 20/16 = 1.25x < 1.3x
    }
    met, sentence = verdict_line(summarize(runs, slack=0.005), slack=0.005)
    assert met is False and "1.25x" in sentence and "NOT met" in sentence
    assert verdict_line(summarize({"ddp": runs["ddp"]}, 0.005), 0.005)[0] is None


def test_link_runs_name_the_link_and_judge_the_overlapped_run_at_8x():
    args = parse_args(["--link", "1gbit"])
    assert args.algorithms == "ddp,localsgd,localsgd_overlap,localsgd_streaming,diloco"
    assert (args.verdict_run, args.speedup_target, args.results_dir.name) == ("localsgd_overlap", 8.0, "demo_1gbit")
    assert (parse_args([]).verdict_run, parse_args([]).speedup_target) == ("localsgd", 1.3)
    # behind a link the replicas are evaluated after the fit (no sync in flight while the clock is paused)
    assert (args.evaluation, parse_args([]).evaluation) == ("deferred", "live")
    with pytest.raises(SystemExit, match="easgd"):  # EASGD evaluates its center, not the replicas' average
        parse_args(["--link", "1gbit", "--algorithms", "ddp,easgd"])
    with pytest.raises(ValueError, match="rate"):
        parse_args(["--link", "fast"])
    runs = {
        "ddp": run([0.97, 0.985], [80, 160], [1, 2], [1, 2], "closed form"),
        "localsgd_overlap": run([0.97, 0.99], [10, 20], [1, 2], [1, 2]),  # 160 s / 20 s = 8x
    }
    s = summarize(runs, slack=0.005)
    met, sentence = verdict_line(s, 0.005, run="localsgd_overlap", target=8.0)
    assert met is True and "localsgd_overlap reached it 8.00x sooner" in sentence and "(target 8x: met)" in sentence
    assert format_table(s, "1gbit").splitlines()[0] == "link: 1gbit loopback (tc tbf, burst 256kb, latency 200ms)"


def test_sync_every_override_rewrites_only_sync_every(tmp_path):
    args = parse_args(["--sync-every", "4", "--results-dir", str(tmp_path)])
    path = overlay_for("diloco", args, tmp_path)
    original = yaml.safe_load((CONFIGS / "diloco.yaml").read_text())
    cfg = yaml.safe_load(path.read_text())
    (cb,) = cfg["trainer"]["callbacks+"]
    assert cb["init_args"]["sync_every"] == 4
    original["trainer"]["callbacks+"][0]["init_args"]["sync_every"] = 4
    assert cfg == original
    assert overlay_for("ddp", parse_args([]), tmp_path) == CONFIGS / "ddp.yaml"


def test_replot_recomputes_the_summary_from_demo_json_without_running(tmp_path, capsys):
    import json

    from recipes.demo import main

    runs = {
        "ddp": run([0.90, 0.985], [10, 20], [100, 200], [8, 16], "closed form"),
        "localsgd": run([0.60, 0.99], [6, 12], [12, 25], [1, 2]),  # 0.60: below the plot's floor
    }
    settings = {
        "target_slack": 0.005,
        "model": "resnet18",
        "image_size": 32,
        "steps": 16,
        "batch_size": 8,
        "lr": 0.025,
        "val_every": 8,
        "seed": 0,
    }
    doc = {"settings": settings, "runs": runs, "summary": {}, "demo_seconds": 1.0, "pretrain": {}, "machine": {}}
    (tmp_path / "demo.json").write_text(json.dumps(doc))
    out = main(["--replot", "--results-dir", str(tmp_path)])
    rows = out["summary"]["rows"]
    assert out["summary"]["target_acc"] == 0.98 and rows["localsgd"]["speedup_vs_ddp"] == 20 / 12
    printed = capsys.readouterr().out
    assert "reached it 1.67x sooner" in printed and "target 1.3x: met" in printed
    from matplotlib.image import imread

    assert imread(tmp_path / "demo.png").shape == (504, 1320, 4)  # 11 x 4.2 inches at 120 dpi, RGBA


def test_plot_draws_accuracy_against_seconds_and_megabytes(tmp_path):
    runs = {
        "ddp": run([0.90, 0.985], [10, 20], [100, 200], [8, 16], "closed form"),
        "localsgd": run([0.60, 0.99], [6, 12], [0, 25], [0, 2]),  # 0 MB: drawn at 1e-3 on the log axis
    }
    drawn = plot(runs, 0.98, tmp_path / "p.png")
    assert drawn["series"] == {
        "ddp": {"accuracy": [90.0, 98.5], "train_seconds": [10, 20], "MB_sent": [100, 200]},
        "localsgd": {"accuracy": [60.0, 99.0], "train_seconds": [6, 12], "MB_sent": [1e-3, 25]},
    }
    assert drawn["below_floor"] == {"localsgd": 60.0}  # under the 70% floor: named below the plot
    assert plot(runs, 0.98, tmp_path / "q.png", floor=50.0)["below_floor"] == {}
