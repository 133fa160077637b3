import json
import operator
import random

import numpy as np
import pytest

from align.tasks import arithmetic
from align.tasks.arithmetic import Problem


def _python_answer(prompt):
    """The answer by Python's own arithmetic on the prompt's text."""
    op = "+" if "+" in prompt else "-"
    left, right = prompt.removesuffix("=").split(op)
    return {"+": operator.add, "-": operator.sub}[op](int(left), int(right))


def test_prompt_and_answer_format():
    assert Problem(372, 45, "+").prompt == "372+45="
    assert Problem(372, 45, "+").answer == 417
    assert arithmetic.sft_records([Problem(372, 45, "+"), Problem(50, 8, "-")]) == [
        {"prompt": "372+45=", "response": "417"},
        {"prompt": "50-8=", "response": "42"},
    ]


@pytest.mark.parametrize(
    "a, b, op, answer",
    [
        (999, 1, "+", 1000),  # carry through every digit
        (58, 67, "+", 125),
        (0, 0, "+", 0),
        (1000, 1, "-", 999),  # borrow through every digit
        (502, 7, "-", 495),
        (43, 43, "-", 0),
    ],
)
def test_carry_and_borrow(a, b, op, answer):
    problem = Problem(a, b, op)
    assert problem.answer == answer == _python_answer(problem.prompt)


def test_generated_answers_match_python():
    problems = arithmetic.generate(500, seed=3, max_digits=4)
    assert all(p.answer == _python_answer(p.prompt) >= 0 for p in problems)


def test_problem_refuses_negative_answers_and_unknown_ops():
    with pytest.raises(ValueError, match="negative"):
        Problem(3, 5, "-")
    with pytest.raises(ValueError, match="op="):
        Problem(3, 5, "*")


def test_generation_is_deterministic_distinct_and_in_range():
    problems = arithmetic.generate(400, seed=0, min_digits=2, max_digits=3)
    assert problems == arithmetic.generate(400, seed=0, min_digits=2, max_digits=3)
    assert problems != arithmetic.generate(400, seed=1, min_digits=2, max_digits=3)
    assert len(set(problems)) == 400
    assert all(10 <= p.a <= 999 and 10 <= p.b <= 999 for p in problems)
    assert {p.op for p in problems} == {"+", "-"}
    assert {p.op for p in arithmetic.generate(50, seed=0, ops=("-",))} == {"-"}


# With 2 digits the test split is small enough to be listed whole; the others are sampled.
@pytest.mark.parametrize("max_digits", [2, 3])
def test_splits_are_disjoint_and_match_split_of(max_digits):
    train = arithmetic.generate(2000, seed=0, max_digits=max_digits)
    test = arithmetic.generate(300, seed=0, max_digits=max_digits, split="test")
    assert not set(train) & set(test)
    assert {arithmetic.split_of(p) for p in train} == {"train"}
    assert {arithmetic.split_of(p) for p in test} == {"test"}


def test_sums_with_swapped_operands_share_a_split():
    for p in arithmetic.generate(300, seed=0, ops=("+",), split="test"):
        assert arithmetic.split_of(Problem(p.b, p.a, "+")) == "test"


def test_a_larger_test_fraction_only_adds_to_the_test_split():
    problems = arithmetic.generate(1000, seed=0)
    small = {p for p in problems if arithmetic.split_of(p, 0.1) == "test"}
    large = {p for p in problems if arithmetic.split_of(p, 0.3) == "test"}
    assert small < large


def test_a_split_can_be_taken_whole_but_not_more():
    # 55 one-digit subtractions a - b with a >= b, all in train when test_fraction is 0.
    whole = arithmetic.generate(55, seed=0, max_digits=1, ops=("-",), test_fraction=0.0)
    assert sorted((p.a, p.b) for p in whole) == [(a, b) for a in range(10) for b in range(a + 1)]
    with pytest.raises(ValueError, match="more than the 55 problems of the train split"):
        arithmetic.generate(56, seed=0, max_digits=1, ops=("-",), test_fraction=0.0)
    with pytest.raises(ValueError, match="more than the 0 problems of the test split"):
        arithmetic.generate(1, seed=0, max_digits=1, test_fraction=0.0, split="test")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(split="validation"), "split="),
        (dict(ops=("*",)), "ops="),
        (dict(ops=("+", "+")), "ops="),
        (dict(min_digits=3, max_digits=2), "min_digits"),
        (dict(test_fraction=1.5), "test_fraction"),
    ],
)
def test_generate_refuses_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        arithmetic.generate(10, seed=0, **arguments)


def test_listed_probabilities_are_the_frequencies_of_draws():
    def cells(a, b, op):
        """Cell index by op, each operand's digit count, and whether the operands are equal."""
        return op * 8 + (a >= 10) * 4 + (b >= 10) * 2 + (a == b)

    a, b, op, p = arithmetic._listed(("+", "-"), 1, 2)
    assert len(p) == 100 * 100 + 100 * 101 // 2 and p.sum() == pytest.approx(1)
    drawn = arithmetic._drawn(np.random.default_rng(0), 200_000, ("+", "-"), 1, 2)
    frequencies = np.bincount(cells(*drawn), minlength=16) / 200_000
    probabilities = np.bincount(cells(a, b, op), weights=p, minlength=16)
    np.testing.assert_allclose(probabilities, frequencies, atol=2e-3)


def test_listing_and_sampling_draw_alike(monkeypatch):
    # Digit counts are uniform, so a one-digit first operand is far more common than the 10% of
    # uniform pairs (less than half: the 86 one-digit training sums are all used up).
    def one_digit_share(list_below):
        monkeypatch.setattr(arithmetic, "_LIST_BELOW", list_below)
        problems = arithmetic.generate(2000, seed=0, max_digits=2, ops=("+",))
        assert sum(p.a < 10 and p.b < 10 for p in problems) == 86
        return sum(p.a < 10 for p in problems) / len(problems)

    listed, sampled = one_digit_share(10**9), one_digit_share(0)
    assert 0.28 < listed < 0.34 and 0.28 < sampled < 0.34


@pytest.mark.parametrize(
    "response, answer",
    [
        ("12", 12),
        (" 12", 12),
        ("12\n", 12),
        ("\t12 \n", 12),
        ("007", 7),  # leading zeros are still digits only
        ("-3", None),  # no answer is negative, so a sign is never well-formed
        ("+3", None),
        ("12a", None),
        ("", None),
        ("  ", None),
        ("1 2", None),
        ("12=12", None),
        ("1.0", None),
        ("١٢", None),  # digits of other scripts are not decimal ASCII digits
    ],
)
def test_extract_answer(response, answer):
    assert arithmetic.extract_answer(response) == answer


def test_reward_values():
    problem = Problem(372, 45, "+")
    assert arithmetic.reward(problem, "417") == 1.0
    assert arithmetic.reward(problem, " 417\n") == 1.0
    assert arithmetic.reward(problem, "418") == arithmetic.PARTIAL_CREDIT == 0.1
    assert arithmetic.reward(problem, "417 apples") == 0.0
    assert arithmetic.reward(problem, "") == 0.0


def test_score():
    problems = [Problem(1, 2, "+"), Problem(9, 4, "-"), Problem(10, 10, "+"), Problem(7, 7, "-")]
    result = arithmetic.score(problems, ["3", "6", "20", "zero"])
    assert result == {"count": 4, "accuracy": 0.5, "mean_reward": 2.1 / 4, "well_formed": 0.75}
    with pytest.raises(ValueError, match="4 problems but 3 responses"):
        arithmetic.score(problems, ["3", "5", "20"])


SAMPLED = [
    (Problem(2, 3, "+"), ["5", "6", "5", " 5", "x"]),  # mixed
    (Problem(9, 9, "-"), ["0", "0"]),  # all correct
    (Problem(12, 30, "+"), ["41", "43", "41"]),  # all wrong
    (Problem(8, 1, "-"), ["7", "9"]),  # mixed
]
PROBLEMS = [problem for problem, _ in SAMPLED]
SAMPLES = [samples for _, samples in SAMPLED]


def test_preference_pairs_choose_right_and_reject_wrong():
    pairs, report = arithmetic.preference_pairs(PROBLEMS, SAMPLES, seed=0)
    assert report == dict(problems=4, pairs=2, all_correct=1, all_wrong=1, reference_chosen=0)
    assert [p["prompt"] for p in pairs] == ["2+3=", "8-1="]
    assert pairs[1] == {"prompt": "8-1=", "chosen": "7", "rejected": "9"}
    assert pairs == arithmetic.preference_pairs(PROBLEMS, SAMPLES, seed=0)[0]
    drawn = set()
    for seed in range(20):
        pairs, _ = arithmetic.preference_pairs(PROBLEMS, SAMPLES, seed=seed)
        drawn.add((pairs[0]["chosen"], pairs[0]["rejected"]))
    assert drawn == {("5", "6"), ("5", "x"), (" 5", "6"), (" 5", "x")}


def test_preference_pairs_on_generated_samples():
    problems = arithmetic.generate(200, seed=0)
    rng = random.Random(0)
    samples = [
        rng.choices([str(p.answer), f" {p.answer}\n", str(p.answer + 1), "?", ""], k=4)
        for p in problems
    ]
    pairs, report = arithmetic.preference_pairs(problems, samples, seed=0)
    assert report["pairs"] == len(pairs) > 100
    assert report["pairs"] + report["all_correct"] + report["all_wrong"] == 200
    for pair in pairs:
        answer = str(_python_answer(pair["prompt"]))
        assert pair["chosen"].strip() == answer and pair["rejected"].strip() != answer


def test_preference_pairs_with_the_reference_answer():
    pairs, report = arithmetic.preference_pairs(
        PROBLEMS, SAMPLES, seed=0, use_reference_answer=True
    )
    assert report == dict(problems=4, pairs=3, all_correct=1, all_wrong=1, reference_chosen=1)
    assert pairs[1]["prompt"] == "12+30=" and pairs[1]["chosen"] == "42"
    assert pairs[1]["rejected"] in ("41", "43")


def test_kto_records_label_each_distinct_sample():
    records = arithmetic.kto_records(PROBLEMS[:3], SAMPLES[:3])
    assert [(r["prompt"], r["completion"], r["label"]) for r in records] == [
        ("2+3=", "5", True),
        ("2+3=", "6", False),
        ("2+3=", " 5", True),
        ("2+3=", "x", False),
        ("9-9=", "0", True),
        ("12+30=", "41", False),
        ("12+30=", "43", False),
    ]


def test_jsonl_round_trip(tmp_path):
    records = arithmetic.preference_pairs(PROBLEMS, SAMPLES, seed=0)[0]
    records += arithmetic.sft_records(PROBLEMS) + arithmetic.kto_records(PROBLEMS, SAMPLES)
    path = tmp_path / "data.jsonl"
    arithmetic.write_jsonl(path, records)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == len(records) + 1
    assert [json.loads(line) for line in lines[:-1]] == records


def test_a_jsonl_file_is_written_whole_or_not_at_all(tmp_path):
    """The pipeline takes a data file that exists as finished: one cut short must not exist."""
    path = tmp_path / "records.jsonl"
    with pytest.raises(TypeError):
        arithmetic.write_jsonl(path, [{"prompt": "1+1="}, {"prompt": object()}])
    assert not path.exists()
    arithmetic.write_jsonl(path, [{"prompt": "1+1="}])
    assert path.read_text() == '{"prompt": "1+1="}\n' and list(tmp_path.iterdir()) == [path]
