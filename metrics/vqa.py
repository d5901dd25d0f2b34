"""VQA accuracy (Antol et al., 2015; Goyal et al., 2017 for VQAv2) as the official evaluation computes it.

GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py`, line for line: the prediction is cleaned
(newlines and tabs to spaces, stripped), its punctuation processed (`processPunctuation`) and its number words,
articles and contractions normalised (`processDigitArticle`); the ten human answers get only the punctuation
step, and only when they are not all the same. A prediction then scores, for each of the ten humans, min(1,
matches among the other nine / 3), averaged over the ten ("10 choose 9" subsets).

Kept as the official script has them, quirks included: its contractions table has curly apostrophes in most
entries (so after punctuation processing, which removes or spaces out "'", almost none of them can match);
"-" and "!" are not in its punctuation list; the period regex's look-behind is malformed (`(?!<=\\d)`, a
look-ahead), so a period is removed wherever no digit follows, at most 32 times (`re.UNICODE` passed as
the count argument of `sub`). `vqa_score` is the official "overall" before its rounding to 2 decimals.
"""
import re

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn’t’ve", "couldnt’ve": "couldn’t’ve", "didnt": "didn’t", "doesnt": "doesn’t",
    "dont": "don’t", "hadnt": "hadn’t", "hadnt’ve": "hadn’t’ve", "hadn'tve": "hadn’t’ve", "hasnt": "hasn’t",
    "havent": "haven’t", "hed": "he’d", "hed’ve": "he’d’ve", "he’dve": "he’d’ve", "hes": "he’s", "howd": "how’d",
    "howll": "how’ll", "hows": "how’s", "Id’ve": "I’d’ve", "I’dve": "I’d’ve", "Im": "I’m", "Ive": "I’ve",
    "isnt": "isn’t", "itd": "it’d", "itd’ve": "it’d’ve", "it’dve": "it’d’ve", "itll": "it’ll", "let’s": "let’s",
    "maam": "ma’am", "mightnt": "mightn’t", "mightnt’ve": "mightn’t’ve", "mightn’tve": "mightn’t’ve",
    "mightve": "might’ve", "mustnt": "mustn’t", "mustve": "must’ve", "neednt": "needn’t", "notve": "not’ve",
    "oclock": "o’clock", "oughtnt": "oughtn’t", "ow’s’at": "’ow’s’at", "’ows’at": "’ow’s’at",
    "’ow’sat": "’ow’s’at", "shant": "shan’t", "shed’ve": "she’d’ve", "she’dve": "she’d’ve", "she’s": "she’s",
    "shouldve": "should’ve", "shouldnt": "shouldn’t", "shouldnt’ve": "shouldn’t’ve", "shouldn’tve": "shouldn’t’ve",
    "somebody’d": "somebodyd", "somebodyd’ve": "somebody’d’ve", "somebody’dve": "somebody’d’ve",
    "somebodyll": "somebody’ll", "somebodys": "somebody’s", "someoned": "someone’d",
    "someoned’ve": "someone’d’ve", "someone’dve": "someone’d’ve", "someonell": "someone’ll",
    "someones": "someone’s", "somethingd": "something’d", "somethingd’ve": "something’d’ve",
    "something’dve": "something’d’ve", "somethingll": "something’ll", "thats": "that’s", "thered": "there’d",
    "thered’ve": "there’d’ve", "there’dve": "there’d’ve", "therere": "there’re", "theres": "there’s",
    "theyd": "they’d", "theyd’ve": "they’d’ve", "they’dve": "they’d’ve", "theyll": "they’ll", "theyre": "they’re",
    "theyve": "they’ve", "twas": "’twas", "wasnt": "wasn’t", "wed’ve": "we’d’ve", "we’dve": "we’d’ve",
    "weve": "we've", "werent": "weren’t", "whatll": "what’ll", "whatre": "what’re", "whats": "what’s",
    "whatve": "what’ve", "whens": "when’s", "whered": "where’d", "wheres": "where's", "whereve": "where’ve",
    "whod": "who’d", "whod’ve": "who’d’ve", "who’dve": "who’d’ve", "wholl": "who’ll", "whos": "who’s",
    "whove": "who've", "whyll": "why’ll", "whyre": "why’re", "whys": "why’s", "wont": "won’t",
    "wouldve": "would’ve", "wouldnt": "wouldn’t", "wouldnt’ve": "wouldn’t’ve", "wouldn’tve": "wouldn’t’ve",
    "yall": "y’all", "yall’ll": "y’all’ll", "y’allll": "y’all’ll", "yall’d’ve": "y’all’d’ve",
    "y’alld’ve": "y’all’d’ve", "y’all’dve": "y’all’d’ve", "youd": "you’d", "youd’ve": "you’d’ve",
    "you’dve": "you’d’ve", "youll": "you’ll", "youre": "you’re", "youve": "you’ve",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The official processPunctuation: a mark next to a space (or any mark in text with a digit-comma-digit) is
    deleted, elsewhere it becomes a space; then periods not followed by a digit are deleted."""
    out = text
    has_number_comma = _COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_number_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, 32)  # the official passes re.UNICODE (32) where sub takes the count


def process_digit_article(text: str) -> str:
    """The official processDigitArticle: lowercase, number words to digits, articles dropped, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """A predicted answer as the official evaluation compares it: "Two dogs." -> "2 dogs"."""
    return process_digit_article(process_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Soft accuracy in [0, 1] of one predicted answer against the (ten) human answers."""
    if not answers:
        raise ValueError("vqa_accuracy needs the human answers of the question")
    prediction = normalize_answer(prediction)
    if len(set(answers)) > 1:  # unanimous answers are compared as they are
        answers = [process_punctuation(answer) for answer in answers]
    matches = [answer == prediction for answer in answers]
    total = sum(matches)
    # leave each human out in turn: min(1, matches among the other nine / 3)
    return sum(min(1.0, (total - match) / 3) for match in matches) / len(answers)


def vqa_score(predictions: dict, answers: dict) -> float:
    """{question_id: answer}, {question_id: [10 answers]} -> mean accuracy x100 (the official "overall")."""
    missing = [key for key in predictions if key not in answers]
    if missing:
        raise ValueError(f"vqa_score: no human answers for {len(missing)} questions, e.g. {missing[:3]}")
    if not predictions:
        raise ValueError("vqa_score: no predictions")
    return 100 * sum(vqa_accuracy(predictions[key], answers[key]) for key in predictions) / len(predictions)
