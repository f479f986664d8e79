"""The README's first command end to end: each adapter solves its own task on held-out prompts, far more often
than the base model and the other adapter, in fp32, int4 and int8."""

from ortlora.quickstart import PRECISIONS


def test_quickstart_adapters_solve_their_own_task(quickstarted):
    _, acc = quickstarted
    for precision in PRECISIONS:
        a = acc[precision]
        # measured: 100% on its own task, 0% for the base and the other adapter (every precision)
        assert a["upper"]["upper"] >= 0.9 and a["shift"]["shift"] >= 0.9, a
        assert a["base"]["upper"] <= 0.1 and a["base"]["shift"] <= 0.1, a
        assert a["upper"]["shift"] <= 0.1 and a["shift"]["upper"] <= 0.1, a
