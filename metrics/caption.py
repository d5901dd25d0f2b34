"""Caption metrics as the COCO caption evaluation (Chen et al., 2015; pycocoevalcap) computes them.

- `ptb_tokenize`: pycocoevalcap's text preparation, which runs Stanford CoreNLP 3.4.1's PTBTokenizer
  (`-preserveLines -lowerCase`) and then drops the tokens in its PUNCTUATIONS list. Written here without Java.
- `bleu`: BLEU-1..4 (Papineni et al., 2002) as pycocoevalcap's BleuScorer with option "closest": n-gram
  counts clipped by the most any one reference has, summed over the corpus; the brevity penalty uses, per
  caption, the reference length closest to the caption's (the shorter on a tie); the 1e-15/1e-9 guards of
  the reference are kept so that an empty corpus scores 0, not NaN.
- `cider_d`: CIDEr-D (Vedantam et al., 2015), which is what pycocoevalcap's `Cider` computes: tf-idf vectors
  of 1..4-grams, document frequencies over the references of the evaluated set, the candidate's weights
  clipped at the reference's, a Gaussian length penalty (sigma 6), averaged over n and references, x10.
  As in the reference the "length" in the penalty counts bigrams (its `if n == 1` is the bigram index).

`caption_scores` reports both x100, the scale COCO captioning papers print (BLIP: B@4 39.7, CIDEr 133.3).

Deliberate approximations in `ptb_tokenize` (of the Java lexer's hundreds of rules, the ones that change
captions' scores): CoreNLP 3.4's British -> American spellings ("colour" -> "color", "grey" -> "gray"; only
lowercase words, as there); lowercase; split off the clitics 's 're 've 'm 'll 'd n't (and "cannot" -> can not);
split off punctuation and symbols; keep periods inside words ("u.s.", "3.5", "st.") and a final period only
on single-letter and listed abbreviations; keep commas and colons inside numbers ("2,500", "4:45"); map
brackets to -lrb- -rrb- -lsb- -rsb- -lcb- -rcb- (which pycocoevalcap then keeps: its list has them in upper
case and the text was lowercased), "/" and "*" to "\\/" and "\\*", quotes to `` '' ` ' and dashes to --.
Not done: URLs, e-mail addresses, emoticons, SGML tags, words joined by "/" (split here; the lexer may keep
"and\\/or" whole) and the rarer Unicode punctuation; captions have almost none of them.
"""
import math
import re
from collections import Counter

# pycocoevalcap/tokenizer/ptbtokenizer.py: the tokens removed after tokenising
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                "...", ";"}
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "co", "corp", "no", "mt",
                  "ft", "prof", "gen", "sgt", "capt", "lt", "col", "rev", "ave", "blvd", "approx", "dept"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00ab": '"', "\u00bb": '"'})
_DASHES = re.compile("[\u2012\u2013\u2014\u2015]|-{2,}")
# one token: a number with , . : inside; a word with inner periods, hyphens, apostrophes or &; or one symbol
_TOKEN = re.compile(r"\d+(?:[.,:]\d+)+|\w+(?:[.\-&']\w+)*\.?|\.\.\.|--|``|''|\S")
_CLITIC = re.compile(r"(?i)^(.+?)(n't|'s|'re|'ve|'m|'ll|'d)$")


def _split_word(word: str) -> list[str]:
    """A matched word (original case) -> its PTB tokens: a final period and clitics split off."""
    tokens = []
    if word.endswith(".") and len(word) > 1:
        stem = word[:-1]
        # "u.s." and "e.g." keep their period (it holds an inner one), so do "a." and the listed abbreviations
        if "." in stem or len(stem) == 1 and stem.isalpha() or stem.lower() in _ABBREVIATIONS:
            return [word]
        word, tokens = stem, ["."]
    if word.lower() == "cannot":
        return [word[:3], word[3:], *tokens]
    match = _CLITIC.match(word)
    if match and match.group(1) != "'":
        return [match.group(1), match.group(2), *tokens]
    return [word, *tokens]


# CoreNLP 3.4's Americanize (edu/stanford/nlp/process/Americanize.java), on by default in its PTBLexer and applied
# before -lowerCase, so only lowercase spellings change: "grey" -> "gray", "Grey" stays (then "grey")
_AMERICAN = dict(zip(
    "anaesthetic analogue analogues analyse analysed analysing armoured cancelled cancelling candour capitalise "
    "capitalised capitalisation centre chimaeric clamour coloured colouring colourful defence Defence discolour "
    "discolours discoloured discolouring encyclopaedia endeavour endeavours endeavoured endeavouring fervour favour "
    "favours favoured favouring favourite favourites fibre fibres finalise finalised finalising flavour flavours "
    "flavoured flavouring glamour grey harbour harbours homologue homologues honour honours honoured honouring "
    "honourable humour humours humoured humouring kerb labelled labelling labour Labour labours laboured labouring "
    "leant learnt localise localised manoeuvre manoeuvres maximise maximised maximising meagre minimise minimised "
    "minimising modernise modernised modernising misdemeanour misdemeanours neighbour neighbours neighbourhood "
    "neighbourhoods oestrogen oestrogens organisation organisations penalise penalised popularise popularised "
    "popularises popularising practise practised pressurise pressurised pressurises pressurising realise realised "
    "realising realises recognise recognised recognising recognises rumoured rumouring savour savours savoured "
    "savouring splendour splendours theatre theatres titre titres travelled travelling".split(),
    "anesthetic analog analogs analyze analyzed analyzing armored canceled canceling candor capitalize capitalized "
    "capitalization center chimeric clamor colored coloring colorful defense Defense discolor discolors discolored "
    "discoloring encyclopedia endeavor endeavors endeavored endeavoring fervor favor favors favored favoring favorite "
    "favorites fiber fibers finalize finalized finalizing flavor flavors flavored flavoring glamour gray harbor "
    "harbors homolog homologs honor honors honored honoring honorable humor humors humored humoring curb labeled "
    "labeling labor Labor labors labored laboring leaned learned localize localized maneuver maneuvers maximize "
    "maximized maximizing meager minimize minimized minimizing modernize modernized modernizing misdemeanor "
    "misdemeanors neighbor neighbors neighborhood neighborhoods estrogen estrogens organization organizations "
    "penalize penalized popularize popularized popularizes popularizing practice practiced pressurize pressurized "
    "pressurizes pressurizing realize realized realizing realizes recognize recognized recognizing recognizes "
    "rumored rumoring savor savors savored savoring splendor splendors theater theaters titer titers traveled "
    "traveling".split(),
))
_AMERICAN_PATTERNS = [(re.compile(pattern), replacement, re.compile(exception) if exception else None)
                      for pattern, replacement, exception in [
    ("haem(at)?o", r"hem\1o", None), ("aemia$", "emia", None), ("([lL])eukaem", r"\1eukem", None),
    ("programme(s?)$", r"program\1", None),
    ("^([a-z]{3,})our(s?)$", r"\1or\2", "abatjour|beflour|bonjour|calambour|carrefour|cornflour|contour|de[tv]our|"
     "dortour|dyvour|downpour|giaour|glamour|holour|inpour|outpour|pandour|paramour|pompadour|recontour|repour|"
     "ryeflour|sompnour|tambour|troubadour|tregetour|velour"),
]]


def _americanize(word: str) -> str:
    if len(word) < 4:
        return word
    if word in _AMERICAN:
        return _AMERICAN[word]
    if len(word) < 6:
        return word
    for pattern, replacement, exception in _AMERICAN_PATTERNS:
        if pattern.search(word) and not (exception and exception.search(word)):
            return pattern.sub(lambda match: match.expand(replacement), word)
    return word


def ptb_tokenize(caption: str) -> str:
    """A caption as pycocoevalcap scores it: PTB tokens, lowercased, its punctuation tokens removed, joined by
    spaces. "A man's hat (red)." -> "a man 's hat -lrb- red -rrb-"."""
    text = _DASHES.sub(" -- ", caption.translate(_QUOTES).replace("&amp;", "&").replace("\u2026", "..."))
    tokens, opened = [], False
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token == '"':  # opening and closing double quotes alternate: `` then ''
            token, opened = ("''" if opened else "``"), not opened
        elif token in _BRACKETS:
            token = _BRACKETS[token]
        elif token in ("/", "*"):
            token = "\\" + token
        elif token[0].isalnum() or token[0] == "_":
            tokens.extend(_americanize(word).lower() for word in _split_word(token))
            continue
        tokens.append(token.lower())
    return " ".join(token for token in tokens if token not in PUNCTUATIONS)


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(predictions: dict, references: dict, n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised captions (pycocoevalcap's Bleu(n), option "closest"), in [0, 1]."""
    tiny, small = 1e-15, 1e-9  # the reference's guards against empty corpora
    correct, guess = [0] * n, [0] * n
    hypothesis_length = reference_length = 0
    for key, prediction in predictions.items():
        words = prediction.split()
        counts = _ngrams(words, n)
        max_reference = Counter()
        lengths = []
        for reference in references[key]:
            reference_words = reference.split()
            lengths.append(len(reference_words))
            max_reference |= _ngrams(reference_words, n)  # union: the most any one reference has
        hypothesis_length += len(words)
        reference_length += min((abs(length - len(words)), length) for length in lengths)[1]
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for ngram, count in counts.items():
            correct[len(ngram) - 1] += min(max_reference[ngram], count)
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1 / (k + 1)))
    ratio = (hypothesis_length + tiny) / (reference_length + small)
    if ratio < 1:  # brevity penalty
        scores = [score * math.exp(1 - 1 / ratio) for score in scores]
    return scores


def cider_d(predictions: dict, references: dict, n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D of tokenised captions (pycocoevalcap's Cider(), x10 included), the mean over images."""
    keys = list(predictions)
    reference_counts = {key: [_ngrams(reference.split(), n) for reference in references[key]] for key in keys}
    document_frequency = Counter(ngram for key in keys for ngram in set().union(*reference_counts[key]))
    log_images = math.log(len(keys)) if keys else 0.0

    def vectors(counts: Counter) -> tuple[list[dict], list[float], int]:
        """tf-idf weights and their norm per n-gram order, and the bigram count (the reference's 'length')."""
        vec, norm = [{} for _ in range(n)], [0.0] * n
        for ngram, term_frequency in counts.items():
            weight = term_frequency * (log_images - math.log(max(1.0, document_frequency[ngram])))
            vec[len(ngram) - 1][ngram] = weight
            norm[len(ngram) - 1] += weight * weight
        return vec, [math.sqrt(x) for x in norm], sum(c for g, c in counts.items() if len(g) == 2)

    scores = []
    for key in keys:
        vec, norm, length = vectors(_ngrams(predictions[key].split(), n))
        total = [0.0] * n
        for counts in reference_counts[key]:
            vec_ref, norm_ref, length_ref = vectors(counts)
            penalty = math.e ** (-((length - length_ref) ** 2) / (2 * sigma**2))
            for k in range(n):
                # the candidate's weight clipped at the reference's ("-D"), times the reference's
                value = sum(min(weight, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0)
                            for g, weight in vec[k].items())
                if norm[k] != 0 and norm_ref[k] != 0:
                    value /= norm[k] * norm_ref[k]
                total[k] += value * penalty
        scores.append(sum(total) / n / len(reference_counts[key]) * 10.0)
    return sum(scores) / len(scores) if scores else 0.0


def caption_scores(predictions: dict, references: dict, tokenize: bool = True) -> dict[str, float]:
    """{image_id: caption}, {image_id: [reference, ...]} -> {"BLEU-1".."BLEU-4", "CIDEr"}, all x100 (COCO papers'
    scale). Every prediction needs references; references of images without a prediction are ignored (CIDEr's
    document frequencies come from the evaluated images only, as in pycocoevalcap)."""
    missing = [key for key in predictions if not references.get(key)]
    if missing:
        raise ValueError(f"caption_scores: no references for {len(missing)} predictions, e.g. {missing[:3]}")
    if tokenize:
        predictions = {key: ptb_tokenize(text) for key, text in predictions.items()}
        references = {key: [ptb_tokenize(text) for text in references[key]] for key in predictions}
    scores = {f"BLEU-{k + 1}": 100 * score for k, score in enumerate(bleu(predictions, references))}
    scores["CIDEr"] = 100 * cider_d(predictions, references)
    return scores
