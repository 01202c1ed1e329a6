"""Table 4 (tvt.complexity.table4): both MAC accountings and both latencies, labelled, side by side."""

from __future__ import annotations

from tvt import reports
from tvt.complexity import RANKING_NOTE, table4
from tvt.stats import Mark

TVT, OSEDIFF = "TVT restorer (E4 + CE-UNet + D4)", "OSEDiff restorer (E8 + UNet + D8)"
PAPER = {  # issue 16's paper-size counts at 512² (G MACs)
    "tvt": {"name": TVT, "params_M": 1020.0, "gmacs": 1832.0, "attn_gmacs": 941.0},
    "osediff": {"name": OSEDIFF, "params_M": 949.0, "gmacs": 2107.0, "attn_gmacs": 110.0},
}
MEASURED = {
    "tvt": {"steps": 1, "params_M": 3.1, "latency_ms": 41.0},
    "osediff": {"steps": 1, "latency_ms": 35.0},
    "bicubic": {"steps": 0, "params_M": 0.0, "latency_ms": 0.2},
}
LATENCY = {"CPU, 2 threads": {TVT: 29.0, OSEDIFF: 21.4}, "GPU": {TVT: 0.2}}


def test_rows_carry_both_accountings_and_every_measured_device():
    columns, rows, notes = table4(MEASURED, PAPER, test_set="mini", device="cpu", sd_latency=LATENCY)
    by_method = {row["method"]: row for row in rows}
    labels = {key: label for key, label, _ in columns}
    assert labels["paper_gmacs"] == "Paper-size conv+linear MACs (G)"
    assert labels["sd_latency_s:GPU"] == "Paper-size latency, GPU (s/img)"
    assert by_method["tvt"]["paper_all_gmacs"] == 2773.0 and by_method["osediff"]["paper_all_gmacs"] == 2217.0
    assert by_method["osediff"]["sd_latency_s:CPU, 2 threads"] == 21.4
    assert by_method["osediff"]["sd_latency_s:GPU"] is None  # not measured: left empty, not guessed
    assert by_method["bicubic"]["paper_gmacs"] is None and by_method["bicubic"]["latency_ms"] == 0.2
    assert RANKING_NOTE in notes and "attention" in RANKING_NOTE


def test_the_two_accountings_rank_tvt_and_osediff_differently_in_the_report():
    summary = {"complexity": {m: MEASURED[m] for m in ("tvt", "osediff")}, "test_set": "mini", "device": "cpu"}
    table = reports.complexity_table(summary, list(PAPER.values()))
    marks = table.marks()  # costs are exact (counts) or one measurement each: ranked by value
    assert marks[("tvt", "paper_gmacs")] == Mark.BEST and marks[("osediff", "paper_all_gmacs")] == Mark.BEST
    assert marks[("osediff", "sd_latency_s:CPU, 2 threads")] == Mark.BEST
    assert "Paper-size latency, CPU, 2 threads (s/img)" in table.markdown() and "**21.4**" in table.markdown()
