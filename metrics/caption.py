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

`ptb_tokenize` is a regex rewrite of the rules of CoreNLP 3.4.1's lexer that captions meet, as pycocoevalcap
runs it (`-preserveLines -lowerCase`, PTB3 escaping on): lowercase; split off the clitics 's 're 've 'm 'll
'd n't and split "cannot", "gonna", "gotta", "wanna", "lemme", "gimme", "'tis", "'twas"; keep periods inside
words ("u.s.", "3.5"), a final one only on single letters, 122 abbreviations ("st.", "Pa.", not "pa."), "no."
before a number and before , ; :; keep , : . inside numbers and "/" inside words ("2,500", "4:45", "and/or", "1/2");
brackets become -lrb- -rrb- -lsb- -rsb- -lcb- -rcb- (pycocoevalcap then keeps them: its list is upper case,
the text lower), also inside emoticons (":)" -> ":-rrb-"); quotes become `` '' ` ' and dashes --; runs of
"?" and "!" stay one token ("?!", kept); £ € ¢ become # $ cents; "&amp;" is "&"; URLs, e-mail addresses,
@mentions, #hashtags and SGML-like tags are one token. Measured against the real tokenizer (the jar
pycocoevalcap ships, run with Java): equal on 470 crafted captions but "y'all" (the lexer: y' all), and on
2,995 of 3,000 random caption-like strings; the rest end in "no." or have a single letter before a capital,
whose period the lexer keeps or not by rules not copied here, some depending on how the NEXT caption starts
(pycocoevalcap tokenises all captions as the lines of one file, and the lexer looks across lines). Words glued
to punctuation ("dog's3.5") split differently.
"""
import math
import re
from collections import Counter

# pycocoevalcap/tokenizer/ptbtokenizer.py: the tokens removed after tokenising
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                "...", ";"}
# words whose final period the lexer keeps (those of 300 candidates it keeps in "a X. b"), and state names it
# keeps only capitalised ("Pa." but "pa.")
_ABBREVIATIONS = set("""adm al apr ariz assn assoc asst atty aug ave bldg blvd brig bros calif capt cf cmdr co col colo
    conn corp cpl ct dec dept det dr ens esq est etc feb fla fri ft ga gen gov hon inc ind insp jan jr jul jun kan
    kans ky lt ltd maj mar md messrs mfg mich minn mlle mme mo mon mont mr mrs ms msgr mt natl neb nev nov oct okla
    p penn pfc ph pres prof pvt rd rep reps rev sen sens sep sept sgt sq sr st ste supt tenn thu thurs treas tue
    tues univ va vs vt wed wis wisc wm wyo""".split())
_CAPITALISED_ABBREVIATIONS = {"ark", "del", "ill", "la", "mass", "miss", "ore", "pa", "tex", "wash"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00ab": '"', "\u00bb": '"'})
_DASHES = re.compile("[\u2012\u2013\u2014\u2015]|-{2,}")
_CURRENCY = str.maketrans({"\u00a3": "#", "\u20ac": "$", "\u00a2": " cents "})  # the lexer's normalizeCurrency
_TOKEN = re.compile(r"""  # one token, the first alternative that matches
    https?://[^\s"'()\[\]{}<>]+                       # a URL
    | [:;=]-?[()\[\]dp](?!\w)                        # an emoticon
    | </?[a-z!?][^>\n]*>                              # an SGML-like tag
    | \w+(?:[.-]\w+)*@\w+(?:[.-]\w+)*                 # an e-mail address
    | [@#][^\W\d]\w*                                  # a @mention or #hashtag
    | \d+\ \d+/\d+                                     # a whole number and a fraction, "3 1/2"
    | \d+(?:[.,:]\d+)+ | \.\d+                         # 2,500  4:45  3.5.6  .5
    | \w+(?:[./\-&']\w+)*\.?                           # a word with inner . / - & ' (_split_word: final period)
    | '(?:\d+s?|em|tis|twas|s|re|ve|m|ll|d)\b | 'n'    # kept whole: '90s 'em 'n' and lone clitics
    | [?!]{2,} | \.\.\. | -- | \*+ | `` | '' | \S        # runs of ?! and *, ellipsis, dash, quotes, any other
""", re.VERBOSE | re.IGNORECASE)
_CLITIC = re.compile(r"(?i)^(.+?)(n't|'s|'re|'ve|'m|'ll|'d)$")
_ASSIMILATIONS = {"cannot": 3, "gonna": 3, "gotta": 3, "wanna": 3, "lemme": 3, "gimme": 3, "'tis": 2, "'twas": 2}


def _split_word(word: str, after: str) -> list[str]:
    """A matched word -> its PTB tokens: a final period and clitics split off. `after`: the text that follows."""
    tokens = []
    if word.endswith(".") and len(word) > 1:
        stem = word[:-1]
        lower, following = stem.lower(), after.lstrip()[:1]
        keeps_period = (
            "." in stem  # "u.s.", "e.g."
            or len(stem) == 1 and stem.isalpha() and not following.isupper()  # "a." unless a capital follows
            or lower in _ABBREVIATIONS or stem[:1].isupper() and lower in _CAPITALISED_ABBREVIATIONS
            or lower == "no" and following.isdigit()  # "no. 5"
            or after[:1] in (",", ";", ":")  # "two.:"
        )
        if keeps_period:
            return [word]
        word, tokens = stem, ["."]
    if word.lower() in _ASSIMILATIONS:  # "gonna" -> gon na, "'tis" -> 't is
        cut = _ASSIMILATIONS[word.lower()]
        return [word[:cut], word[cut:], *tokens]
    match = _CLITIC.match(word)
    if match and match.group(1) != "'":
        return [match.group(1), match.group(2), *tokens]
    return [word, *tokens]


def ptb_tokenize(caption: str) -> str:
    """A caption as pycocoevalcap scores it: PTB tokens, lowercased, its punctuation tokens removed, joined by
    spaces. "A man's hat (red)." -> "a man 's hat -lrb- red -rrb-"."""
    # tokenised in its own case (abbreviations depend on it), lowercased after, as -lowerCase does
    text = caption.translate(_QUOTES).translate(_CURRENCY).replace("&amp;", "&").replace("\u2026", "...")
    text = _DASHES.sub(" -- ", text)
    tokens, opened = [], False
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token == '"':  # opening and closing double quotes alternate: `` then ''
            token, opened = ("''" if opened else "``"), not opened
        elif token in _BRACKETS:
            token = _BRACKETS[token]
        elif token[0] in ":;=" and len(token) > 1:  # an emoticon: its round bracket is escaped too, ":)" -> ":-rrb-"
            token = token.replace("(", "-lrb-").replace(")", "-rrb-")
        elif " " in token:  # the lexer's normalizeSpace: "3 1/2" stays one token, with a no-break space
            token = token.replace(" ", "\u00a0")
        elif token[0].isalnum() or token[0] in "_'":
            tokens.extend(_split_word(token, text[match.end() : match.end() + 8]))
            continue
        tokens.append(token)
    return " ".join(token for token in map(str.lower, tokens) if token not in PUNCTUATIONS)


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
