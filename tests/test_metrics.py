"""Caption metrics equal pycocoevalcap's Bleu(4) and Cider() on tokenised captions; the PTB tokenisation and the
VQA accuracy behave as the official tools on crafted cases."""
import itertools
import random

import pytest

from crossmodal.metrics import caption_scores, normalize_answer, ptb_tokenize, vqa_accuracy, vqa_score
from crossmodal.metrics.caption import bleu, cider_d

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
        "cats & dogs / birds * fish and/or 1/2": "cats & dogs / birds * fish and/or 1/2",
        "‘curly’ “quotes” – dash": "curly quotes dash",
        "  extra   spaces\tand\nlines ": "extra spaces and lines",
        "A grey colour, gonna wanna; Pa. pa. 3 1/2 :) what?!":
            "a grey colour gon na wan na pa. pa 3\u00a01/2 :-rrb- what ?!",  # no Americanize in 3.4.1
        "": "",
    }
    for text, expected in cases.items():
        assert ptb_tokenize(text) == expected, text


# captions on which ptb_tokenize was checked against the real tokenizer (the next test, where Java runs)
CRAFTED = """
A man's hat (red).
Two dogs, don't run!
I can't -- won't.
U.S. flag at 4:45 and 2,500 people...
a t-shirt and/or a * "quoted" word
Mr. Smith
A dog. A cat.
it's 3.5 ft.
what?! yes; no: maybe
A grey cat, a colourful theatre; Grey armour and neighbours' favourite contour
A woman (in red) holds a [sign] {x}
cats & dogs / birds * fish
‘curly’ “quotes” – dash
A man riding a wave on top of a surfboard.
They're sure we've seen it, I'm told
they'll go and he'd stay
I cannot go
'hello' said the dog's owner
A sign that says "STOP" - really...
Mr. and Mrs. Smith at St. Paul's Cathedral.
a 1/2 pound burger for $5.99 at 50% off
e.g. a dog i.e. a cat etc.
A dog, a cat... and a bird!!
gonna wanna gotta lemme
An elephant's trunk; elephants' trunks
the 1990s and '90s
A T.V. on a stand
a man with a cell-phone &amp; a laptop
A blue/white plane flying over a city.
people @ the beach #fun
a 2-year-old boy
an o'clock sign; o'neil's bar
A LARGE JET PLANE.
3 dogs.
Dogs playing. Cats sleeping.
a  man   with    spaces
a caption ending with a number 5.
a room with a t.v.
an open-air market
what?? really?!? no!!! ok?
a dog.. a cat.... end
gimme that, d'ye see 'tis 'twas
@user and #tag and a#b and c@d
a*b and * and ** and a/b/c and / and //
50/50 chance and 1/2 and 3/4ths
'90s fashion and the '60s and rock 'n' roll
it's the dogs' bowl and the dog's bowl
don't DON'T Don't can't CAN'T won't shan't ain't
i'd you'd he'll she's we're they've
a man in a tie.A woman in a dress
a number 3.5.6 and 1.000.000 and .5 and 5.
e-mail me at john@example.com or www.example.com
http://example.com/page
a $100 bill and £50 and €20 and ¥100 and 5¢
20°C and 5' 10" tall
a 10x10 grid and 4x4 truck and a 2x4
A man's shirt's color
semicolon; colon: comma, period. question? exclamation!
(parenthetical) [square] {curly} <angle>
hyphen - dash -- long—dash en–dash
"double" 'single' `backtick' ``latex''
a dog's and a cat's
a word, with,commas,inside
ends with 's
'
a caption with a trailing apostrophe'
it is 5:30pm and 10:00 a.m. now
the u.s.a. and u.k. flags
Mt. Everest and Dr. Who and Jr. and vs. and etc.
no. 5 and No. 24
mr smith. mrs jones.
a.b.c d.e f.
I
a
.
..
...
....
a - b
a -- b
x-ray and pre-war and e-mail and well-known
co-op and t.v.'s and cd's and 1980's
tables, chairs & a lamp
A man is standing next to a red double-decker bus.
two giraffes standing in a grassy field next to trees
A plate with a sandwich, fries and a pickle on it.
There is a cat that is sitting on the toilet seat
A kitchen with stainless steel appliances and granite counter tops.
A group of people standing around a table with food on it .
a young boy swinging a baseball bat at a ball
The large clock tower is next to a building.
a bathroom that has a sink and a mirror in it
An old fashioned bus parked on the side of a road
A "no parking" sign on a pole.
A woman holding an umbrella in the rain.
a man on a skateboard doing a trick , on a ramp
Two men playing Wii in a living room
a close up of a pizza with pepperoni & cheese
A cake that says "Happy 30th Birthday!"
a dog laying on a bed next to a laptop...
people are flying kites at the beach; it's windy
a train going down the tracks near a station .
A bowl of oranges, bananas, and apples.
a person riding a motorcycle down a street
THE CAT IS ON THE MAT.
A giraffe's head is seen through the trees.
The elephants' trunks are intertwined.
an image of a man with a surf board in the water
A sign reads "Main St." and "Elm Ave."
an 18-wheeler truck on the highway
A sandwich cut in half on a plate w/ chips
a 4x4 truck and a 10-speed bike
A man wearing a hat (and sunglasses) smiling.
a baseball player swings at a pitch, while the catcher waits
Someone's toothbrush and toothpaste on the counter
a stop sign that has been vandalized with the word "eating"
Here is a picture of a bedroom that's very clean.
A  bus  with  extra  spaces.
A man in a blue shirt and tie. He is smiling.
Kids playing frisbee in the park :)
A pair of scissors ; a ruler
The time is 10:30 on the clock
three zebras grazing in the wild !
a tennis player, #1 seed, at Wimbledon
A view of the Golden Gate Bridge in S.F.
this is a 1/2 eaten donut
park :) ok
park :( ok
park ;) ok
park :-) ok
park :D ok
park :P ok
park =) ok
park :] ok
note: (this) ok
a (b) :)
time 10:30)
a: b
smile :-( sad
plan b.
vitamin c. is good
the letter a. here
a.
I.
the letter X. Then
type no.
go no.
the no. The end
""".strip("\n").split("\n")


def test_ptb_tokenize_equals_corenlp_where_java_runs():
    # pycocoevalcap ships stanford-corenlp-3.4.1.jar; its PTBTokenizer wrapper needs a `java` on the PATH
    import shutil

    ptbtokenizer = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    if shutil.which("java") is None:
        pytest.skip("no java to run pycocoevalcap's PTBTokenizer")
    from crossmodal.metrics.caption import _ABBREVIATIONS, _CAPITALISED_ABBREVIATIONS

    abbreviations = sorted(_ABBREVIATIONS | _CAPITALISED_ABBREVIATIONS) + ["approx", "fig", "oz", "min", "hr"]
    texts = CRAFTED + [f"a {word}. b" for word in abbreviations] + [f"The {w.title()}. Smith" for w in abbreviations]
    reference = ptbtokenizer.PTBTokenizer().tokenize({i: [{"caption": text}] for i, text in enumerate(texts)})
    differ = [(text, reference[i][0], ptb_tokenize(text)) for i, text in enumerate(texts)
              if reference[i][0] != ptb_tokenize(text)]
    assert differ == []


def test_caption_scores_equal_pycocoevalcap_end_to_end_where_java_runs(pycocoevalcap):
    # raw captions through pycocoevalcap's own pipeline: PTBTokenizer (Java), then Bleu(4) and Cider()
    import shutil

    ptbtokenizer = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    if shutil.which("java") is None:
        pytest.skip("no java to run pycocoevalcap's PTBTokenizer")
    predictions = {1: "A man riding a wave, on a surfboard.", 2: "Two dogs (playing) in the grass!",
                   "img3": "A plate of food w/ broccoli...", 4: "A stop-sign; it's red.", 5: "a cat's nap on a couch"}
    endings = itertools.cycle([".", "", " !"])
    references = {key: [text.capitalize() + next(endings) for text in REFERENCES[key]] for key in predictions}
    tokenizer = ptbtokenizer.PTBTokenizer()
    gts = tokenizer.tokenize({key: [{"caption": text} for text in texts] for key, texts in references.items()})
    res = tokenizer.tokenize({key: [{"caption": text}] for key, text in predictions.items()})
    bleus, cider = reference_scores(pycocoevalcap, {key: texts[0] for key, texts in res.items()}, gts)
    scores = caption_scores(predictions, references)
    assert [scores[f"BLEU-{k}"] for k in range(1, 5)] == pytest.approx([100 * b for b in bleus], abs=1e-9)
    assert scores["CIDEr"] == pytest.approx(100 * cider, abs=1e-9)


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
