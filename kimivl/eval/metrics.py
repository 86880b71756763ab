"""Benchmark metrics, each as the published harness computes it (quirks included and documented).

Every metric scores one (sample, prediction) pair into a record {"score": value in [0, 1], ...details} and sums a
list of records into a summary {"n", "score" (percent), ...extras}; `evaluate` does both, overall and per category.
Sources, for the quirks kept on purpose:
  OCRBench    VLMEvalKit `OCRBench.evaluate` (vlmeval/dataset/image_vqa.py), as in the OCRBench repository.
  VQA         the official VQA API (GT-Vision-Lab/VQA vqaEval.py: processPunctuation, processDigitArticle), as
              VLMEvalKit's `process_answer` long applied it; current VLMEvalKit keeps a "." after a digit (see
              `vqa_normalize`).
  ANLS        the DocVQA / InfographicVQA challenge evaluation script (Robust Reading Competition), which
              VLMEvalKit's `anls_compute` follows (see `anls`).
  relaxed     pix2struct's `relaxed_correctness` (metrics.py), used by VLMEvalKit for ChartQA.
  mcq         VLMEvalKit's `can_infer` (vlmeval/utils/matching_util.py), the exact-matching stage of MMBench.
  mmmu        MMMU's `parse_multi_choice_response`, `parse_open_response` and `eval_open` (MMMU-Benchmark/MMMU
              eval/eval_utils.py, checked against commits 44b45b5 and bb91f23, identical in these functions).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from .data import CIRCULAR_STRIDE, Sample, circular_group
from .errors import DataError, EvalError

Record = dict
Summary = dict


@dataclass(frozen=True)
class Metric:
    """A named metric: `score` maps (sample, prediction) to a record, `summarize` records to a summary."""

    name: str
    title: str
    score: Callable[[Sample, str], Record]
    summarize: Callable[[list[Sample], list[Record]], Summary]
    headline: str = "score"  # the summary key that is the benchmark's published number
    unit: str = "%"


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _mean_summary(samples: list[Sample], records: list[Record]) -> Summary:
    return {"n": len(records), "score": 100.0 * sum(r["score"] for r in records) / max(len(records), 1)}


# ---- OCRBench -----------------------------------------------------------------------------------------------------
OCRBENCH_HME = "Handwritten Mathematical Expression Recognition"
OCRBENCH_TEXT_RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                             "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition")


def ocrbench_hit(prediction: str, answers: list[str], category: str = "") -> bool:
    """OCRBench: a prediction scores when some ground truth, normalised, is a substring of the normalised prediction.

    Normalisation: strip, newlines to spaces, lower-case. Quirk kept from the harness: in the category "Handwritten
    Mathematical Expression Recognition" (HME100k LaTeX) the comparison is case-sensitive and every space is removed
    from both sides instead (the OCRBench repository tests the dataset name "HME100k", VLMEvalKit the category:
    the same 100 questions). Consequence of the substring rule: an empty ground truth matches every prediction.
    """
    if category == OCRBENCH_HME:
        pred = prediction.strip().replace("\n", " ").replace(" ", "")
        return any(a.strip().replace("\n", " ").replace(" ", "") in pred for a in answers)
    pred = prediction.lower().strip().replace("\n", " ")
    return any(a.lower().strip().replace("\n", " ") in pred for a in answers)


def _ocrbench_summary(samples: list[Sample], records: list[Record]) -> Summary:
    """OCRBench's total is the number of hits over its 1000 questions; on n questions we report 1000 * hits / n
    (the same number when n = 1000) and the raw hits. "Text Recognition" is the sum of the six recognition
    categories, as the harness reports it."""
    hits = sum(int(r["score"]) for r in records)
    out = {**_mean_summary(samples, records), "hits": hits, "score_1000": 1000.0 * hits / max(len(records), 1)}
    text = [r for s, r in zip(samples, records) if s.category in OCRBENCH_TEXT_RECOGNITION]
    if text:
        out["text_recognition_hits"] = sum(int(r["score"]) for r in text)
    return out


# ---- VQA accuracy -------------------------------------------------------------------------------------------------
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a typo for a look-behind and, being a
# look-ahead for the text "<=digit" at a ".", never fails; so it removes every "." not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The official table, word for word (pairs "from:to"). Entries kept as published although they never apply or point
# the other way: "Id've", "I'dve", "Im", "Ive" (the text is lower-cased first) and "somebody'd" -> "somebodyd".
_CONTRACTIONS = dict(pair.split(":") for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've
didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't
havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've
I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am
mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at
shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't
shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've
someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd
somethingd've:something'd've something'dve:something'd've somethingll:something'll thats:that's thered:there'd
thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've
they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've
we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's
whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll
whos:who's whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've
y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll
youre:you're youve:you've
""".split())


def vqa_normalize(answer: str) -> str:
    """The official VQA answer normalisation, in its order:

    1. newlines and tabs become spaces; strip.
    2. punctuation: each of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted if the *input* has it next to a
       space (or contains a digit,digit comma anywhere), else replaced by a space; then every "." not followed by a
       digit is deleted -- at most 32 of them, because the harness passes re.UNICODE (= 32) as `count`.
    3. lower-case, split on whitespace, number words "none".."ten" to digits, drop the articles a / an / the, map
       apostrophe-less contractions ("dont") to their spelling ("don't"); join with single spaces.
    This is the VQA API's rule, its look-behind typo included ("5. apples" -> "5 apples"), as VLMEvalKit applied it
    for years. Current VLMEvalKit (`process_punctuation` in vlmeval/smp/misc.py) writes the look-behind correctly
    and keeps a "." that follows a digit ("5. apples" -> "5. apples", "5." -> "5."); otherwise the two agree (it
    still passes re.UNICODE as the count).
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if strip_all or p + " " in text or " " + p in text else " ")
    out = _PERIOD.sub("", out, count=32)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy (VQAv2, TextVQA): min(#humans that gave the prediction / 3, 1), averaged over the leave-one-out
    subsets of the human answers (10 in both datasets): for each answer i, count the *other* answers equal to the
    prediction. Prediction and answers are compared after `vqa_normalize`.

    With m of 10 answers matching: m=1 -> 0.3, m=2 -> 0.6, m=3 -> 0.9, m>=4 -> 1. The official API normalises the
    prediction fully but the ground truths only for punctuation, and only when they disagree (VQA's annotations are
    normalised already); we normalise both fully, as VLMEvalKit does, which differs only on unnormalised annotations.
    """
    if len(answers) < 2:
        raise DataError(f"VQA accuracy needs the human answers (10 in VQAv2 / TextVQA), got {len(answers)}; with one "
                        "answer the leave-one-out score is always 0: use --metric ocr, anls or relaxed instead")
    gts = [vqa_normalize(a) for a in answers]
    pred = vqa_normalize(prediction)
    matches = sum(g == pred for g in gts)
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)


# ---- ANLS ---------------------------------------------------------------------------------------------------------
def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity (DocVQA, InfographicVQA), one question's term:
    max over ground truths g of 1 - NL(g, p), set to 0 when below `threshold` (0.5).

    NL = levenshtein(norm(g), norm(p)) / max(len(g), len(p)), norm = strip, lower-case, collapse whitespace.
    Quirks kept from the challenge's script: the denominator is the longer of the two strings *before*
    normalisation (measured as `len(s.upper())`), so stray whitespace in a prediction enlarges it; a similarity of
    exactly 0.5 is kept (the paper states NL < 0.5, the script tests similarity < 0.5); two empty strings score 1.
    VLMEvalKit's `anls_compute` (vlmeval/dataset/utils/vqa_eval.py) divides by the raw lengths too, as we do; one
    recent revision of it (commit 0a04a1d) divides by the normalised lengths instead, which differs on strings with
    surrounding or repeated whitespace (and on the few characters whose upper case is longer, such as "ß").
    """
    det = " ".join(prediction.strip().lower().split())
    best = 0.0
    for g in answers:
        gt = " ".join(g.strip().lower().split())
        length = max(len(g.upper()), len(prediction.upper()))
        best = max(best, 1.0 - (levenshtein(gt, det) / length if length else 0.0))
    return best if best >= threshold else 0.0


# ---- relaxed accuracy (ChartQA) -----------------------------------------------------------------------------------
def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed correctness: when both parse as numbers, |p - t| / |t| <= 5%; otherwise a case-insensitive
    exact match. Quirks kept from pix2struct: "x%" parses as x / 100 (so "45%" equals "0.45", not "45"); parsing is
    Python's float() ("1e3", " 7 " and "1_000" are numbers, "1,000" is not); a target of 0 is falsy, so it falls
    back to the string comparison ("0" matches "0" but not "0.0")."""
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: list[str]) -> float:
    """1 if the stripped prediction is relaxed-correct for any ground truth, else 0 (VLMEvalKit takes the max)."""
    pred = prediction.strip()
    return float(any(relaxed_correct(pred, t) for t in answers))


# ---- plain OCR ----------------------------------------------------------------------------------------------------
def ocr_record(prediction: str, answers: list[str]) -> Record:
    """Plain OCR: exact match (case-sensitive, after stripping both sides) with any ground truth, and the edit count
    against the closest ground truth, for the character error rate."""
    pred = prediction.strip()
    best = min((levenshtein(pred, a.strip()), len(a.strip())) for a in answers)
    return {"score": float(any(pred == a.strip() for a in answers)), "edits": best[0], "ref_chars": best[1]}


def _ocr_summary(samples: list[Sample], records: list[Record]) -> Summary:
    """CER = total edits / total reference characters (corpus level, in %; above 100 when predictions run long)."""
    ref = sum(r["ref_chars"] for r in records)
    cer = 100.0 * sum(r["edits"] for r in records) / ref if ref else None
    return {**_mean_summary(samples, records), "cer": cer}


# ---- multiple choice ----------------------------------------------------------------------------------------------
_MMBENCH_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                     "I'm sorry, but without the image provided", "Cannot determine the answer")


def mmbench_choice(prediction: str, options: dict[str, str]) -> str | None:
    """VLMEvalKit's exact-matching stage (`can_infer`): the option letter, "Z" (no option fits), or None.

    1. a known refusal sentence -> "Z".
    2. replace . ( ) [ ] , : ; ! * # { } by spaces and split on whitespace; if exactly one option letter
       (upper-case only) is a token, that letter; if none is and "Z" is a token -> "Z".
    3. else, if exactly one option text (lower-cased) is a substring of the lower-cased prediction, its letter.
    Quirk: "A" used as an article counts as the letter A ("A dog." -> A when no other letter appears). Recent
    VLMEvalKit versions add a position check on the letter and a length guard on step 3; this is the long-standing
    rule. Where VLMEvalKit then asks an LLM judge, we do not (see `choice_record`).
    """
    if any(r in prediction for r in _MMBENCH_REFUSALS):
        return "Z"
    tokens = prediction
    for c in ".()[],:;!*#{}":
        tokens = tokens.replace(c, " ")
    tokens = tokens.split()
    letters = [k for k in options if k in tokens]
    if len(letters) == 1:
        return letters[0]
    if not letters and "Z" in tokens:
        return "Z"
    lower = prediction.lower()
    found = [k for k, text in options.items() if text.lower() in lower]
    return found[0] if len(found) == 1 else None


def mmmu_choice(prediction: str, options: dict[str, str]) -> str | None:
    """MMMU's `parse_multi_choice_response`, without its random fallback (see `choice_record`):

    1. strip , . ! ? ; : ' from both ends (one character class after another) and pad with a space on each side;
    2. candidates: letters written "(X)"; if none, letters written " X "; if none and the response has more than
       5 words, letters whose option text occurs in it (case-insensitive);
    3. one candidate -> it; several -> the one whose match starts last (first listed on a tie); none -> None.
    """
    response = prediction
    for c in ",.!?;:'":
        response = response.strip(c)
    response = f" {response} "
    cands = [k for k in options if f"({k})" in response]
    patterns = {k: f"({k})" for k in cands}
    if not cands:
        cands = [k for k in options if f" {k} " in response]
        patterns = {k: f" {k} " for k in cands}
    if not cands and len(response.split()) > 5:
        cands = [k for k, text in options.items() if text.lower() in response.lower()]
        patterns = {k: options[k].lower() for k in cands}
        response = response.lower()
    if not cands:
        return None
    return max(cands, key=lambda k: (response.rfind(patterns[k]), -cands.index(k)))


def choice_record(sample: Sample, prediction: str, parse: Callable[[str, dict[str, str]], str | None],
                  seed: int) -> Record:
    """Score a multiple-choice answer. When `parse` finds no option, the published harnesses end with a random
    option (MMMU directly; MMBench after its LLM judge fails): we draw it from a generator seeded by (seed, sample
    index), so the draw does not depend on run order or on resuming, and flag the record `random`."""
    if not sample.options:
        raise DataError(f"sample {sample.index}: a multiple-choice metric needs options (columns A, B, ...)")
    answer = sample.answers[0] if sample.answers else ""
    if answer not in sample.options:
        raise DataError(f"sample {sample.index}: answer {answer!r} is not an option letter "
                        f"({', '.join(sample.options)})")
    choice = parse(prediction, sample.options)
    guessed = choice is None
    if guessed:
        choice = random.Random(f"{seed}:{sample.index}").choice(list(sample.options))
    return {"score": float(choice == answer), "choice": choice, "random": guessed}


def _choice_summary(circular: bool) -> Callable[[list[Sample], list[Record]], Summary]:
    def summarize(samples: list[Sample], records: list[Record]) -> Summary:
        """Accuracy, with the count of random picks and of "no option" (Z) answers (MMMU's open questions are
        neither). Circular: a question counts only if every rotated copy is right (groups by index mod 1e6);
        `vanilla` is the accuracy on the unrotated copies (index < 1e6)."""
        out = {**_mean_summary(samples, records), "random_picks": sum(r.get("random", False) for r in records),
               "no_option": sum(r.get("choice") == "Z" for r in records)}
        if circular:
            groups: dict[str, bool] = {}
            for s, r in zip(samples, records):
                groups[circular_group(s.index)] = groups.get(circular_group(s.index), True) and r["score"] == 1.0
            first = [r for s, r in zip(samples, records) if int(s.index) < CIRCULAR_STRIDE]
            out.update(score=100.0 * sum(groups.values()) / max(len(groups), 1), groups=len(groups),
                       vanilla=100.0 * sum(r["score"] for r in first) / max(len(first), 1))
        return out
    return summarize


# ---- MMMU open questions ------------------------------------------------------------------------------------------
_MMMU_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_MMMU_TRIVIAL = (":", ",", ".", "!", "?", ";", "'")
_MMMU_NUMBERS = (re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # thousands separators: 1,000
                 re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # scientific notation: 6.02e23
                 re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"))  # plain: 3, 3.5, .5


def mmmu_key_responses(response: str) -> list[str]:
    """MMMU's `get_key_subresponses` (inside `parse_open_response`): where the answer probably is.

    Strip, strip "." from both ends, lower-case, split into lines. In each line, take the text after the last
    occurrence of each indicator ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ",
    "result ", and "=" in the last line only), stripped, and keep the shortest; drop it when empty or a lone
    punctuation mark. Every line contributes; when none does, the whole lower-cased response is the key.
    Quirks kept: MMMU also splits at ". " before a capital letter, but only after lower-casing, so sentences are
    never split, only lines; indicators match inside words ("this " contains "is "); an empty tail is replaced by
    the next indicator's even when that one is longer.
    """
    text = response.strip().strip(".").lower()
    lines = text.split("\n")
    keys = []
    for i, line in enumerate(lines):
        best = None
        for indicator in _MMMU_INDICATORS + (("=",) if i == len(lines) - 1 else ()):
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                if not best or len(tail) < len(best):
                    best = tail
        if best and best not in _MMMU_TRIVIAL:
            keys.append(best)
    return keys or [text]


def mmmu_numbers(text: str) -> list[str]:
    """MMMU's `extract_numbers`: numbers with thousands separators, then in scientific notation, then plain ones
    (each pattern over the whole text). Quirk kept: the patterns overlap and have no left boundary, so "1,000" also
    yields "000" and "2.5e3" also yields "2" and "3"."""
    return [m for pattern in _MMMU_NUMBERS for m in pattern.findall(text)]


def mmmu_normalize(text: str) -> list[float | str]:
    """MMMU's `normalize_str`: a number (Python's float() once commas are dropped: "1,000" -> 1000.0, "1e3",
    "nan" and "1,2" -> 12.0 too) becomes that float rounded to 2 decimals; other text is lower-cased, and a
    single character becomes two padded forms (" x", "x ") so it does not match inside words."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [f" {text}", f"{text} "] if len(text) == 1 else [text]


def mmmu_open_parse(response: str) -> list[float | str]:
    """MMMU's `parse_open_response`: the key responses and the numbers found in them, each normalised, without
    duplicates (MMMU returns a set; we keep first-seen order so that records are reproducible)."""
    keys = mmmu_key_responses(response)
    found = keys + [n for key in keys for n in mmmu_numbers(key)]
    return list(dict.fromkeys(v for f in found for v in mmmu_normalize(f)))


def mmmu_open_correct(parsed: list[float | str], answers: list[str]) -> bool:
    """MMMU's `eval_open`: right when a parsed number equals a normalised ground truth (both rounded to 2
    decimals), or a normalised text ground truth is a substring of a parsed text. Numbers never match text: a
    numeric ground truth needs a number in the response ("three" does not match "3")."""
    golds = [g for a in answers for g in mmmu_normalize(a)]
    texts = [g for g in golds if isinstance(g, str)]
    return any(any(g in p for g in texts) if isinstance(p, str) else p in golds for p in parsed)


def mmmu_record(sample: Sample, prediction: str, seed: int) -> Record:
    """One MMMU question: multiple choice when the sample has options (`mmmu_choice`, `choice_record`), open
    otherwise (MMMU reads a `question_type` field; here a sample without options is open). An open record holds
    the parsed predictions. Unlike MMMU, we refuse an open question with a blank ground truth, which MMMU would
    count right for every response ("" is in every string)."""
    if sample.options:
        return choice_record(sample, prediction, mmmu_choice, seed)
    if not sample.answers or not all(a.strip() for a in sample.answers):
        raise DataError(f"sample {sample.index}: an open question (no options) needs non-empty answers, got "
                        f"{sample.answers!r}; an empty answer would match every prediction")
    parsed = mmmu_open_parse(prediction)
    return {"score": float(mmmu_open_correct(parsed, sample.answers)), "parsed": parsed}


# ---- registry -----------------------------------------------------------------------------------------------------
MULTIPLE_CHOICE = ("mcq", "mmmu")
METRICS = {  # name: (title, what it computes)
    "ocrbench": ("OCRBench", "normalised ground truth contained in the prediction; 0-1000 total"),
    "vqa": ("VQA accuracy (TextVQA, VQAv2)", "min(#humans / 3, 1) over leave-one-out subsets of the answers"),
    "anls": ("ANLS (DocVQA, InfoVQA)", "normalised Levenshtein similarity, threshold 0.5"),
    "relaxed": ("Relaxed accuracy (ChartQA)", "numbers within 5%, exact match otherwise"),
    "mcq": ("Multiple choice (MMBench matching)", "option letter or text extracted as MMBench does; --circular"),
    "mmmu": ("MMMU (multiple choice and open)",
             "option letter, or an open answer's numbers and text, extracted and matched as MMMU does"),
    "ocr": ("Plain OCR", "exact match and character error rate"),
}


def get_metric(name: str, *, seed: int = 42, circular: bool = False) -> Metric:
    """The metric called `name` (see METRICS). `seed` drives multiple-choice random picks (42 as in MMMU);
    `circular` turns on MMBench circular scoring for the multiple-choice metrics."""
    if circular and name not in MULTIPLE_CHOICE:
        raise EvalError(f"circular evaluation applies to the multiple-choice metrics ({', '.join(MULTIPLE_CHOICE)}), "
                        f"not to {name!r}")
    title = METRICS[name][0] if name in METRICS else ""
    if name == "ocrbench":
        return Metric(name, title, lambda s, p: {"score": float(ocrbench_hit(p, s.answers, s.category))},
                      _ocrbench_summary, headline="score_1000", unit="/ 1000")
    if name == "vqa":
        return Metric(name, title, lambda s, p: {"score": _named(vqa_accuracy, s, p)}, _mean_summary)
    if name == "anls":
        return Metric(name, title, lambda s, p: {"score": anls(p, s.answers)}, _mean_summary)
    if name == "relaxed":
        return Metric(name, title, lambda s, p: {"score": relaxed_accuracy(p, s.answers)}, _mean_summary)
    if name == "ocr":
        return Metric(name, title, lambda s, p: ocr_record(p, s.answers), _ocr_summary)
    if name == "mcq":
        return Metric(name, title + (" (circular)" if circular else ""),
                      lambda s, p: choice_record(s, p, mmbench_choice, seed), _choice_summary(circular))
    if name == "mmmu":
        return Metric(name, title + (" (circular)" if circular else ""),
                      lambda s, p: mmmu_record(s, p, seed), _choice_summary(circular))
    raise EvalError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")


def _named(fn: Callable[[str, list[str]], float], sample: Sample, prediction: str) -> float:
    try:
        return fn(prediction, sample.answers)
    except DataError as e:
        raise DataError(f"sample {sample.index}: {e}") from None


def evaluate(metric: Metric, samples: list[Sample], predictions: dict[str, str]
             ) -> tuple[Summary, dict[str, Summary], list[Record]]:
    """Score every sample's prediction: (overall summary, per-category summaries in order of appearance, records)."""
    records = [metric.score(s, predictions[s.index]) for s in samples]
    overall = metric.summarize(samples, records)
    by_cat: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        if s.category:
            by_cat.setdefault(s.category, []).append(i)
    categories = {c: metric.summarize([samples[i] for i in idx], [records[i] for i in idx])
                  for c, idx in by_cat.items()}
    return overall, categories, records
