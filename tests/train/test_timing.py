"""The benchmarks' timing: one step in flight as training keeps it, sides measured in turns."""

from train.timing import in_turns, pipelined_intervals


def test_timed_steps_are_each_queued_before_the_one_ahead_is_waited_for():
    events = []

    def dispatch():
        events.append(("dispatch", sum(e[0] == "dispatch" for e in events)))
        return events[-1][1]

    times = pipelined_intervals(dispatch, lambda step: events.append(("wait", step)), 3)
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert events == [("dispatch", 0), ("dispatch", 1), ("wait", 0), ("dispatch", 2), ("wait", 1),
                      ("dispatch", 3), ("wait", 2), ("wait", 3)]


def test_sides_are_measured_in_turns():
    calls = []

    def timer(name, seconds):
        def measure():
            calls.append(name)
            return seconds[calls.count(name) - 1]
        return measure

    assert in_turns([timer("a", [3, 1, 2]), timer("b", [9, 7, 8])], 3) == [[3, 1, 2], [9, 7, 8]]
    assert "".join(calls) == "ababab"
