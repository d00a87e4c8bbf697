"""Is a model's final answer mathematically equal to the gold answer? Safe, bounded, sympy-only.

Every accuracy this project reports is a count of `grade` verdicts, so the grader has to be right, fast
and impossible to hang or exploit. The common alternatives each fail one of those: the DeepScaleR/rllm
grader misses equal forms and hangs on `9**9**9**9`; the Qwen2.5-Math grader calls `parse_expr` (that is,
`eval`) on model output; Math-Verify is good but has known false negatives/positives. Here model output
is only ever read by our own tokenizer and recursive-descent grammar, which build sympy objects through
size-checked constructors; no string ever reaches `eval`, `exec`, `sympify`, `parse_expr` or `parse_latex`.

Pipeline: extract the last \\boxed{} -> clean the string (linear regexes) -> tokenize -> parse -> compare:
  1. exact match of the cleaned strings;
  2. structure: lists/sets (unordered, with multiplicity), tuples (ordered), intervals (with end types),
     matrices, relations, multiple-choice letters, base-b numerals, plain text;
  3. numbers: exact rationals, then 60-digit numerics for algebraic/transcendental constants;
  4. expressions with symbols: 60-digit evaluation at fixed pseudo-random points;
  5. sympy.simplify of the difference, in a killable child process, within what is left of the budget.

Policies (a reviewer should know these; each is what a careful human grader does):
  - no boxed answer -> incorrect (the prompt demands one); `require_boxed=False` falls back to
    "final answer is ...", then the last math ($...$, \\(...\\) or \\[...\\]), then the last number.
    `require_think_end=True` is the paper's rule: no closing </think> -> incorrect, and only the text
    after it is searched.
  - decimals are exact: 0.5 == 1/2, 0.\\overline{3} == 1/3, but 0.333 != 1/3 and 0.866 != sqrt(3)/2.
  - a gold written as a decimal or in scientific notation (Minerva's 9.6, 1.07 \\times 10^{16}) is a
    rounded measurement, alone, in a list or tuple, as a matrix entry or an equation's value (not as an
    interval's end). A numeric answer is accepted if it rounds to the gold (|a - g| <= half a unit
    of the gold's last digit: 9.62 for 9.6); or, given at least as precisely as the gold, if it is within
    1% and within one unit of the last digit (1.08e16 for 1.07e16, Minerva's ~1% convention, never a
    wider margin than the gold's own precision); or if it is the gold correctly rounded to >= 3 (or all
    of the gold's) significant figures (4.47e14 for 4.4677e14). Integers and integer-valued decimals like
    142.0 are exact.
  - percent: a side written with % is compared both as the bare number and divided by 100
    (gold 62.5\\% accepts 62.5, 62.5\\% and 0.625). Degrees likewise (30^\\circ accepts 30 and \\pi/6).
  - equations: `x = 5` matches `5` (a lone symbol or f(x) on one side is a name, not content; so is a label
    made of symbols multiplied or divided, beside a constant: `AB = 5`, `|AB| = 5`, `AP:PB = 1:2`);
    two equations match if their differences are proportional (the same line or plane written
    differently). Inequalities in one variable compare as sets (x \\ge 2 == [2, \\infty)), otherwise
    by positive proportionality in the same direction.
  - lists and sets are unordered with multiplicity (a partial or padded list is wrong, `\\pm` stands for
    two items); tuples, points and vectors are ordered; intervals compare as sets, end types included.
    A gold list whose items are all equal (Minerva lists accepted forms: `4.4e7, 4.4 \\times 10^7`)
    accepts any one of them.
  - expressions with symbols are compared at positive real points (integers where floor, factorial,
    binomial or a sum appear), as the lengths, masses and counts that answers are about: \\sqrt{x^2} equals x.
  - gcd, lcm, max, min and mod (\\bmod, \\pmod{b}, `(\\text{mod } b)`) are evaluated when their arguments are
    numbers (integers for gcd/lcm/mod: 10 \\pmod{7} is 3, so `x \\equiv 3 \\pmod 7` states 3); with symbols
    they are not read. \\sum and \\prod over a finite range are compared term by term at integer points
    (so reindexed or reordered sums match each other and their closed forms); infinite ones are not read.
  - units and words after a number are dropped (5 \\text{ m}, 5 USD, \\euro 5); a bare one-letter unit
    (5 m², 3 m/s) could be a product, so that reading is tried only against a gold that is a plain number.
  - several boxes in a row (`\\boxed{2} \\quad\\text{and}\\quad \\boxed{3}`) are one answer list if the gold has
    several items; if the gold is one item, every box must be equal to it (a hedge between two is wrong).
Bounded cost: inputs over the size limits (answer length, token count, nesting depth, digits, bits of
any exact number, factorial/binomial size, exponents) are rejected before any big-integer or symbolic
work; a SIGALRM timer and cooperative deadline checks stop Python-level work; the only unbounded stage
(simplify) runs in a forked child that is SIGKILLed at the deadline; grade_batch workers are separate
processes that the parent kills and replaces when an item overruns. No exception escapes the public API.

Usage:
    python verify.py --answer '\\frac{1}{2}' --gold '0.5'
    python verify.py --response 'Therefore, the final answer is: $\\boxed{12}$.' --gold '12'
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import multiprocessing
import os
import random
import re
import select
import signal
import threading
import time
from collections import deque
from multiprocessing.connection import wait as wait_connections

import mpmath
import sympy
from sympy import Integer, Rational, S

MAX_RESPONSE_SCAN = 20_000  # characters scanned for one \boxed{...} group
MAX_ANSWER_CHARS = 2_000  # a longer "final answer" is not one
MAX_TOKENS = 1_500
MAX_DEPTH = 40  # nesting of groups; keeps recursion far below Python's limit
MAX_DIGITS = 400  # digits in one literal
MAX_BITS = 20_000  # bits of any exact rational built while parsing
MAX_ROOT_BITS = 1_100  # sympy factors the base of a non-integer power: keep it small
MAX_EXPONENT = 10**6  # integer exponent on a symbolic or irrational base
MAX_SUM_TERMS = 5_000  # terms of \\sum/\\prod evaluated in one verification (all sums and points together)
NUM_DPS = 60  # digits for numeric comparisons
MEMORY_LIMIT = 4 << 30  # address space a worker or child process may add to what it inherits


class _ParseError(Exception):
    """The text is not an answer this grammar reads (it then only matches by exact text)."""


class _TooBig(_ParseError):
    """Over a size limit: refused before any expensive work."""


class _NoNumeric(Exception):
    """An expression our numeric evaluator cannot evaluate at a point."""


class _Timeout(BaseException):
    """The call's budget ran out. BaseException so that no `except Exception` on the way swallows it."""


# ---------------------------------------------------------------------------------------------------
# Public API


@dataclasses.dataclass
class BatchResult:
    correct: list[bool]  # one verdict per pair, in order
    answers: list[str | None]  # the extracted answer of each response
    timed_out: list[bool]  # whether that item hit its time budget (it then counts as incorrect)

    @property
    def n_timeouts(self) -> int:
        return sum(self.timed_out)


def extract_answer(response: str, *, require_think_end: bool = False) -> str | None:
    """The content of the last complete \\boxed{...} (or \\fbox{...}); None if there is none.

    The text after the last </think> is searched first, then the thinking part. With `require_think_end`
    (the paper's rule, that of the rllm/DeepScaleR grader) only the text after </think> is: a response
    without one (cut at the token limit while thinking) has no answer. Boxes that follow each
    other separated only by connectives (punctuation, "and"/"or", \\quad, `\\text{and}`, `\\text{, }`, a name
    and `=`: `\\boxed{2} \\quad \\text{and} \\quad \\boxed{3}`) are joined with commas, since models box the
    parts of a multi-part answer separately. Which reading counts is the gold's shape: a gold of several
    items is compared with the joined list; a gold of one item needs every box to be equal to it.
    """
    try:
        if not isinstance(response, str):
            return None
        head, sep, tail = response.rpartition("</think>")
        if require_think_end:
            regions = (tail,) if sep else ()
        else:
            regions = (tail, head) if sep else (response,)
        for region in regions:
            found = _last_boxes(region)
            if found:
                return ", ".join(found)
        return None
    except Exception:
        return None


def is_equivalent(answer: str, gold: str, *, timeout: float = 5.0) -> bool:
    """Whether `answer` (an extracted final answer) is mathematically equal to `gold`, within `timeout` s."""
    return _verdict(answer, gold, timeout)[0]


def grade(response: str, gold: str, *, timeout: float = 5.0, require_boxed: bool = True,
          require_think_end: bool = False) -> bool:
    """Whether the final answer of a full model response equals `gold` (see module docstring for policies;
    `require_think_end`: see extract_answer)."""
    answer = _answer_of(response, require_boxed, require_think_end)
    return answer is not None and is_equivalent(answer, gold, timeout=timeout)


def grade_batch(pairs: list[tuple[str, str]], *, timeout: float = 5.0, workers: int | None = None,
                require_boxed: bool = True, require_think_end: bool = False) -> BatchResult:
    """Grade (response, gold) pairs in worker processes (default: one per CPU this process may run on) with a
    per-item time budget.

    Answers are extracted here (cheap), so only short strings cross process boundaries, and identical
    (answer, gold) pairs are verified once. A worker stuck past its item's budget is killed and replaced;
    that item counts as a timeout and the batch goes on.
    """
    n = len(pairs)
    answers: list[str | None] = [None] * n
    correct, timed_out = [False] * n, [False] * n
    jobs: dict[tuple[str, str], list[int]] = {}
    for i, pair in enumerate(pairs):
        try:
            response, gold = pair
            answers[i] = _answer_of(response, require_boxed, require_think_end)
            if answers[i] is not None and isinstance(gold, str):
                jobs.setdefault((answers[i], gold), []).append(i)
        except Exception:
            continue
    keys = list(jobs)
    try:
        results = _run_pool(keys, timeout, workers)
    except Exception:  # no processes to be had: grade here, still under the in-process guards
        results = [_verdict(a, g, timeout) for a, g in keys]
    for key, (ok, late) in zip(keys, results):
        for i in jobs[key]:
            correct[i], timed_out[i] = ok, late
    return BatchResult(correct, answers, timed_out)


# ---------------------------------------------------------------------------------------------------
# Extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE_RE = re.compile(r"\\.|[{}]", re.S)
_CONNECTOR = (r"(?:[\s$,;.&]|\\[,;:! ]|\\q?quad(?![A-Za-z])|\\\\|and|or"
              r"|\\(?:text|textrm|mathrm|mbox)\s*\{[\s,;.]*(?:and|or)?[\s,;.]*\})")
# what may stand between two boxes of one answer: `\quad\text{and}\quad y = `
_JOIN_GAP_RE = re.compile(rf"{_CONNECTOR}*(?:\\?[A-Za-z]+(?:_\{{?\w+\}}?)?\s*=\s*)?[\s$]*")
_LAST_BOXES = 10
_BOX_ATTEMPTS = 50  # `\boxed{` repeated 100,000 times must not cost 100,000 scans


def _box_at(text: str, m: re.Match) -> tuple[str, int] | None:
    """(content, end) of the box whose command `m` matched, or None if it never closes."""
    j = m.end()
    while j < len(text) and text[j] in " \t":
        j += 1
    if j >= len(text):
        return None
    if text[j] != "{":  # \boxed 5
        k = j
        while k < len(text) and not text[k].isspace() and text[k] not in "$":
            k += 1
        return (text[j:k], k) if k > j else None
    depth = 0
    for b in _BRACE_RE.finditer(text, j, min(len(text), j + MAX_RESPONSE_SCAN)):
        t = b.group()
        if t == "{":
            depth += 1
        elif t == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1:b.start()], b.end()
    return None


def _last_boxes(text: str) -> list[str]:
    """Contents of the last box and of the boxes directly before it, in reading order."""
    found: list[tuple[int, int, str]] = []  # (start, end, content), last first
    pos = len(text)
    for _ in range(_BOX_ATTEMPTS):
        if len(found) == _LAST_BOXES:
            break
        start = max(text.rfind("\\boxed", 0, pos), text.rfind("\\fbox", 0, pos))
        if start < 0:
            break
        pos = start
        m = _BOX_RE.match(text, start)
        box = _box_at(text, m) if m else None
        if box is None:
            continue
        content, end = box
        if found:
            gap_start, gap_end = end, found[-1][0]
            if gap_end < gap_start or gap_end - gap_start > 60 or not _JOIN_GAP_RE.fullmatch(text, gap_start, gap_end):
                break
        found.append((start, end, content))
    contents = [c for _, _, c in reversed(found)]
    return contents[:1] if len(set(contents)) == 1 else contents


_FINAL_RE = re.compile(r"final answer is\s*:?\s*(.+)", re.I)
_DOLLAR_RE = re.compile(r"\$([^$]{1,500})\$")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _last_math(text: str) -> str | None:
    """The content of the last inline or display math, `$..$`, `\\(..\\)` or `\\[..\\]` (up to 500 characters)."""
    found = [(m.end(), m.group(1)) for m in _DOLLAR_RE.finditer(text)][-1:]
    for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
        end = text.rfind(closer)
        start = text.rfind(opener, 0, end) if end > 0 else -1
        if start >= 0 and end - start - 2 <= 500:
            found.append((end + 2, text[start + 2:end]))
    return max(found)[1] if found else None


def _answer_of(response: str, require_boxed: bool, require_think_end: bool = False) -> str | None:
    """The answer graded for a response: the boxed one, or (if allowed) a best-effort fallback."""
    answer = extract_answer(response, require_think_end=require_think_end)
    if answer is not None or require_boxed or not isinstance(response, str):
        return answer
    _, sep, text = response.rpartition("</think>")
    if require_think_end and not sep:
        return None
    text = text[-MAX_RESPONSE_SCAN:]
    finals = _FINAL_RE.findall(text)
    if finals:
        line = finals[-1].split("I hope")[0].strip().rstrip(".")
        inner = _last_math(line)
        return line if inner is None else inner
    math = _last_math(text)
    if math is not None:
        return math
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


# ---------------------------------------------------------------------------------------------------
# String cleaning: linear regexes that keep the meaning and remove the typography

_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u00d7": r"\times ", "\u22c5": r"\cdot ", "\u00b7": r"\cdot ",
    "\u00f7": r"\div ", "\u2264": r"\le ", "\u2265": r"\ge ", "\u2260": r"\ne ", "\u03c0": r"\pi ",
    "\u221a": r"\sqrt", "\u221e": r"\infty ", "\u00b1": r"\pm ", "\u2213": r"\mp ", "\u222a": r"\cup ",
    "\u2208": r"\in ", "\u2248": r"\approx ", "\u2032": "'", "\u2033": "''", "\u00b0": "\u00b0",
    "\u00b2": "^2", "\u00b3": "^3", "\u00b9": "^1", "\u2219": r"\cdot ", "\u00c5": r"\text{AA}", "\u212b": r"\text{AA}",
    "\u00a0": " ", "\u2009": " ", "\u202f": " ",
    "\u20ac": " ", "\u00a3": " ", "\u00a5": " ", "\u20b9": " ", "\u00a2": " ",  # currency: like \\$, dropped
}
_CLEAN = [
    (re.compile(r",\\!\s*"), ","),
    (re.compile(r"\\(?:left|right)\s*\."), " "),
    (re.compile(r"\\(?:left|right|[bB]ig{1,2}[lr]?|middle)(?![A-Za-z])"), " "),
    (re.compile(r"\\[dtc]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"\\[dt]binom(?![A-Za-z])"), r"\\binom"),
    (re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|\\(?:circ|degree|textdegree)(?![A-Za-z])"), "\u00b0"),
    (re.compile(r"\u00b0\s*(?:\\(?:mathrm|text)\s*\{\s*[CFK]\s*\}|[CFK](?![A-Za-z]))"), " "),  # temperatures
    (re.compile(r"\^\s*\{\s*((?:\\prime\s*)+)\}"), lambda m: "'" * m.group(1).count("prime")),
    (re.compile(r"\^\s*\\prime(?![A-Za-z])|\\prime(?![A-Za-z])"), "'"),
    (re.compile(r"\\%"), "%"),
    (re.compile(r"\\\$|\$"), " "),
    (re.compile(r"(?<!\\)\\[()\[\]]"), " "),
    (re.compile(r"\\!"), ""),
    (re.compile(r"(?<!\\)\\[,;:> ]"), " "),
    (re.compile(r"\\(?:quad|qquad|enspace|thinspace|medspace|thickspace|negthinspace|negmedspace|negthickspace"
                r"|displaystyle|textstyle|scriptstyle|nonumber|limits|nolimits)(?![A-Za-z])"), " "),
    (re.compile(r"\\(?:euro|texteuro|EUR|pounds|textsterling|yen|textyen|textdollar|dollar|textcent|cent)"
                r"(?![A-Za-z])"), " "),  # currency marks
    (re.compile(r"(?<![A-Za-z])Rs\.(?=\s*\d)"), "Rs "),  # Rs. 500
    (re.compile(r"(?<![A-Za-z])per\s*cent(?![A-Za-z])"), "%"),
    (re.compile(r"\\mu\s*([mgs])(?![A-Za-z])"), r"\\text{mu\1}"),
    (re.compile(r"\\AA(?![A-Za-z])"), r"\\text{AA}"),
    (re.compile(r"~"), " "),
    (re.compile(r"\{,\}(?=\d{3}(?!\d))"), ""),  # 10{,}080
    (re.compile(r"(?<=\d)\{,\}(?=\d)"), "."),  # 3{,}5: a decimal comma
]
_TRIM = " \t\n,;"
_THOUSANDS_RE = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])")
_SPACE_THOUSANDS_RE = re.compile(r"(?<![\d.])\d{1,3}(?: \d{3})+(?![\d.])")


def _clean(s: str) -> str:
    s = "".join(_UNICODE.get(c, c) for c in s) if not s.isascii() else s
    s = s.replace("\n", " ").replace("\r", " ").replace("\t", " ")
    for pattern, repl in _CLEAN:
        s = pattern.sub(repl, s)
    s = s.strip(_TRIM).rstrip(" .")
    while s.endswith("\\\\"):
        s = s[:-2].strip(_TRIM).rstrip(" .")
    s = re.sub(r"^(?:=|\\approx|\\sim)\s*", "", s)
    s = _SPACE_THOUSANDS_RE.sub(lambda m: m.group().replace(" ", ""), s)
    return _join_thousands(s)


def _join_thousands(s: str) -> str:
    """`1,000` -> `1000` outside brackets; inside (..), [..], \\{..\\} commas separate elements."""
    if "," not in s:
        return s
    depth, depth_at = 0, []
    i = 0
    while i < len(s):
        c = s[i]
        depth_at.append(depth)
        if c in "([" or (c == "\\" and s.startswith("\\{", i)):
            depth += 1
        elif c in ")]" or (c == "\\" and s.startswith("\\}", i)):
            depth = max(0, depth - 1)
        i += 1
    return _THOUSANDS_RE.sub(lambda m: m.group().replace(",", "") if depth_at[m.start()] == 0 else m.group(), s)


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


def _text_key(s: str) -> str:
    s = re.sub(r"\\(?:textbf|textit|textrm|text|mbox|mathrm|mathbf|operatorname)\s*", "", s)
    return re.sub(r"[^0-9a-z]", "", s.lower())


_CHOICE_GOLD_RE = re.compile(r"\(?\s*([A-E])\s*\)?")
_CHOICE_ANSWER_RE = re.compile(r"\(\s*([A-E])\s*\)|([A-E])(?:\s*[).:]|$)")


def _strip_text_cmds(s: str) -> str:
    return re.sub(r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", s).strip()


def _choice(s: str, answer: bool) -> str | None:
    """The option letter of a multiple-choice answer: gold `(C)`/`\\text{(C)}`; answers may add the option text."""
    t = _strip_text_cmds(s)
    if not answer:
        m = _CHOICE_GOLD_RE.fullmatch(t)
        return m.group(1) if m else None
    m = _CHOICE_ANSWER_RE.match(t)
    return (m.group(1) or m.group(2)) if m else None


# ---------------------------------------------------------------------------------------------------
# Tokenizer

_TEXT_CMDS = frozenset("text textrm textnormal textbf textit textsf texttt textup mbox hbox mathrm operatorname"
                       .split())
_STYLE_CMDS = frozenset("mathbf boldsymbol bm mathit mathsf mathtt mathcal mathbb mathfrak mathscr mathnormal "
                        "boxed fbox framebox rm bf it angle measuredangle".split())
_SKIP_GROUP_CMDS = frozenset("hspace vspace phantom hphantom vphantom label tag".split())
_GREEK = frozenset("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi "
                   "omicron rho varrho sigma varsigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda "
                   "Xi Pi Sigma Upsilon Phi Psi Omega hbar ell odot mho aleph nabla partial".split())
_GREEK_VARIANTS = {"varphi": "phi", "vartheta": "theta", "varepsilon": "epsilon", "varrho": "rho", "varsigma": "sigma"}
_MULTI_FUNCS = frozenset("gcd lcm max min".split())  # functions of several arguments, evaluated to a number
_FUNCS = _MULTI_FUNCS | frozenset("sin cos tan cot sec csc arcsin arccos arctan arccot arcsec arccsc sinh cosh tanh "
                                  "coth sech csch arcsinh arccosh arctanh arccoth arcsech arccsch log ln lg exp sgn "
                                  "floor ceil".split())
# Other spellings of the same functions: ISO's ar- for the area functions, a- as in code, ceiling, gcf/hcf.
_FUNC_ALIASES = {**{f"{p}{h}": f"arc{h}" for p in ("ar", "arg", "a") for h in ("sinh", "cosh", "tanh", "coth", "sech",
                                                                             "csch")},
                 **{f"a{t}": f"arc{t}" for t in ("sin", "cos", "tan", "cot", "sec", "csc")},
                 "ceiling": "ceil", "gcf": "gcd", "hcf": "gcd", "sign": "sgn"}
_BARE_WORDS = ("arcsinh", "arccosh", "arctanh", "arsinh", "arcosh", "artanh", "arcsin", "arccos", "arctan", "sinh",
               "cosh", "tanh", "sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "pi")
_WHOLE_WORDS = frozenset("gcd lcm max min floor ceil ceiling".split())  # function names only as a whole word
_RELATIONS = {"le": "<=", "leq": "<=", "leqslant": "<=", "ge": ">=", "geq": ">=", "geqslant": ">=", "lt": "<",
              "gt": ">", "ne": "!=", "neq": "!=", "approx": "=", "simeq": "=", "cong": "=", "equiv": "=", "in": "in",
              "eq": "="}
_PLAIN_CMDS = frozenset("frac sqrt binom over choose pm mp cdot times div ast cup cap setminus lfloor rfloor lceil "
                        "rceil overline bar hat vec tilde dot ddot widehat widetilde".split())
_UNIT_WORDS = frozenset("""cm mm km nm um pm kg mg Hz kHz MHz GHz eV keV MeV GeV kJ kcal cal mol mph kph kmh units
    unit sq square cubic inches inch in ft feet foot yd yards yard miles mile meters meter metres metre hours hour hr
    hrs minutes minute min mins seconds second sec secs days day weeks week years year yr yrs cents cent dollars
    dollar radians radian rad liters liter litres ml mL gallons grams gram kilograms pounds lb lbs ounces oz people
    ways students AU pc kpc Mpc ly erg ergs kW MW Pa atm ohm ohms euros euro yuan yen rupees rupee""".split())
_DEGREE_WORDS = frozenset(("degrees", "degree", "deg"))
_PERCENT_WORDS = frozenset(("percent", "percents", "percentage", "pct"))
_CURRENCY_WORDS = frozenset("USD EUR GBP JPY INR CNY RMB Rs".split())  # before or after the amount
_SEP_WORDS = frozenset(("or", "and", ",", "or,", "and,"))
_SINGLE_OPS = "+-*/^_()[]{},;|!=<>&:'%\u00b0"

_NUM_RE = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+(?![A-Za-z\d]))?")
_CMD_RE = re.compile(r"\\([A-Za-z]+)")
_LETTERS_RE = re.compile(r"[A-Za-z]+")


def _read_group(s: str, i: int) -> tuple[str, int]:
    """The content of the brace group starting at s[i] (after spaces) and the index after it."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s) or s[i] != "{":
        if i < len(s):  # a one-character argument
            return s[i], i + 1
        raise _ParseError("missing argument")
    depth = 0
    for b in _BRACE_RE.finditer(s, i):
        if b.group() == "{":
            depth += 1
        elif b.group() == "}":
            depth -= 1
            if depth == 0:
                return s[i + 1:b.start()], b.end()
    raise _ParseError("unbalanced braces")


def _tokenize(s: str) -> list[tuple[str, str]]:
    """(kind, value) tokens. Kinds: num id const func cmd op rel text sep lset rset rowsep begin end empty."""
    toks: list[tuple[str, str]] = []
    i, n = 0, len(s)
    while i < n:
        if len(toks) > MAX_TOKENS:
            raise _TooBig("too many tokens")
        c = s[i]
        if c == " ":
            i += 1
        elif c.isdigit() or (c == "." and i + 1 < n and s[i + 1].isdigit()):
            m = _NUM_RE.match(s, i)
            toks.append(("num", m.group()))
            i = m.end()
        elif c.isascii() and c.isalpha():
            m = _LETTERS_RE.match(s, i)
            _letters(m.group(), toks)
            i = m.end()
        elif c == "\\":
            i = _command(s, i, toks)
        elif c in "<>!" and i + 1 < n and s[i + 1] == "=":
            toks.append(("rel", {"<": "<=", ">": ">=", "!": "!="}[c]))
            i += 2
        elif c in "=<>":
            toks.append(("rel", c))
            i += 1
        elif c in _SINGLE_OPS:
            toks.append(("op", c))
            i += 1
        else:
            raise _ParseError(f"unexpected character {c!r}")
    return toks


def _letters(word: str, toks: list[tuple[str, str]]) -> None:
    """A run of letters: or/and, a unit word after a number, a currency code, bare function names (gcd, max,
    mod only as whole words), else one symbol per letter."""
    if word in ("or", "and"):
        toks.append(("sep", word))
        return
    if word in _CURRENCY_WORDS:  # USD 5, 5 USD
        toks.append(("text", word))
        return
    last = toks[-1] if toks else ("", "")
    after_value = last[0] in ("num", "text", "const") or (last[0] == "op" and last[1] in ")}'\u00b0")
    if after_value and word in _DEGREE_WORDS:
        toks.append(("op", "\u00b0"))
        return
    if after_value and (word in _UNIT_WORDS or word in _PERCENT_WORDS):
        toks.append(("op", "%") if word in _PERCENT_WORDS else ("text", word))
        return
    if word == "mod":
        toks.append(("cmd", "bmod"))
        return
    if word in _WHOLE_WORDS or word in _FUNC_ALIASES:
        toks.append(("func", _FUNC_ALIASES.get(word, word)))
        return
    while word:
        for name in _BARE_WORDS:
            if word.startswith(name):
                toks.append(("const", "pi") if name == "pi" else ("cmd", "sqrt") if name == "sqrt" else ("func", name))
                word = word[len(name):]
                break
        else:
            toks.append(("id", word[0]))
            word = word[1:]


def _command(s: str, i: int, toks: list[tuple[str, str]]) -> int:
    """Tokenize the backslash command at s[i]; returns the index after it."""
    m = _CMD_RE.match(s, i)
    if not m:
        nxt = s[i + 1:i + 2]
        if nxt == "{":
            toks.append(("lset", "{"))
        elif nxt == "}":
            toks.append(("rset", "}"))
        elif nxt == "\\":
            toks.append(("rowsep", "\\\\"))
        elif nxt == "|":
            toks.append(("op", "|"))
        elif nxt in "%_&#":
            toks.append(("op", nxt) if nxt == "%" else ("text", nxt))
        elif nxt in ", ;:!":
            pass
        else:
            raise _ParseError(f"unknown escape \\{nxt}")
        return i + 2
    name, j = m.group(1), m.end()
    name = _FUNC_ALIASES.get(name, name)
    if name in _TEXT_CMDS:
        content, j = _read_group(s, j)
        _text_token(name, content.strip(), toks)
    elif name in ("SI", "num"):  # siunitx: \SI{9.6}{\angstrom}
        number, j = _read_group(s, j)
        if not _NUM_RE.fullmatch(number.strip()):
            raise _ParseError("bad \\SI number")
        toks.append(("num", number.strip()))
        if name == "SI":
            unit, j = _read_group(s, j)
            toks.append(("text", unit))
    elif name == "si":
        unit, j = _read_group(s, j)
        toks.append(("text", unit))
    elif name == "mathbb" and s.startswith("{R}", j):  # the reals, as the interval they are
        toks.extend([("op", "("), ("op", "-"), ("const", "oo"), ("op", ","), ("const", "oo"), ("op", ")")])
        j += 3
    elif name in _SKIP_GROUP_CMDS:
        _, j = _read_group(s, j)
    elif name in _STYLE_CMDS:
        pass  # the following group is read as ordinary grouping braces
    elif name in ("begin", "end"):
        env, j = _read_group(s, j)
        toks.append((name, env.strip().rstrip("*")))
        if name == "begin" and env.strip() == "array":
            _, j = _read_group(s, j)  # column spec
    elif name in _RELATIONS:
        toks.append(("rel", _RELATIONS[name]))
    elif name == "notin":
        raise _ParseError("\\notin")
    elif name == "not":  # \not= is \neq; any other negated relation is refused
        while j < len(s) and s[j] == " ":
            j += 1
        if not s.startswith("=", j):
            raise _ParseError("\\not")
        toks.append(("rel", "!="))
        j += 1
    elif name == "pi":
        toks.append(("const", "pi"))
    elif name == "infty":
        toks.append(("const", "oo"))
    elif name in ("emptyset", "varnothing"):
        toks.append(("empty", name))
    elif name in _FUNCS:
        toks.append(("func", name))
    elif name in _PLAIN_CMDS:
        toks.append(("cmd", name))
    elif name in _GREEK:
        toks.append(("id", _GREEK_VARIANTS.get(name, name)))
    elif name in ("mod", "bmod", "pmod"):
        toks.append(("cmd", "pmod" if name == "pmod" else "bmod"))
    elif name in ("sum", "prod"):
        toks.append(("cmd", name))
    elif name in ("lim", "int", "oint", "ldots", "cdots", "dots"):
        raise _ParseError(f"unsupported \\{name}")
    else:
        toks.append(("id", name))  # an unknown macro is an opaque symbol, never code
    return j


def _text_token(cmd: str, content: str, toks: list[tuple[str, str]]) -> None:
    if not content:
        return
    low = content.lower()
    if low in _SEP_WORDS:
        toks.append(("sep", low))
    elif content == "U":  # (-\infty, 2) \text{ U } (3, \infty)
        toks.append(("cmd", "cup"))
    elif low in _DEGREE_WORDS:
        toks.append(("op", "\u00b0"))
    elif low in _PERCENT_WORDS or content == "%":
        toks.append(("op", "%"))
    elif re.match(r"[+-]?\.?\d", content) and not re.search(r"[\\{}]", content):  # \textbf{36}, \text{5 meters}
        toks.extend(_tokenize(content))
    elif cmd in ("mathrm", "operatorname") and _FUNC_ALIASES.get(content, content) in _FUNCS:
        toks.append(("func", _FUNC_ALIASES.get(content, content)))
    elif cmd in ("mathrm", "operatorname", "text") and content == "mod":  # 3 (\text{mod } 7)
        toks.append(("cmd", "bmod"))
    elif cmd == "mathrm" and content in ("e", "i", "d"):
        toks.append(("id", content))
    else:
        toks.append(("text", content))


def _drop_text(toks: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Remove text tokens (units, annotations) together with an exponent or `/unit` right after them. A word
    applied to a parenthesis (`\text{exec}(1)`) is not a unit: it stays, and the grammar refuses it."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(toks):
        if toks[i][0] != "text" or (i + 1 < len(toks) and toks[i + 1] == ("op", "(")):
            out.append(toks[i])
            i += 1
            continue
        i += 1
        while i < len(toks):
            if toks[i] == ("op", "^"):
                i = _skip_argument(toks, i + 1)
            elif toks[i] in (("op", "/"), ("cmd", "cdot")) and i + 1 < len(toks) and toks[i + 1][0] == "text":
                i += 1
            else:
                break
    return out


def _skip_argument(toks: list[tuple[str, str]], i: int) -> int:
    if i < len(toks) and toks[i] == ("op", "{"):
        depth = 0
        while i < len(toks):
            if toks[i] == ("op", "{"):
                depth += 1
            elif toks[i] == ("op", "}"):
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return i
    if i < len(toks) and toks[i] == ("op", "-"):
        i += 1
    return min(i + 1, len(toks))


# ---------------------------------------------------------------------------------------------------
# Values the parser builds besides sympy expressions


@dataclasses.dataclass(frozen=True)
class _Seq:
    """Comma-separated items. kind: list (bare), set (\\{..\\}), tuple, pair ((a,b): point or open
    interval), cpair ([a,b]: closed interval or ordered pair)."""
    kind: str
    items: tuple


@dataclasses.dataclass(frozen=True)
class _Ival:
    lo: sympy.Expr
    hi: sympy.Expr
    lo_open: bool
    hi_open: bool


@dataclasses.dataclass(frozen=True)
class _Union:
    parts: tuple  # _Ival or _Seq("set")


@dataclasses.dataclass(frozen=True)
class _Rel:
    """A relation or chain: terms[0] ops[0] terms[1] ops[1] ... with ops in = < <= > >= != in."""
    ops: tuple
    terms: tuple


@dataclasses.dataclass(frozen=True)
class _Mat:
    rows: tuple


@dataclasses.dataclass(frozen=True)
class _Text:
    text: str


@dataclasses.dataclass(frozen=True)
class _Base:
    """A numeral in base `base` (204_5): the digits are the answer, not the decimal value."""
    digits: str
    base: int


@dataclasses.dataclass(frozen=True)
class _Lit:
    """A top-level number as written: its exact value plus significant figures and last-digit unit."""
    value: sympy.Rational
    sig: int
    ulp: sympy.Rational
    approx: bool  # a decimal/scientific measurement (tolerance applies when it is the gold)


_PM = sympy.Symbol("_pm_")  # stands for +-1 until the alternatives are expanded
_ARBITRARY = frozenset("c C c_0 C_0 c_1 C_1 c_2 C_2".split())  # constants of integration


# ---------------------------------------------------------------------------------------------------
# Size-checked constructors: every number is checked before sympy can start a big computation


def _expr(v) -> sympy.Expr:
    if isinstance(v, _Lit):
        return v.value
    if isinstance(v, sympy.Expr):
        return v
    raise _ParseError("arithmetic on a non-expression")


def _bits(r: sympy.Rational) -> int:
    return max(int(r.p).bit_length(), int(r.q).bit_length())


def _checked(v: sympy.Expr) -> sympy.Expr:
    if v.is_Rational:
        if _bits(v) > MAX_BITS:
            raise _TooBig("number too large")
    elif v.is_Add or v.is_Mul:
        c = v.as_coeff_Add()[0] if v.is_Add else v.as_coeff_Mul()[0]
        if c.is_Rational and _bits(c) > MAX_BITS:
            raise _TooBig("number too large")
    if v is S.NaN or v is S.ComplexInfinity:
        raise _ParseError("undefined value")
    return v


def _add(a, b) -> sympy.Expr | _Mat:
    if isinstance(a, _Mat) or isinstance(b, _Mat):  # A + B, entrywise
        if not (isinstance(a, _Mat) and isinstance(b, _Mat)) or _shape(a) != _shape(b):
            raise _ParseError("sum of a matrix and a non-matrix of its shape")
        return _Mat(tuple(tuple(_add(x, y) for x, y in zip(ra, rb)) for ra, rb in zip(a.rows, b.rows)))
    return _checked(sympy.Add(_expr(a), _expr(b)))


def _mul(a, b) -> sympy.Expr | _Mat:
    """a * b; with matrices: a scalar times a matrix (`\\frac{1}{3}\\begin{pmatrix}1\\\\2\\end{pmatrix}`), or a matrix
    product of compatible shapes."""
    if isinstance(a, _Mat) and isinstance(b, _Mat):
        if _shape(a)[1] != _shape(b)[0]:
            raise _ParseError("matrix product of incompatible shapes")
        return _Mat(tuple(tuple(functools.reduce(_add, (_mul(x, y) for x, y in zip(row, col)))
                                for col in zip(*b.rows)) for row in a.rows))
    if isinstance(a, _Mat) or isinstance(b, _Mat):
        m, c = (a, _expr(b)) if isinstance(a, _Mat) else (b, _expr(a))
        return _Mat(tuple(tuple(_mul(c, x) for x in row) for row in m.rows))
    return _checked(sympy.Mul(_expr(a), _expr(b)))


def _shape(m: _Mat) -> tuple[int, int]:
    return len(m.rows), len(m.rows[0])


def _neg(a) -> sympy.Expr | _Mat:
    if isinstance(a, _Mat):
        return _mul(S.NegativeOne, a)
    return _checked(-_expr(a))


def _div(a, b) -> sympy.Expr | _Mat:
    b = _expr(b)
    if b.is_zero:
        raise _ParseError("division by zero")
    return _mul(a, _pow(b, S.NegativeOne))


def _pow(b, e) -> sympy.Expr:
    b, e = _expr(b), _expr(e)
    if b.is_zero and e.is_negative:
        raise _ParseError("division by zero")
    if e.is_Rational and b not in (S.Zero, S.One, S.NegativeOne):
        size = abs(e)
        if b.is_Rational:
            if size > MAX_BITS or _bits(b) * size > MAX_BITS:
                raise _TooBig("power too large")
            if not e.is_Integer and _bits(b) > MAX_ROOT_BITS:
                raise _TooBig("root of a huge number")
        elif b.is_number:
            weight = sum(_bits(r) for r in b.atoms(sympy.Rational))
            if size > MAX_EXPONENT or weight * size > MAX_BITS:
                raise _TooBig("power too large")
        elif size > MAX_EXPONENT:
            raise _TooBig("exponent too large")
    elif e.is_number and not e.is_Rational and e.is_extended_real is not False and b.is_number:
        if abs(float(e)) > MAX_EXPONENT:
            raise _TooBig("exponent too large")
    return _checked(sympy.Pow(b, e))


def _factorial(v) -> sympy.Expr:
    v = _expr(v)
    if v.is_number and not v.is_Integer:
        raise _ParseError("factorial of a non-integer")
    if v.is_Integer:
        if v < 0:
            raise _ParseError("factorial of a negative integer")
        if v > 10**5 or math.lgamma(int(v) + 1) / math.log(2) > MAX_BITS:
            raise _TooBig("factorial too large")
    return _checked(sympy.factorial(v))


def _binomial(n, k) -> sympy.Expr:
    n, k = _expr(n), _expr(k)
    if n.is_Integer and k.is_Integer:
        if abs(n) > 10**12 or abs(k) > 10**12:
            raise _TooBig("binomial too large")
        if 0 <= k <= n:
            nn, kk = int(n), int(k)
            bits = (math.lgamma(nn + 1) - math.lgamma(kk + 1) - math.lgamma(nn - kk + 1)) / math.log(2)
            if bits > MAX_BITS:
                raise _TooBig("binomial too large")
        elif n < 0:
            raise _ParseError("binomial of a negative integer")
    return _checked(sympy.binomial(n, k))


def _integers(name: str, args: list) -> list[int]:
    values = [_expr(a) for a in args]
    if not all(v.is_Integer for v in values):
        raise _ParseError(f"{name} of non-integers")
    return [int(v) for v in values]


def _mod(a, b) -> sympy.Integer:
    """a mod b for integers: the remainder with the sign of b (as sympy's Mod and Python's %)."""
    x, m = _integers("mod", [a, b])
    if m == 0:
        raise _ParseError("mod 0")
    return Integer(x % m)


def _gcd_lcm(name: str, args: list) -> sympy.Integer:
    """gcd/lcm of two or more integers. Arguments are within MAX_BITS already; an lcm grows, so it is checked."""
    values = _integers(name, args)
    if len(values) < 2:
        raise _ParseError(f"{name} of one argument")
    out = abs(values[0])
    for v in values[1:]:
        out = math.gcd(out, v) if name == "gcd" else math.lcm(out, v)
        if out.bit_length() > MAX_BITS:
            raise _TooBig("lcm too large")
    return Integer(out)


def _extremum(name: str, args: list) -> sympy.Expr:
    """max/min of real numbers (no symbols: which one is largest would depend on them), decided at 60 digits.
    Arguments within 10^-40 of each other are the same number for every later comparison, so either will do."""
    values = [_expr(a) for a in args]
    if not values or any(v.free_symbols or not v.is_number for v in values):
        raise _ParseError(f"{name} of non-numbers")
    with mpmath.workdps(NUM_DPS):
        try:
            keys = [_num(v, {}) for v in values]
        except (_NoNumeric, ArithmeticError, ValueError, TypeError):
            raise _ParseError(f"{name} of non-numbers")
        if any(isinstance(x, mpmath.mpc) or not mpmath.isfinite(x) for x in keys):
            raise _ParseError(f"{name} of non-real numbers")
    pick = max if name == "max" else min
    return values[pick(range(len(values)), key=keys.__getitem__)]


def _number(text: str) -> sympy.Rational:
    """Exact value of a decimal literal: `0.15` is 3/20, `4.5e33` is 45 * 10^32."""
    mantissa, _, exp = text.lower().partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0") or "0"
    if len(digits) > MAX_DIGITS or len(exp) > 6:
        raise _TooBig("literal too long")
    power = (int(exp) if exp else 0) - len(frac)
    if abs(power) > 4 * MAX_DIGITS:
        raise _TooBig("literal too large")
    value = int(digits)
    return Rational(value * 10**power) if power >= 0 else Rational(value, 10**-power)


_FUNC_BUILD = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec, "csc": sympy.csc,
    "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "arccot": sympy.acot, "arcsec": sympy.asec,
    "arccsc": sympy.acsc, "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh, "coth": sympy.coth,
    "sech": sympy.sech, "csch": sympy.csch, "arcsinh": sympy.asinh, "arccosh": sympy.acosh,
    "arctanh": sympy.atanh, "arccoth": sympy.acoth, "arcsech": sympy.asech, "arccsch": sympy.acsch,
    "log": sympy.log, "ln": sympy.log, "exp": sympy.exp, "sgn": sympy.sign,
    "lg": lambda x: sympy.log(x, 10),
}
_INVERSE = {"sin": "arcsin", "cos": "arccos", "tan": "arctan", "cot": "arccot", "sec": "arcsec", "csc": "arccsc",
            "sinh": "arcsinh", "cosh": "arccosh", "tanh": "arctanh", "coth": "arccoth", "sech": "arcsech",
            "csch": "arccsch"}


def _apply(name: str, arg) -> sympy.Expr:
    arg = _expr(arg)
    if name == "exp" and arg.is_Rational and abs(arg) > 10**9:
        raise _TooBig("exp of a huge number")
    return _checked(_FUNC_BUILD[name](arg))


# ---------------------------------------------------------------------------------------------------
# Parser: recursive descent over the tokens, one method per precedence level

_IMPLICIT_CMDS = frozenset(("frac", "sqrt", "binom", "lfloor", "lceil", "overline", "bar", "hat", "vec", "tilde",
                            "dot", "ddot", "widehat", "widetilde", "sum", "prod"))
_MATRIX_ENVS = frozenset(("pmatrix", "bmatrix", "Bmatrix", "vmatrix", "Vmatrix", "matrix", "smallmatrix", "array"))
_ACCENTS = frozenset(("bar", "hat", "vec", "tilde", "dot", "ddot", "widehat", "widetilde", "overline"))


class _Parser:
    def __init__(self, toks: list[tuple[str, str]], percent: str, degree: str):
        self.t = toks
        self.i = 0
        self.depth = 0
        self.in_abs = 0
        self.percent = percent  # "strip": 5% reads 5; "frac": 0.05
        self.degree = degree  # "strip": 30 deg reads 30; "rad": pi/6
        self.saw_percent = False
        self.saw_degree = False
        self.after_argument = -1  # token index just after a one-digit macro argument (\frac1234 is 1/2 * 34)
        self.bound: list[str] = []  # indices of the sums being read: there `i` and `e` are plain names

    # token helpers
    def peek(self, k: int = 0) -> tuple[str, str]:
        j = self.i + k
        return self.t[j] if j < len(self.t) else ("eof", "")

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        self.i += 1
        return tok

    def accept(self, *toks: tuple[str, str]) -> bool:
        if self.peek() in toks:
            self.i += 1
            return True
        return False

    def expect(self, tok: tuple[str, str]) -> None:
        if not self.accept(tok):
            raise _ParseError(f"expected {tok[1]}")

    def is_sep(self) -> bool:
        return self.peek() in (("op", ","), ("op", ";")) or self.peek()[0] == "sep"

    # grammar
    def parse(self):
        items = self.items(top=True)
        if self.peek()[0] != "eof":
            raise _ParseError(f"unexpected {self.peek()[1]!r}")
        return items[0] if len(items) == 1 else _Seq("list", tuple(items))

    def items(self, top: bool = False) -> list:
        out = []
        while True:
            start = self.i
            value = self.relation()
            if top:
                value = self.literal(value, start)
            out.append(value)
            if not self.is_sep():
                return out
            while self.is_sep():
                self.i += 1
            if self.peek()[0] == "eof" or self.peek() in (("op", ")"), ("op", "]"), ("op", "}"), ("rset", "}")):
                return out

    def relation(self):
        terms, ops = [self.setexpr()], []
        while self.peek()[0] == "rel":
            ops.append(self.take()[1])
            start = self.i
            terms.append(self.literal(self.setexpr(), start))  # x = 9.6: a decimal value as written
        return _Rel(tuple(ops), tuple(terms)) if ops else terms[0]

    def setexpr(self):
        v = self.expr()
        while self.peek() == ("cmd", "cup") or (self.peek() == ("id", "U") and isinstance(v, (_Ival, _Seq, _Union))
                                                 and self.peek(1) in (("op", "("), ("op", "["), ("lset", "{"))):
            self.i += 1
            v = _union(v, self.expr())
        if self.peek() in (("cmd", "cap"), ("cmd", "setminus")):
            raise _ParseError("set algebra")
        return v

    def expr(self):
        v = self.term()
        while True:
            tok = self.peek()
            if tok == ("op", "+"):
                self.i += 1
                v = _add(v, self.term())
            elif tok == ("op", "-"):
                self.i += 1
                v = _add(v, _neg(self.term()))
            elif tok in (("cmd", "pm"), ("cmd", "mp")):
                self.i += 1
                v = _add(v, _mul(_PM if tok[1] == "pm" else -_PM, self.term()))
            elif tok == ("cmd", "pmod"):  # 2 + 5 \pmod{4}: the residue of everything before it
                self.i += 1
                v = _mod(v, self.argument())
            elif self.paren_mod():  # 9 (\bmod 4), 9 (\text{mod } 4)
                self.i += 2
                modulus = self.expr()
                self.expect(("op", ")"))
                v = _mod(v, modulus)
            else:
                return v

    def paren_mod(self) -> bool:
        return self.peek() == ("op", "(") and self.peek(1) == ("cmd", "bmod")

    def term(self):
        v = self.factor()
        while True:
            tok = self.peek()
            if tok in (("op", "*"), ("cmd", "cdot"), ("cmd", "times"), ("cmd", "ast")):
                self.i += 1
                v = _mul(v, self.factor())
            elif tok in (("op", "/"), ("cmd", "div"), ("op", ":")):  # 3:2 is the ratio 3/2
                self.i += 1
                v = _div(v, self.factor())
            elif tok == ("cmd", "bmod"):  # 17 \bmod 5, 17 mod 5
                self.i += 1
                v = _mod(v, self.factor())
            elif self.starts_operand(tok) and not self.paren_mod():
                if tok[0] == "num" and self.t[self.i - 1][0] == "num" and self.i != self.after_argument:
                    raise _ParseError("two numbers side by side")
                v = _implicit(v, self.power())
            else:
                return v

    def starts_operand(self, tok: tuple[str, str]) -> bool:
        kind, val = tok
        if kind in ("num", "id", "const", "func", "begin"):
            return True
        if kind == "cmd":
            return val in _IMPLICIT_CMDS
        return tok in (("op", "("), ("op", "{")) or (tok == ("op", "|") and not self.in_abs)

    def factor(self):
        tok = self.peek()
        if tok == ("op", "-"):
            self.i += 1
            return _neg(self.factor())
        if tok == ("op", "+"):
            self.i += 1
            return self.factor()
        if tok in (("cmd", "pm"), ("cmd", "mp")):
            self.i += 1
            return _mul(_PM if tok[1] == "pm" else -_PM, self.factor())
        return self.power()

    def power(self):
        base = self.postfix()
        if self.accept(("op", "^")):
            return self.postfix_ops(_pow(base, self.exponent()))
        return base

    def exponent(self):
        if self.accept(("op", "-")):
            return _neg(self.exponent())
        if self.accept(("op", "+")):
            return self.exponent()
        if self.peek()[0] == "num":  # 2^10 means 2^{10}: models write it that way
            value = _number(self.take()[1])
        else:
            value = self.postfix()
        if self.accept(("op", "^")):
            value = _pow(value, self.exponent())
        return value

    def postfix(self):
        return self.postfix_ops(self.primary())

    def postfix_ops(self, v):
        while True:
            tok = self.peek()
            if tok == ("op", "!"):
                self.i += 1
                v = _factorial(v)
            elif tok == ("op", "%"):
                self.i += 1
                self.saw_percent = True
                v = _div(v, Integer(100)) if self.percent == "frac" else _expr(v)
            elif tok == ("op", "\u00b0"):
                self.i += 1
                self.saw_degree = True
                v = _mul(v, S.Pi / 180) if self.degree == "rad" else _expr(v)
            elif tok == ("op", "_") and isinstance(v, sympy.Integer) and v >= 0:  # (204)_5
                self.i += 1
                base = self.raw_argument()
                if not (base.isdigit() and 2 <= int(base) <= 36):
                    raise _ParseError("bad base subscript")
                v = _Base(str(v), int(base))
            elif tok == ("op", "'"):
                self.i += 1
                if isinstance(v, sympy.Symbol):
                    v = sympy.Symbol(v.name + "'")
                elif not (isinstance(v, sympy.Expr) and v.is_number):  # 0.003'' : arc-seconds, a unit
                    raise _ParseError("prime on an expression")
            else:
                return v

    def primary(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _TooBig("nested too deeply")
        try:
            return self.atom()
        finally:
            self.depth -= 1

    def atom(self):
        kind, val = self.take()
        if kind == "num":
            return self.numeral(val)
        if kind == "id":
            return self.identifier(val)
        if kind == "const":
            return S.Pi if val == "pi" else S.Infinity
        if kind == "func":
            return self.function(val)
        if kind == "empty":
            return _Seq("set", ())
        if kind == "begin" and val in _MATRIX_ENVS:
            return self.matrix(val)
        if kind == "lset":
            items = [] if self.peek() == ("rset", "}") else self.items()
            self.expect(("rset", "}"))
            return _Seq("set", tuple(items))
        if kind == "op":
            if val == "(" or val == "[":
                return self.bracketed(val)
            if val == "{":
                return self.brace_group()
            if val == "|":
                self.in_abs += 1
                inner = self.expr()
                self.in_abs -= 1
                self.expect(("op", "|"))
                return _checked(sympy.Abs(_expr(inner)))
        if kind == "cmd":
            return self.command(val)
        raise _ParseError(f"unexpected {val!r}")

    def numeral(self, text: str):
        value = _number(text)
        if self.peek() == ("cmd", "overline") and "." in text and "e" not in text.lower():
            self.i += 1  # repeating decimal 0.1\overline{6}
            rep = self.raw_argument()
            if not rep.isdigit() or len(rep) > 50:
                raise _ParseError("bad repeating decimal")
            frac = text.partition(".")[2]
            value = _checked(value + Rational(int(rep), 10 ** len(frac) * (10 ** len(rep) - 1)))
        elif self.peek() == ("cmd", "frac") and text.isdigit():
            value = self.mixed_number(value)
        elif text.isdigit() and self.peek()[0] == "num" and self.peek(1) == ("op", "/") and self.peek(2)[0] == "num":
            num, den = self.peek()[1], self.peek(2)[1]  # 1 1/2
            if num.isdigit() and den.isdigit() and 0 < int(num) < int(den) and len(den) < 20:
                self.i += 3
                value = value + Rational(int(num), int(den))
        if self.peek() == ("op", "_") and text.isdigit():
            self.i += 1
            base = self.raw_argument()
            if base.isdigit() and 2 <= int(base) <= 36:
                return _Base(text.lstrip("0") or "0", int(base))
            raise _ParseError("bad base subscript")
        return value

    def mixed_number(self, whole: sympy.Integer):
        """`137\\frac{1}{2}` is 137 + 1/2 when both parts of the fraction are integers and it is proper."""
        save = self.i
        self.i += 1
        try:
            num, den = self.raw_argument(), self.raw_argument()
        except _ParseError:
            self.i = save
            return whole
        if num.isdigit() and den.isdigit() and 0 < int(num) < int(den) and len(den) < 20:
            return whole + Rational(int(num), int(den))
        self.i = save
        return whole

    def raw_argument(self) -> str:
        """The tokens of a macro argument joined as text (for subscripts, digits of \\overline, mixed numbers)."""
        if self.accept(("op", "{")):
            parts = []
            depth = 1
            while True:
                tok = self.take()
                if tok[0] == "eof":
                    raise _ParseError("unbalanced braces")
                if tok == ("op", "{"):
                    depth += 1
                elif tok == ("op", "}"):
                    depth -= 1
                    if depth == 0:
                        return "".join(parts)
                parts.append(tok[1])
        tok = self.take()
        if tok[0] == "num" and len(tok[1]) > 1 and tok[1][0].isdigit():
            self.t = self.t[:self.i - 1] + [("num", tok[1][0]), ("num", tok[1][1:])] + self.t[self.i:]
            return tok[1][0]
        if tok[0] in ("num", "id", "const", "func", "cmd"):
            return tok[1]
        raise _ParseError("missing argument")

    def argument(self):
        """A macro argument: a brace group, or a single token (\\frac12 is 1/2, \\sqrt2 is sqrt(2))."""
        tok = self.peek()
        if tok == ("op", "{"):
            self.i += 1
            return self.brace_group()
        if tok[0] != "num":
            return self.primary()
        if len(tok[1]) > 1:
            self.t = self.t[:self.i] + [("num", tok[1][0]), ("num", tok[1][1:])] + self.t[self.i + 1:]
        value = self.primary()
        self.after_argument = self.i
        return value

    def identifier(self, name: str):
        if self.accept(("op", "_")):
            name = f"{name}_{self.raw_argument()}"
        while self.accept(("op", "'")):
            name += "'"
        if name == "e" and name not in self.bound:
            return S.Exp1
        if name == "i" and name not in self.bound:
            return S.ImaginaryUnit
        # f(x), u(t), I(0): a name applied to one atom is an opaque function value, not a product
        if self.peek() == ("op", "(") and self.peek(2) == ("op", ")") and self.peek(1)[0] in ("id", "num"):
            arg = self.peek(1)[1]
            self.i += 3
            return sympy.Symbol(f"{name}({arg})")
        return sympy.Symbol(name)

    def function(self, name: str):
        if name in _MULTI_FUNCS:
            return self.multi_function(name)
        power = base = None
        while self.peek() in (("op", "^"), ("op", "_")):
            if self.take() == ("op", "^"):
                power = self.exponent()
            else:
                base = self.argument()
        if self.peek() == ("op", "("):
            self.i += 1
            arg = self.single(self.items())
            self.expect(("op", ")"))
        elif self.peek() == ("op", "{"):
            self.i += 1
            arg = self.brace_group()
        else:  # \sin 2x, \ln 2: the implicit product that follows, stopping at the next function
            arg = self.power()
            while self.starts_operand(self.peek()) and self.peek()[0] != "func":
                arg = _implicit(arg, self.power())
        if power is not None and power == -1 and name in _INVERSE:
            return _apply(_INVERSE[name], arg)
        if name in ("floor", "ceil"):
            value = _rounding(sympy.floor if name == "floor" else sympy.ceiling, _expr(arg))
        else:
            value = _apply(name, arg)
        if base is not None and name == "log":
            value = _div(value, _apply("log", base))
        return _pow(value, power) if power is not None else value

    def multi_function(self, name: str):
        """\\gcd(18, 3), \\max\\{a, b\\}: the arguments in parentheses, braces or set braces, evaluated."""
        close = {("op", "("): ("op", ")"), ("op", "{"): ("op", "}"), ("lset", "{"): ("rset", "}")}.get(self.take())
        if close is None:
            raise _ParseError(f"\\{name} without arguments")
        args = self.items()
        self.expect(close)
        return _extremum(name, args) if name in ("max", "min") else _gcd_lcm(name, args)

    def big_operator(self, name: str):
        """\\sum_{k=1}^{n} body, \\prod likewise: the body is the product term that follows (TeX's reading
        of \\sum_k a_k + 1). Kept unevaluated; compared by evaluating it at sample points (`_num`)."""
        index = lower = upper = None
        while self.peek() in (("op", "_"), ("op", "^")):
            if self.take() == ("op", "^"):
                upper = _expr(self.argument())
            elif self.peek() == ("op", "{") and self.peek(1)[0] == "id" and self.peek(2) == ("rel", "="):
                index = self.peek(1)[1]
                self.i += 3
                lower = _expr(self.single(self.items()))
                self.expect(("op", "}"))
            else:
                raise _ParseError(f"\\{name} without an index range")
        if index is None or upper is None:
            raise _ParseError(f"\\{name} without an index range")
        k = sympy.Symbol(index)
        if not all(b.is_finite is not False and k not in b.free_symbols for b in (lower, upper)):
            raise _ParseError(f"bad \\{name} range")
        if (upper - lower).is_number:
            if not (upper - lower).is_Integer:
                raise _ParseError(f"\\{name} range of a non-integer length")
            if upper - lower >= MAX_SUM_TERMS:
                raise _TooBig(f"\\{name} of too many terms")
        self.bound.append(index)
        body = _expr(self.term())
        self.bound.pop()
        return _checked((sympy.Sum if name == "sum" else sympy.Product)(body, (k, lower, upper)))

    def command(self, name: str):
        if name in ("sum", "prod"):
            return self.big_operator(name)
        if name == "frac":
            num = self.argument()
            return _div(num, self.argument())
        if name == "binom":
            n = self.argument()
            return _binomial(n, self.argument())
        if name == "sqrt":
            index = None
            if self.accept(("op", "[")):
                index = self.single(self.items())
                self.expect(("op", "]"))
            radicand = self.argument()
            return _pow(radicand, _div(S.One, index) if index is not None else S.Half)
        if name in ("lfloor", "lceil"):
            inner = self.single(self.items())
            self.expect(("cmd", "rfloor" if name == "lfloor" else "rceil"))
            return _rounding(sympy.floor if name == "lfloor" else sympy.ceiling, _expr(inner))
        if name in _ACCENTS:
            inner = self.raw_argument()
            return self.identifier(f"{name}({inner})")
        raise _ParseError(f"unexpected \\{name}")

    def single(self, items: list):
        if len(items) != 1:
            raise _ParseError("a list where one value was expected")
        return items[0]

    def brace_group(self):
        """After `{`: a group, `{a \\over b}`, `{n \\choose k}`, or `{1, 2}` read as a set."""
        items = [] if self.peek() == ("op", "}") else self.items()
        if self.peek() in (("cmd", "over"), ("cmd", "choose")):
            op = self.take()[1]
            num = self.single(items)
            den = self.single(self.items())
            self.expect(("op", "}"))
            return _div(num, den) if op == "over" else _binomial(num, den)
        self.expect(("op", "}"))
        if len(items) == 1:
            return items[0]
        return _Seq("set", tuple(items))

    def bracketed(self, open_: str):
        items = self.items(top=True)  # a tuple's numbers as written, for decimal golds: (0.29, 0.196)
        close = self.take()
        if close not in (("op", ")"), ("op", "]")):
            raise _ParseError("unclosed bracket")
        pair = open_ + close[1]
        if len(items) == 1:
            if pair in ("()", "[]"):
                return items[0].value if isinstance(items[0], _Lit) else items[0]
            raise _ParseError("half-open bracket around one value")
        if len(items) == 2 and pair in ("(]", "[)"):
            return _Ival(_expr(items[0]), _expr(items[1]), open_ == "(", close[1] == ")")
        if len(items) == 2:
            return _Seq("pair" if pair == "()" else "cpair", tuple(items))
        if pair in ("()", "[]"):
            return _Seq("tuple", tuple(items))
        raise _ParseError("mismatched brackets")

    def matrix(self, env: str):
        rows, row = [], []
        while True:
            if self.peek() == ("end", env):
                self.i += 1
                break
            if self.peek()[0] == "eof":
                raise _ParseError("unclosed matrix")
            start = self.i
            row.append(self.literal(_expr(self.expr()), start))  # an entry as written, for decimal golds
            if self.accept(("op", "&")):
                continue
            if self.accept(("rowsep", "\\\\")) or self.peek() == ("end", env):
                rows.append(tuple(row))
                row = []
                continue
            raise _ParseError("bad matrix entry")
        if row:
            rows.append(tuple(row))
        if not rows or any(len(r) != len(rows[0]) for r in rows):
            raise _ParseError("ragged matrix")
        return _Mat(tuple(rows))

    def literal(self, value, start: int):
        """Wrap a plain number (an item of the answer, of a tuple, a matrix entry, the value of an equation) with
        how it was written (for decimal golds)."""
        if not (isinstance(value, sympy.Expr) and value.is_Rational):
            return value
        info = _literal_info(self.t[start:self.i])
        if info is None:
            return value
        sig, ulp, approx, marks = info
        if "%" in marks and self.percent == "frac":
            ulp = ulp / 100
        if "\u00b0" in marks and self.degree == "rad":
            return value
        return _Lit(value, sig, ulp, approx)


def _rounding(fn, x: sympy.Expr) -> sympy.Expr:
    """floor/ceiling; sympy evaluates a numeric argument to as many digits as its integer part has."""
    if x.is_number and not x.is_Rational:
        try:
            if abs(_num(x, {})) > 10**30:
                raise _TooBig("floor of a huge number")
        except (_NoNumeric, ArithmeticError, ValueError, TypeError):
            raise _ParseError("floor of a non-number")
    return _checked(fn(x))


def _implicit(left, right):
    """Juxtaposition: a product, except `t(0,4]` (OlympiadBench writes t in (0,4] that way)."""
    if isinstance(left, sympy.Symbol) and isinstance(right, (_Ival, _Union)):
        return _Rel(("in",), (left, right))
    return _mul(left, right)


def _union(a, b) -> _Union:
    parts = []
    for v in (a, b):
        if isinstance(v, _Union):
            parts.extend(v.parts)
        elif isinstance(v, _Ival) or (isinstance(v, _Seq) and v.kind == "set"):
            parts.append(v)
        elif isinstance(v, _Seq) and v.kind in ("pair", "cpair"):
            parts.append(_Ival(_expr(v.items[0]), _expr(v.items[1]), v.kind == "pair", v.kind == "pair"))
        else:
            raise _ParseError("union of non-sets")
    return _Union(tuple(parts))


def _literal_info(toks: list[tuple[str, str]]) -> tuple[int, sympy.Rational, bool, str] | None:
    """(significant figures, unit of the last digit, is-approximate, trailing marks) of the tokens of a
    plain number like `-4.5 \\times 10^{3}`, or None."""
    i = 0
    if i < len(toks) and toks[i] in (("op", "-"), ("op", "+")):
        i += 1
    if i >= len(toks) or toks[i][0] != "num":
        return None
    mantissa, _, exp = toks[i][1].lower().partition("e")
    shift = int(exp) if exp else 0
    scientific = bool(exp)
    i += 1
    if toks[i:i + 3] in ([("cmd", "times"), ("num", "10"), ("op", "^")], [("cmd", "cdot"), ("num", "10"), ("op", "^")]):
        i += 3
        sign, braced = 1, False
        if i < len(toks) and toks[i] == ("op", "{"):
            braced, i = True, i + 1
        if i < len(toks) and toks[i] in (("op", "-"), ("op", "+")):
            sign, i = (-1 if toks[i][1] == "-" else 1), i + 1
        if i >= len(toks) or not toks[i][1].isdigit():
            return None
        shift += sign * int(toks[i][1])
        i += 1
        if braced:
            if i >= len(toks) or toks[i] != ("op", "}"):
                return None
            i += 1
        scientific = True
    marks = "".join(v for _, v in toks[i:])
    if any(m not in "%\u00b0'" for m in marks):
        return None
    whole, dot, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    sig = max(len(digits), 1)
    ulp = Rational(10) ** (shift - len(frac))
    approx = scientific or (bool(dot) and frac.strip("0") != "")
    return sig, ulp, approx, marks


# ---------------------------------------------------------------------------------------------------
# Reading an answer: clean, tokenize, parse (with % and degree variants), expand +-


@dataclasses.dataclass(frozen=True)
class _Reading:
    plain: object  # % and degree marks dropped
    percent: object  # % read as /100, when the text has a % sign
    degree: object  # degrees read as radians, when the text has a degree mark
    unit: object = None  # one-letter units after a number dropped (5 m², 3 m/s), when the text has them


def _read(text: str) -> _Reading | None:
    """Everything the grammar makes of one answer string, or None if it is not an answer it reads."""
    if len(text) > 4 * MAX_ANSWER_CHARS:
        return None
    return _read_cached(text)


@functools.lru_cache(maxsize=4096)  # golds repeat across samples: parse each once per process
def _read_cached(text: str) -> _Reading | None:
    try:
        s = _clean(text)
        if not s or len(s) > MAX_ANSWER_CHARS:
            return None
        toks = _tokenize(s)
        if any(k == "text" for k, _ in toks):
            if all(k in ("text", "sep") or (k == "op" and v in "(),.;:") for k, v in toks):
                return _Reading(_Text(_text_key(s)), None, None)
            toks = _drop_text(toks)
            if not toks:
                return None
        parser = _Parser(toks, "strip", "strip")
        plain = _finish(parser.parse())
        percent = _finish(_Parser(toks, "frac", "strip").parse()) if parser.saw_percent else None
        degree = _finish(_Parser(toks, "strip", "rad").parse()) if parser.saw_degree else None
        unit_toks = _unit_letters(toks)
        unit = _finish(_Parser(unit_toks, "strip", "strip").parse()) if unit_toks else None
        return _Reading(plain, percent, degree, unit)
    except (_ParseError, RecursionError, ValueError, TypeError, ZeroDivisionError, OverflowError, AttributeError):
        return None


_UNIT_LETTERS = frozenset("m g s h L K N J W V".split())
_ITEM_END = (("eof", ""), ("op", ","), ("op", ";"))


def _unit_letters(toks: list[tuple[str, str]]) -> list[tuple[str, str]] | None:
    """The tokens with one-letter units dropped, or None if there are none: a letter that follows a number and,
    alone or as `m/s`, `m^2`, ends an item (5 m², 3 m/s). `5m` may also be a product, so this reading is
    used only against a gold that is a plain number (see _equivalent)."""
    out, i, found = [], 0, False
    while i < len(toks):
        out.append(toks[i])
        j = i + 1
        if toks[i][0] == "num" and j < len(toks) and toks[j][0] == "id" and toks[j][1] in _UNIT_LETTERS:
            while j < len(toks) and toks[j][0] == "id" and toks[j][1] in _UNIT_LETTERS:
                j += 1
                if toks[j:j + 2] in ([("op", "^"), ("num", "2")], [("op", "^"), ("num", "3")]):
                    j += 2
                if j < len(toks) and toks[j] == ("op", "/"):
                    j += 1
            end = toks[j] if j < len(toks) else ("eof", "")
            if end in _ITEM_END or end[0] == "sep":
                found = True
                i = j
                continue
        i += 1
    return out if found else None


def _finish(v):
    """Expand +- into alternatives: `1 \\pm \\sqrt{19}` is the two-element list it stands for."""
    alts = _alternatives(v)
    if len(alts) == 1:
        return alts[0]
    return _Seq("list", tuple(alts))


def _alternatives(v) -> list:
    if isinstance(v, _Lit):
        return [v]
    if isinstance(v, sympy.Expr):
        if not v.has(_PM):
            return [v]
        plus, minus = _checked(v.subs(_PM, 1)), _checked(v.subs(_PM, -1))
        return [plus] if plus == minus else [plus, minus]
    if isinstance(v, _Seq):
        if v.kind in ("list", "set"):
            return [_Seq(v.kind, tuple(a for item in v.items for a in _alternatives(item)))]
        combos = [()]
        for item in v.items:
            combos = [c + (a,) for c in combos for a in _alternatives(item)]
            if len(combos) > 16:
                raise _TooBig("too many +- combinations")
        return [_Seq(v.kind, c) for c in combos]
    if isinstance(v, _Rel):
        combos = [()]
        for term in v.terms:
            combos = [c + (a,) for c in combos for a in _alternatives(term)]
            if len(combos) > 16:
                raise _TooBig("too many +- combinations")
        return [_Rel(v.ops, c) for c in combos]
    if isinstance(v, _Ival) and (v.lo.has(_PM) or v.hi.has(_PM)):
        raise _ParseError("+- in an interval")
    return [v]


# ---------------------------------------------------------------------------------------------------
# Comparison


def _equivalent(answer: str, gold: str) -> bool:
    if not isinstance(answer, str) or not isinstance(gold, str):
        return False
    if len(answer) > 4 * MAX_ANSWER_CHARS or len(gold) > 4 * MAX_ANSWER_CHARS:
        return False
    a_clean, g_clean = _clean(answer), _clean(gold)
    if not a_clean or not g_clean:
        return False
    if _squash(a_clean) == _squash(g_clean):
        return True
    letter = _choice(g_clean, answer=False)
    if letter is not None:
        return _choice(a_clean, answer=True) == letter
    g, a = _read(gold), _read(answer)
    if g is None or isinstance(g.plain, _Text) or (a is not None and isinstance(a.plain, _Text)):
        return bool(_text_key(a_clean)) and _text_key(a_clean) == _text_key(g_clean)
    if a is None:
        return False
    with mpmath.workdps(NUM_DPS):
        candidates = [(a.plain, g.plain)]
        for a_alt, g_alt in ((a.percent, g.percent), (a.degree, g.degree)):
            if g_alt is not None and a_alt is None:
                candidates.append((a.plain, g_alt))
            if a_alt is not None and g_alt is None:
                candidates.append((a_alt, g.plain))
        if a.unit is not None and _plain_numbers(g.plain):
            candidates.append((a.unit, g.plain))
        return any(_eq_top(x, y) for x, y in candidates)


def _plain_numbers(v) -> bool:
    """A number, or a list/tuple of numbers: a gold with no letter that a one-letter unit could stand for."""
    if isinstance(v, _Seq):
        return all(_plain_numbers(x) for x in v.items)
    return _is_constant(v)


def _eq_top(a, g) -> bool:
    if _eq(a, g):
        return True
    # one answer expected, several given (boxes joined by extract_answer): each must be that answer, so the same
    # answer boxed twice in two forms passes and a hedge between two different answers does not; nor do values
    # of two different unknowns (`x = 2, y = 2` for a gold 2 that may be x + y)
    if isinstance(a, _Seq) and a.kind == "list" and not (isinstance(g, _Seq) and g.kind in ("list", "set")):
        names = {str(x.terms[0]) for x in a.items if isinstance(x, _Rel)}
        return len(names) <= 1 and all(_eq(x, g) for x in a.items)
    # Minerva lists the accepted forms of one answer: `7.5 \times 10^7, 7.5 \times 10^7`
    if isinstance(g, _Seq) and g.kind == "list" and len(g.items) > 1 and _all_same(g.items):
        return any(_eq(a, item) for item in g.items)
    return False


def _all_same(items: tuple) -> bool:
    first = items[0]
    for other in items[1:]:
        if _eq(other, first) or _eq(first, other):
            continue
        if not (isinstance(first, _Lit) and isinstance(other, _Lit) and (first.approx or other.approx)):
            return False
        if abs(first.value - other.value) > max(first.ulp, other.ulp):
            return False
    return True


def _tick() -> None:
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _Timeout()


def _eq(a, g) -> bool:
    """Is answer value `a` equal to gold value `g`? Dispatch on the gold's kind."""
    _tick()
    if isinstance(g, _Lit):
        if g.approx:
            return _approx_eq(a, g)
        g = g.value
    if isinstance(a, _Lit):
        a = a.value
    if isinstance(g, _Rel):
        return _rel_eq(a, g)
    if isinstance(a, _Rel):
        if any(_eq(v, g) for v in _rel_values(a)):
            return True
        return isinstance(g, (_Ival, _Union, _Seq)) and _set_eq(a, g)
    if isinstance(g, sympy.Expr):
        if isinstance(a, sympy.Expr):
            return _expr_eq(a, g)
        if isinstance(a, _Seq) and a.kind in ("set", "list") and len(a.items) == 1:
            return _eq(a.items[0], g)
        if isinstance(a, _Base):  # 1010_2 for 10
            return g.is_Integer and _valid_base(a) and int(a.digits, a.base) == int(g)
        return False
    if isinstance(g, _Seq):
        return _seq_eq(a, g)
    if isinstance(g, (_Ival, _Union)):
        return _set_eq(a, g)
    if isinstance(g, _Mat):
        if isinstance(a, _Mat):
            return len(a.rows) == len(g.rows) and len(a.rows[0]) == len(g.rows[0]) and all(
                _eq(x, y) for ra, rg in zip(a.rows, g.rows) for x, y in zip(ra, rg))
        vec = _vector(g)
        is_tuple = isinstance(a, _Seq) and a.kind in ("tuple", "pair", "cpair")
        return vec is not None and is_tuple and _ordered_eq(a.items, vec)
    if isinstance(g, _Base):
        if isinstance(a, _Base):
            return a.digits == g.digits and a.base == g.base
        return isinstance(a, sympy.Expr) and a.is_Integer and str(a) == g.digits
    return False


def _valid_base(b: _Base) -> bool:
    try:
        int(b.digits, b.base)
        return True
    except ValueError:
        return False


def _vector(m: _Mat) -> tuple | None:
    if len(m.rows) == 1:
        return m.rows[0]
    if all(len(r) == 1 for r in m.rows):
        return tuple(r[0] for r in m.rows)
    return None


def _ordered_eq(xs: tuple, ys: tuple) -> bool:
    return len(xs) == len(ys) and all(_eq(x, y) for x, y in zip(xs, ys))


def _multiset_eq(xs: tuple, ys: tuple) -> bool:
    """Unordered, with multiplicity: each gold item takes a distinct equal answer item."""
    if len(xs) != len(ys):
        return False
    free = list(xs)
    for y in ys:
        for k, x in enumerate(free):
            if x == y or _eq(x, y):
                del free[k]
                break
        else:
            return False
    return True


def _seq_eq(a, g: _Seq) -> bool:
    if isinstance(a, _Mat):
        vec = _vector(a)
        return vec is not None and g.kind in ("tuple", "pair", "cpair") and _ordered_eq(vec, g.items)
    if g.kind in ("set", "list"):
        items = a.items if isinstance(a, _Seq) else (a,)
        return _multiset_eq(items, g.items)
    if isinstance(a, _Seq) and a.kind != "set":
        if g.kind == "cpair" and a.kind == "pair":
            return False
        if g.kind == "pair" and a.kind == "cpair":
            return False
        if _ordered_eq(a.items, g.items):
            return True
    if g.kind in ("pair", "cpair") and isinstance(a, (_Ival, _Union, _Rel)):
        return _set_eq(a, g)
    return False


def _approx_eq(a, g: _Lit) -> bool:
    """The decimal-gold rule (module docstring): within the gold's rounding or ~1%, or a correct rounding of it."""
    if isinstance(a, _Rel):
        return any(_approx_eq(v, g) for v in _rel_values(a))
    if isinstance(a, _Seq) and a.kind in ("set", "list") and len(a.items) == 1:
        a = a.items[0]
    value = a.value if isinstance(a, _Lit) else a
    if not isinstance(value, sympy.Expr) or value.free_symbols:
        return False
    if value == g.value:
        return True
    if value.is_Rational:  # exact, so that a difference of exactly half a unit counts as rounding
        diff = abs(value - g.value)

        def within(tolerance):
            return diff <= tolerance
    else:
        try:
            x = _num(value, {})
        except (_NoNumeric, ArithmeticError, ValueError, TypeError):
            return False
        if isinstance(x, mpmath.mpc):
            if abs(x.imag) > abs(x) * mpmath.mpf(10) ** -40:
                return False
            x = x.real
        diff = abs(x - _num(g.value, {}))

        def within(tolerance):
            return diff <= _num(tolerance, {})
    if within(g.ulp / 2):  # the answer rounds to the gold
        return True
    as_precise = not isinstance(a, _Lit) or a.ulp <= g.ulp
    if as_precise and within(min(abs(g.value) / 100, g.ulp)):  # ~1%, at most one unit of the last digit
        return True
    return isinstance(a, _Lit) and min(3, g.sig) <= a.sig < g.sig and within(a.ulp / 2)  # a correct rounding


# relations


def _is_name(v) -> bool:
    if isinstance(v, sympy.Symbol):
        return v is not _PM
    return isinstance(v, _Seq) and v.kind in ("pair", "tuple") and all(isinstance(x, sympy.Symbol) for x in v.items)


def _is_name_product(v) -> bool:
    """`\\angle BEA_1`, `|AB|`, `AP:PB`, `\\frac{NO}{BO}`: symbols multiplied, divided and in absolute value
    only, the label of a quantity (a segment, an angle, a ratio of two) rather than an expression."""
    if isinstance(v, sympy.Abs):
        v = v.args[0]
    factors = v.args if isinstance(v, sympy.Mul) else (v,)
    return isinstance(v, sympy.Expr) and any(isinstance(f, sympy.Symbol) for f in factors) and all(
        isinstance(f, sympy.Symbol) or (isinstance(f, sympy.Pow) and isinstance(f.base, sympy.Symbol) and f.exp == -1)
        for f in factors)


def _rel_values(r: _Rel) -> list:
    """What an equation states as the answer: `x = 5` -> 5, `x = 14/3 = 4.67` -> both, `f(x) = 2x` -> 2x."""
    if any(op not in ("=", "in") for op in r.ops):
        return []
    if "in" in r.ops:
        return [r.terms[-1]] if len(r.ops) == 1 and _is_name(r.terms[0]) else []
    terms = list(r.terms)
    if _is_name(terms[-1]) and not _is_name(terms[0]):
        terms.reverse()
    k = 0
    while k < len(terms) - 1 and _is_name(terms[k]):
        k += 1
    rest = terms[k:]
    if k:
        return rest
    if len(terms) == 2 and _is_name_product(terms[0]) and _is_constant(terms[1]):
        return [terms[1]]
    if all(_is_constant(t) for t in terms):
        return terms
    return []


def _is_constant(v) -> bool:
    v = v.value if isinstance(v, _Lit) else v
    return isinstance(v, sympy.Expr) and not v.free_symbols


def _rel_eq(a, g: _Rel) -> bool:
    if not isinstance(a, _Rel):
        if any(_eq(a, v) for v in _rel_values(g)):
            return True
        return isinstance(a, (_Ival, _Union, _Seq)) and _set_eq(a, g)
    if set(g.ops) == {"="} and set(a.ops) == {"="}:
        ga, aa = _rel_values(g), _rel_values(a)
        g_head, a_head = g.terms[0], a.terms[0]
        if ga and aa and _is_name(g_head) and _is_name(a_head) and _same_head(a_head, g_head):
            return _eq(aa[0], ga[0])
        if len(g.terms) == 2 and len(a.terms) == 2:
            try:
                dg = _expr(g.terms[0]) - _expr(g.terms[1])
                da = _expr(a.terms[0]) - _expr(a.terms[1])
            except _ParseError:
                return False
            return _proportional(da, dg, positive=False)
        return False
    if g.ops == ("!=",) and a.ops == ("!=",):  # a != b: the same excluded set, however it is written
        sa, sg = _as_set(a), _as_set(g)
        if sa is not None and sg is not None:
            return _sets_equal(sa, sg)
        try:
            dg, da = _expr(g.terms[0]) - _expr(g.terms[1]), _expr(a.terms[0]) - _expr(a.terms[1])
        except _ParseError:
            return False
        return _proportional(da, dg, positive=False)
    if "in" in g.ops or "in" in a.ops:
        return _set_eq(a, g)
    sa, sg = _as_set(a), _as_set(g)
    if sa is not None and sg is not None:
        return _sets_equal(sa, sg)
    da, sa_ = _one_sided(a)
    dg, sg_ = _one_sided(g)
    return da is not None and dg is not None and sa_ == sg_ and _proportional(da, dg, positive=True)


def _same_head(a, g) -> bool:
    if a == g:
        return True
    # x and x(t) name the same unknown
    an, gn = str(a).split("(")[0], str(g).split("(")[0]
    return isinstance(a, sympy.Symbol) and isinstance(g, sympy.Symbol) and an == gn


def _one_sided(r: _Rel) -> tuple[sympy.Expr | None, str]:
    """`a < b` as (b - a, '<'), `a >= b` as (a - b, '<=')."""
    if len(r.ops) != 1 or r.ops[0] not in ("<", "<=", ">", ">="):
        return None, ""
    try:
        lhs, rhs = _expr(r.terms[0]), _expr(r.terms[1])
    except _ParseError:
        return None, ""
    op = r.ops[0]
    if op in ("<", "<="):
        return rhs - lhs, op
    return lhs - rhs, "<" if op == ">" else "<="


def _proportional(da: sympy.Expr, dg: sympy.Expr, positive: bool) -> bool:
    """da = c * dg for one nonzero constant c (c > 0 if `positive`), checked at sample points."""
    if dg == 0 or da == 0:
        return da == dg
    symbols = sorted(da.free_symbols | dg.free_symbols, key=str)
    ratios = []
    for env in _points(symbols, _needs_integers(da) or _needs_integers(dg)):
        _tick()
        try:
            x, y = _num(da, env), _num(dg, env)
        except (_NoNumeric, ArithmeticError, ValueError, TypeError):
            continue
        if not (_finite(x) and _finite(y)) or abs(y) == 0:
            continue
        ratios.append(x / y)
    if len(ratios) < 2:
        return False
    r0 = ratios[0]
    if abs(r0) == 0 or not all(_close(r, r0, 1e-20) for r in ratios):
        return False
    if positive:  # the same direction of inequality
        return mpmath.im(r0) == 0 and mpmath.re(r0) > 0
    return True


# sets and intervals


def _as_set(v) -> list | None:
    """A set as a list of parts (_Ival, or sympy expressions for points), or None if `v` is not one."""
    if isinstance(v, _Ival):
        return [v]
    if isinstance(v, _Union):
        out = []
        for p in v.parts:
            out.extend(_as_set(p))
        return out
    if isinstance(v, _Seq):
        if not all(isinstance(x, (sympy.Expr, _Lit, _Rel)) for x in v.items):
            return None
        if v.kind in ("pair", "cpair", "set") and any(isinstance(x, _Rel) for x in v.items):
            return None
        if v.kind in ("pair", "cpair"):
            return [_Ival(_expr(v.items[0]), _expr(v.items[1]), v.kind == "pair", v.kind == "pair")]
        if v.kind == "set":
            return [_expr(x) for x in v.items]
        if v.kind == "list" and all(isinstance(x, _Rel) for x in v.items):  # x < 2 or x > 3
            out = []
            for x in v.items:
                part = _as_set(x)
                if part is None:
                    return None
                out.extend(part)
            return out
        return None
    if isinstance(v, _Rel):
        if v.ops == ("in",):
            return _as_set(v.terms[1])
        return _inequality_set(v)
    return None


def _inequality_set(r: _Rel) -> list | None:
    """`x >= 2` -> [2, oo); `-1 < x <= 3` -> (-1, 3]; `x != 0` -> two rays. Only one-variable forms."""
    try:
        terms = [_expr(t) for t in r.terms]
    except _ParseError:
        return None
    oo = S.Infinity
    if len(r.ops) == 1:
        (op,), (lhs, rhs) = r.ops, terms
        if isinstance(rhs, sympy.Symbol) and not lhs.free_symbols:
            op, lhs, rhs = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "!=": "!=", "=": "="}[op], rhs, lhs
        if not isinstance(lhs, sympy.Symbol) or rhs.free_symbols:
            return None
        if op == "<":
            return [_Ival(-oo, rhs, True, True)]
        if op == "<=":
            return [_Ival(-oo, rhs, True, False)]
        if op == ">":
            return [_Ival(rhs, oo, True, True)]
        if op == ">=":
            return [_Ival(rhs, oo, False, True)]
        if op == "!=":
            return [_Ival(-oo, rhs, True, True), _Ival(rhs, oo, True, True)]
        return None
    if len(r.ops) == 2 and isinstance(terms[1], sympy.Symbol) and not (terms[0].free_symbols | terms[2].free_symbols):
        ops = r.ops
        if all(o in ("<", "<=") for o in ops):
            return [_Ival(terms[0], terms[2], ops[0] == "<", ops[1] == "<")]
        if all(o in (">", ">=") for o in ops):
            return [_Ival(terms[2], terms[0], ops[1] == ">", ops[0] == ">")]
    return None


def _set_eq(a, g) -> bool:
    sa, sg = _as_set(a), _as_set(g)
    return sa is not None and sg is not None and _sets_equal(sa, sg)


def _sets_equal(xs: list, ys: list) -> bool:
    nx, ny = _normal_set(xs), _normal_set(ys)
    if nx is None or ny is None:  # symbolic endpoints: compare part by part, in order
        nx, ny = xs, ys
    if len(nx) != len(ny):
        return False
    for x, y in zip(nx, ny):
        if isinstance(x, _Ival) != isinstance(y, _Ival):
            return False
        if isinstance(x, _Ival):
            if (x.lo_open, x.hi_open) != (y.lo_open, y.hi_open) or not _eq(x.lo, y.lo) or not _eq(x.hi, y.hi):
                return False
        elif not _eq(x, y):
            return False
    return True


def _normal_set(parts: list) -> list | None:
    """Sorted, merged intervals and points with numeric ends; None if some end is not a number."""
    items = []
    for p in parts:
        if isinstance(p, _Ival):
            try:
                lo, hi = _endpoint(p.lo), _endpoint(p.hi)
            except (_NoNumeric, ArithmeticError, ValueError, TypeError):
                return None
            lo_open = p.lo_open or p.lo == S.NegativeInfinity
            hi_open = p.hi_open or p.hi == S.Infinity
            items.append([lo, hi, lo_open, hi_open, p.lo, p.hi])
        else:
            try:
                x = _endpoint(p)
            except (_NoNumeric, ArithmeticError, ValueError, TypeError):
                return None
            items.append([x, x, False, False, p, p])
    items.sort(key=lambda it: (it[0], it[2]))
    merged: list[list] = []
    for it in items:
        if merged:
            last = merged[-1]
            touching = it[0] < last[1] or (_close(it[0], last[1], 1e-40) and not (it[2] and last[3]))
            if touching:
                if it[1] > last[1] or (_close(it[1], last[1], 1e-40) and not it[3]):
                    last[1], last[3], last[5] = it[1], it[3], it[5]
                continue
        merged.append(it)
    out = []
    for lo, hi, lo_open, hi_open, lo_e, hi_e in merged:
        if lo_e is hi_e and not lo_open and not hi_open and _close(lo, hi, 1e-40):
            out.append(lo_e)
        else:
            out.append(_Ival(lo_e, hi_e, lo_open, hi_open))
    return out


def _endpoint(e: sympy.Expr):
    if e == S.Infinity:
        return mpmath.inf
    if e == S.NegativeInfinity:
        return -mpmath.inf
    x = _num(e, {})
    if isinstance(x, mpmath.mpc):
        raise _NoNumeric("complex endpoint")
    return x


# expressions


def _expr_eq(a: sympy.Expr, g: sympy.Expr) -> bool:
    if a == g:
        return True
    infinities = (S.Infinity, S.NegativeInfinity, S.ComplexInfinity)
    if a.has(*infinities) or g.has(*infinities):
        return False
    if a.is_Rational and g.is_Rational:
        return False
    fa, fg = a.free_symbols, g.free_symbols
    if not fa and not fg:
        try:
            return _close(_num(a, {}), _num(g, {}), 1e-40)
        except (_NoNumeric, ArithmeticError, ValueError, TypeError):
            return _symbolic_eq(a, g)
    verdict = _sample_eq(a, g)
    if verdict is None:
        verdict = _symbolic_eq(a, g)
    if not verdict and len(fa - fg) == 1 and len(fg - fa) == 1:
        # an arbitrary constant named differently: c e^{-2t} vs C e^{-2t}
        (x,), (y,) = fa - fg, fg - fa
        if x.name in _ARBITRARY and y.name in _ARBITRARY:
            return bool(_sample_eq(a.xreplace({x: y}), g))
    return verdict


def _needs_integers(e: sympy.Expr) -> bool:
    """Floor, factorials, (-1)^n, sums to n: equal on integers is what matters, so sample integers."""
    if e.has(sympy.floor, sympy.ceiling, sympy.factorial, sympy.binomial, sympy.Sum, sympy.Product):
        return True
    return any(p.base.is_number and p.base.is_negative and p.exp.free_symbols for p in e.atoms(sympy.Pow))


def _points(symbols: list, integers: bool) -> list[dict]:
    """Fixed pseudo-random points: reals in (0.35, 2.65), or for integer expressions small integers
    (floor-type expressions can agree on most integers, so one variable gets every n in 1..30)."""
    rng = random.Random(0x5EED + len(symbols))
    if integers and len(symbols) == 1:
        return [{symbols[0]: mpmath.mpf(n)} for n in range(1, 31)]
    if integers:
        return [dict(zip(symbols, (mpmath.mpf(rng.randint(1, 40)) for _ in symbols))) for _ in range(30)]
    return [dict(zip(symbols, (mpmath.mpf(rng.uniform(0.35, 2.65)) for _ in symbols))) for _ in range(6)]


def _sample_eq(a: sympy.Expr, g: sympy.Expr) -> bool | None:
    """Equal at every sample point (True), different at one (False), or too few points evaluate (None).
    Integer expressions are sampled at integers, and at reals if they are undefined at the integers."""
    symbols = sorted(a.free_symbols | g.free_symbols, key=str)
    verdict = None
    if _needs_integers(a) or _needs_integers(g):
        verdict = _agree_at(a, g, _points(symbols, True))
    return verdict if verdict is not None else _agree_at(a, g, _points(symbols, False))


def _agree_at(a: sympy.Expr, g: sympy.Expr, points: list[dict]) -> bool | None:
    ok = 0
    for env in points:
        _tick()
        try:
            x, y = _num(a, env), _num(g, env)
        except (_NoNumeric, ArithmeticError, ValueError, TypeError):
            continue
        if not (_finite(x) and _finite(y)):
            continue
        if not _close(x, y, 1e-25):
            return False
        ok += 1
    return True if ok >= 2 else None


def _finite(x) -> bool:
    return mpmath.isfinite(x) if not isinstance(x, mpmath.mpc) else mpmath.isfinite(x.real) and mpmath.isfinite(x.imag)


def _close(x, y, rel: float) -> bool:
    scale = max(abs(x), abs(y))
    return abs(x - y) <= rel * scale or scale < mpmath.mpf(10) ** -(NUM_DPS - 10)


_MP_FUNCS = {
    sympy.exp: mpmath.exp, sympy.log: mpmath.log, sympy.sin: mpmath.sin, sympy.cos: mpmath.cos,
    sympy.tan: mpmath.tan, sympy.cot: mpmath.cot, sympy.sec: mpmath.sec, sympy.csc: mpmath.csc,
    sympy.asin: mpmath.asin, sympy.acos: mpmath.acos, sympy.atan: mpmath.atan, sympy.acot: mpmath.acot,
    sympy.asec: mpmath.asec, sympy.acsc: mpmath.acsc, sympy.sinh: mpmath.sinh, sympy.cosh: mpmath.cosh,
    sympy.tanh: mpmath.tanh, sympy.coth: mpmath.coth, sympy.sech: mpmath.sech, sympy.csch: mpmath.csch,
    sympy.asinh: mpmath.asinh, sympy.acosh: mpmath.acosh, sympy.atanh: mpmath.atanh, sympy.acoth: mpmath.acoth,
    sympy.asech: mpmath.asech, sympy.acsch: mpmath.acsch,
    sympy.Abs: abs, sympy.floor: lambda x: _snap(x, mpmath.floor), sympy.ceiling: lambda x: _snap(x, mpmath.ceil),
    sympy.factorial: mpmath.factorial,
    sympy.binomial: mpmath.binomial, sympy.gamma: mpmath.gamma, sympy.sign: mpmath.sign,
    sympy.re: mpmath.re, sympy.im: mpmath.im,
}


def _snap(x, rounding):
    """floor/ceil of a value that is an integer up to rounding noise (log(8)/log(2)) is that integer."""
    k = mpmath.nint(x)
    return k if abs(x - k) < mpmath.mpf(10) ** -(NUM_DPS - 15) else rounding(x)


def _num(e: sympy.Expr, env: dict):
    """Evaluate `e` at the 60-digit point `env` with our own walker (no lambdify: it execs generated code)."""
    if e.is_Integer:
        return mpmath.mpf(int(e))
    if e.is_Rational:
        return mpmath.mpf(int(e.p)) / int(e.q)
    if e.is_Symbol:
        if e not in env:
            raise _NoNumeric(f"unbound {e}")
        return env[e]
    if e is S.Pi:
        return +mpmath.pi
    if e is S.Exp1:
        return +mpmath.e
    if e is S.ImaginaryUnit:
        return mpmath.mpc(0, 1)
    if e.is_Add:
        return mpmath.fsum(_num(x, env) for x in e.args)
    if e.is_Mul:
        out = mpmath.mpf(1)
        for x in e.args:
            out *= _num(x, env)
        return out
    if e.is_Pow:
        base, exp = _num(e.base, env), _num(e.exp, env)
        if abs(exp) > 10**9:
            raise _NoNumeric("huge exponent")
        if base == 0 and (exp.real if isinstance(exp, mpmath.mpc) else exp) < 0:
            raise ZeroDivisionError
        return mpmath.power(base, exp)
    if isinstance(e, (sympy.Sum, sympy.Product)):
        return _num_big_operator(e, env)
    fn = _MP_FUNCS.get(e.func)
    if fn is None:
        raise _NoNumeric(f"no numeric rule for {e.func}")
    args = [_num(x, env) for x in e.args]
    if e.func is sympy.exp and abs(args[0]) > 10**9:
        raise _NoNumeric("huge exponent")
    return fn(*args)


def _num_big_operator(e, env: dict):
    """A sum or product term by term, its bounds evaluated at the point; every term counts against the
    verification's MAX_SUM_TERMS (\\sum_{k=0}^{10^9} is refused, nested sums cannot multiply the work)."""
    (k, lower, upper), = e.limits
    lo, hi = (_num(b, env) for b in (lower, upper))
    if isinstance(lo, mpmath.mpc) or isinstance(hi, mpmath.mpc) or not (mpmath.isfinite(lo) and mpmath.isfinite(hi)):
        raise _NoNumeric("bad range")
    lo_i, hi_i = mpmath.nint(lo), mpmath.nint(hi)
    if abs(lo - lo_i) > mpmath.mpf(10) ** -(NUM_DPS - 15) or abs(hi - hi_i) > mpmath.mpf(10) ** -(NUM_DPS - 15):
        raise _NoNumeric("non-integer range")
    count = max(0, int(hi_i - lo_i) + 1)
    used = getattr(_state, "sum_terms", 0) + count
    if used > MAX_SUM_TERMS:
        raise _NoNumeric("too many terms")
    _state.sum_terms = used
    is_sum = isinstance(e, sympy.Sum)
    out = mpmath.mpf(0 if is_sum else 1)
    for n in range(int(lo_i), int(lo_i) + count):
        if n % 256 == 0:
            _tick()
        term = _num(e.function, {**env, k: mpmath.mpf(n)})
        out = out + term if is_sum else out * term
    return out


# ---------------------------------------------------------------------------------------------------
# Guards: the time budget, and the child process that runs sympy.simplify

_state = threading.local()
_IN_WORKER = False  # set in grade_batch workers: the parent kills them, so no extra fork is needed


def _on_alarm(signum, frame):
    raise _Timeout()


class _Budget:
    """Deadline for one verification: cooperative checks everywhere, plus SIGALRM on the main thread."""

    def __init__(self, seconds: float):
        self.seconds = max(0.01, float(seconds))
        self.old_handler = None

    def __enter__(self):
        _state.deadline = time.monotonic() + self.seconds
        _state.sum_terms = 0
        if threading.current_thread() is threading.main_thread():
            self.old_handler = signal.signal(signal.SIGALRM, _on_alarm)
            self.old_timer = signal.setitimer(signal.ITIMER_REAL, self.seconds)
            self.started = time.monotonic()
        return self

    def __exit__(self, *exc):
        if self.old_handler is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old_handler)
            remaining = self.old_timer[0] - (time.monotonic() - self.started)
            if self.old_timer[0] > 0:
                signal.setitimer(signal.ITIMER_REAL, max(remaining, 0.001), self.old_timer[1])
        _state.deadline = None
        return False


def _verdict(answer: str, gold: str, timeout: float) -> tuple[bool, bool]:
    """(correct, timed_out) for one pair; never raises (except KeyboardInterrupt)."""
    try:
        with _Budget(timeout):
            return bool(_equivalent(answer, gold)), False
    except _Timeout:
        return False, True
    except KeyboardInterrupt:
        raise
    except BaseException:
        return False, False


def _simplifies_to_zero(e: sympy.Expr) -> bool:
    return sympy.simplify(e) == 0


def _symbolic_eq(a: sympy.Expr, g: sympy.Expr) -> bool:
    """Last resort: simplify(a - g) == 0, in a child process killed at the deadline."""
    deadline = getattr(_state, "deadline", None)
    remaining = (deadline - time.monotonic()) if deadline is not None else 5.0
    if remaining <= 0.05:
        raise _Timeout()
    diff = a - g
    if diff.has(sympy.Sum, sympy.Product):  # sympy would try to sum them in closed form: unbounded
        return False
    if _IN_WORKER:
        return _simplifies_to_zero(diff)
    if not hasattr(os, "fork"):
        return False
    return _in_child(_simplifies_to_zero, diff, remaining)


def _address_space() -> int:
    """Bytes of address space this process holds (Linux's VmSize; 0 where /proc does not say)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0


def _limit_memory() -> None:
    """Cap a forked worker's address space at MEMORY_LIMIT above what it inherited. The cap counts from the
    parent's size, not from zero: a process that has imported torch 2.11's CUDA build holds 3.1 GB of address
    space before it allocates anything (CUDA's initialization reserves more), and a fixed 4 GiB cap below what
    the child inherits makes its allocations fail: answers needing the symbolic stage were graded wrong
    without a word (tests: a parent holding 16 GiB)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _address_space() + MEMORY_LIMIT
        cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, ValueError, OSError):
        pass


def _in_child(fn, arg, seconds: float) -> bool:
    """Run fn(arg) -> bool in a forked child; SIGKILL it if it is not done in `seconds`."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: compute, write one byte, exit without running any parent cleanup
        try:
            os.close(r)
            _limit_memory()
            os.write(w, b"1" if fn(arg) else b"0")
        finally:
            os._exit(0)
    os.close(w)
    done = False
    try:
        ready, _, _ = select.select([r], [], [], seconds)
        if not ready:
            raise _Timeout()
        done = True
        return os.read(r, 1) == b"1"
    finally:
        if not done:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)


# ---------------------------------------------------------------------------------------------------
# Worker pool for grade_batch


def _worker_main(conn, timeout: float) -> None:
    global _IN_WORKER
    _IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _limit_memory()
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        for i, answer, gold in batch:
            ok, late = _verdict(answer, gold, timeout)
            conn.send((i, ok, late))


@dataclasses.dataclass
class _Slot:
    proc: multiprocessing.Process
    conn: object
    inflight: deque
    since: float


def _usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (a cluster job bound to 32 of a
    node's 224 cores), else the machine's count. More workers than usable CPUs share them, and each item's
    budget is wall-clock time: an oversubscribed pool turns slow items into timeouts, graded wrong."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _run_pool(tasks: list[tuple[str, str]], timeout: float, workers: int | None) -> list[tuple[bool, bool]]:
    """Verify tasks in worker processes; a worker past an item's budget (plus grace) is killed and replaced.

    Workers are forked (started in milliseconds with sympy already imported, and without re-running the
    caller's __main__ as spawn would); they only run this module's pure-Python code.
    """
    if not tasks:
        return []
    ctx = multiprocessing.get_context("fork")
    n_workers = max(1, min(workers or _usable_cpus(), len(tasks)))
    chunk = max(1, min(32, len(tasks) // (n_workers * 4)))
    hard_limit = timeout + max(1.0, 0.2 * timeout)  # the worker's own alarm fires at `timeout`
    pending = deque(range(len(tasks)))
    results: list[tuple[bool, bool] | None] = [None] * len(tasks)
    left = len(tasks)

    def start() -> _Slot:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, timeout), daemon=True)
        proc.start()
        child.close()
        return _Slot(proc, parent, deque(), time.monotonic())

    def retire(slot: _Slot) -> None:
        slot.proc.kill()
        slot.proc.join()
        slot.conn.close()

    slots = [start() for _ in range(n_workers)]
    failures = 0
    try:
        while left:
            for slot in slots:
                if not slot.inflight and pending:
                    ids = [pending.popleft() for _ in range(min(chunk, len(pending)))]
                    slot.conn.send([(i, *tasks[i]) for i in ids])
                    slot.inflight.extend(ids)
                    slot.since = time.monotonic()
            busy = [s for s in slots if s.inflight]
            now = time.monotonic()
            wait_for = max(0.0, min(s.since + hard_limit - now for s in busy))
            ready = wait_connections([s.conn for s in busy], timeout=wait_for)
            for k, slot in enumerate(slots):
                if not slot.inflight:
                    continue
                dead = False
                if slot.conn in ready:
                    try:
                        while slot.conn.poll():
                            i, ok, late = slot.conn.recv()
                            results[i] = (ok, late)
                            slot.inflight.popleft()
                            slot.since = time.monotonic()
                            left -= 1
                            failures = 0
                    except (EOFError, OSError):
                        dead = True
                if dead or (slot.inflight and time.monotonic() > slot.since + hard_limit):
                    retire(slot)
                    if slot.inflight:
                        i = slot.inflight.popleft()
                        results[i] = (False, True)
                        left -= 1
                        pending.extendleft(reversed(slot.inflight))
                    failures += 1
                    if failures > 3 * n_workers + 3:
                        raise RuntimeError("worker processes keep dying")
                    slots[k] = start()
    finally:
        for slot in slots:
            try:
                slot.conn.send(None)
            except (OSError, ValueError):
                pass
        for slot in slots:
            slot.proc.join(timeout=1.0)
            if slot.proc.is_alive():
                slot.proc.kill()
                slot.proc.join()
    return [r if r is not None else (False, True) for r in results]


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description="Grade one answer against a gold answer.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--answer", help="an extracted final answer (LaTeX)")
    src.add_argument("--response", help="a full model response; its last \\boxed{} is graded")
    p.add_argument("--gold", required=True, help="the gold answer (LaTeX)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds allowed for the verification")
    p.add_argument("--no-require-boxed", action="store_true", help="fall back to unboxed final answers")
    p.add_argument("--require-think-end", action="store_true",
                   help="the paper's rule: a response without </think> is incorrect; search only after it")
    args = p.parse_args()
    if args.response is not None:
        answer = _answer_of(args.response, not args.no_require_boxed, args.require_think_end)
        ok = answer is not None and is_equivalent(answer, args.gold, timeout=args.timeout)
    else:
        answer, ok = args.answer, is_equivalent(args.answer, args.gold, timeout=args.timeout)
    print(f"answer: {answer!r}\ngold:   {args.gold!r}\n{'correct' if ok else 'incorrect'}")


if __name__ == "__main__":
    main()
