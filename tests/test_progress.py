"""Progress bars: on on rank 0, off on other ranks and with QALORA_TUNE_PROGRESS=0; a log
line at least every LOG_INTERVAL_S seconds when stderr is not a terminal."""

import qalora_tune._progress as progress


def test_bars_show_on_rank_zero_only_and_can_be_switched_off(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("QALORA_TUNE_PROGRESS", raising=False)
    with progress.progress_bar(3, "loading", unit="B") as bar:
        assert not bar.disable and bar.unit_scale
    monkeypatch.setenv("RANK", "1")
    with progress.progress_bar(3, "loading") as bar:
        assert bar.disable
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("QALORA_TUNE_PROGRESS", "0")
    with progress.progress_bar(3, "loading") as bar:
        assert bar.disable


def test_without_a_terminal_the_bar_writes_at_the_log_interval(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("QALORA_TUNE_PROGRESS", raising=False)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    with progress.progress_bar(None, "writing") as bar:
        assert bar.mininterval == progress.LOG_INTERVAL_S
