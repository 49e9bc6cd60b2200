"""The trusted judge: evalplus's verdicts on ordinary programs, and what it accepts from the sandbox and the judge.

`test_same_verdict_as_evalplus` runs each program through evalplus 0.3.1's own untrusted_check (comparison in
the forked process, as upstream) and through the sandbox + judge, and wants the same verdict. The other tests
feed hand-made streams, pickles and rows to the checks that guard each boundary.
"""
from __future__ import annotations

import math
import pickle
import platform
import struct
import sys

import pytest

from tflow.tasks.judge import (ENDED, MALFORMED, NO_GT, NOT_PLAIN, SETUP, TOO_BIG, WALL, WRONG, _row, _same,
                               _Verdict, evaluate)
from tflow.tasks.plain import NotPlain, dumps_plain, loads_plain
from tflow.tasks.sandbox import Runner, Sandbox

needs_sandbox = pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                                   reason="the code sandbox's seccomp filter is written for Linux x86_64")
BOX = Sandbox(min_time_limit=0.3)


# ----------------------------------------------------------------------------- evalplus equivalence
def program(entry_point: str, body: str) -> str:
    lines = "".join(f"    {line}\n" for line in body.split("\n"))
    return f"import math, re, os, signal\ndef {entry_point}(*args):\n{lines}"


CASES = [  # (id, dataset, entry point, inputs, expected outputs, atol, body of the program)
    ("int", "humaneval", "f", [[1]], [3], 0, "return 3"),
    ("int_as_float", "humaneval", "f", [[1]], [3], 0, "return 3.0"),
    ("bool_as_int", "humaneval", "f", [[1]], [1], 0, "return True"),
    ("float_close", "humaneval", "f", [[1]], [1.0], 0, "return 1.0 + 1e-9"),
    ("float_far", "humaneval", "f", [[1]], [1.0], 0, "return 1.1"),
    ("float_list_close", "humaneval", "f", [[1]], [[1.0, 2.0]], 0, "return [1.0, 2.0 + 1e-8]"),
    ("float_list_as_tuple", "humaneval", "f", [[1]], [[1.0, 2.0]], 0, "return (1.0, 2.0 + 1e-8)"),
    ("float_list_short", "humaneval", "f", [[1]], [[1.0, 2.0]], 0, "return [1.0]"),
    ("tuple_as_list", "humaneval", "f", [[1]], [(1, 2)], 0, "return [1, 2]"),
    ("nan", "humaneval", "f", [[1]], [math.nan], 0, "return float('nan')"),
    ("atol_carries_over", "humaneval", "f", [[0], [1]], [0.5, [1.0, 2]], 0,
     "return 0.5 if args[0] == 0 else [1.0, 2.0000001]"),
    ("atol_given", "humaneval", "f", [[1]], [2.0], 0.5, "return 2.4"),
    ("atol_type", "humaneval", "f", [[1]], [2], 0.5, "return 2.4"),
    ("dict_set_complex", "humaneval", "f", [[1]], [{"a": {1, 2}, "b": 1 + 2j}], 0, "return {'b': 1+2j, 'a': {2, 1}}"),
    ("second_input_wrong", "humaneval", "f", [[1], [2]], [1, 2], 0, "return 1"),
    ("raises", "humaneval", "f", [[1]], [1], 0, "return 1 // 0"),
    ("syntax_error", "humaneval", "f", [[1]], [1], 0, "return (1"),
    ("loop", "humaneval", "f", [[1]], [1], 0, "while True:\n    pass"),
    ("loop_ignoring_alarm", "humaneval", "f", [[1]], [1], 0,
     "signal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass"),
    ("exits", "humaneval", "f", [[1]], [1], 0, "os._exit(0)"),
    ("large_outputs", "humaneval", "f", [[1], [2]], ["x" * 2**21, ["y"] * 2**18], 0,  # lockstep with the judge
     "return 'x' * 2**21 if args[0] == 1 else ['y'] * 2**18"),
    ("large_output_wrong", "humaneval", "f", [[1], [2], [3]], ["x" * 2**21, "z", "z"], 0, "return 'x' * 2**21"),
    ("set_eq", "mbpp", "similar_elements", [[(3, 4), (4, 3)]], [(3, 4)], 0, "return [4, 3, 3]"),
    ("set_eq_wrong", "mbpp", "similar_elements", [[(3, 4), (4, 3)]], [(3, 4)], 0, "return (4,)"),
    ("not_none_match", "mbpp", "check_str", [["ab"]], [True], 0, "return re.match('a', 'ab')"),
    ("not_none_none", "mbpp", "check_str", [["ab"]], [True], 0, "return None"),
    ("sum_div_zero", "mbpp", "sum_div", [[5]], [6], 0, "return 0"),
    ("are_equivalent", "mbpp", "are_equivalent", [[1, 2]], [True], 0, "return 'anything'"),
    ("surface_area_oracle", "mbpp", "surface_Area", [[3, 4]], [7], 1, "return 33.4"),
    ("digit_distance_oracle", "mbpp", "digit_distance_nums", [[123, 256]], [0], 0, "return 7"),
]


@pytest.fixture(scope="module")
def runner():
    r = Runner(BOX)
    yield r
    r.close()


def ours(runner: Runner, dataset, entry_point, inputs, expected, atol, code) -> str:
    limits = [BOX.min_time_limit] * len(inputs)
    verdict = _Verdict(dataset, entry_point, inputs, expected, atol, BOX.max_output_bytes)
    request = {"code": code, "entry_point": entry_point, "inputs": inputs, "limits": limits,
               "not_none": entry_point == "check_str"}
    return verdict.finish(runner.run(request, min(60, sum(limits)) + 2, verdict.feed))[0]


@needs_sandbox
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_verdict_as_evalplus(runner, case):
    from evalplus.eval import untrusted_check

    _, dataset, ep, inputs, expected, atol, body = case
    code = program(ep, body)
    theirs, _ = untrusted_check(dataset, code, inputs, ep, expected=expected, atol=atol, ref_time=[0.0] * len(inputs),
                                fast_check=True, min_time_limit=BOX.min_time_limit)
    assert ours(runner, dataset, ep, inputs, expected, atol, code) == theirs


@needs_sandbox
def test_deliberate_differences(runner):
    """Outputs that are not plain data fail (evalplus compares a numpy int by value); find_zero's pass counts
    (evalplus 0.3.1 never records it)."""
    assert ours(runner, "humaneval", "f", [[1]], [3], 0, program("f", "import numpy\nreturn numpy.int64(3)")) == "fail"
    find_zero = program("find_zero", "return 1.0")
    assert ours(runner, "humaneval", "find_zero", [[[-1.0, 1.0]]], [1.0], 1e-6, find_zero) == "pass"


@needs_sandbox
def test_ordinary_verdicts_through_score(data_dir, tmp_path):
    """A syntax error and a timeout, end to end (extract_code would not let a syntax error through)."""
    from tflow.tasks.code import load_records

    path = f"{data_dir}/humanevalplus/HumanEvalPlus.jsonl.gz"
    recs = load_records("humaneval", path)
    samples = [("HumanEval/2", "def truncate_number(number:\n    return number % 1.0"),
               ("HumanEval/2", "import signal\ndef truncate_number(number):\n"
                               "    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n    while True:\n        pass"),
               ("HumanEval/2", recs["HumanEval/2"]["prompt"] + recs["HumanEval/2"]["canonical_solution"])]
    rows = evaluate("humaneval", recs, samples, tmp_path, BOX)
    assert [(r["base"], r["plus"], r["error"]) for r in rows] == [
        ("fail", "skipped", "the program failed to load"), ("timeout", "skipped", WALL), ("pass", "pass", None)]


# ----------------------------------------------------------------------------- boundaries
def rec(tag: bytes, data: bytes = b"") -> bytes:
    return tag + struct.pack(">Q", len(data)) + data


GOOD = rec(b"r") + rec(b"x") + rec(b"o", dumps_plain(1)) + rec(b"o", dumps_plain(2))
END = {"killed": False, "stopped": False, "overflow": False}


def verdict_of(stream: bytes, **end) -> tuple[str, str | None]:
    v = _Verdict("humaneval", "f", [[1], [2]], [1, 2], 0, cap=1000)
    for i in range(len(stream)):  # byte by byte: records split anywhere
        if v.feed(stream[i:i + 1])[0]:
            break
    return v.finish({**END, **end})


@pytest.mark.parametrize("stream, end, want", [
    (GOOD, {}, ("pass", None)),
    (GOOD + rec(b"o", dumps_plain(3)), {}, ("fail", MALFORMED)),  # more outputs than inputs
    (rec(b"x") + GOOD[9:], {}, ("fail", MALFORMED)),  # no ready record
    (GOOD[:18] + rec(b"Z") + GOOD[18:], {}, ("fail", MALFORMED)),  # unknown tag
    (GOOD[:18] + rec(b"e", b"boom"), {}, ("fail", MALFORMED)),  # payload where none belongs
    (GOOD[:18] + b"o" + struct.pack(">Q", 10**9), {}, ("fail", MALFORMED)),  # over the cap
    (GOOD[:-3], {}, ("fail", MALFORMED)),  # cut short, yet the check ended by itself
    (GOOD[:-3], {"killed": True}, ("timeout", WALL)),
    (GOOD[:18], {}, ("timeout", ENDED)),
    (b"", {}, ("error", SETUP)),
    (GOOD[:18], {"overflow": True}, ("fail", TOO_BIG)),
    (GOOD[:18] + rec(b"o", dumps_plain(5)), {}, ("fail", WRONG)),
    (GOOD[:18] + rec(b"o", pickle.dumps(NotPlain)), {}, ("fail", NOT_PLAIN)),  # a global
    (GOOD[:18] + rec(b"o", b"\x80\x05garbage"), {}, ("fail", NOT_PLAIN)),
])
def test_record_stream_is_checked(stream, end, want):
    assert verdict_of(stream, **end) == want


class Sub(list):
    pass


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_plain_data_only():
    for value in [1, 2**5000, -0.0, 1 + 2j, "x", b"y", (1, [2, {3: (4,)}]), {1, 2}, frozenset({3}), None, True]:
        assert loads_plain(dumps_plain(value)) == value and type(loads_plain(dumps_plain(value))) is type(value)
    for value in [Sub(), Evil(), print, object()]:
        with pytest.raises(NotPlain):
            dumps_plain(value)
        with pytest.raises(NotPlain):
            loads_plain(pickle.dumps(value))


def test_same_guards_exponential_outputs():
    """A few pickled bytes can share one tuple into a tree far larger than the expected output: set() and
    numpy would walk all of it; the judge refuses it first."""
    t = (1,)
    for _ in range(60):
        t = (t, t)
    with pytest.raises(ValueError):
        _same("mbpp", "similar_elements", [], [t], [1], 0)
    assert _same("mbpp", "similar_elements", [], [3, 4, 4], (4, 3), 0) == (True, 0)


@pytest.mark.parametrize("row, ok", [
    ({"i": 3, "base": "pass", "plus": "pass", "error": None}, True),
    ({"i": 3, "base": "fail", "plus": "skipped", "error": WRONG}, True),
    ({"i": 3, "base": "error", "plus": "skipped", "error": NO_GT}, True),
    ({"i": 4, "base": "pass", "plus": "pass", "error": None}, False),  # another sample
    ({"i": True, "base": "pass", "plus": "pass", "error": None}, False),
    ({"i": 3, "base": 7, "plus": "skipped", "error": WRONG}, False),  # out of range
    ({"i": 3, "base": "fail", "plus": "pass", "error": None}, False),  # plus without base
    ({"i": 3, "base": "fail", "plus": "skipped", "error": "root:$6$secret"}, False),  # free text
    ({"i": 3, "base": "pass", "plus": "pass", "error": None, "extra": 1}, False),
    ([3, "pass", "pass", None], False),
])
def test_verdict_rows_are_checked(row, ok):
    assert (_row(row, 3) is not None) == ok
