"""Caption → tags (``tags=true``): content words and known phrases, folded like the emoji mapping.

Tags come from the same tokens as the emoji mapping (``EmojiMapper.tokens``: split, strip,
lower-case, phrases from ``mwe.txt`` merged) so a caption's tags and its emojis always agree,
and from the same config snapshot, so a refresh never mixes two configs. No model and no
downloaded data: stop words are the fixed list below.

Rules, in caption order, each tag once:

- A phrase from the phrase list is one tag, its words joined with spaces (``fire_hydrant`` →
  ``fire hydrant``); its words are not tagged again on their own. Only phrases in the list
  count: ``gray background`` is two tags unless the list has ``gray_background``.
- Stop words (:data:`STOP_WORDS`) are dropped, and so are phrases that begin or end with one
  (``a_lot``, ``a_couple_of``, ``as_well``, ``close_up``: quantifiers and function phrases, not
  things in the picture); a stop word inside a phrase is kept (``cup_of_coffee``).
- Numbers (``2``), single characters and tokens without a letter are dropped.
- Plurals are folded with the emoji mapping's plural rule (a token longer than 3 characters
  ending in ``s``, whose singular is a known word): ``circles`` → ``circle`` and
  ``red_circles`` → ``red circle``. Where the config tells the two apart on purpose (the
  singular and the plural map to different emojis, as ``glass`` 🥛 and ``glasses`` 👓 do, or the
  plural maps to ``""``) the plural is kept. Irregular plurals stay as they are (``men``), as in
  the emoji mapping.
"""

from __future__ import annotations

from emoji_config.mapper import SEPARATOR, EmojiMapper, plural_stem

# Stop words: the closed-class English words (articles and determiners, pronouns, prepositions,
# conjunctions, auxiliary and modal verbs, function adverbs, number words, common contractions),
# the word classes NLTK's and spaCy's English stop lists are built from, plus two small groups
# that act as function words in image captions: the place nouns of "in front of", "on top of",
# "on the side of", "in the middle of" (spaCy's list has most of them too), and the quantity
# nouns of "a lot of", "a group of", "a couple of". spaCy's other open-class entries ("empty",
# "full", "name", "part", "well") are not stop words here: in a caption they describe the picture.
_STOP_TEXT = """
    a an the this that these those some any each every no another other others such both either
    neither all few many much more most several same own
    i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his
    himself she her hers herself it its itself they them their theirs themselves what which who
    whom whose someone something somebody anyone anything anybody everyone everything everybody
    nothing nobody none
    about above across after against along alongside amid amidst among amongst around as at atop
    before behind below beneath beside besides between beyond by despite down during except for
    from in inside into like near nearby next of off on onto out outside over past per through
    throughout till to toward towards under underneath until up upon via with within without
    and or but nor so yet if than then because while although though whether when where why how
    whereas unless since however therefore thus else whatever whoever whenever wherever
    am is are was were be been being has have had having do does did doing can could will would
    shall should may might must
    very too also just only there here not again once still together really almost quite rather
    even ever always never often sometimes perhaps maybe already now cannot somewhere anywhere
    everywhere nowhere
    one two three four five six seven eight nine ten eleven twelve twenty hundred dozen
    it's that's there's here's what's isn't aren't wasn't weren't don't doesn't didn't can't
    won't
    front top side bottom back middle
    lot lots bunch couple group pair variety
"""
STOP_WORDS: frozenset[str] = frozenset(_STOP_TEXT.split())


def tags_for(caption: str, mapper: EmojiMapper) -> list[str]:
    """The caption's tags (see the module docstring), using `mapper`'s phrases and words.

    Pass the same mapper object the prediction's ``emoji_mappings`` came from.
    """
    tags: list[str] = []
    seen: set[str] = set()
    for token in mapper.tokens(caption):
        tag = _tag(token, mapper)
        if tag is not None and tag not in seen:
            seen.add(tag)
            tags.append(tag)
    return tags


def _tag(token: str, mapper: EmojiMapper) -> str | None:
    """One token's tag, or None when it is not a content word."""
    words = token.split(SEPARATOR)
    if words[0] in STOP_WORDS or words[-1] in STOP_WORDS or not _is_content(token):
        return None
    folded = fold_plural(token, mapper)
    if folded in STOP_WORDS:  # "ones" → "one"
        return None
    return folded.replace(SEPARATOR, " ")


def _is_content(token: str) -> bool:
    return len(token) > 1 and any(c.isalpha() for c in token)


def fold_plural(token: str, mapper: EmojiMapper) -> str:
    """`token`'s singular by the emoji mapping's plural rule, or `token` itself."""
    stem = plural_stem(token)
    if stem is None:
        return token
    singular = mapper.lookup(stem)
    if singular is None:  # not a known word: "grass" is not a plural of "gras"
        return token
    own = mapper.lookup(token)
    return stem if own is None or own == singular else token
