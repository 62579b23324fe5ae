from mrl_kernels.demo import DIMS, run_demo


def test_demo_shows_mrl_beats_truncated_baseline(capsys):
    results = run_demo()
    mrl, fixed = results.values()
    assert len(mrl) == len(fixed) == len(DIMS)
    assert min(mrl) > 0.8  # every truncation of the MRL embedding still classifies
    assert mrl[0] > fixed[0] + 0.2  # the 2-dim prefix of the baseline is far worse
    assert "| 2 |" in capsys.readouterr().out
