from benchmarks.head_cost import markdown_table, measure


def test_head_cost_times_every_class_count_against_an_encoder_layer():
    report = measure([2, 50], tokens=8, calls=2, rounds=1)
    assert [row["classes"] for row in report["rows"]] == [2, 50] and report["encoder_layer_ms"] > 0
    small, large = report["rows"]
    assert large["prototype_parameters"] - small["prototype_parameters"] == 48 * 384  # one prototype per class
    assert all(row["edr_ms"] > 0 and row["entropy_share_of_layer"] > 0 for row in report["rows"])
    assert "| 50 | 167,090 + 167,040 |" in markdown_table(report)
