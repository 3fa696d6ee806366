"""The benchmark's smoke on a busy machine: a scenario that answered nothing is reported, never divided by."""

from bench.run import normalized, packages_beyond_runtime, share_of


def test_a_share_of_nothing_answered_is_said_in_words_not_divided_by_zero():
    assert share_of(5, 0) == "n/a (nothing answered)"
    assert share_of(0.0, 0.0) == "n/a (nothing answered)"


def test_a_share_is_a_percentage():
    assert share_of(1, 4) == "25.0%"


def test_the_benchmark_counts_the_test_tools_as_packages_a_deploy_lacks_and_no_runtime_dependency():
    beyond = {normalized(name) for name in packages_beyond_runtime()}
    assert {"pytest", "selenium", "trio"} <= beyond
    # Direct requirements, one pulled in through an extra (psycopg[binary]), and dependencies of dependencies.
    assert not {"flask", "psycopg", "psycopg-binary", "werkzeug", "greenlet", "pydantic-core"} & beyond
