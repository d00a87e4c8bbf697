"""Write tests/verify_cases.jsonl: hand-labelled grading cases plus rewrites of every benchmark gold.

The file is the labelled set that tests/test_verify.py checks and bench/bench_verify.py scores (verify.py
and Math-Verify on the same cases). Each line: category, response (a full model output), answer (its
boxed content, or null), gold, expected (what a careful human grader says), and for the few cases
verify.py is known to get wrong, known_miss (why).

Hand-written cases are below, one tuple each: (category, answer, gold, expected) or, where the response
itself is under test, (category, answer, gold, expected, response). Generated cases (category
`bench:<name>`) are correct by construction: for every distinct gold of benchmarks/*.jsonl, one
meaning-preserving rewrite (true) and one near miss (false: a digit changed, a pair swapped, a bracket
flipped, an item dropped).

    python tests/make_verify_cases.py
"""

import json
import re
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "verify_cases.jsonl"
BENCHMARKS = ("aime24", "amc23", "math500", "minerva", "olympiadbench")
MARKER = "MARKER"  # tests replace it with a temporary path that must never be created

T, F = True, False


def respond(answer: str) -> str:
    """A response in the paper's format, with a thinking part that mentions a wrong intermediate value."""
    return ("<think>\nLet me compute this carefully. A first guess would be 7, but that ignores a case.\n</think>\n\n"
            f"Therefore, the final answer is: $\\boxed{{{answer}}}$. I hope it is correct.")


HAND = [
    # integers
    ("integer", "204", "204", T), ("integer", "025", "25", T), ("integer", "25", "025", T),
    ("integer", "204.0", "204", T), ("integer", "142", "142.0", T), ("integer", "143", "142.0", F),
    ("integer", "1,000", "1000", T), ("integer", "1000", "1,000", T), ("integer", "10{,}080", "10080", T),
    ("integer", r"10\,080", r"10,\!080", T), ("integer", "10 080", "10080", T), ("integer", "1,000,000", "10^6", T),
    ("integer", "-4", "-4", T), ("integer", "4", "-4", F), ("integer", "\u22124", "-4", T),
    ("integer", "x = 809", "809", T), ("integer", "n=809", "809", T), ("integer", "808", "809", F),
    ("integer", "810", "809", F), ("integer", "8090", "809", F), ("integer", r"36 \text{ ways}", "36", T),
    ("integer", r"\$36", r"\$36", T), ("integer", "36", r"\$36", T), ("integer", "36 dollars", r"\$36", T),
    ("integer", r"\mathbf{36}", "36", T), ("integer", r"\textbf{36}", "36", T),
    ("integer", "11,111,111,100", r"11,\! 111,\! 111,\! 100", T),
    ("integer", "11111111101", r"11,\! 111,\! 111,\! 100", F), ("integer", "2^{10}", "1024", T),
    ("integer", "2^10", "1024", T), ("integer", "1023", "1024", F), ("integer", "{12}", "12", T),
    ("integer", "12.5", "12", F), ("integer", "-0", "0", T), ("integer", "32,348", r"\$32,\!348", T),
    ("integer", "58 500", "58,500", T), ("integer", "5850", "58,500", F), ("integer", "0", "1", F),
    ("integer", "1", "-1", F), ("integer", "+7", "7", T), ("integer", "7.", "7", T),
    ("integer", r"\left(7\right)", "7", T), ("integer", "-(-7)", "7", T),

    # decimals (exact values: a decimal equals a fraction only if it is that fraction exactly)
    ("decimal", "0.5", r"\frac{1}{2}", T), ("decimal", ".5", "0.5", T), ("decimal", "0.50", r"\frac12", T),
    ("decimal", "0.333", r"\frac{1}{3}", F), ("decimal", r"0.\overline{3}", r"\frac{1}{3}", T),
    ("decimal", r"0.1\overline{6}", r"\frac{1}{6}", T), ("decimal", "0.3333333333", r"\frac{1}{3}", F),
    ("decimal", "1.25", r"\frac{5}{4}", T), ("decimal", "1.2", r"\frac54", F), ("decimal", "0.35625", ".35625", T),
("decimal", "0.0000672", ".0000672", T),
    ("decimal", r"6.72 \times 10^{-5}", ".0000672", T), ("decimal", "4.5", "4.5", T),
    ("decimal", r"\frac{9}{2}", "4.5", T), ("decimal", "4.6", "4.5", F), ("decimal", "2.50", "2.5", T),
    ("decimal", "3.2", "3.21", F), ("decimal", "0.1", "0.15", F), ("decimal", "0.15", r"\frac{3}{20}", T),
    ("decimal", "18.9", r"\$18.90", T), ("decimal", "1.0", "1", T), ("decimal", r"0.\overline{142857}", r"\frac17", T),
    ("decimal", r"2.\overline{6}", r"\frac{8}{3}", T), ("decimal", "2.67", r"\frac{8}{3}", F),
    ("decimal", r"\frac{3}{8}", "0.375", T), ("decimal", "0.38", "0.375", F),
    # a decimal gold inside a tuple, a matrix or an equation is a rounded measurement too
    ("decimal", "(0.2902, 0.196)", "(0.29, 0.196)", T), ("decimal", "(0.3, 0.196)", "(0.29, 0.196)", F),
    ("decimal", r"\begin{pmatrix} 0.2902 \\ -0.1864 \end{pmatrix}", r"\begin{pmatrix} 0.29 \\ -0.186 \end{pmatrix}", T),
    ("decimal", "x = 9.62", "x = 9.6", T), ("decimal", "x = 9.7", "x = 9.6", F),
    ("decimal", "(0.333, 2)", r"(\frac{1}{3}, 2)", F),

    # measured values (Minerva): within the gold's rounding, ~1% at the gold's precision, or a correct rounding
    ("scientific", "9.6", "9.6", T), ("scientific", "9.62", "9.6", T), ("scientific", "9.58", "9.6", T),
    ("scientific", "9.5", "9.6", F), ("scientific", "9.7", "9.6", F), ("scientific", "10", "9.6", F),
    ("scientific", r"8.7 \times 10^{8}", r"8.7 \times 10^{8}", T), ("scientific", "8.7e8", r"8.7 \times 10^{8}", T),
    ("scientific", "870000000", r"8.7 \times 10^{8}", T), ("scientific", r"8.65 \times 10^8", r"8.7 \times 10^{8}", T),
    ("scientific", r"8.8 \times 10^8", r"8.7 \times 10^{8}", F),
    ("scientific", r"8.7 \times 10^{9}", r"8.7 \times 10^{8}", F),
    ("scientific", r"1.08 \times 10^{16}", r"1.07 \times 10^{16}", T),
    ("scientific", r"1.10 \times 10^{16}", r"1.07 \times 10^{16}", F),
    ("scientific", r"1.07 \times 10^{15}", r"1.07 \times 10^{16}", F),
    ("scientific", r"7 \times 10^{37}", "7e37", T), ("scientific", r"7.2 \times 10^{37}", r"7 \times 10^{37}", T),
    ("scientific", r"8 \times 10^{37}", r"7 \times 10^{37}", F),
    ("scientific", r"4.47 \times 10^{14}", r"4.4677 \times 10^{14}", T),
    ("scientific", r"4.5 \times 10^{14}", r"4.4677 \times 10^{14}", F),
    ("scientific", r"2.78 \times 10^{-6}", r"2.7778 \times 10^{-6}", T),
    ("scientific", r"3.89 \times 10^{-10}", "3.89e-10, 3.89e-10", T),
    ("scientific", r"4.4 \times 10^{7}", r"4.4e7, 4.4 \times 10^7", T), ("scientific", "0.012", "0.01, 0.02", T),
    ("scientific", "0.05", "0.01, 0.02", F), ("scientific", "6630.65", "6630.65, 6630", T),
    ("scientific", "6630", "6630.65, 6630", T), ("scientific", "6631", "6630.65, 6630", T),
    ("scientific", "6640", "6630.65, 6630", F),
    ("scientific", r"1.3 \times 10^{-27}", r"1.325 \times 10^{-27}, 1.325 \times 10^{-27}", F),
    ("scientific", r"1.33 \times 10^{-27}", r"1.325 \times 10^{-27}", T), ("scientific", "24.31", "24.310", T),
    ("scientific", "56", "56.0", T), ("scientific", "56.2", "56.0", F), ("scientific", "0.1", "0.10", T),
    ("scientific", "0.11", "0.10", F), ("scientific", r"-\frac{7}{8}", "-0.875", T),
    ("scientific", "0.875", "-0.875", F),
    ("scientific", r"1.7 \times 10^{4}", "1.70e4", T), ("scientific", "17000", "1.70e4", T),
    ("scientific", "0.0022", "0.022", F), ("scientific", r"2.2 \times 10^{-2}", "0.022", T),
    ("scientific", r"\frac{\sqrt{3}}{2}", "0.866", T), ("scientific", "e^{2}", "7.389", T),
    ("scientific", r"5.47 \times 10^{5}", r"5.47 \times 10^5, 5.47 \times 10^5", T),
    ("scientific", r"5.74 \times 10^{5}", r"5.47 \times 10^5, 5.47 \times 10^5", F),
    ("scientific", r"1.39 \cdot 10^{9}", r"1.39 \times 10^9, 1.39 \times 10^{9}", T),
    ("scientific", "13.1", "13.1", T), ("scientific", "13.2", "13.1", T), ("scientific", "13.3", "13.1", F),

    # fractions
    ("fraction", r"\frac12", r"\frac{1}{2}", T), ("fraction", r"\dfrac{1}{2}", "1/2", T),
    ("fraction", r"\tfrac{1}{2}", r"\frac12", T), ("fraction", r"\cfrac{1}{2}", r"\frac12", T),
    ("fraction", r"{1 \over 2}", r"\frac12", T), ("fraction", r"\frac{3}{4}", r"\frac 34", T),
    ("fraction", r"\frac{4}{3}", r"\frac 34", F), ("fraction", r"\frac{9}{19}", r"\frac9{19}", T),
    ("fraction", r"137\frac{1}{2}", r"137 \frac{1}{2}", T), ("fraction", "137.5", r"137 \frac{1}{2}", T),
    ("fraction", r"\frac{275}{2}", r"137 \frac{1}{2}", T), ("fraction", "68.5", r"137 \frac{1}{2}", F),
    ("fraction", r"\frac{9}{5}", r"1\frac{4}{5}", T), ("fraction", "1.8", r"1\frac{4}{5}", T),
    ("fraction", r"\frac{4}{5}", r"1\frac{4}{5}", F), ("fraction", r"-\frac{3}{8}", r"-\frac{3}{8}", T),
    ("fraction", r"\frac{-3}{8}", r"-\frac{3}{8}", T), ("fraction", r"\frac{3}{-8}", r"-\frac{3}{8}", T),
    ("fraction", r"\frac{3}{8}", r"-\frac{3}{8}", F), ("fraction", r"\frac{2}{4}", r"\frac{1}{2}", T),
    ("fraction", r"4\frac{2}{3}", r"\frac{14}{3}", T), ("fraction", "4.67", r"\frac{14}{3}", F),
    ("fraction", r"\frac{1}{2^{98}}", r"\frac{1}{2^{99}}", F), ("fraction", "2^{-99}", r"\frac{1}{2^{99}}", T),
    ("fraction", r"\frac{2016}{4068289}", r"\frac{2016}{2017^{2}}", T),
    ("fraction", r"\frac{2017}{2016^2}", r"\frac{2016}{2017^{2}}", F),
    ("fraction", "0.028672", r"\frac{448}{15625}", T), ("fraction", "0.306", r"\frac{11}{36}", F),
    ("fraction", r"\frac{22}{7}", r"\frac{21}{7}", F), ("fraction", "3", r"\frac{21}{7}", T),
    ("fraction", "-1/1997", r"\frac{-1}{1997}", T), ("fraction", "1/1997", r"\frac{-1}{1997}", F),
    ("fraction", r"\frac{\frac{1}{2}}{\frac{3}{4}}", r"\frac23", T), ("fraction", "1/2/3", r"\frac16", T),

    # radicals
    ("radical", r"2\sqrt{5}", r"2 \sqrt{5}", T), ("radical", r"\sqrt{20}", r"2\sqrt{5}", T),
    ("radical", r"\sqrt{5}", r"2\sqrt{5}", F), ("radical", r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}", T),
    ("radical", r"\frac{1}{\sqrt3}", r"\frac{\sqrt{3}}{3}", T), ("radical", r"\sqrt{242}", r"11\sqrt2", T),
    ("radical", r"\sqrt{243}", r"11\sqrt2", F), ("radical", "0.866", r"\frac{\sqrt3}{2}", F),
    ("radical", r"\sqrt[3]{7}", "7^{1/3}", T), ("radical", r"\frac{8\sqrt[3]{49}}{7}", r"\frac{8}{\sqrt[3]{7}}", T),
    ("radical", r"\frac{8}{\sqrt{7}}", r"\frac{8}{\sqrt[3]{7}}", F), ("radical", r"\sqrt[3]{500}", r"5 \sqrt[3]{4}", T),
    ("radical", r"2\sqrt{3}+1", r"1+2\sqrt{3}", T), ("radical", r"1-2\sqrt3", r"1+2\sqrt{3}", F),
    ("radical", r"\sqrt{2}-1", r"\frac{1}{\sqrt{2}+1}", T),
    ("radical", r"\frac{\sqrt5-1}{2}", r"\frac{-1+\sqrt{5}}{2}", T),
    ("radical", r"\frac{\sqrt5+1}{2}", r"\frac{-1+\sqrt{5}}{2}", F),
    ("radical", r"\frac{189}{\sqrt{11}}", r"\frac{189 \sqrt{11}}{11}", T),
    ("radical", r"\sqrt{2}\sqrt{3}", r"\sqrt6", T), ("radical", r"\sqrt{1.44}", "1.2", T),
    ("radical", r"3\sqrt{13}", r"\sqrt{117}", T), ("radical", r"\sqrt{118}", r"3\sqrt{13}", F),
    ("radical", r"\frac{3\sqrt{3}}{4}", r"\frac{3\sqrt{3}}{4}", T),
    ("radical", r"\frac{3}{4}\sqrt3", r"\frac{3\sqrt{3}}{4}", T),
    ("radical", r"\frac{\sqrt{27}}{4}", r"\frac{3\sqrt{3}}{4}", T),
    ("radical", r"\frac{3\sqrt{2}}{4}", r"\frac{3\sqrt{3}}{4}", F),
    ("radical", r"\frac{\sqrt{21}}{5}", r"\sqrt{\frac{21}{25}}", T), ("radical", r"2\sqrt{113}", r"\sqrt{452}", T),

    # constants
    ("constant", r"12 \pi", r"12\pi", T), ("constant", r"\pi \cdot 12", r"12\pi", T), ("constant", "37.7", r"12\pi", F),
    ("constant", "12", r"12\pi", F), ("constant", r"20000\pi^{-1}", r"\frac{20000}{\pi}", T),
    ("constant", r"2(9+\pi)", r"18+2\pi", T), ("constant", r"\exp(2)", "e^2", T),
    ("constant", r"-\infty", r"\infty", F),
    ("constant", "3.14", r"\pi", F), ("constant", r"\frac{22}{7}", r"\pi", F),
    ("constant", r"\frac{\pi^2}{6}", r"\frac{\pi^{2}}{6}", T),
    ("constant", r"22\frac{1}{3}\pi", r"\frac{67 \pi}{3}", T), ("constant", r"\frac{67}{3}\pi", r"\frac{67 \pi}{3}", T),
    ("constant", r"\frac{68\pi}{3}", r"\frac{67 \pi}{3}", F), ("constant", r"288\pi", r"288 \pi", T),
    ("constant", r"1024-256\pi", r"1024-256 \pi", T), ("constant", r"256(4-\pi)", r"1024-256 \pi", T),
    ("constant", r"\ln(e^3)", "3", T), ("constant", "e", r"\exp(1)", T),
    ("constant", r"\frac{5\pi}{4}\sqrt{17}", r"\frac{5 \pi}{4} \sqrt{17}", T),

    # complex numbers
    ("complex", "7i-2", "-2 + 7i", T), ("complex", "-2 + 7 i", "-2 + 7i", T), ("complex", "-2-7i", "-2 + 7i", F),
    ("complex", "2i+1", "1+2i", T), ("complex", r"1 + 2\,i", "1+2i", T), ("complex", r"1+i\sqrt{3}", r"1+\sqrt{3}i", T),
    ("complex", r"1+\sqrt{3}\,i", r"1+\sqrt{3}i", T), ("complex", r"1-i\sqrt{3}", r"1+\sqrt{3}i", F),
    ("complex", "6+5i", "6 - 5i", F), ("complex", r"2e^{i\pi/3}", r"1+\sqrt{3}i", T),
    ("complex", r"\ln 2 + \frac{i\pi}{3}", r"\ln 2 + i\frac{\pi}{3}, \ln 2 + \frac{i\pi}{3}", T),
    ("complex", r"-8-8\sqrt{3}i", r"-8-8\sqrt{3}i, -8-8\sqrt{3}i, -8-8 \sqrt{3} i", T),
    ("complex", "-i", "i", F), ("complex", r"\frac{1-i}{2}", r"\frac{1}{1+i}", T), ("complex", "1+274i", "1+274i", T),
    ("complex", "274i+1", "1+274i", T), ("complex", "1+247i", "1+274i", F), ("complex", "(1+i)^2", "2i", T),
    ("complex", "1-12i", "1 - 12i", T), ("complex", "1+12i", "1 - 12i", F),

    # expressions with symbols
    ("expression", "ab+2a+5b+10", "(a+5)(b+2)", T), ("expression", "(b+2)(a+5)", "(a+5)(b+2)", T),
    ("expression", "(a+2)(b+5)", "(a+5)(b+2)", F), ("expression", "-q+p", "p - q", T),
    ("expression", "q-p", "p - q", F),
    ("expression", "3x+x^3-6", "x^3+3x-6", T), ("expression", "x^3+3x+6", "x^3+3x-6", F),
    ("expression", r"\frac{11}{20}+\frac{9a}{20}", r"\frac{11+9a}{20}", T),
    ("expression", "0.55+0.45a", r"\frac{11+9a}{20}", T),
    ("expression", r"\frac{11+9a}{2}", r"\frac{11+9a}{20}", F), ("expression", r"2\cdot 4^{504}", "2^{1009}", T),
    ("expression", "2^{1008}", "2^{1009}", F), ("expression", r"\frac{100!}{2^{49}}", r"\frac{100!}{2^{50}}", F),
    ("expression", "343943885", r"2021 \cdot 505 \cdot 337", T),
    ("expression", "(x-1)(x^4+x^2+1)", "x^5 - x^4 + x^3 - x^2 + x - 1", T),
    ("expression", "4n(2n+1)+1", "8n^2 + 4n + 1", T), ("expression", "8n^2+4n", "8n^2 + 4n + 1", F),
    ("expression", r"\frac{2n^3+3n^2+n}{6}", r"\frac{n(n+1)(2 n+1)}{6}", T),
    ("expression", r"\frac{n(n+1)}{2}", r"\frac{n(n+1)(2 n+1)}{6}", F),
    ("expression", r"\frac{1}{2(n+1)}", r"\frac{1}{2 n+2}", T),
    ("expression", r"\frac{1}{2n+1}", r"\frac{1}{2 n+2}", F), ("expression", r"\frac{2^k}{2^n}", "2^{k-n}", T),
    ("expression", "2^{n-k}", "2^{k-n}", F), ("expression", r"\frac{\sinh(at)}{a}", r"\frac{e^{at}-e^{-at}}{2a}", T),
    ("expression", r"\frac{\cosh(at)}{a}", r"\frac{e^{at}-e^{-at}}{2a}", F),
    ("expression", r"\cos 2t + \sin 2t", r"\sqrt{2} \cos (2 t-\pi / 4)", T),
    ("expression", r"\cos 2t - \sin 2t", r"\sqrt{2} \cos (2 t-\pi / 4)", F),
    ("expression", r"\frac{x}{2}-\frac14+Ce^{-2x}", r"\frac{x}{2} - \frac{1}{4} + ce^{-2x}", T),
    ("expression", r"\frac{x}{2}-\frac14+Ce^{2x}", r"\frac{x}{2} - \frac{1}{4} + ce^{-2x}", F),
    ("expression", "I(0)e^{-t/(RC)}", r"I(0)e^{-\frac{t}{RC}}", T),
    ("expression", "I(0)e^{-tRC}", r"I(0)e^{-\frac{t}{RC}}", F),
    ("expression", "(s+a)^{-1}", r"\frac{1}{s+a}", T), ("expression", r"\frac{1}{s-a}", r"\frac{1}{s+a}", F),
    ("expression", r"\frac{t}{m}", r"\frac{t}{m}, \frac{1}{m}t", T),
    ("expression", r"-\frac{1}{2\sqrt{X}}", r"-\frac{1}{2}X^{-\frac{1}{2}}", T),
    ("expression", "R+C+2RC", "2RC+R+C", T), ("expression", "2RC+R", "2RC+R+C", F), ("expression", "6m", "6m", T),
    ("expression", "m6", "6m", T), ("expression", "6n", "6m", F), ("expression", "2k+2", "2(k+1)", T),
    ("expression", r"\frac{N}{2}", "0.5N", T), ("expression", r"\frac{a b}{2}", r"\frac{ab}{2}", T),
    ("expression", r"\frac{1-p^2}{3}", r"\frac{1-p^{2}}{3}", T),
    ("expression", r"\frac{(1-p)(1+p)}{3}", r"\frac{1-p^{2}}{3}", T),
    ("expression", r"\frac{1-p}{3}", r"\frac{1-p^{2}}{3}", F),
    ("expression", r"\frac{\cos(2t)}{15}", r"\frac{\cos (2 t)}{15}", T),
    ("expression", r"\frac{1}{4}n^2+\frac14 n", r"\frac{1}{4} n(n+1)", T),
    ("expression", r"(2^n)(n-2)+1", r"(n-2) 2^{n}+1", T),
    ("expression", r"v_0 r_0^{1/2} (r+r_0)^{-3/2}", r"\frac{v_{0}}{r_{0}} \frac{1}{\left(1+r / r_{0}\right)^{3 / 2}}", T),
    ("expression", r"\frac{2\pi}{\omega}", r"\frac{2\pi}{\omega}", T),
    ("expression", r"\frac{\pi}{\omega}", r"\frac{2\pi}{\omega}", F),
    ("expression", r"\frac{1}{LCs^2+RCs+1}", r"\frac{1}{L C s^{2}+R C s+1}", T),
    ("expression", r"\frac{4A}{3+3i}e^{it}", r"\frac{4A}{3+3i}e^{it}", T),
    ("expression", r"\frac{2A(1-i)}{3}e^{it}", r"\frac{4A}{3+3i}e^{it}", T),

    # functions
    ("function", r"\frac{\cos x}{\sin x}", r"\cot x", T), ("function", r"\tan x", r"\cot x", F),
    ("function", r"\frac{1}{\tan x}", r"\cot x", T), ("function", r"\sin^2 x + \cos^2 x", "1", T),
    ("function", r"\log_2 8", "3", T),
    ("function", r"\frac{\ln 2}{\ln(2/3)}", r"\frac{\log 2}{\log 2-\log 3}", T),
    ("function", r"\log_{2/3} 2", r"\frac{\log 2}{\log 2-\log 3}", T),
    ("function", r"\frac{\log 3}{\log 2 - \log 3}", r"\frac{\log 2}{\log 2-\log 3}", F),
    ("function", r"\log_{10}\frac{1}{250}", r"-\log _{10} 250", T),
    ("function", r"\frac{(2n)!}{(n!)^2}", r"\binom{2n}{n}", T),
    ("function", r"\binom{2n}{n-1}", r"\binom{2n}{n}", F), ("function", r"\dbinom{10}{3}", "120", T),
    ("function", r"\tbinom{10}{3}", "120", T),
    ("function", "5!", "120", T), ("function", "6!", "120", F),
    ("function", r"\lfloor\log_2 n\rfloor+1", r"\left\lfloor\log _{2} n\right\rfloor+1", T),
    ("function", r"\lfloor\frac{n+1}{2}\rfloor+1", r"\lceil n / 2\rceil+1", T),
    ("function", r"\lfloor n/2 \rfloor+1", r"\lceil n / 2\rceil+1", F),
    ("function", r"\frac{d!}{2k(d-k)!}", r"\frac{d !}{2 k(d-k) !}", T),
    ("function", r"e^{-2t}/15", r"\frac{e^{-2t}}{15}", T),
    ("function", r"\arcsin\frac{10}{13}", r"\arcsin{\frac{1}{1.3}}, \arcsin{\frac{10}{13}}", T),
    ("function", r"\sin^{-1}(10/13)", r"\arcsin{\frac{1}{1.3}}, \arcsin{\frac{10}{13}}", T),
    ("function", r"\arccos(10/13)", r"\arcsin{\frac{1}{1.3}}, \arcsin{\frac{10}{13}}", F),
    ("function", r"\arcsin(1.3 \sin \theta_w)", r"\arcsin(1.3\sin(\theta_w)), \arcsin(1.3\sin\theta_w)", T),
    ("function", r"\left|-3\right|", "3", T), ("function", r"\sin\frac{\pi}{6}", r"\frac12", T),
    ("function", r"\cos\frac{\pi}{6}", r"\frac12", F),
    ("function", r"\tan\frac{\pi}{4}", "1", T), ("function", r"\ln 8", r"3\ln 2", T),
    ("function", r"\log_{3} 81", "4", T),
    ("function", r"\log 100", r"2\log 10", T), ("function", r"\sec^2 x - \tan^2 x", "1", T),
    ("function", r"2r_0\sqrt{\pi G\rho_0}", r"\sqrt{4 \pi G \rho_{0} r_{0}^{2}}", T),

    # lists and sets: unordered, with multiplicity; partial or extra answers are wrong
    ("set_list", "5, 3, 1", "1,3,5", T), ("set_list", r"\{1,3,5\}", "1,3,5", T), ("set_list", "1, 3", "1,3,5", F),
    ("set_list", "1,3,5,7", "1,3,5", F), ("set_list", "1, 3, 3, 5", "1,3,5", F),
    ("set_list", "x = 1, 3, 5", "1,3,5", T),
    ("set_list", r"x=1 \text{ or } x=3 \text{ or } x=5", "1,3,5", T), ("set_list", r"1, 3, \text{ and } 5", "1,3,5", T),
    ("set_list", r"1 \text{ and } 3 \text{ and } 5", "1,3,5", T), ("set_list", "1,-2", "-2,1", T),
    ("set_list", "-2", "-2,1", F),
    ("set_list", "2,-1", "-2,1", F), ("set_list", r"1+\sqrt{19}, 1-\sqrt{19}", r"1 \pm \sqrt{19}", T),
    ("set_list", r"1\pm\sqrt{19}", r"1 \pm \sqrt{19}", T), ("set_list", r"1+\sqrt{19}", r"1 \pm \sqrt{19}", F),
    ("set_list", r"-1 \pm \sqrt{19}", r"1 \pm \sqrt{19}", F), ("set_list", r"3 \pm \sqrt{8}", r"3 \pm 2 \sqrt{2}", T),
    ("set_list", r"\{-2, 1+\sqrt5, 1-\sqrt5\}", r"\{1\pm\sqrt{5},-2\}", T),
    ("set_list", r"1\pm\sqrt5", r"\{1\pm\sqrt{5},-2\}", F),
    ("set_list", "(4,5,7),(1,8,19),(2,7,13)", "(1,8,19), (2,7,13), (4,5,7)", T),
    ("set_list", "(1,8,19),(2,7,13)", "(1,8,19), (2,7,13), (4,5,7)", F),
    ("set_list", "(8,1,19),(2,7,13),(4,5,7)", "(1,8,19), (2,7,13), (4,5,7)", F),
    ("set_list", r"\{(1,1),(3,2)\}", "(1,1), (3,2)", T), ("set_list", "(3,2),(1,1)", "(1,1), (3,2)", T),
    ("set_list", "(1,1)", "(1,1), (3,2)", F), ("set_list", "69, 84", "69$,$84", T),
    ("set_list", r"84 \text{ and } 69", "69$,$84", T),
    ("set_list", "69", "69$,$84", F), ("set_list", r"\frac{32}{9}, \frac12", r"\frac{32}{9}$,$\frac{1}{2}", T),
    ("set_list", "f(x) = x, f(x) = -x", "f(x)=x,f(x)=-x", T), ("set_list", "f(x)=x", "f(x)=x,f(x)=-x", F),
    ("set_list", r"\{\}", r"\varnothing", T), ("set_list", r"\{0\}", r"\varnothing", F),
    ("set_list", "2, 2", "-2,-2", F),
    ("set_list", "a=-2, b=-2", "-2,-2", T), ("set_list", "T(10)=2, T(11)=4, T(12)=3", "2,4,3", T),
    ("set_list", "10^{100}, 10^{1/100}", "10^{100}$,$10^{1 / 100}", T),
    ("set_list", "10^{100}, 10^{1/10}", "10^{100}$,$10^{1 / 100}", F),
    ("set_list", r"\{-1, 0, 1\}", "-1,0,1", T), ("set_list", r"\{-1, 1\}", "-1,0,1", F),
    ("set_list", "8, 4", "8$,$4", T),
    ("set_list", r"2, -\log_{10} 250", r"2,-\log _{10} 250", T),
    ("set_list", r"\frac13, 1, 9", r"\frac{1}{3}, 1, 9", T),
    ("set_list", r"\frac13, 1, \frac19", r"\frac{1}{3}, 1, 9", F), ("set_list", r"\{3, 5, 7\}", "3, 5, 7", T),

    # tuples: ordered
    ("tuple", r"\left(3,\frac{\pi}{2}\right)", r"\left( 3, \frac{\pi}{2} \right)", T),
    ("tuple", r"(\frac{\pi}{2}, 3)", r"\left( 3, \frac{\pi}{2} \right)", F),
    ("tuple", r"(3, 90^\circ)", r"\left( 3, \frac{\pi}{2} \right)", T),
    ("tuple", "(6,-1)", "(-1,6)", F), ("tuple", "(-1, 6)", "(-1,6)", T), ("tuple", "x=-1, y=6", "(-1,6)", T),
    ("tuple", "(x,y)=(-1,6)", "(-1,6)", T), ("tuple", "[-1,6]", "(-1,6)", F),
    ("tuple", "(1,-16,-4,42)", "(1,-16,-4,43)", F),
    ("tuple", "(-16,1,-4,43)", "(1,-16,-4,43)", F), ("tuple", "(6, 31, -1)", "(6,31,-1)", T),
    ("tuple", "(1.5,-13)", r"\left( \frac{3}{2}, -13 \right)", T),
    ("tuple", r"(1+\sqrt2,2+\sqrt2)", r"\quad(2+\sqrt{2}, 1+\sqrt{2})", F),
    ("tuple", r"(2+\sqrt2, 1+\sqrt2)", r"\quad(2+\sqrt{2}, 1+\sqrt{2})", T),
    ("tuple", r"(4, \frac{\ln 2}{\ln 10})", r"(4, \log _{10} 2)", T), ("tuple", "(4,2)", "(2,4)", F),
    ("tuple", "(2,4)", "(2,4)", T),
    ("tuple", "(k,n)=(2,4)", "(2,4)", T), ("tuple", "(2,251,252)", "(2,251,252)", T),
    ("tuple", "(2,252,251)", "(2,251,252)", F),
    ("tuple", r"\left(-\frac12,\frac72\right)", r"(-\frac{1}{2}, \frac{7}{2})", T),
    ("tuple", "(-0.5, 3.5)", r"(-\frac{1}{2}, \frac{7}{2})", T),
    ("tuple", "(3.5, -0.5)", r"(-\frac{1}{2}, \frac{7}{2})", F), ("tuple", "(15,-29)", "(15,-29)", T),
    ("tuple", "(-15,29)", "(15,-29)", F),

    # intervals: end types matter
    ("interval", r"x \le 0", r"(-\infty, 0]", T), ("interval", r"(-\infty,0)", r"(-\infty, 0]", F),
    ("interval", r"[0,\infty)", r"(-\infty, 0]", F), ("interval", r"3 < x \le 4", "(3,4]", T),
    ("interval", "[3,4]", "(3,4]", F),
    ("interval", "(3,4)", "(3,4]", F), ("interval", r"(3,\infty)\cup(-\infty,2)", r"(-\infty, 2) \cup (3, \infty)", T),
    ("interval", r"x<2 \text{ or } x>3", r"(-\infty, 2) \cup (3, \infty)", T),
    ("interval", r"(-\infty,2]\cup[3,\infty)", r"(-\infty, 2) \cup (3, \infty)", F),
    ("interval", "(2,3)", r"(-\infty, 2) \cup (3, \infty)", F), ("interval", "(0,36)", r"(0,9) \cup (9,36)", F),
    ("interval", "(0,9)\\cup(9,36)", r"(0,9) \cup (9,36)", T), ("interval", "[0.5,8]", r"[\frac{1}{2}, 8]", T),
    ("interval", r"\frac12 \le x \le 8", r"[\frac{1}{2}, 8]", T), ("interval", r"(\frac12,8)", r"[\frac{1}{2}, 8]", F),
    ("interval", r"-\sqrt3<x<\sqrt3", r"(-\sqrt{3}, \sqrt{3})", T),
    ("interval", r"[-\sqrt3,\sqrt3]", r"(-\sqrt{3}, \sqrt{3})", F),
    ("interval", "x>2", r"(2,\infty)", T), ("interval", r"[2,\infty)", r"(2,\infty)", F),
    ("interval", r"(-\infty,0)\cup\{1\}", r"$(-\infty, 0) \cup\{1\}$.", T),
    ("interval", r"(-\infty,0)", r"$(-\infty, 0) \cup\{1\}$.", F),
    ("interval", r"(-\infty,1]", r"$(-\infty, 0) \cup\{1\}$.", F), ("interval", "(0,4]", "t(0,4]", T),
    ("interval", r"0<t\le4", "t(0,4]", T),
    ("interval", "(0,4)", "t(0,4]", F), ("interval", "[-2,7]", r"x \in [-2,7]", T),
    ("interval", r"-2\le x\le 7", r"x \in [-2,7]", T),
    ("interval", "(-2,7)", r"x \in [-2,7]", F),
    ("interval", r"(0.6,\frac83]", r"\left(\frac{3}{5},\frac{8}{3}\right]", T),
    ("interval", "x<-5", r"(-\infty,-5)", T), ("interval", "x>-5", r"(-\infty,-5)", F),
    ("interval", r"(-\sqrt{11},-2)", r"(-\sqrt{11},-2)\cup (\sqrt{11},9)", F),
    ("interval", r"[1,2)\cup[2,3]", "[1,3]", T),
    ("interval", r"[1,2)\cup(2,3]", "[1,3]", F), ("interval", r"x \ne 1", r"(-\infty,1)\cup(1,\infty)", T),
    ("interval", r"\left[\frac{\pi^2}{8},\frac{5\pi^2}{4}\right]", r"\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]", T),
    ("interval", r"\left(\frac{\pi^2}{8},\frac{5\pi^2}{4}\right]", r"\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]", F),

    # equations: `x = 5` states 5; two equations are equal if one is a nonzero multiple of the other
    ("equation", "5", "x=5", T), ("equation", "x = 5", "5", T), ("equation", "-5", "x=5", F),
    ("equation", "y=5", "x=5", F),
    ("equation", "-2x", "y = -2x", T), ("equation", "2x+y=0", "y = -2x", T), ("equation", "y=2x", "y = -2x", F),
    ("equation", "2x - y + 3 = 0", "y = 2x + 3", T), ("equation", "y - 3 = 2x", "y = 2x + 3", T),
    ("equation", "y=3x+2", "y = 2x + 3", F),
    ("equation", "-5x+7y-11z-4=0", "5x - 7y + 11z + 4 = 0", T),
    ("equation", "10x-14y+22z+8=0", "5x - 7y + 11z + 4 = 0", T),
    ("equation", "5x-7y+11z=-4", "5x - 7y + 11z + 4 = 0", T), ("equation", "5x-7y+11z-4=0", "5x - 7y + 11z + 4 = 0", F),
    ("equation", "5x-7y+11z+4", "5x - 7y + 11z + 4 = 0", F), ("equation", "2x", "f(x)=2 x", T),
    ("equation", "f(x)=x", "f(x)=2x", F),
    ("equation", "1", "k=1", T), ("equation", "k=2", "k=1", F), ("equation", "2^{N-2}+1", "M=2^{N-2}+1", T),
    ("equation", "n^2-n-1", r"m_{\max }=n^{2}-n-1", T),
    ("equation", r"m_{\max} = n^2 - n - 1", r"m_{\max }=n^{2}-n-1", T),
    ("equation", "y' = r x(t) - r y", r"y^{\prime}+ry-rx(t)=0", T),
    ("equation", "y' = r y - r x(t)", r"y^{\prime}+ry-rx(t)=0", F),
    ("equation", "LRAC=SRAC", "SRAC=LRAC", T), ("equation", "MR=SRAC", "MR=SRMC", F),
    ("equation", "X_d = 125 - 1.25P", "X_{d}=125-1.25 P", T),
    ("equation", r"X_d=125-\frac{5}{4}P", "X_{d}=125-1.25 P", T), ("equation", "X_d=125-1.5P", "X_{d}=125-1.25 P", F),
    ("equation", r"x = \frac{e^t}{3}+ce^{-2t}", r"x = \frac{e^{t}}{3} + ce^{-2t}, \frac{e^{t}}{3} + c e^{-2t}", T),
    ("equation", r"y = cx^{-2} - \frac{\cos 2x}{2x^2}", r"cx^{-2} - \frac{\cos(2x)}{2x^2}, y=cx^{-2}-\frac{\cos(2x)}{2x^{2}}", T),
    ("equation", r"m\frac{dv}{dt} = f - bv", r"m \frac{d v}{d t}+b v=f, m \frac{d v}{d t}+b v=f", T),
    ("equation", r"x=\frac{\pi}{6}+k\pi, \frac{\pi}{3}+k\pi, \frac{2\pi}{3}+k\pi, \frac{5\pi}{6}+k\pi",
     r"x=\frac{1}{6} \pi+\pi k, \frac{1}{3} \pi+\pi k, \frac{2}{3} \pi+\pi k, \frac{5}{6} \pi+\pi k", T),
    ("equation", r"\frac{x^2-3x+2}{6}", r"p(x)=\frac{(x-1)(x-2)}{6}", T),
    ("equation", r"\frac{x^2-3x+2}{3}", r"p(x)=\frac{(x-1)(x-2)}{6}", F),
    ("equation", r"\frac{14}{3} \approx 4.67", r"\frac{14}{3}", T), ("equation", "d = 7", "7", T),
    ("equation", r"f(n)=n, g(n)=1", "f(n)=n$, $g(n)=1", T),
    ("equation", r"a = 2, a = -6-4\sqrt2", r"a=2$, $a=-6-4 \sqrt{2}", T),
    ("equation", r"a = 2", r"a=2$, $a=-6-4 \sqrt{2}", F), ("equation", "y=-2x+3", "y = -2x + 3", T),
    ("equation", "2x+y-3=0", "y = -2x + 3", T),

    # inequalities
    ("inequality", r"k \ge 2", r"k \geqslant 2", T), ("inequality", r"k\geq 2", r"k \geqslant 2", T),
    ("inequality", r"2 \le k", r"k \geqslant 2", T),
    ("inequality", r"k \le 2", r"k \geqslant 2", F), ("inequality", "k>2", r"k \geqslant 2", F),
    ("inequality", "3 > x", "x<3", T),
    ("inequality", r"x \lt 3", "x<3", T), ("inequality", r"x \le 3", "x<3", F),
    ("inequality", r"a \ge b", r"b \le a", T),
    ("inequality", r"a - b \ge 0", r"a \geq b", T), ("inequality", r"a \le b", r"a\ge b", F),
    ("inequality", r"[2, \infty)", r"k \geqslant 2", T),
    ("inequality", r"x \geq -1", r"x \ge -1", T), ("inequality", r"x > -1", r"x \ge -1", F),
    ("inequality", r"-1 \le x", r"x \ge -1", T),

    # matrices and vectors
    ("matrix", r"\begin{bmatrix} -1 & 0 \\ 0 & -1 \end{bmatrix}", r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", T),
    ("matrix", r"\begin{pmatrix} 1 & 0 \\ 0 & -1 \end{pmatrix}", r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", F),
    ("matrix", r"\begin{pmatrix} 0 & -1 \\ -1 & 0 \end{pmatrix}", r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", F),
    ("matrix", r"\begin{pmatrix} -\frac13 \\ \frac23 \\ \frac53 \end{pmatrix}", r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}", T),
    ("matrix", r"(-\frac13,\frac23,\frac53)", r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}", T),
    ("matrix", r"\begin{pmatrix} \frac13 \\ \frac23 \\ \frac53 \end{pmatrix}", r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}", F),
    ("matrix", r"\begin{pmatrix} -18 \\ -49 \\ 96 \end{pmatrix}", r"\begin{pmatrix} -18 \\ -49 \\ 96 \end{pmatrix}", T),
    ("matrix", r"\begin{pmatrix} -18 \\ 96 \\ -49 \end{pmatrix}", r"\begin{pmatrix} -18 \\ -49 \\ 96 \end{pmatrix}", F),
    ("matrix", r"\begin{pmatrix} \frac{16}{49} \\ \frac{48}{49} \\ \frac{24}{49} \end{pmatrix}", r"\begin{pmatrix} 16/49 \\ 48/49 \\ 24/49 \end{pmatrix}", T),
    ("matrix", r"\begin{pmatrix}-18/5\\1/5\end{pmatrix}", r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}", F),
    ("matrix", r"\begin{pmatrix}0.2\\-3.6\end{pmatrix}", r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}", T),
    ("matrix", r"\begin{pmatrix} -2 \\ -14 \\ -7 \end{pmatrix}", r"\begin{pmatrix} -2 \\ -14 \\ -7 \end{pmatrix}", T),
    ("matrix", r"\begin{pmatrix} 2 \\ 14 \\ 7 \end{pmatrix}", r"\begin{pmatrix} -2 \\ -14 \\ -7 \end{pmatrix}", F),
    # a scalar factored out, a sum or a product left unevaluated: the same matrix
    ("matrix", r"\frac{1}{3}\begin{pmatrix} -1 \\ 2 \\ 5 \end{pmatrix}", r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}", T),
    ("matrix", r"-\frac{1}{3}\begin{pmatrix} -1 \\ 2 \\ 5 \end{pmatrix}", r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}", F),
    ("matrix", r"\begin{pmatrix} 2 \\ 28 \\ 14 \end{pmatrix} / (-2)", r"\begin{pmatrix} -1 \\ -14 \\ -7 \end{pmatrix}", T),
    ("matrix", r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix} + \begin{pmatrix} 5 & 6 \\ 7 & 8 \end{pmatrix}",
     r"\begin{pmatrix} 6 & 8 \\ 10 & 12 \end{pmatrix}", T),
    ("matrix", r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix} \begin{pmatrix} 0 & 1 \\ 1 & 0 \end{pmatrix}",
     r"\begin{pmatrix} 2 & 1 \\ 4 & 3 \end{pmatrix}", T),
    ("matrix", r"\begin{pmatrix} 0 & 1 \\ 1 & 0 \end{pmatrix} \begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}",
     r"\begin{pmatrix} 2 & 1 \\ 4 & 3 \end{pmatrix}", F),
    ("matrix", r"\begin{pmatrix} 2 \\ 4 \end{pmatrix} + 1", r"\begin{pmatrix} 3 \\ 5 \end{pmatrix}", F),

    # multiple choice
    ("choice", "C", r"\text{(C)}", T), ("choice", "(C)", r"\text{(C)}", T),
    ("choice", r"\text{(C) Plane}", r"\text{(C)}", T),
    ("choice", r"\textbf{(C)}", r"\text{(C)}", T), ("choice", "(D)", r"\text{(C)}", F),
    ("choice", r"\text{(B)}", r"\text{(C)}", F),
    ("choice", "B", r"\text{(B)}", T), ("choice", "E", r"\text{(E)}", T), ("choice", "(E) 12", r"\text{(E)}", T),
    ("choice", r"\mathrm{(B)}", "(B)", T), ("choice", "A", r"\text{(E)}", F), ("choice", r"\text{C}", "C", T),

    # plain text
    ("text", "Evelyn", r"\text{Evelyn}", T), ("text", r"\text{evelyn}", r"\text{Evelyn}", T),
    ("text", r"\text{Navin}", r"\text{Evelyn}", F),
    ("text", "East", r"\text{east}", T), ("text", r"\text{west}", r"\text{east}", F),
    ("text", r"\text{ellipse}", r"\text{ellipse}", T),
    ("text", r"\text{parabola}", r"\text{ellipse}", F), ("text", r"\text{even}", r"\text{even}", T),
    ("text", r"\text{odd}", r"\text{even}", F),
    ("text", "m", "m", T), ("text", "n", "m", F), ("text", r"\alpha", r"\alpha", T), ("text", r"\beta", r"\alpha", F),
    ("text", r"\text{Navin}", r"\text{Navin}", T), ("text", r"\textbf{Navin}", r"\text{Navin}", T),

    # base-b numerals: the digits are the answer
    ("base", "204_{5}", "204_5", T), ("base", "204", "204_5", T), ("base", "54", "204_5", F),
    ("base", "203_5", "204_5", F),
    ("base", "2516", "2516_8", T), ("base", "2516_9", "2516_8", F), ("base", "4210_5", "4210_{5}", T),
    ("base", "4201_5", "4210_{5}", F),
    ("base", "52_8", "52_8", T), ("base", "25_8", "52_8", F), ("base", "4343_{6}", "4343_6", T),
    ("base", "40_{9}", "40_9", T),

    # units are not part of the value
    ("units", "15", r"15\mbox{ cm}^2", T), ("units", r"15 \text{ cm}^2", r"15\mbox{ cm}^2", T),
    ("units", r"15\,\text{cm}^2", r"15\mbox{ cm}^2", T),
    ("units", "16", r"15\mbox{ cm}^2", F), ("units", r"864 \text{ square inches}", r"864 \mbox{ inches}^2", T),
    ("units", r"5.4 \text{ cents}", r"5.4 \text{ cents}", T), ("units", "5.4", r"5.4 \text{ cents}", T),
    ("units", "1950", r"1950^\circ C", T),
    ("units", r"1950^\circ \mathrm{C}", r"1950^\circ C", T), ("units", "1905", r"1950^\circ C", F),
    ("units", r"4.4677 \times 10^{14}", r"4.4677 \times 10^{14} Hz, 4.4677 \times 10^{14}", T),
    ("units", r"4.4677 \times 10^{14}\text{ Hz}", r"4.4677 \times 10^{14} Hz, 4.4677 \times 10^{14}", T),
    ("units", "15000", r"15000 \text{ kcal m}^{-2} \text{yr}^{-1}, 15000", T),
    ("units", r"6.43 \times 10^{16} \text{ cm}^{-3}", r"6.43 \times 10^{16}, 6.43 \times 10^{16} \text{ cm}^{-3}", T),
    ("units", r"9.6 \text{ \AA}", "9.6", T), ("units", r"9.6\,\mathrm{\AA}", "9.6", T),
    ("units", "9.6 \u00c5", "9.6", T),
    ("units", "0.003''", r"0.003^{\prime \prime}", T), ("units", "0.003", r"0.003^{\prime \prime}", T),
    ("units", "0.03", r"0.003^{\prime \prime}", F),
    ("units", r"\frac{600}{7}\text{ km/h}", r"\frac{600}{7}", T), ("units", r"45 \text{ minutes}", "45", T),
    ("units", r"7 \times 10^{37} \mathrm{erg\,s^{-1}}", r"7 \times 10^{37}", T), ("units", r"8 \text{ min}", "8", T),
    ("units", r"1.2 \mu m", "1.2", T), ("units", "100 cm", "100", T), ("units", r"166\text{ cm}^2", "166", T),

    # degrees: 30 degrees is 30 and is pi/6
    ("degree", "30", r"30^\circ", T), ("degree", "30\u00b0", r"30^\circ", T), ("degree", "30 degrees", r"30^\circ", T),
    ("degree", r"\frac{\pi}{6}", r"30^\circ", T), ("degree", r"60^\circ", r"30^\circ", F),
    ("degree", r"-30^\circ", r"-\frac{\pi}{6}", T),
    ("degree", r"\frac{\pi}{6}", r"-\frac{\pi}{6}", F), ("degree", "41.8", r"41.8^\circ, 41.8^{\circ}", T),
    ("degree", r"\frac{270}{7}", r"\frac{270}7\text{ degrees}", T),
    ("degree", r"\frac{270}{7}^\circ", r"\frac{270}7\text{ degrees}", T),
    ("degree", r"90^\circ, 60^\circ", r"90^{\circ}$,$60^{\circ}", T), ("degree", "18.8", r"18.8^{\circ}", T),
    ("degree", r"106^{\circ}", r"106^\circ", T),
    ("degree", r"\frac{\pi}{2}", r"90^\circ", T), ("degree", "180", r"90^\circ", F),

    # percent: the same number with or without the sign, or the fraction it stands for
    ("percent", r"62.5\%", "62.5%", T), ("percent", "62.5", "62.5%", T), ("percent", "0.625", "62.5%", T),
    ("percent", r"\frac58", "62.5%", T), ("percent", "62", "62.5%", F), ("percent", r"6.25\%", "62.5%", F),
    ("percent", r"8\%", r"8 \%", T), ("percent", "8", r"8 \%", T), ("percent", "0.08", r"8 \%", T),
    ("percent", r"80\%", r"8 \%", F),
    ("percent", r"4.2\%", "4.2", T), ("percent", r"17.5\%", "17.5%", T), ("percent", r"50\%", r"\frac12", T),
    ("percent", "62.5 percent", "62.5%", T),
    ("percent", r"0.08\%", r"8 \%", F),

    # answers as reasoning models write them
    ("format", r"9.6\ \text{\AA}", "9.6", T),
    ("format", r"1.07 \times 10^{16}\ \text{cm}^{-3}", r"1.07 \times 10^{16}", T),
    ("format", r"4.5 \times 10^{33} \text{ erg/s}", "4.5e33", T),
    ("format", r"\lambda \approx 9.6 \text{ \AA}", "9.6", T),
    ("format", r"T = 1.2 \times 10^{5}\,\text{K}", r"1.2 \times 10^5", T),
    ("format", r"1.2\times10^{5}\ \mathrm{K}", r"1.2 \times 10^5", T),
    ("format", r"\text{(C)}\ \frac{1}{2}", r"\text{(C)}", T), ("format", r"\text{Answer: } 5", "5", T),
    ("format", r"5\text{ (km)}", "5", T),
    ("format", r"\$32,348", r"\$32,\!348", T), ("format", r"1\,000\,000", "1000000", T),
    ("format", r"\frac{3}{2}\text{ hours}", r"\frac32", T),
    ("format", r"x = 2 \text{ or } x = 3", "2, 3", T), ("format", r"x = 2 \text{ or } x = 3", "2", F),
    ("format", r"3\text{ m/s}", "3", T),
    ("format", r"5.0 \times 10^{-3} \text{ M}", r"5 \times 10^{-3}", T), ("format", "k = 3", "3", T),
    ("format", r"\mathbf{(B)}", r"\text{(B)}", T),
    ("format", r"\textbf{(B) } 12", r"\text{(B)}", T), ("format", r"\frac{1}{4}\pi r^2", r"\frac{\pi r^2}{4}", T),
    ("format", r"A = \frac{\sqrt{3}}{4}s^2", r"\frac{\sqrt3 s^2}{4}", T),
    ("format", r"\theta = 30^{\circ}", r"30^\circ", T),
    ("format", r"x \in \{1, 2\}", "1,2", T), ("format", r"\left\{ -1, 1 \right\}", "-1, 1", T),
    ("format", r"\pm 1", "-1, 1", T),
    ("format", r"x = \pm 1", "-1,1", T),
    ("format", r"\pm\frac{\sqrt{2}}{2}", r"\frac{\sqrt2}{2}, -\frac{\sqrt2}{2}", T),
    ("format", r"\sqrt{3}/2", r"\frac{\sqrt3}{2}", T), ("format", r"\sqrt[4]{16}", "2", T),
    ("format", r"\frac{\pi}{4}\text{ radians}", r"\frac{\pi}{4}", T),
    ("format", r"\angle ABC = 45^\circ", "45", T), ("format", r"AB = 5", "5", T),
    ("format", "7:32", r"S_{MBCN}:S = 7:32", T), ("format", "|AB| = 1", "1", T),
    ("format", r"\frac{1}{\sqrt{6}}", r"\frac{NO}{BO} = \frac{1}{\sqrt{6}}", T),
    ("format", "2", "AP:PB = 1", F), ("format", "5", r"\frac{1}{x} = 5", F), ("format", "5", "x^2 = 5", F),
    ("format", r"P(A) = \frac{1}{3}", r"\frac13", T),
    ("format", r"f(2) = 5", "5", T), ("format", r"a_{10} = 512", "512", T),
    ("format", r"\text{The answer is } 42", "42", T),
    ("format", r"{\bf 42}", "42", T), ("format", r"\displaystyle \frac{1}{2}", r"\frac12", T),
    ("format", r"\left(\frac{1}{2}\right)^{2}", r"\frac14", T),
    ("format", r"e^{i\pi}", "-1", T), ("format", r"x + 2y = 6", r"y = -\frac12 x + 3", T),
    ("format", r"x + 2y = 3", r"y = -\frac12 x + 3", F),
    ("format", r"\left(\begin{array}{c} 1 \\ 2 \end{array}\right)", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", T),
    ("format", r"x < -3 \quad \text{or} \quad x > 2", r"(-\infty,-3)\cup(2,\infty)", T),
    ("format", r"(-\infty, -3) \text{ U } (2, \infty)", r"(-\infty,-3)\cup(2,\infty)", T),
    ("format", r"1 \leq x < 5", "[1,5)", T),
    ("format", r"(-\infty,\infty)", r"\mathbb{R}", T), ("format", r"12 \text{ percent}", r"12\%", T),
    ("format", "3:2", r"\frac32", T),
    ("format", r"{8 \choose 3}", "56", T), ("format", r"8!/(3!5!)", "56", T), ("format", r"\frac{8!}{3!\,5!}", "56", T),
    ("format", r"\phi", r"\varphi", T), ("format", r"3-4\mathrm{i}", "3-4i", T),
    ("format", r"5\sqrt{2}\text{ cm}", r"5\sqrt2", T),
    ("format", r"12\,\mathrm{cm}^{2}", "12", T), ("format", r"\SI{12}{cm}", "12", T),
    ("format", r"\text{5 meters}", "5", T),
    ("format", r"\text{6 meters}", "5", F), ("format", "x²+1", "x^2+1", T), ("format", r"(204)_5", "204_5", T),
    ("format", r"3{,}5", "3.5", T),
    ("format", r"\dfrac{14}{3}\approx 4.67", r"\frac{14}{3}", T),
    ("format", r"\frac{7}{3} \approx 2.33", r"\frac{14}{3}", F),

    # the response around the answer
    ("extraction", None, "5", F, "The answer is 5."),
    ("extraction", "5", "5", T, "<think>\nTry \\boxed{3}? No.\n</think>\nSo the answer is $\\boxed{5}$."),
    ("extraction", "5", "3", F, "<think>\nTry \\boxed{3}? No.\n</think>\nSo the answer is $\\boxed{5}$."),
    ("extraction", "7", "7", T, "<think>\nSo it is \\boxed{7}.\n</think>\nThe answer is seven."),
    ("extraction", "3", "3", T, "First guess \\boxed{2}. Wait, that double counts.\n\nFinal: \\boxed{3}"),
    ("extraction", "3", "2", F, "First guess \\boxed{2}. Wait, that double counts.\n\nFinal: \\boxed{3}"),
    ("extraction", r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt2}{2}", T, "Thus $\\boxed{\\frac{1}{\\sqrt{2}}}$."),
    ("extraction", "12", "12", T, "The total is \\boxed {12}."),
    ("extraction", "12", "12", T, "The total is \\fbox{12}."),
    ("extraction", "2, 3", "2, 3", T, "The roots are $\\boxed{2}$ and $\\boxed{3}$."),
    ("extraction", "3", "2, 3", F, "One root is \\boxed{2}. The other root we need is \\boxed{3}."),
    ("extraction", "5", "5", T, "Answer: \\boxed{5}. Extra check: \\boxed{6"),
    ("extraction", "", "5", F, "Answer: \\boxed{}"),
    ("extraction", r"\text{(C)}", r"\text{(C)}", T, "Therefore, the final answer is: $\\boxed{\\text{(C)}}$. I hope it is correct."),
    ("extraction", r"\{1,2\}", "1,2", T, "The set is $\\boxed{\\{1,2\\}}$."),
    ("extraction", "8", "8", T, "Hence $\\boxed{\\boxed{8}}$."),
    ("extraction", "8", "8", T, "</think>\n\nTherefore, the final answer is: $\\boxed{8}$. I hope it is correct."),
    ("extraction", None, "8", F, "<think>\nThe answer should be 8.\n</think>\nTherefore, the final answer is: 8. I hope it is correct."),
    ("extraction", r"x = \frac{1}{2}", r"\frac12", T, "Solving, we get $$\\boxed{x = \\frac{1}{2}}$$"),
    ("extraction", "42", "42", T, "A" * 20_000 + " so the answer is \\boxed{42}."),

    # model output is data: nothing in it is ever executed, and none of it is a correct answer
    ("injection", "__import__('os').system('touch MARKER')", "0", F),
    ("injection", "exec(\"open('MARKER', 'w').write('x')\")", "0", F),
    ("injection", "eval(\"__import__('os').system('touch MARKER')\")", "0", F),
    ("injection", "sympify(\"__import__('os').system('touch MARKER')\")", "0", F),
    ("injection", "().__class__.__bases__[0].__subclasses__()", "0", F),
    ("injection", "[c for c in ().__class__.__base__.__subclasses__()]", "0", F),
    ("injection", "__builtins__.__dict__['__import__']('os').system('touch MARKER')", "0", F),
    ("injection", r"\input{/etc/passwd}", "0", F),
    ("injection", "lambda: __import__('subprocess').run(['touch', 'MARKER'])", "0", F),
    ("injection", "Symbol('x').__reduce__()", "0", F),
    ("injection", "x=__import__('os').system('touch MARKER')", "0", F),
    ("injection", "open('MARKER','w')", "0", F),

    # inputs built to exhaust a grader: refused by the size limits, quickly
    ("adversarial", r"10^{10^{10^{10}}}", "5", F), ("adversarial", "9^{9^{9^{9}}}", "1", F),
    ("adversarial", "9**9**9**9", "1", F),
    ("adversarial", r"(10^{10})!", "1", F), ("adversarial", "100000!", "1", F),
    ("adversarial", r"\binom{10^{9}}{5\cdot 10^{8}}", "1", F),
    ("adversarial", "2^{2^{100}}", "2", F), ("adversarial", "x^{10^{100}}", "x", F),
    ("adversarial", r"\sqrt{10^{5000}+1}", "1", F),
    ("adversarial", r"e^{e^{e^{e^{10}}}}", "1", F), ("adversarial", r"(1+x)^{10^{6}} - (1+x)^{10^{6}} + 1", "2", F),
    ("adversarial", "1e999999999", "1", F), ("adversarial", "(3/2)^{10^{9}}", "1", F),
    ("adversarial", r"\sqrt{2}^{10^{9}}", "1", F),
    ("adversarial", "1" * 5000, "1", F),
]


# Cases verify.py gets wrong, kept so the bench counts them and a fix is noticed (the tests expect them
# to fail): (category, answer, gold, expected, why).
KNOWN_MISSES = [
    ("decimal", "0.3562", ".35625", F, "a decimal gold may be exact (MATH) or rounded (Minerva); the rounding rule assumes rounded"),
    ("equation", r"y = \frac{\sqrt{x}}{2}", r"\frac{1}{2},\sqrt{x}", T, "the gold itself is mangled into a list"),
    ("function", r"\sqrt{x^2}", "x", F, "symbols are sampled as positive reals (lengths, masses, counts)"),
    ("interval", "|x| > 2", r"(-\infty,-2)\cup(2,\infty)", T, "inequalities are turned into sets only for a lone variable"),
    ("expression", r"\frac{\cos(2t)}{15}", r"\frac{\cos (2 t)}{15}, \frac{\cos (2 t)}{15}+C_{1} e^{t}+C_{2} e^{-t}+C_{3} \cos (t)+C_{4} \sin (t)",
     T, "Minerva lists two accepted answers that are not equal; read as a two-item list"),
]


# ---------------------------------------------------------------------------------------------------
# Generated cases from the benchmark golds


def first_digit_changed(gold: str) -> str | None:
    """Change the first digit that is not inside \\text{} or a command name: 9.6 -> 0.6, (2,4) -> (3,4)."""
    skip = [(m.start(), m.end()) for m in re.finditer(r"\\text\{[^{}]*\}|\\[A-Za-z]+", gold)]
    for i, c in enumerate(gold):
        if c.isdigit() and not any(a <= i < b for a, b in skip):
            return gold[:i] + str((int(c) + 1) % 10) + gold[i + 1:]
    return None


def plain(gold: str) -> str:
    """The gold as a model would typeset it: \\dfrac, a space after commas, OlympiadBench's `$,$` removed."""
    s = gold.strip().strip("$").replace("$,$", ", ").replace("$, $", ", ")
    return s.replace(r"\frac", r"\dfrac")


def rewrite(gold: str, k: int) -> str:
    """One meaning-preserving rewrite of a gold, varied with k."""
    s = gold.strip()
    if re.fullmatch(r"-?\d+", s):
        n = int(s)
        options = [str(n), f"{n}.0", f"x = {n}", f"{n} \\text{{ units}}"]
        if abs(n) >= 1000:
            options.append(f"{n:,}")
        if 0 <= n < 100:
            options.append(f"{n:03d}")
        return options[k % len(options)]
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", s)
    if m:
        sign, a, b = m.group(1), int(m.group(2)), int(m.group(3))
        value = Fraction(a, b)
        den = value.denominator
        while den % 2 == 0:
            den //= 2
        while den % 5 == 0:
            den //= 5
        options = [f"{sign}{a}/{b}", f"{sign}\\dfrac{{{2 * a}}}{{{2 * b}}}"]
        if den == 1:
            options.append(sign + format_decimal(value))
        return options[k % len(options)]
    m = re.fullmatch(r"(-?)(\d*\.\d+)", s)
    if m:
        value = Fraction(m.group(2))
        options = [f"{m.group(1)}\\frac{{{value.numerator}}}{{{value.denominator}}}", s + "0"]
        return options[k % len(options)]
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?) \\times 10\^\{?(-?\d+)\}?", s)
    if m:
        return f"{m.group(1)}e{m.group(2)}" if k % 2 else f"{m.group(1)} \\cdot 10^{{{m.group(2)}}}"
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?)e(-?\d+)", s)
    if m:
        return f"{m.group(1)} \\times 10^{{{m.group(2)}}}"
    if s.startswith(r"\text{") and s.endswith("}") and "(" not in s:
        return s[6:-1]
    return plain(gold)


def format_decimal(value: Fraction) -> str:
    whole, frac = divmod(value.numerator, value.denominator)
    if frac == 0:
        return str(whole)
    digits = ""
    while frac:
        frac *= 10
        digits += str(frac // value.denominator)
        frac %= value.denominator
    return f"{whole}.{digits}"


def near_miss(gold: str, k: int) -> str | None:
    """A wrong answer close to the gold."""
    s = gold.strip()
    m = re.fullmatch(r"\\text\{\(([A-E])\)\}", s)
    if m:
        return f"\\text{{({'ABCDE'[('ABCDE'.index(m.group(1)) + 1) % 5]})}}"
    pair = re.fullmatch(r"\((-?\d+),\s*(-?\d+)\)", s)
    if pair and pair.group(1) != pair.group(2) and k % 2:
        return f"({pair.group(2)}, {pair.group(1)})"
    interval = re.fullmatch(r"(\\left)?([(\[])(.*)([)\]])", s)
    if interval and interval.group(2) + interval.group(4) in ("(]", "[)") and "infty" not in s and k % 2:
        flipped = "[" if interval.group(2) == "(" else "("
        return (interval.group(1) or "") + flipped + interval.group(3) + interval.group(4)
    changed = first_digit_changed(s)
    if changed is not None:
        return plain(changed)
    if "=" in s:
        return s.replace("=", "=2", 1)
    if " - " in s:
        return s.replace(" - ", " + ", 1)
    if s.startswith(r"\text{"):
        return None
    return f"2\\left({s}\\right)"


def generated() -> list[dict]:
    cases = []
    for bench in BENCHMARKS:
        seen = set()
        for k, line in enumerate((ROOT / "benchmarks" / f"{bench}.jsonl").read_text().splitlines()):
            row = json.loads(line)
            gold = row["answer"]
            if gold in seen:
                continue
            seen.add(gold)
            good, bad = rewrite(gold, k), near_miss(gold, k)
            cases.append(case(f"bench:{bench}", good, gold, True))
            if bad is not None:
                cases.append(case(f"bench:{bench}", bad, gold, False))
            items = [x for x in re.split(r"\$?,\s*\$?", gold.strip("$"))]
            if row.get("multiple_answers") and len(items) > 1 and len(set(items)) == len(items) and "(" not in gold:
                cases.append(case(f"bench:{bench}", ", ".join(items[1:]), gold, False))  # partial answer
                if "all" in row["problem"].lower():
                    cases.append(case(f"bench:{bench}", ", ".join(reversed(items)), gold, True))  # order is free
    return cases


def case(category: str, answer: str | None, gold: str, expected: bool, response: str | None = None) -> dict:
    return {"category": category, "response": respond(answer) if response is None else response,
            "answer": answer, "gold": gold, "expected": expected}


def main() -> None:
    rows = [case(*c) for c in HAND]
    rows += [dict(case(*c[:4]), known_miss=c[4]) for c in KNOWN_MISSES]
    rows += generated()
    with OUT.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    hand = sum(1 for r in rows if not r["category"].startswith("bench:"))
    print(f"wrote {len(rows)} cases ({hand} hand-written, {len(rows) - hand} generated) to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
