"""Hand-written cue lists: words and patterns that move answer length, grouped by direction.

These are the prior knowledge the model starts from; the learned vocabulary (``FeatureSpec.vocab``)
adds whatever the training data shows on top. Changing anything here changes features, so it
must come with a bump of ``FEATURE_SPEC_VERSION`` and a retrain.
"""

from __future__ import annotations

import re

#: Every cue phrase → its group. Groups become count features.
CUES: dict[str, str] = {}


def _words(text: str) -> tuple[str, ...]:
    """``"a|b|c"`` → ``("a", "b", "c")``: long word lists stay a few lines long."""
    return tuple(word.strip() for word in text.split("|"))


def _add(group: str, phrases: str) -> None:
    for phrase in _words(phrases):
        CUES[phrase] = group


# Asking for a short answer.
_add(
    "brief",
    "brief|briefly|short|shortly|shorter|concise|concisely|succinct|succinctly|tl;dr|tldr|one word"
    "|one sentence|single sentence|a sentence|one line|one-liner|a few words|few words|yes or no"
    "|just answer|only answer|just the|only the|no explanation|without explanation|simply|quick"
    "|quickly|in short|short answer|keep it short|one paragraph|single word|a word|a number",
)
# Priming turns ("I will send you ... just reply OK") whose answer is an acknowledgement.
_add(
    "ack",
    "acknowledge|acknowledged|reply ok|say ok|respond ok|just say|only reply|only respond"
    "|wait for|i will send|i'll send|i will give you|i'll give you|i will provide|i'll provide"
    "|do not respond|don't respond|don't reply|do not reply|next message|until i|remember this"
    "|part 1|part 2|read this|understood|confirm",
)
# Asking for a long answer.
_add(
    "long",
    "detailed|detail|details|in detail|comprehensive|thorough|thoroughly|elaborate|extensive"
    "|in depth|in-depth|long|lengthy|essay|article|blog|blog post|story|chapter|report|guide"
    "|tutorial|full|complete|entire|whole|outline|plan|curriculum|itinerary|script|screenplay"
    "|lesson|proposal|book|novel|paper|thesis|course|strategy|business plan|all the|everything",
)
# Asking for structure, which tends to lengthen answers.
_add(
    "format",
    "list|table|bullet|bullets|bullet points|step by step|step-by-step|steps|numbered|enumerate"
    "|markdown|json|csv|format|structure|headings|sections|examples|template",
)
# Programming tasks.
_add(
    "code",
    "code|function|def|class|script|program|implement|algorithm|debug|refactor|import|variable"
    "|loop|api|sql|regex|python|javascript|typescript|java|c++|c#|html|css|react|node|django|flask"
    "|golang|rust|bash|shell|query|database|bug|error|exception|compile|snippet|component|endpoint",
)
# Transformations of the given text: the answer's length follows the input's.
_add(
    "rewrite",
    "rewrite|rephrase|paraphrase|translate|correct|proofread|fix|edit|improve|convert|grammar"
    "|summarize|summarise|summary|shorten|simplify|reword|polish|revise|tweak|modify|change",
)
# Short creative forms.
_add(
    "short_form",
    "poem|haiku|limerick|joke|tweet|slogan|tagline|title|titles|caption|headline|name|names"
    "|subject line|hashtag|hashtags|one-liner|quote|riddle|pun",
)
# Explanations.
_add(
    "explain",
    "explain|why|how|describe|compare|difference|differences|pros and cons|advantages"
    "|disadvantages|analyze|analyse|discuss|evaluate|what is|what are|tell me about",
)
# Requests to keep going with a previous answer.
_add("continue", "continue|go on|keep going|carry on|finish|more|next|rest|expand|further")

CUE_GROUPS: tuple[str, ...] = tuple(dict.fromkeys(CUES.values()))

WORD_RE = re.compile(r"[a-z0-9][a-z0-9'+#]*")


def _phrase_tables() -> tuple[dict[str, str], dict[str, list[tuple[tuple[str, ...], str]]]]:
    """Cue phrases split into words the way ``WORD_RE`` splits text, so matching is a word scan.

    Single words go to a dict; longer phrases are indexed by their first word, longest first, so
    "in detail" is matched as one cue rather than as "in" + "detail".
    """
    single: dict[str, str] = {}
    multi: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    for phrase, group in CUES.items():
        words = tuple(WORD_RE.findall(phrase))
        if len(words) == 1:
            single[words[0]] = group
        elif words:
            multi.setdefault(words[0], []).append((words[1:], group))
    for options in multi.values():
        options.sort(key=lambda option: -len(option[0]))
    return single, multi


CUE_WORDS, CUE_PHRASES = _phrase_tables()

#: The Clairvoyant anchor's task verbs, in its priority order; first match wins.
VERBS: tuple[str, ...] = _words("what|write|explain|summarize|how|list|implement|compare|describe|generate|why|define")

NUMBER_WORDS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "fifteen": 15,
    "twenty": 20,
    "thirty": 30,
    "fifty": 50,
    "hundred": 100,
    "few": 3,
    "several": 5,
    "couple": 2,
}

#: Unit word → (unit group, rough answer tokens per unit).
UNITS: dict[str, tuple[str, float]] = {
    "word": ("words", 1.35),
    "words": ("words", 1.35),
    "character": ("chars", 0.25),
    "characters": ("chars", 0.25),
    "chars": ("chars", 0.25),
    "token": ("words", 1.0),
    "tokens": ("words", 1.0),
    "sentence": ("sentences", 25.0),
    "sentences": ("sentences", 25.0),
    "line": ("lines", 12.0),
    "lines": ("lines", 12.0),
    "paragraph": ("paragraphs", 90.0),
    "paragraphs": ("paragraphs", 90.0),
    "page": ("pages", 500.0),
    "pages": ("pages", 500.0),
    "chapter": ("sections", 400.0),
    "chapters": ("sections", 400.0),
    "section": ("sections", 150.0),
    "sections": ("sections", 150.0),
    "day": ("sections", 80.0),
    "days": ("sections", 80.0),
    "week": ("sections", 120.0),
    "weeks": ("sections", 120.0),
    "slide": ("sections", 60.0),
    "slides": ("sections", 60.0),
    "module": ("sections", 100.0),
    "modules": ("sections", 100.0),
}
# Countable things asked for in lists ("10 ideas", "five tips").
for _item in _words(
    "point|points|item|items|example|examples|idea|ideas|tip|tips|way|ways|reason|reasons|question"
    "|questions|step|steps|name|names|title|titles|option|options|tweet|tweets|post|posts|email|emails"
    "|headline|headlines|tagline|taglines|suggestion|suggestions|bullet|bullets|fact|facts|thing|things"
    "|alternative|alternatives|variation|variations|version|versions"
):
    UNITS[_item] = ("items", 30.0)

UNIT_GROUPS: tuple[str, ...] = _words("words|chars|sentences|lines|paragraphs|pages|sections|items")

#: Words just before a number that make it a ceiling ("under 50", "no more than 3", "at most 5").
CEILING_WORDS = frozenset({"under", "than", "most", "max", "maximum", "within", "to"})


def number_value(word: str) -> float:
    """A word as a requested amount ("12", "ten", "few"), or 0.0 if it is not one."""
    if word.isdigit():
        return float(word) if len(word) <= 5 else 0.0
    return float(NUMBER_WORDS.get(word, 0))


#: Words that start a yes/no question, whose answers tend to be short.
YES_NO_STARTS = frozenset(
    _words("is|are|am|was|were|do|does|did|can|could|will|would|should|shall|has|have|had|may|might|must")
)
