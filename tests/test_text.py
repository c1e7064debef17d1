"""Where a concept occurs in a prompt (t2vu.core.text): the one rule of the anchor prompt and the token masks."""

import subprocess
import sys

from t2vu.core.engine import anchor_prompt
from t2vu.core.text import concept_spans, overlapping, replace_concept


def words(text, concept):
    return [text[a:b] for a, b in concept_spans(text, concept)]


def test_whole_words_only():
    text = "a hundred red cars, covered in Red; reddish, red-brown, bored, RED."
    assert words(text, "red") == ["red", "Red", "red", "RED"]
    assert concept_spans("a hundred red cars", "red") == [(10, 13)]
    assert concept_spans("a reddish car", "red") == [] and concept_spans("hundred", "red") == []
    assert words("nude nudes nudity Nude", "nude") == ["nude", "Nude"]
    assert words("red_car red2 red", "red") == ["red"]  # _ and digits are word characters


def test_case_whitespace_and_multi_word_concepts():
    assert words("in the style of Van  Gogh", "van gogh") == ["Van  Gogh"]
    assert words("Van\tGogh and van gogh", "  VAN GOGH ") == ["Van\tGogh", "van gogh"]
    assert concept_spans("a vangogh painting", "van gogh") == []
    assert concept_spans("a caravan goghs", "van gogh") == []  # whole words at both ends
    assert words("i like C++ and c++.", "c++") == ["C++", "c++"]  # regex characters are literal


def test_empty_concept_matches_nothing():
    assert concept_spans("a red car", "") == [] and concept_spans("a red car", "   ") == []
    assert replace_concept("a red car", "", "x") == "a red car"


def test_replace_concept_and_anchor_prompt_use_the_same_rule():
    assert replace_concept("a red car, a hundred RED cars", "red", "blue") == "a blue car, a hundred blue cars"
    assert replace_concept("a red car", "red", r"\1 \g<0>") == r"a \1 \g<0> car"  # the anchor is literal text
    for prompt, target in [("a hundred red cars", "red"), ("Van  Gogh's starry night", "van gogh"),
                           ("Squares and a Square", "square"), ("a reddish car", "red")]:
        n = len(concept_spans(prompt, target))
        assert anchor_prompt(prompt, target, "ANCHOR").count("ANCHOR") == n
    assert anchor_prompt("Van  Gogh's starry night", "van gogh", "a painter") == "a painter's starry night"
    assert anchor_prompt("a red square moving left", "red", "") == "a square moving left"
    assert anchor_prompt("a nude person", "nude", None) == ""


def test_overlapping_tokens():
    # "a hundred red cars": tokens a | hund | red | red | cars (a word split so that one piece spells "red")
    offsets = [(0, 1), (2, 6), (6, 9), (10, 13), (14, 18), (0, 0)]
    assert overlapping(offsets, concept_spans("a hundred red cars", "red")) == [False, False, False, True, False,
                                                                              False]
    assert overlapping([(9, 13), (13, 17)], [(10, 13)]) == [True, False]  # a leading space in a token's offsets
    assert overlapping([(0, 0), (3, 3)], [(0, 5)]) == [False, False]  # empty offsets (EOS, padding) never
    assert overlapping([(0, 2)], []) == [False]


def test_the_module_is_light():
    code = "import sys, t2vu.core.text; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
