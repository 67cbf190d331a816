"""recipes.launch: the benchmarks' worker side, link rates, and the shaped-link namespace."""

import json
import subprocess

import pytest

from recipes.launch import LinkUnavailable, check_link_support, link_bits_per_second, run_rank_from_file, shaped_link


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


def test_link_rates_parse_in_tc_units_and_bad_ones_name_the_format():
    assert link_bits_per_second("1gbit") == 1e9
    assert link_bits_per_second("100mbit") == 1e8
    assert link_bits_per_second("2.5Mbit") == 2.5e6
    with pytest.raises(ValueError, match="looks like '1gbit'"):
        link_bits_per_second("1gbps")


def test_a_shaped_link_puts_the_command_behind_tbf_at_that_rate_and_leaves_no_namespace():
    try:
        check_link_support()
    except LinkUnavailable as err:
        pytest.skip(str(err))
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    with shaped_link("100mbit") as prefix:
        shown = subprocess.run([*prefix, "tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout
        name = prefix[-1]
        assert name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "tbf" in shown and "rate 100Mbit" in shown
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == before
    with shaped_link(None) as prefix:
        assert prefix == []
