"""Caption metrics equal pycocoevalcap's Bleu(4) and Cider() on tokenised captions; the PTB tokenisation and the
VQA accuracy behave as the official tools on crafted cases."""
import itertools
import random

import pytest

from metrics import caption_scores, normalize_answer, ptb_tokenize, vqa_accuracy, vqa_score
from metrics.caption import bleu, cider_d

REFERENCES = {
    1: ["a man riding a wave on top of a surfboard", "a surfer rides a large wave in the ocean",
        "a person on a surfboard riding a wave", "a man surfing on a big wave", "surfer in the ocean riding a wave"],
    2: ["two dogs playing with a frisbee in the grass", "a couple of dogs play in a field",
        "two brown dogs running on the grass", "dogs chase a frisbee in a park"],
    "img3": ["a plate of food with broccoli and meat", "a dinner plate with meat and vegetables",
             "broccoli and beef on a white plate"],
    4: ["a red stop sign on a street corner", "a stop sign at an intersection", "the stop sign is red"],
    5: ["a cat sleeping on a couch", "a cat lying on a sofa", "a small cat asleep on the couch",
        "a grey cat on a couch", "a cat curled up on a couch", "a sleeping cat"],
}
PREDICTIONS = {1: "a man riding a wave on a surfboard", 2: "two dogs playing in the grass",
               "img3": "a plate of food with broccoli", 4: "a stop sign", 5: "a cat sleeping on a couch"}


@pytest.fixture(scope="module")
def pycocoevalcap():
    bleu_module = pytest.importorskip("pycocoevalcap.bleu.bleu")
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider")
    return bleu_module.Bleu(4), cider_module.Cider()


def reference_scores(scorers, predictions, references):
    bleu_scorer, cider_scorer = scorers
    gts = {key: references[key] for key in predictions}
    res = {key: [text] for key, text in predictions.items()}
    bleus, _ = bleu_scorer.compute_score(gts, res, verbose=0)
    cider, _ = cider_scorer.compute_score(gts, res)
    return bleus, cider


def random_corpus(seed: int, images: int = 40):
    rng = random.Random(seed)
    words = "a an the man woman dog cat red blue on in of with sitting riding large small two table street".split()
    sentence = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))  # noqa: E731
    references = {k: [sentence() for _ in range(rng.randint(1, 6))] for k in range(images)}
    predictions = {k: sentence() for k in range(images)}
    return predictions, references


def test_bleu_and_cider_equal_pycocoevalcap(pycocoevalcap):
    bleus, cider = reference_scores(pycocoevalcap, PREDICTIONS, REFERENCES)
    assert bleu(PREDICTIONS, REFERENCES) == pytest.approx(bleus, abs=1e-12)
    assert cider_d(PREDICTIONS, REFERENCES) == pytest.approx(cider, abs=1e-12)
    assert 0.3 < bleus[3] < 1 and 1 < cider < 5  # a corpus that exercises clipping, penalties and idf


@pytest.mark.parametrize("seed", range(5))
def test_equal_pycocoevalcap_on_random_corpora(pycocoevalcap, seed):
    # short and long captions (brevity penalty both ways, ties in the closest length), repeats, one-word captions
    predictions, references = random_corpus(seed)
    bleus, cider = reference_scores(pycocoevalcap, predictions, references)
    assert bleu(predictions, references) == pytest.approx(bleus, abs=1e-12)
    assert cider_d(predictions, references) == pytest.approx(cider, abs=1e-12)


def test_caption_scores_scale_and_keys(pycocoevalcap):
    scores = caption_scores(PREDICTIONS, REFERENCES, tokenize=False)
    bleus, cider = reference_scores(pycocoevalcap, PREDICTIONS, REFERENCES)
    assert list(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"]
    assert scores["BLEU-4"] == pytest.approx(100 * bleus[3]) and scores["CIDEr"] == pytest.approx(100 * cider)
    perfect = caption_scores({1: "A dog."}, {1: ["a dog", "a dog"]})
    assert perfect["BLEU-1"] == pytest.approx(100) and perfect["CIDEr"] == 0.0  # one image: every idf is log(1)
    with pytest.raises(ValueError, match="no references"):
        caption_scores({1: "a dog", 9: "a cat"}, {1: ["a dog"]})


def test_ptb_tokenize_crafted_cases():
    cases = {
        "A man riding a wave on top of a surfboard.": "a man riding a wave on top of a surfboard",
        "Two dogs, playing; in the grass!": "two dogs playing in the grass",
        "A man's hat isn't red.": "a man 's hat is n't red",
        "They're sure we've seen it, I'm told": "they 're sure we 've seen it i 'm told",
        "they'll go and he'd stay": "they 'll go and he 'd stay",
        "I can't, won't, cannot": "i ca n't wo n't can not",
        'A sign that says "STOP" - really...': "a sign that says stop really",
        "A woman (in red) holds a [sign] {x}": "a woman -lrb- in red -rrb- holds a -lsb- sign -rsb- -lcb- x -rcb-",
        "Mr. Smith at 4:45 with 2,500 people in the U.S.": "mr. smith at 4:45 with 2,500 people in the u.s.",
        "a dog. a cat? a t-shirt -- and 3.5 ft": "a dog a cat a t-shirt and 3.5 ft",
        "cats & dogs / birds * fish": "cats & dogs \\/ birds \\* fish",
        "‘curly’ “quotes” – dash": "curly quotes dash",
        "  extra   spaces\tand\nlines ": "extra spaces and lines",
        # CoreNLP 3.4's Americanize, which sees the text before -lowerCase
        "A grey cat, a colourful theatre; Grey armour and neighbours' favourite contour":
            "a gray cat a colorful theater grey armor and neighbors favorite contour",
        "": "",
    }
    for text, expected in cases.items():
        assert ptb_tokenize(text) == expected, text


# ---------------------------------------------------------------- VQA


def official_accuracy(prediction: str, answers: list[str]) -> float:
    """The official formula written out: the mean, over the 10 ways to leave one human out, of
    min(1, #remaining humans who gave the answer / 3)."""
    scores = []
    for subset in itertools.combinations(range(len(answers)), len(answers) - 1):
        scores.append(min(1.0, sum(answers[i] == prediction for i in subset) / 3))
    return sum(scores) / len(scores)


def test_normalize_answer_crafted_cases():
    cases = {
        "Two": "2", "two dogs.": "2 dogs", "The Red one": "red 1", "an apple": "apple", "none": "0",
        "yes!": "yes!",  # "!" is not in the official punctuation list
        "t-shirt": "t-shirt",  # neither is "-"
        "it's": "it s",  # "'" between letters becomes a space
        "dont": "don’t", "isnt": "isn’t", "weve": "we've",  # the table's curly and straight apostrophes
        "3.5": "3.5", "1,000": "1000", "red, white": "red white", "x,y": "x y", "a,b": "b",
        "yes.": "yes", "u.s.a.": "usa", "(left)": "left", "left / right": "left right",
        "  \tblue\n": "blue",
    }
    for answer, expected in cases.items():
        assert normalize_answer(answer) == expected, answer


def test_vqa_accuracy_equals_official_formula():
    cases = [
        ("2", ["2"] * 10),
        ("2", ["2"] * 3 + ["3"] * 7),
        ("2", ["2"] * 2 + ["3"] * 8),
        ("2", ["2"] + ["3"] * 9),
        ("2", ["3"] * 10),
        ("2", ["2"] * 4 + ["3"] * 6),
        ("red", ["red", "red", "dark red", "red", "maroon", "red", "red", "red", "crimson", "red"]),
    ]
    for prediction, answers in cases:
        assert vqa_accuracy(prediction, answers) == pytest.approx(official_accuracy(prediction, answers))
    assert [vqa_accuracy("2", ["2"] * k + ["3"] * (10 - k)) for k in range(5)] == pytest.approx([0, 0.3, 0.6, 0.9, 1])


def test_vqa_accuracy_normalises_prediction_and_answers():
    assert vqa_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # non-unanimous answers get the punctuation step: "yes." matches "yes"; unanimous ones are compared as written
    assert vqa_accuracy("yes", ["yes."] * 5 + ["no"] * 5) == 1.0
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    # the step spaces out a "," and does not strip: "yes," becomes "yes " and matches nothing, as in the official
    assert vqa_accuracy("yes", ["yes,"] * 5 + ["no"] * 5) == 0.0
    # answers are not digit/article-normalised: "two" from humans never matches the prediction's "2"
    assert vqa_accuracy("two", ["two"] * 5 + ["three"] * 5) == 0.0


def test_vqa_score_is_the_mean_x100():
    predictions = {1: "yes", 2: "2", 3: "blue"}
    answers = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, 3: ["red"] * 10}
    assert vqa_score(predictions, answers) == pytest.approx(100 * (1 + 0.6 + 0) / 3)
    with pytest.raises(ValueError, match="no human answers"):
        vqa_score({9: "yes"}, answers)
