"""lightning_localsgd.local_launch: the benchmarks' worker side writes exactly what run_rank returned."""

import json

from lightning_localsgd.local_launch import run_rank_from_file


def test_run_rank_from_file_writes_the_result_under_its_rank(tmp_path):
    cfg = {"out_dir": str(tmp_path), "steps": 3}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    seen = []

    def run_rank(c):
        seen.append(c)
        return {"rank": 2, "losses": [0.5, 0.25, 0.125 * c["steps"]]}

    run_rank_from_file(tmp_path / "cfg.json", run_rank)
    assert seen == [cfg]
    assert json.loads((tmp_path / "rank2.json").read_text()) == {"rank": 2, "losses": [0.5, 0.25, 0.375]}
