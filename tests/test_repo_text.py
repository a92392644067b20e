"""The repository speaks of the project only: no tracked text file (outside the raw results,
bench/results/*.json) describes the environment the project was developed in (particular
machines lent or borrowed, files carried to them, the tool and output folder of remote runs,
per-run time budgets). A user reads instructions for what they do on their own machine.

The vocabulary is a short list of patterns. Words that have an ordinary sense as well are
matched only in that environment's sense (``carry`` next to wheels, files or a limit; a
*time* budget), and ALLOWED masks ordinary prose first, so the method's own words ("memory
budget", "bits/param budget") and plain English stay allowed."""
from __future__ import annotations

import codecs
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELF = os.path.relpath(os.path.abspath(__file__), ROOT)
# The remote run's output folder variable, assembled so this file does not spell it.
OUT_VAR = "$" + "".join(("O", "U", "T"))


def _rot13(text: str) -> str:
    """The examples of the vocabulary below are stored ROT13-encoded, so that this file does
    not itself spell what it forbids elsewhere."""
    return codecs.decode(text, "rot13")


# (pattern, what it describes); matched case-insensitively, line by line.
VOCABULARY = [
    (r"\blent\b|\bborrow(?:ed|ing)?\b", "a lent or borrowed machine"),
    (r"\bsessions?\b", "a development session"),
    (r"\blease[sd]?\b", "a machine lease"),
    (r"\bcarr(?:y|ied|ies|ying)\b(?=[^.\n]{0,40}(?:\bwheels?\b|\blimit\b|\bfolders?\b"
     r"|\bfiles?\b|dist/|\.whl|\bto (?:a|the) (?:GPU|device|machine)))|\bcarry:\s*\[",
     "files carried to a machine"),
    (r"(?-i:\$" + OUT_VAR[1:] + r")\b|\bgpu-out\b", "the output folder of a remote run"),
    (r"\b(?:run|device)`? tool\b", "the tool that runs commands on a machine"),
    (r"\b" + _rot13("tch_frffvba") + r"\b", "the old validation script"),
    (r"\b(?:the|our|this|that) (?:(?:lent|borrowed|GPU-less|GPU|H100|H200|device|CI-like) )+"
     r"(?:machine|box)\b", "one particular machine"),
    (r"\b(?:time|run|call|device|GPU|session) budget\b|\bbudget(?:ed)? to (?:stay|fit)\b"
     r"|\bbudget_(?:s|left)\b|_" + "BUDGET" + r"_S\b"
     r"|\b(?:minutes|seconds|hours) of device time\b",
     "a per-run time budget"),
    (r"(?:^|[\s(\"'`])(?:\.\./)*\.library/", "a folder outside the repository"),
]
# Ordinary prose that contains a word above, masked before matching.
ALLOWED = [
    r"\bmemory budget\b",
    r"\bbits/param budget\b",
    r"\bcarr(?:y|ies|ied) over\b",        # "the factors carry over unchanged"
    r"\b\w+\.(?:Inference)?Session\b",   # library classes (requests.Session, ...)
    r"\bper (?:test )?session\b|\bscope=[\"']session[\"']|\bsession[- ]scoped?\b",  # pytest's
]
_VOCAB = [(re.compile(p, re.IGNORECASE), what) for p, what in VOCABULARY]
_ALLOWED = re.compile("|".join(ALLOWED), re.IGNORECASE)

# Raw results, as written by the benchmarks (their Markdown twins are checked).
EXEMPT = re.compile(r"^bench/results/[^/]+\.json$")


def find_vocabulary(text: str):
    """[(line number, matched text, what it describes)] for every hit in ``text``."""
    hits = []
    for n, line in enumerate(text.splitlines(), 1):
        masked = _ALLOWED.sub(lambda m: " " * len(m.group()), line)
        for rx, what in _VOCAB:
            hits += [(n, m.group().strip(), what) for m in rx.finditer(masked)]
    return hits


@pytest.mark.parametrize("text", [
    _rot13('N frffvba jvgu gur yrag TCH ehaf fpevcgf/tch_frffvba.fu guebhtu gur qrivpr `eha` gbby'),
    _rot13('pneel `[".juy"]` ubyqvat gur uvtufcl naq ovgfnaqolgrf jurryf'),
    _rot13('13 ZvO bs gur 64 ZvO pneel yvzvg'),
    _rot13('Pneevrq gb n TCH znpuvar, gur jurry vf fzbxr-grfgrq gurer'),
    _rot13('pneel: ["qvfg/ydyben_rkg-0.1.0+ph130.gbepu2.11-pc312-pc312-znalyvahk_2_28_k86_64.juy"]'),
    _rot13('Ybtf, WFBA naq Znexqbja ynaq va ') + OUT_VAR + _rot13(' jvgu n fhzznel'),
    _rot13('TCH_FRFFVBA_OHQTRG_F (qrsnhyg 580)'),
    _rot13('nobhg 5-6 zvahgrf ba na U100, ohqtrgrq gb fgnl haqre 10'),
    _rot13('rnpu fgntr svgf gur cre-eha gvzr ohqtrg'),
    _rot13('Gur TCH znpuvar unf ab argjbex naq ynpxf uvtufcl'),
    _rot13('cnffrf gur fzbxr grfg ba guvf TCH-yrff znpuvar'),
    _rot13('Zrgubq (ba n TCH; ../.yvoenel/qrivpr/ZRGUBQ.zq)'),
    _rot13('n obeebjrq U100'),
    _rot13("orsber gur znpuvar'f yrnfr raqf"),
    _rot13('rnpu pbzznaq znl hfr 15 zvahgrf bs qrivpr gvzr'),
])
def test_matcher_flags_the_old_vocabulary(text):
    assert find_vocabulary(text), text


@pytest.mark.parametrize("text", [
    "an ILP picks bit widths under a whole-model memory budget (e.g. 2.75 bits/param)",
    "compressed to a 2.75 bits/param budget with rank-16 adapters",
    "the smallest feasible budget is 2.625 bits/param; --budget 3.5; budget_bits=2.75",
    "so the LQ-LoRA factors carry over unchanged",
    "Frozen: it carries no state; the kernels carry target(\"avx2,fma\")",
    "release wheels, an excellent fit, silently, outputs, ort.InferenceSession",
    "scripts/gpu_check.sh --out DIR --wheels DIR runs on any machine with a CUDA GPU",
    "Machines without network access often lack highspy and bitsandbytes",
    "the selftest program, built once per session; @pytest.fixture(scope=\"session\")",
    "One kernel launch through the model: the SASS analysis + the device time model",
])
def test_matcher_allows_ordinary_prose(text):
    assert find_vocabulary(text) == []


def test_matcher_reports_line_and_meaning():
    text = f"fine\nsee {OUT_VAR}/summary.txt\n"
    assert find_vocabulary(text) == [(2, OUT_VAR, "the output folder of a remote run")]


def _tracked_files():
    try:
        r = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True,
                           timeout=60)
    except OSError:
        pytest.skip("needs git")
    if r.returncode != 0:
        pytest.skip("not a git checkout (e.g. an unpacked sdist)")
    return [p for p in r.stdout.decode().split("\0") if p]


def test_tracked_text_files_speak_of_the_project_only():
    bad, checked = [], 0
    for rel in _tracked_files():
        path = os.path.join(ROOT, rel)
        if rel == SELF or EXEMPT.match(rel) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data:
            continue  # binary (plots)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        checked += 1
        bad += [f"{rel}:{n}: {hit!r} ({what})" for n, hit, what in find_vocabulary(text)]
    assert checked > 50, f"only {checked} text files found: is this the repository?"
    assert not bad, ("tracked files describe the development environment, not the project:\n"
                     + "\n".join(bad))
