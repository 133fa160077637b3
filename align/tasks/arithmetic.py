"""Multi-digit addition and subtraction: a task whose answers are checked exactly.

The prompt is plain text the model continues, `"372+45="`, and the response is the answer's
decimal digits, `"417"`, with no space or newline (the data pipeline appends EOS). Subtraction
keeps a >= b, so every answer is a non-negative integer and a well-formed response is digits
alone. The same problems give SFT data (`sft_records`), evaluation (`score`), DPO pairs
(`preference_pairs`) and KTO examples (`kto_records`) from a model's own samples.

Train and test are split by a hash of the problem, not by the seed, so they are disjoint
whatever seeds draw them; a + b and b + a hash alike, so a test sum is never a training sum with
its operands swapped.
"""

import dataclasses
import json
import os
import pathlib
import random
import re

import numpy as np

from data.sources import stable_fraction
from data.steps import replace_from_this_process

OPS = ("+", "-")
SPLITS = ("train", "test")
PARTIAL_CREDIT = 0.1  # for a well-formed wrong answer: the format is right, the sum is not
MAX_DIGITS = 18  # operands are drawn as int64
_ANSWER = re.compile(r"\s*([0-9]+)\s*")
# A split expected to hold fewer problems than this is listed whole, which is quick: only listing
# tells its actual size, which may fall well short of the expected one. Above it the two differ by
# a few percent at most.
_LIST_BELOW = 10_000
_MAX_LISTED = 5_000_000  # about ten seconds to list


@dataclasses.dataclass(frozen=True)
class Problem:
    a: int
    b: int
    op: str

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op={self.op!r} is not one of {OPS}")
        if min(self.a, self.b) < 0 or (self.op == "-" and self.a < self.b):
            raise ValueError(f"{self.prompt} has a negative operand or answer")

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="


def split_of(problem: Problem, test_fraction: float = 0.1) -> str:
    """'test' for the share `test_fraction` of problems whose hash falls below it, else 'train'.

    A larger fraction only moves problems into the test split, never out of it.
    """
    return "test" if _in_test(problem.a, problem.b, problem.op, test_fraction) else "train"


def _in_test(a, b, op, test_fraction):
    if op == "+":
        a, b = min(a, b), max(a, b)
    return stable_fraction(f"{a}{op}{b}=") < test_fraction


def _lowest(digits):
    return 0 if digits == 1 else 10 ** (digits - 1)


def _drawn(rng, count, ops, min_digits, max_digits):
    """(a, b, op index) arrays of `count` draws, with repeats.

    Each operand's digit count is uniform over [min_digits, max_digits], so one-digit operands
    are as common as three-digit ones rather than 1 in 100; a subtraction swaps its operands
    when a < b.
    """
    op = rng.integers(len(ops), size=count)
    digits = rng.integers(min_digits, max_digits + 1, size=(2, count))
    low = np.where(digits == 1, 0, 10 ** (digits - 1))
    a, b = rng.integers(low, 10**digits)
    swap = (np.asarray(ops)[op] == "-") & (a < b)
    return np.where(swap, b, a), np.where(swap, a, b), op


def _listed(ops, min_digits, max_digits):
    """(a, b, op index, probability) arrays of every problem, each once, under `_drawn`."""
    numbers = np.arange(_lowest(min_digits), 10**max_digits)
    digits = np.searchsorted(10 ** np.arange(1, max_digits + 1), numbers, side="right") + 1
    per_digit_count = np.array([10**d - _lowest(d) for d in range(max_digits + 1)])
    p = 1 / ((max_digits - min_digits + 1) * per_digit_count[digits])
    a, b = (grid.ravel() for grid in np.meshgrid(numbers, numbers, indexing="ij"))
    pair_p = np.outer(p, p).ravel() / len(ops)
    columns = []
    for index, op in enumerate(ops):
        if op == "+":
            columns.append((a, b, np.full(a.size, index), pair_p))
        else:
            keep = a >= b
            # (a, b) is drawn as itself or, swapped, as (b, a).
            twice = np.where(a[keep] > b[keep], 2, 1)
            columns.append((a[keep], b[keep], np.full(keep.sum(), index), pair_p[keep] * twice))
    return [np.concatenate(column) for column in zip(*columns)]


def _universe_size(ops, min_digits, max_digits):
    numbers = 10**max_digits - _lowest(min_digits)
    return sum(numbers**2 if op == "+" else numbers * (numbers + 1) // 2 for op in ops)


def generate(
    n: int,
    *,
    seed: int,
    min_digits: int = 1,
    max_digits: int = 3,
    ops: tuple[str, ...] = OPS,
    split: str = "train",
    test_fraction: float = 0.1,
) -> list[Problem]:
    """`n` distinct problems of `split`, the same for the same arguments.

    Operands have min_digits to max_digits digits, with digit counts uniform (see `_drawn`);
    problems are drawn without replacement, in draw order.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    if not ops or not set(ops) <= set(OPS) or len(set(ops)) != len(ops):
        raise ValueError(f"ops={ops!r} must be distinct entries of {OPS}")
    if not 1 <= min_digits <= max_digits <= MAX_DIGITS:
        raise ValueError(
            f"need 1 <= min_digits <= max_digits <= {MAX_DIGITS}, got {min_digits} and {max_digits}"
        )
    if not 0 <= test_fraction <= 1:
        raise ValueError(f"test_fraction={test_fraction} is not in [0, 1]")
    if n < 0:
        raise ValueError(f"n={n} is negative")
    rng = np.random.default_rng(seed)
    share = test_fraction if split == "test" else 1 - test_fraction
    universe = _universe_size(ops, min_digits, max_digits)
    expected = share * universe
    # Both ways draw from the same distribution (weighted sampling without replacement). Sampling
    # is fast while at most half the split is asked for; listing knows exactly what the split holds.
    if expected >= _LIST_BELOW and n <= expected / 2:
        return _sampled(rng, n, ops, min_digits, max_digits, split, test_fraction, share)
    where = f"the {split} split of {ops} problems with {min_digits} to {max_digits} digits"
    if universe > _MAX_LISTED:
        raise ValueError(
            f"n={n:,} is over half the ~{expected:,.0f} problems of {where}, too many to list"
        )
    a, b, op, p = _listed(ops, min_digits, max_digits)
    symbols = np.asarray(ops)[op].tolist()
    in_test = [_in_test(*row, test_fraction) for row in zip(a.tolist(), b.tolist(), symbols)]
    inside = np.array(in_test) == (split == "test")
    if n > inside.sum():
        raise ValueError(f"n={n:,} is more than the {inside.sum():,} problems of {where}")
    # Exponential race: the n smallest Exp(1)/p are a weighted sample without replacement, in order.
    race = rng.standard_exponential(universe) / p
    race[~inside] = np.inf
    return [Problem(int(a[i]), int(b[i]), symbols[i]) for i in np.argsort(race, kind="stable")[:n]]


def _sampled(rng, n, ops, min_digits, max_digits, split, test_fraction, share):
    problems, seen = [], set()
    while len(problems) < n:
        # Enough draws that one batch usually suffices.
        count = int((n - len(problems)) / share) + 64
        a, b, op = _drawn(rng, count, ops, min_digits, max_digits)
        for problem in map(Problem, a.tolist(), b.tolist(), np.asarray(ops)[op].tolist()):
            if problem in seen:
                continue
            seen.add(problem)
            if split_of(problem, test_fraction) == split:
                problems.append(problem)
                if len(problems) == n:
                    break
    return problems


def extract_answer(response: str) -> int | None:
    """The integer a well-formed response states: digits, with optional surrounding whitespace.

    Anything else is malformed and gives None, a minus sign included: no answer is negative.
    """
    match = _ANSWER.fullmatch(response)
    return int(match[1]) if match else None


def is_correct(problem: Problem, response: str) -> bool:
    return extract_answer(response) == problem.answer


def reward(problem: Problem, response: str) -> float:
    """1.0 for the right answer, PARTIAL_CREDIT for a well-formed wrong one, 0.0 if malformed."""
    return reward_of_answer(problem.answer, response)


def reward_of_answer(answer: int, response: str) -> float:
    """`reward` for a problem whose answer is `answer`."""
    stated = extract_answer(response)
    if stated is None:
        return 0.0
    return 1.0 if stated == answer else PARTIAL_CREDIT


def _check_lengths(problems, responses, what):
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems but {len(responses)} {what}")


def score(problems: list[Problem], responses: list[str]) -> dict:
    """Accuracy, mean reward and well-formed fraction of one response per problem."""
    _check_lengths(problems, responses, "responses")
    if not problems:
        raise ValueError("no problems to score")
    count = len(problems)
    return {
        "count": count,
        "accuracy": sum(map(is_correct, problems, responses)) / count,
        "mean_reward": sum(map(reward, problems, responses)) / count,
        "well_formed": sum(extract_answer(r) is not None for r in responses) / count,
    }


def sft_records(problems: list[Problem]) -> list[dict]:
    return [{"prompt": p.prompt, "response": str(p.answer)} for p in problems]


def write_whole(path: str | os.PathLike, text: str) -> None:
    """Written whole or not at all: a file that exists is complete."""
    replace_from_this_process(pathlib.Path(path), text.encode("utf-8"))


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    write_whole(path, "".join(json.dumps(record) + "\n" for record in records))


def preference_pairs(
    problems: list[Problem],
    samples: list[list[str]],
    *,
    seed: int,
    use_reference_answer: bool = False,
) -> tuple[list[dict], dict]:
    """One DPO pair per problem whose samples hold a right and a wrong answer.

    `samples[i]` are the model's responses to `problems[i]`. Chosen and rejected are drawn
    uniformly among the distinct correct and distinct incorrect samples, so a mistake the model
    repeats is not favoured. With `use_reference_answer`, a problem with no correct sample gets
    the ground-truth answer as chosen: a response the model did not sample, which makes the pair
    off-policy. The report counts problems, pairs, problems whose samples were all correct (no
    pair) and all wrong, and pairs whose chosen is the reference answer.
    """
    _check_lengths(problems, samples, "sample lists")
    rng = random.Random(seed)
    pairs = []
    counts = ("pairs", "all_correct", "all_wrong", "reference_chosen")
    report = {"problems": len(problems)} | dict.fromkeys(counts, 0)
    for index, (problem, responses) in enumerate(zip(problems, samples)):
        if not responses:
            raise ValueError(f"problem {index} ({problem.prompt}) has no samples")
        distinct = list(dict.fromkeys(responses))
        correct = [s for s in distinct if is_correct(problem, s)]
        incorrect = [s for s in distinct if not is_correct(problem, s)]
        report["all_correct"] += not incorrect
        report["all_wrong"] += not correct
        if not correct and use_reference_answer:
            correct = [str(problem.answer)]
            report["reference_chosen"] += 1
        if correct and incorrect:
            chosen, rejected = rng.choice(correct), rng.choice(incorrect)
            pairs.append({"prompt": problem.prompt, "chosen": chosen, "rejected": rejected})
    report["pairs"] = len(pairs)
    return pairs, report


def kto_records(problems: list[Problem], samples: list[list[str]]) -> list[dict]:
    """Each distinct sample of each problem, labelled desirable (True) when it is correct."""
    _check_lengths(problems, samples, "sample lists")
    return [
        {"prompt": problem.prompt, "completion": s, "label": is_correct(problem, s)}
        for problem, responses in zip(problems, samples)
        for s in dict.fromkeys(responses)
    ]
