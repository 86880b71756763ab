"""Every metric on hand-computed cases, normalisation edge cases and the harness quirks we keep on purpose."""

import pytest

from kimivl.eval.data import Sample, circular_expand
from kimivl.eval.errors import DataError, EvalError
from kimivl.eval.metrics import (anls, choice_record, evaluate, get_metric, levenshtein, mmbench_choice, mmmu_choice,
                                 mmmu_key_responses, mmmu_normalize, mmmu_numbers, mmmu_open_correct, mmmu_open_parse,
                                 ocr_record, ocrbench_hit, relaxed_accuracy, relaxed_correct, vqa_accuracy,
                                 vqa_normalize)


@pytest.mark.parametrize("a, b, d", [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "", 3),
                                     ("same", "same", 0), ("ab", "ba", 2)])
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)


# ---- OCRBench -----------------------------------------------------------------------------------------------------
def test_ocrbench_substring_case_insensitive():
    assert ocrbench_hit("The word is CENTRE.", ["centre"], "Regular Text Recognition")
    assert ocrbench_hit("12\n34", ["12 34"])  # newlines become spaces
    assert ocrbench_hit("  Paris ", ["  PARIS\n"])  # ground truth stripped
    assert not ocrbench_hit("cent re", ["centre"])
    assert ocrbench_hit("b", ["a", "B"])  # any ground truth
    assert ocrbench_hit("anything", [""])  # quirk: the empty string is a substring of everything


def test_ocrbench_handwritten_math_is_case_sensitive_without_spaces():
    hme = "Handwritten Mathematical Expression Recognition"
    assert ocrbench_hit("x ^ { 2 } + 1", ["x^{2}+1"], hme)
    assert ocrbench_hit("x^{2}+1", ["x ^ {2} + 1"], hme)
    assert not ocrbench_hit("X^{2}+1", ["x^{2}+1"], hme)
    assert ocrbench_hit("X^{2}+1", ["x^{2}+1"], "Key Information Extraction")  # other categories ignore case
    assert not ocrbench_hit("x^{2}+1", ["x ^ {2} + 1"], "Key Information Extraction")  # ... but keep spaces


def test_ocrbench_summary_counts_and_total():
    cats = ["Regular Text Recognition", "Digit String Recognition", "Doc-oriented VQA"]
    samples = [Sample(str(i), "q", ["ok"], category=c) for i, c in enumerate(cats)]
    overall, per_cat, _ = evaluate(get_metric("ocrbench"), samples, {"0": "ok", "1": "no", "2": "OK!"})
    assert overall["hits"] == 2 and overall["n"] == 3
    assert overall["score_1000"] == pytest.approx(2000 / 3)  # equals the hit count on the full 1000 questions
    assert overall["text_recognition_hits"] == 1  # the six recognition categories, summed
    assert per_cat["Digit String Recognition"] == {"n": 1, "score": 0.0, "hits": 0, "score_1000": 0.0,
                                                   "text_recognition_hits": 0}
    assert "text_recognition_hits" not in per_cat["Doc-oriented VQA"]


# ---- VQA ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, norm", [
    ("Two dogs.", "2 dogs"),            # number word, final period removed, lower case
    ("the cat", "cat"),                 # article dropped
    ("A", ""),                          # ... even when it is the whole answer
    ("none", "0"), ("Ten", "10"),
    ("dont", "don't"), ("Dont", "don't"), ("youre", "you're"),
    ("Im", "im"),                       # table entry "Im" never applies: text is lower-cased first
    ("yes!", "yes"),                    # punctuation not next to a space -> space
    ("coca-cola", "coca cola"),
    ("hello - world", "hello world"),   # next to a space -> deleted
    ("two, three", "2 3"),
    ("1,000", "1000"),                  # a digit,digit comma deletes every punctuation mark ...
    ("1,000 a-b", "1000 ab"),           # ... everywhere in the answer
    ("3.14", "3.14"), ("end.", "end"), ("e.g.", "eg"),  # "." kept only before a digit
    ("5. apples", "5 apples"),          # the official look-behind typo: a period after a digit goes too
    ("red\nball\tgame", "red ball game"),
    ("(a)", ""),                        # brackets -> spaces, then the article goes
    ("it's", "it's"),                   # apostrophes are not punctuation here
])
def test_vqa_normalize(raw, norm):
    assert vqa_normalize(raw) == norm


def test_vqa_normalize_removes_at_most_32_periods():
    # the harness passes re.UNICODE (= 32) as the `count` argument of sub()
    assert vqa_normalize("." * 40) == "." * 8


@pytest.mark.parametrize("m, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(m, expected):
    # m of 10 humans said "red": (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10
    answers = ["red"] * m + ["blue"] * (10 - m)
    assert vqa_accuracy("Red.", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    answers = ["2"] * 3 + ["two dogs"] * 7
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("The 2 dogs", answers) == pytest.approx(1.0)
    assert vqa_accuracy("3", ["three"] * 2 + ["four"] * 3) == pytest.approx((2 * 1 / 3 + 3 * 2 / 3) / 5)


def test_vqa_accuracy_needs_several_answers():
    with pytest.raises(DataError, match="human answers"):
        vqa_accuracy("x", ["x"])
    with pytest.raises(DataError, match="sample 7"):
        get_metric("vqa").score(Sample("7", "q", ["x"]), "x")


# ---- ANLS ---------------------------------------------------------------------------------------------------------
def test_anls_cases():
    assert anls("hello ", ["Hello"]) == 1.0            # lower-cased, stripped
    assert anls("a  b", ["a b"]) == 1.0                # whitespace collapsed
    assert anls("abce", ["abcd"]) == pytest.approx(0.75)
    assert anls("abxy", ["abcd"]) == pytest.approx(0.5)  # exactly 0.5 is kept (the script tests < 0.5)
    assert anls("abxyz", ["abcde"]) == 0.0             # 0.4 < 0.5
    assert anls("cd", ["ab"]) == 0.0
    assert anls("abce", ["foo", "abcd", "xyz"]) == pytest.approx(0.75)  # max over ground truths
    assert anls("", [""]) == 1.0
    assert anls("x", [""]) == 0.0


def test_anls_divides_by_the_raw_length():
    # the challenge script measures the denominator before normalisation: 1 edit / max(4, 7) instead of / 4
    assert anls("abce   ", ["abcd"]) == pytest.approx(1 - 1 / 7)


# ---- relaxed accuracy ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, target, ok", [
    ("105", "100", True), ("95", "100", True), ("106", "100", False), ("94.9", "100", False),
    ("45%", "0.45", True), ("45", "0.45", False), ("45%", "45", False),  # "x%" means x / 100
    ("0", "0", True), ("0.0", "0", False),             # a zero target falls back to string matching
    ("Yes", "yes", True), ("yes.", "yes", False),      # case-insensitive exact match otherwise
    ("1,000", "1000", False), ("1e3", "1000", True),   # Python float() parsing
    ("-10.4", "-10", True),
])
def test_relaxed_correct(pred, target, ok):
    assert relaxed_correct(pred, target) is ok


def test_relaxed_accuracy_strips_and_takes_any_target():
    assert relaxed_accuracy(" 100 \n", ["100"]) == 1.0
    assert relaxed_accuracy("blue", ["red", "Blue"]) == 1.0
    assert relaxed_accuracy("green", ["red", "Blue"]) == 0.0


# ---- plain OCR ----------------------------------------------------------------------------------------------------
def test_ocr_exact_match_and_cer():
    assert ocr_record("hallo", ["hello"]) == {"score": 0.0, "edits": 1, "ref_chars": 5}
    assert ocr_record(" world\n", ["world"]) == {"score": 1.0, "edits": 0, "ref_chars": 5}
    assert ocr_record("Hello", ["hello"])["score"] == 0.0  # case-sensitive
    assert ocr_record("abd", ["xyzw", "abc"]) == {"score": 0.0, "edits": 1, "ref_chars": 3}  # closest truth
    samples = [Sample("0", "q", ["hello"]), Sample("1", "q", ["world"]), Sample("2", "q", ["ab"])]
    overall, _, _ = evaluate(get_metric("ocr"), samples, {"0": "hallo", "1": "world", "2": "abcd"})
    assert overall["score"] == pytest.approx(100 / 3)
    assert overall["cer"] == pytest.approx(100 * (1 + 0 + 2) / (5 + 5 + 2))  # corpus level


# ---- multiple choice ----------------------------------------------------------------------------------------------
ABCD = {"A": "dog", "B": "cat", "C": "red bird", "D": "fish"}


@pytest.mark.parametrize("pred, choice", [
    ("B", "B"), ("The answer is B.", "B"), ("(C) red bird", "C"), ("**D**", "D"),
    ("A dog.", "A"),                       # quirk: the article "A" counts as the letter A
    ("a", None),                           # letters are matched upper-case only
    ("B or C", None),                      # two letters, and no unique option text
    ("I think it is the cat", "B"),        # no letter: the unique option text contained
    ("a red bird or a dog", None),         # two option texts
    ("Z", "Z"), ("Cannot determine the answer", "Z"),
    ("E", None),                           # not an option here
])
def test_mmbench_choice(pred, choice):
    assert mmbench_choice(pred, ABCD) == choice


@pytest.mark.parametrize("pred, choice", [
    ("(B)", "B"), ("B.", "B"), ("'C'", "C"), ("The answer is (B), not (A)", "A"),  # the last bracketed one
    ("A B", "B"),                            # several bare letters: the last
    ("(C) but maybe D", "C"),                # brackets win over bare letters
    ("I believe the right answer here is the cat", "B"),  # > 5 words: option text
    ("the cat", None),                       # <= 5 words: no text matching
    ("Answer:B", None),                      # a letter must be bracketed or stand between spaces
])
def test_mmmu_choice(pred, choice):
    assert mmmu_choice(pred, ABCD) == choice


def test_unparsable_choice_is_a_seeded_random_pick():
    s = Sample("17", "q", ["B"], options=dict(ABCD))
    r1, r2 = choice_record(s, "no idea", mmmu_choice, seed=42), choice_record(s, "no idea", mmmu_choice, seed=42)
    assert r1 == r2 and r1["random"] and r1["choice"] in ABCD
    picks = {choice_record(Sample(str(i), "q", ["A"], options=dict(ABCD)), "?", mmmu_choice, 42)["choice"]
             for i in range(40)}
    assert picks == set(ABCD)  # draws differ across samples
    assert choice_record(s, "B", mmmu_choice, 42) == {"score": 1.0, "choice": "B", "random": False}


# ---- MMMU open questions ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("response, keys", [
    ("so the answer is 3.50", ["3.50"]),             # the shortest tail: after "is ", not after "so " or "answer "
    ("The answer is the mitochondria.", ["the mitochondria"]),  # lower-cased, the final "." stripped
    ("x = 5", ["5"]),                                # "=" counts in the last line ...
    ("Step 1: a = 5\nb = 7", ["7"]),                 # ... and only there
    ("This is red\nso blue", ["red", "blue"]),       # every line contributes; "this " contains "is "
    ("It is 5. The end", ["5. the end"]),            # sentences are never split (MMMU splits after lower-casing)
    ("No idea", ["no idea"]),                        # no indicator: the whole response
    ("The result is ?", ["the result is ?"]),        # a lone punctuation mark is dropped
])
def test_mmmu_key_responses(response, keys):
    assert mmmu_key_responses(response) == keys


def test_mmmu_numbers():
    # in pattern order: thousands separators, scientific notation, plain numbers; the patterns overlap
    assert mmmu_numbers("2.5e3 and 1,000 or -.5") == ["1,000", "2.5e3", "2", "3", "000", "-.5"]
    assert mmmu_numbers("no digits here") == []


@pytest.mark.parametrize("text, norm", [
    ("3.50", [3.5]), (" 1,000 ", [1000.0]), ("3.456", [3.46]), ("1e3", [1000.0]), ("1,2", [12.0]),
    ("Paris", ["paris"]), ("B", [" b", "b "]),      # one character: padded both ways
])
def test_mmmu_normalize(text, norm):
    assert mmmu_normalize(text) == norm


@pytest.mark.parametrize("response, answers, parsed, right", [
    ("so the answer is 3.50", ["3.5"], [3.5], True),                      # a number inside a sentence
    ("1,000", ["1000"], [1000.0, 0.0], True),                              # thousands separator
    ("1,000", ["0"], [1000.0, 0.0], True),                                 # quirk: "000" is extracted too
    ("The answer is the mitochondria.", ["Mitochondria"], ["the mitochondria"], True),  # gold text contained
    ("The answer is the nucleus.", ["Mitochondria"], ["the nucleus"], False),
    ("The ratio is 3.43", ["24/7", "3.429"], [3.43], True),                # a list of golds; 3.429 rounds to 3.43
    ("it is 24/7", ["24/7", "3.429"], ["24/7", 24.0, 7.0], True),
    ("The answer is three and a half", ["3.5"], ["three and a half"], False),  # no number for a numeric gold
    ("Avogadro's number is 6.02E23", ["6.02e23"], [6.02e23, 6.0, 23.0], True),  # scientific notation
    ("the result is 2.5e3", ["2500"], [2500.0, 2.0, 3.0], True),
    ("the result is 1.5e-3", ["0.004"], [0.0, 1.0, -3.0], True),           # both round to 0.00
    ("The answer is B", ["B"], [" b", "b "], True),                        # one character, padded on both sides
    ("The answer is bar", ["B"], ["bar"], False),                          # ... so it does not match inside words
    ("Step 1: a = 5\nb = 7", ["5"], [7.0], False),
])
def test_mmmu_open(response, answers, parsed, right):
    assert mmmu_open_parse(response) == parsed
    assert mmmu_open_correct(parsed, answers) is right


def test_mmmu_metric_scores_open_and_multiple_choice_questions():
    samples = [Sample("0", "q", ["B"], options=dict(ABCD)), Sample("1", "q", ["3.5"]),
               Sample("2", "q", ["24/7", "3.429"]), Sample("3", "q", ["Paris"])]
    preds = {"0": "(B)", "1": "so the answer is 3.50", "2": "It is 3.4", "3": "The capital is paris."}
    overall, _, records = evaluate(get_metric("mmmu"), samples, preds)
    assert records == [{"score": 1.0, "choice": "B", "random": False}, {"score": 1.0, "parsed": [3.5]},
                       {"score": 0.0, "parsed": [3.4]}, {"score": 1.0, "parsed": ["paris"]}]
    assert overall == {"n": 4, "score": 75.0, "random_picks": 0, "no_option": 0}
    with pytest.raises(DataError, match="sample 9: an open question .* needs non-empty answers"):
        get_metric("mmmu").score(Sample("9", "q", [" "]), "x")  # a blank answer would match every prediction


def test_choice_record_rejects_bad_samples():
    with pytest.raises(DataError, match="sample 3: answer 'E'"):
        choice_record(Sample("3", "q", ["E"], options=dict(ABCD)), "A", mmbench_choice, 0)
    with pytest.raises(DataError, match="needs options"):
        choice_record(Sample("3", "q", ["A"]), "A", mmbench_choice, 0)


def test_mcq_summary_counts_random_and_no_option():
    samples = [Sample(str(i), "q", ["A"], options=dict(ABCD), category="c") for i in range(4)]
    overall, _, _ = evaluate(get_metric("mcq"), samples, {"0": "A", "1": "B", "2": "Z", "3": "hmm"})
    assert overall["random_picks"] == 1 and overall["no_option"] == 1 and overall["n"] == 4
    assert overall["score"] in (25.0, 50.0)  # the random pick may or may not hit A


def test_circular_expand_rotates_options_and_answer():
    copies = circular_expand([Sample("7", "q", ["B"], options={"A": "x", "B": "y", "C": "z"})])
    assert [c.index for c in copies] == ["7", "1000007", "2000007"]
    assert [c.options for c in copies] == [{"A": "x", "B": "y", "C": "z"}, {"A": "y", "B": "z", "C": "x"},
                                           {"A": "z", "B": "x", "C": "y"}]
    assert [c.answers for c in copies] == [["B"], ["A"], ["C"]]  # always the letter of "y"
    with pytest.raises(DataError, match="already hold"):
        circular_expand(copies)


def test_circular_scoring_needs_every_rotation_right():
    base = [Sample("0", "q", ["A"], options={"A": "yes", "B": "no"}),
            Sample("1", "q", ["B"], options={"A": "up", "B": "down"})]
    samples = circular_expand(base)  # indices 0, 1000000, 1, 1000001
    by_text = {"0": "yes", "1000000": "yes", "1": "down", "1000001": "up"}  # question 1 fails its rotation
    preds = {s.index: next(k for k, v in s.options.items() if v == by_text[s.index]) for s in samples}
    overall, _, _ = evaluate(get_metric("mcq", circular=True), samples, preds)
    assert overall["groups"] == 2 and overall["score"] == 50.0
    assert overall["vanilla"] == 100.0  # both unrotated copies were right
    plain, _, _ = evaluate(get_metric("mcq"), samples, preds)
    assert plain["score"] == 75.0 and "groups" not in plain


def test_get_metric_errors():
    with pytest.raises(EvalError, match="unknown metric 'bleu'"):
        get_metric("bleu")
    with pytest.raises(EvalError, match="circular"):
        get_metric("anls", circular=True)
