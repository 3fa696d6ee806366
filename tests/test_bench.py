"""The benchmark's smoke on a busy machine: a scenario that answered nothing is reported, never divided by."""

from bench.run import share_of


def test_a_share_of_nothing_answered_is_said_in_words_not_divided_by_zero():
    assert share_of(5, 0) == "n/a (nothing answered)"
    assert share_of(0.0, 0.0) == "n/a (nothing answered)"


def test_a_share_is_a_percentage():
    assert share_of(1, 4) == "25.0%"
