"""Fixtures that several test files share."""
import pytest


@pytest.fixture
def every_16th_row(monkeypatch):
    """The shared data cut to every 16th row of each set, for a fast training run.
    ``split_keys`` caches what it reads, so its cache is emptied on the way in and out: a
    later test must not see the cut rows' groups."""
    import safeattn.data.samples as S
    from safeattn.data import load

    S.split_keys.cache_clear()
    monkeypatch.setattr(S, "load", lambda name: load(name)[::16])
    yield
    S.split_keys.cache_clear()
