from qalora_tune import demo


def test_demo_recovers_the_task_and_merges_exactly(capsys):
    result = demo.run(in_dim=256, out_dim=128, group_size=64, rank=4, steps=150, seed=1)
    assert result["error_int4_base"] > result["error_fp_base"]  # quantizing hurts
    # the adapter learns the task down to the int4 rounding noise, beating the fp base
    assert result["error_qalora"] < 0.6 * result["error_int4_base"]
    assert result["error_qalora"] < result["error_fp_base"]
    assert result["codes_unchanged"] and result["scales_unchanged"]
    assert result["merge_relative_deviation"] < 1e-5  # fp32 zeros: one fp32 rounding
    assert result["weight_type"] == "CpuInt4Tensor"  # torchao Int4OpaqueTensor layout


def test_demo_cli_prints_a_summary(capsys):
    demo.main(["--steps", "2"])
    out = capsys.readouterr().out
    assert "merged int4 (no adapter)" in out and "codes unchanged=True" in out
