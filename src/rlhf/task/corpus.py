"""The review corpus: a small context-free grammar of film and product reviews.

Every review is an opening from `OPENINGS` (a few words that stop mid-sentence, the PPO prompt)
followed by the rest of that sentence and up to two more sentences. The grammar enforces enough
structure that a language model has to learn it: subject-verb agreement ("these headphones are",
"this kettle is"), articles ("an excellent", "a superb"), one product per review ("this blender
... it"), clauses joined by "and", "but" and "because", and a full stop or "!" after each sentence.

Text format: lowercase words and the punctuation tokens "." and "!", separated by single spaces.

The grammar is written below as rules `NAME = alternative | alternative | ...`. A `$NAME` inside an
alternative is another rule, `~` is the empty alternative, and repeating an alternative makes it
more likely. A few rules are bound once per review instead of drawn each time (`$PRODUCT`, and
the words that agree with it: `$IT`, `$IS`, ...), so a review about "these earbuds" says "they
are" and never switches to another product. Rules ending in `_POS`, `_NEG` and `_MIX` carry the
review's sentiment; `_F` rules belong to films and `_P` rules to products.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

CORPUS_VERSION = 1

_GRAMMAR = """
INT = ~ | ~ | ~ | very | really | so | quite | extremely | incredibly | absolutely
END_POS = . | . | !
END_NEG = . | . | !
END_MIX = .
PERSON = mother | father | sister | brother | wife | husband | son | daughter | parents | kids
    | roommate | grandmother | neighbor
LIKED = loved | enjoyed | adored | liked | really liked
DISLIKED = hated | disliked | could not stand | did not like
RECO = would | highly | would happily | strongly
ADJ_NEU = average | ordinary | decent | standard | typical | simple | long | short | predictable
    | familiar | plain | unusual | old fashioned
ADJP_POS_F = $INT $ADJ_POS_F
ADJP_NEG_F = $INT $ADJ_NEG_F
ADJP_POS_P = $INT $ADJ_POS_P
ADJP_NEG_P = $INT $ADJ_NEG_P

ADJ_POS_F = superb | excellent | wonderful | great | brilliant | fantastic | amazing | lovely
    | beautiful | charming | delightful | clever | funny | stunning | perfect | impressive | fun
    | enjoyable | fresh | powerful | elegant | smart | outstanding | terrific | marvelous
    | magnificent | entertaining | thrilling | inspiring | satisfying | exciting | heartfelt
    | touching | gripping | moving
ADJ_NEG_F = terrible | awful | boring | dull | bad | poor | weak | horrible | dreadful
    | disappointing | stupid | messy | lazy | painful | annoying | ugly | confusing | tedious
    | bland | pointless | lifeless | mediocre | clumsy | forgettable
FA_S = acting | story | plot | ending | script | soundtrack | music | dialogue | pacing
    | cinematography | direction | cast | editing | camera work | final scene | opening scene
    | first half | second half | setting | lead actor | lead actress
FA_P = effects | characters | action scenes | costumes | songs | visuals | performances | sets
PERFORMER = the lead actor | the lead actress | the whole cast | every actor | the young star
GENRE = dramas | westerns | musicals | mysteries | thrillers | family films | spy films
GENRE_SG = drama | western | musical | mystery | thriller | family film | spy film
BEST_F = best | finest | funniest | most beautiful | most exciting
WORST_F = worst | dullest | weakest | most boring | most annoying
TIMEFRAME = this year | in years | in a long time | in ages
FEEL_POS = laugh | laugh out loud | smile | want to watch it again | feel happy
FEEL_NEG = want to leave | check my phone | fall asleep | angry | feel nothing
EMO_POS = smiling | delighted | thrilled | glad i went | happy
EMO_NEG = bored | annoyed | angry | confused | asleep | checking my phone
WASTE = time | money | an evening | two hours
FELL_WHEN = halfway through | before the end | during the first act | after twenty minutes
REASON_POS_F = the actors had real chemistry | every scene had a purpose
    | the director knew exactly what to do | the jokes always landed
    | the music fit every scene | the story never slowed down | the characters felt real
REASON_NEG_F = nothing happened for an hour | the actors seemed bored | none of the jokes landed
    | the story made no sense | every scene went on too long | the script was full of holes
PLOT = a detective who moves to a small town | two sisters who run a hotel
    | a young chef in a big city | a family on a long road trip | a teacher who writes a book
    | a boy and his dog | an old sailor and his last voyage | three brothers who open a bakery
WHERE_F = at home | at the cinema | on a plane | on a sunday afternoon | last weekend
    | with my $PERSON
DUR_F = two hours | ninety minutes | almost three hours | about two hours

CONT_WAS_POS = $ADJP_POS_F $END_POS | $ADJP_POS_F and the $FA_S was $ADJP_POS_F .
    | $ADJP_POS_F because $REASON_POS_F .
CONT_WAS_NEG = $ADJP_NEG_F $END_NEG | $ADJP_NEG_F and the $FA_S was $ADJP_NEG_F .
    | $ADJP_NEG_F because $REASON_NEG_F .
CONT_WAS_MIX = $ADJ_NEU . | $ADJP_POS_F but the $FA_S was $ADJP_NEG_F .
    | $ADJP_NEG_F but the $FA_S was $ADJP_POS_F . | $ADJ_NEU but the $FA_S was $ADJ_POS_F .
WATCHED_POS = $LIKED every minute of it $END_POS | it was $ADJP_POS_F $END_POS
    | it made me $FEEL_POS . | i would happily watch it again .
WATCHED_NEG = $DISLIKED every minute of it $END_NEG | it was $ADJP_NEG_F $END_NEG
    | it made me $FEEL_NEG . | fell asleep $FELL_WHEN . | it was a waste of $WASTE $END_NEG
WATCHED_MIX = it was $ADJ_NEU . | it was $ADJ_POS_F but a bit $ADJ_NEG_F .
    | i have mixed feelings about it . | some scenes were $ADJ_POS_F and some were $ADJ_NEG_F .
FILM_IS_POS = $ADJP_POS_F $END_POS | one of the $BEST_F films i have seen $TIMEFRAME $END_POS
    | $A_ADJ_POS_F $GENRE_SG $END_POS
FILM_IS_NEG = $ADJP_NEG_F $END_NEG | one of the $WORST_F films i have seen $TIMEFRAME $END_NEG
    | $A_ADJ_NEG_F $GENRE_SG . | a waste of $WASTE .
FILM_IS_MIX = $ADJ_NEU . | about $PLOT . | $ADJ_POS_F but $ADJ_NEG_F . | $A_ADJ_NEU $GENRE_SG .
WENT_POS = with my $PERSON and $WATCHED_POS | $WHEN_WENT and $WATCHED_POS
WENT_NEG = with my $PERSON and $WATCHED_NEG | $WHEN_WENT and $WATCHED_NEG
WENT_MIX = with my $PERSON and $WATCHED_MIX | $WHEN_WENT and $WATCHED_MIX
WHEN_WENT = last weekend | on a sunday afternoon | on a whim | after work
DIRECTOR_POS = did $A_ADJ_POS_F job $END_POS | knew exactly what to do .
    | made every scene count .
DIRECTOR_NEG = did $A_ADJ_NEG_F job . | simply did not care . | lost control of the story .
DIRECTOR_MIX = did $A_ADJ_NEU job . | tried something new . | stuck to the formula .
PERF_POS = gave $A_ADJ_POS_F performance $END_POS | was $ADJP_POS_F .
PERF_NEG = gave $A_ADJ_NEG_F performance . | was $ADJP_NEG_F . | seemed bored the whole time .
PERF_MIX = was $ADJ_NEU . | was $ADJ_POS_F but the $FA_S was $ADJ_NEG_F .
EXPECTED_POS = very little but it was $ADJP_POS_F $END_POS | to be bored but i $LIKED it .
EXPECTED_NEG = much more from this film . | $A_ADJ_POS_F film but it was $ADJP_NEG_F .
EXPECTED_MIX = more but it was $ADJ_NEU . | $A_ADJ_NEU $GENRE_SG and that is what i got .

FS_POS = the $FA_S was $CONT_WAS_POS | the $FA_P were $CONT_WAS_POS | it is $FILM_IS_POS
    | i $LIKED the $FA_S and the $FA_P . | i $LIKED every minute of it $END_POS
    | i would watch it again with my $PERSON . | i would happily watch it again .
    | i $RECO recommend it to anyone who likes $GENRE . | $PERFORMER $PERF_POS
    | by the end i was $EMO_POS . | it made me $FEEL_POS . | the director $DIRECTOR_POS
    | although it was long i never felt bored .
FS_NEG = the $FA_S was $CONT_WAS_NEG | the $FA_P were $CONT_WAS_NEG | it is $FILM_IS_NEG
    | i $DISLIKED the $FA_S and the $FA_P . | i would not watch it again .
    | i will never watch it again $END_NEG | i would not recommend it to anyone .
    | $PERFORMER $PERF_NEG | by the end i was $EMO_NEG . | it made me $FEEL_NEG .
    | it was a waste of $WASTE $END_NEG | i fell asleep $FELL_WHEN . | the director $DIRECTOR_NEG
FS_MIX = the $FA_S was $CONT_WAS_MIX | the $FA_P were $CONT_WAS_MIX | it is $FILM_IS_MIX
    | it was not as $ADJ_POS_F as i expected . | $PERFORMER $PERF_MIX | the director $DIRECTOR_MIX
    | i might watch it again someday . | i expected $EXPECTED_MIX
FACT_F = it is about $PLOT . | i watched it $WHERE_F . | it runs for $DUR_F .
    | i saw it $WHERE_F .
EXTRA_F_POS = $FS_POS | $FS_POS | $FS_POS | $FACT_F
EXTRA_F_NEG = $FS_NEG | $FS_NEG | $FS_NEG | $FACT_F
EXTRA_F_MIX = $FS_MIX | $FACT_F

ADJ_POS_P = superb | excellent | great | brilliant | fantastic | amazing | lovely | beautiful
    | perfect | impressive | solid | good | nice | elegant | smart | outstanding | terrific
    | bright | clear | comfortable | powerful | responsive | strong | pleasant | reliable
    | sturdy | fast | sleek | handy
ADJ_NEG_P = terrible | awful | bad | poor | weak | horrible | disappointing | useless | broken
    | flimsy | noisy | cheap | ugly | annoying | faulty | loose | uncomfortable | frustrating
    | slow | fragile | overpriced | unreliable | dim | messy
PA_S = battery | screen | sound | design | price | motor | build quality | display | cable | lid
    | handle | app | customer service | charger | setup | packaging | sound quality
    | battery life | case | remote | plug
PA_P = buttons | controls | instructions | blades | settings | keys
WORK_ADV_POS = perfectly | great | well | like a charm | exactly as described | beautifully
SHORT_TIME = two days | a week | one month | three uses | a single day | ten minutes
ARR_POS = on time | early | a day early | well packed | quickly
ARR_NEG = late | broken | damaged | two weeks late | with a missing part | in pieces
ARR_NEU = on tuesday | last week | in a plain box | in a brown box | in two days
COLOR = black | white | silver | red | blue | grey
DUR_POS = all day | for two full days | for a whole week | longer than i expected
DUR_NEG = less than an hour | only two hours | about an hour | barely a morning
DUR_NEU = about a day | about six hours | as long as the box says | a few hours
AUDIENCE_P = anyone on a budget | anyone who cooks | students | anyone who travels
    | busy parents
FREQ = every morning | twice a week | at work | in the kitchen | on the train | every day
REASON_POS_P = the company cares about quality | every part fits together well
    | the engineers thought of everything | it starts up in a second
REASON_NEG_P = the parts do not fit together | it overheats after ten minutes
    | the materials feel cheap | nothing works as described

PCONT_POS = $ADJP_POS_P $END_POS | $ADJP_POS_P and the $PA_S is $ADJP_POS_P .
    | $ADJP_POS_P because $REASON_POS_P .
PCONT_NEG = $ADJP_NEG_P $END_NEG | $ADJP_NEG_P and the $PA_S is $ADJP_NEG_P .
    | $ADJP_NEG_P because $REASON_NEG_P .
PCONT_MIX = $ADJ_NEU . | $ADJP_POS_P but the $PA_S is $ADJP_NEG_P .
    | $ADJP_NEG_P but the $PA_S is $ADJP_POS_P .
PVP_POS = $IS $ADJP_POS_P | $WORKS $WORK_ADV_POS | $IS worth every penny
    | $DOES exactly what i need | $IS $ADJ_POS_P and $ADJ_POS_P
PVP_NEG = $IS $ADJP_NEG_P | $IS a waste of money | $IS $ADJ_NEG_P and $ADJ_NEG_P
    | $DOES not work properly
PVP_MIX = $IS $ADJ_NEU | $IS $ADJ_POS_P but $ADJ_NEG_P | $DOES the job but nothing more
    | $IS $COLOR | $IS fine for the price
PEV_POS = arrived $ARR_POS and $WORKS $WORK_ADV_POS | made my mornings so much easier
PEV_NEG = stopped working after $SHORT_TIME | broke after $SHORT_TIME | arrived $ARR_NEG
PEV_MIX = arrived $ARR_NEU | came with a short cable
PRED_POS = $PVP_POS $END_POS | $PEV_POS $END_POS
PRED_NEG = $PVP_NEG $END_NEG | $PEV_NEG $END_NEG
PRED_MIX = $PVP_MIX . | $PEV_MIX .
DUR_CONT_POS = $DUR_POS $END_POS
DUR_CONT_NEG = $DUR_NEG $END_NEG
DUR_CONT_MIX = $DUR_NEU .
BOUGHT_POS = my $PERSON and $IT $PRED_POS
BOUGHT_NEG = my $PERSON and $IT $PRED_NEG
BOUGHT_MIX = my $PERSON and $IT $PRED_MIX
USE_POS = $FREQ and $IT $PVP_POS $END_POS
USE_NEG = $FREQ and $IT $PVP_NEG $END_NEG
USE_MIX = $FREQ and $IT $PVP_MIX .
AFTER_POS = the $PA_S is $PCONT_POS | $IT still $WORKS $WORK_ADV_POS .
AFTER_NEG = the $PA_S is $PCONT_NEG | $IT already $IS $ADJ_NEG_P .
AFTER_MIX = the $PA_S is $PCONT_MIX | $IT $PVP_MIX .
SUBJ_POS = $IT $PVP_POS $END_POS
SUBJ_NEG = $IT $PVP_NEG $END_NEG
SUBJ_MIX = $IT $PVP_MIX .

PS_POS = the $PA_S is $PCONT_POS | the $PA_P are $PCONT_POS | $THIS $PRODUCT $PRED_POS
    | $IT $PRED_POS | the battery lasts $DUR_CONT_POS | i use $IT_OBJ $USE_POS
    | i would buy $IT_OBJ again $END_POS | i $RECO recommend $IT_OBJ to $AUDIENCE_P .
    | i $LIKED the $PA_S . | $IT $IS the best $PRODUCT i have ever owned $END_POS
PS_NEG = the $PA_S is $PCONT_NEG | the $PA_P are $PCONT_NEG | $THIS $PRODUCT $PRED_NEG
    | $IT $PRED_NEG | the battery lasts $DUR_CONT_NEG | i returned $IT_OBJ after $SHORT_TIME .
    | i would not buy $IT_OBJ again $END_NEG | i would not recommend $IT_OBJ to anyone .
    | i $DISLIKED the $PA_S . | $IT $IS the worst $PRODUCT i have ever owned $END_NEG
    | it was a waste of money $END_NEG
PS_MIX = the $PA_S is $PCONT_MIX | the $PA_P are $PCONT_MIX | $THIS $PRODUCT $PRED_MIX
    | $IT $PRED_MIX | the battery lasts $DUR_CONT_MIX | $IT $WAS not as $ADJ_POS_P as i expected .
    | i have mixed feelings about $IT_OBJ .
FACT_P = i bought $IT_OBJ for my $PERSON . | i use $IT_OBJ $FREQ . | $IT arrived $ARR_NEU .
    | $IT $IS $COLOR .
EXTRA_P_POS = $PS_POS | $PS_POS | $PS_POS | $FACT_P
EXTRA_P_NEG = $PS_NEG | $PS_NEG | $PS_NEG | $FACT_P
EXTRA_P_MIX = $PS_MIX | $FACT_P
"""

# Adjective rules that also get an `A_` rule with the right article: "an excellent", "a superb".
_ARTICLE_RULES = ("ADJ_POS_F", "ADJ_NEG_F", "ADJ_NEU")

# Products and the words bound to agree with them for the whole review.
_SINGULAR = tuple(
    "phone blender kettle laptop vacuum toaster camera speaker keyboard microwave printer lamp"
    " watch router tablet mixer".split()
)
_PLURAL = ("headphones", "earbuds", "speakers")


def _agreement(product: str) -> dict[str, str]:
    plural = product in _PLURAL
    words = (
        ("these", "they", "them", "are", "were", "work", "do")
        if plural
        else ("this", "it", "it", "is", "was", "works", "does")
    )
    return {
        "PRODUCT": product,
        **dict(zip(("THIS", "IT", "IT_OBJ", "IS", "WAS", "WORKS", "DOES"), words, strict=True)),
    }


_ENVS: dict[str, dict[str, str]] = {p: _agreement(p) for p in _SINGULAR + _PLURAL}

# (domain, continuation rule without its sentiment suffix, bound product or None, openings).
_OPENING_GROUPS = (
    (
        "film",
        "CONT_WAS",
        None,
        "the acting was | the story was | the plot was | the ending was"
        " | the script was | the soundtrack was | the dialogue was | the pacing was"
        " | the cinematography was | the cast was | the effects were | the characters were"
        " | the action scenes were | the costumes were | the first half was | the second half was",
    ),
    ("film", "WATCHED", None, "i watched this film and | i watched this movie and"),
    ("film", "FILM_IS", None, "this film is | this movie is | it is"),
    ("film", "WENT", None, "i went to see it | i went to this movie"),
    ("film", "DIRECTOR", None, "the director"),
    ("film", "PERF", None, "the lead actor | the lead actress | the whole cast"),
    ("film", "EXPECTED", None, "i expected"),
    (
        "product",
        "PCONT",
        None,
        "the battery life is | the screen is | the sound quality is"
        " | the design is | the price is | the build quality is | the customer service is"
        " | the motor is | the buttons are | the instructions are",
    ),
    ("product", "DUR_CONT", None, "the battery lasts"),
    ("product", "AFTER", None, "after a week of use"),
    ("product", "SUBJ", None, "for the price"),
    *(
        ("product", "PRED", p, f"{_agreement(p)['THIS']} {p}")
        for p in "phone blender kettle laptop vacuum toaster camera headphones earbuds".split()
    ),
    ("product", "BOUGHT", "phone", "i bought this phone for"),
    ("product", "BOUGHT", "headphones", "i bought these headphones for"),
    ("product", "BOUGHT", "kettle", "i bought this kettle for"),
    ("product", "USE", "blender", "i use this blender"),
    ("product", "USE", "speaker", "i use this speaker"),
    ("product", "SUBJ", "blender", "i ordered this blender and"),
    ("product", "SUBJ", "earbuds", "i ordered these earbuds and"),
)
_OPENING_INFO = {
    o.strip(): (domain, cont, product)
    for domain, cont, product, group in _OPENING_GROUPS
    for o in group.split("|")
}
OPENINGS: tuple[str, ...] = tuple(_OPENING_INFO)

# Every fifth opening is held out for evaluation, so PPO can be scored on unseen prompts.
_SPLITS = {
    "train": tuple(o for i, o in enumerate(OPENINGS) if i % 5 != 2),
    "eval": tuple(o for i, o in enumerate(OPENINGS) if i % 5 == 2),
}

_SENTIMENTS = ((("negative", "NEG"), 0.40), (("positive", "POS"), 0.35), (("neutral", "MIX"), 0.25))
_N_SENTENCES = ((1, 0.35), (2, 0.40), (3, 0.25))


def _parse(text: str) -> dict[str, tuple[tuple[str, ...], ...]]:
    """Rules as `name -> alternatives`; an alternative is a tuple of words and `$RULE` symbols."""
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith(" "):
            lines[-1] += " " + line.strip()
        elif line.strip():
            lines.append(line.strip())
    rules = {}
    for line in lines:
        name, _, body = line.partition(" = ")
        alts = tuple(tuple(w for w in alt.split() if w != "~") for alt in body.split("|"))
        rules[name] = alts
    for name in _ARTICLE_RULES:
        rules["A_" + name] = tuple(
            ("an" if alt[0][0] in "aeiou" else "a", *alt) for alt in rules[name]
        )
    return rules


_RULES = _parse(_GRAMMAR)
_BOUND = frozenset(next(iter(_ENVS.values())))


@dataclass(frozen=True)
class Review:
    """One generated review. `text` starts with `opening` followed by a space."""

    text: str
    opening: str
    sentiment: str  # "positive" | "negative" | "neutral"
    domain: str  # "film" | "product"


def _expand(symbol: str, env: dict[str, str], rand, out: list[str]) -> None:
    alts = _RULES[symbol]
    for part in alts[int(rand() * len(alts))]:
        if part[0] != "$":
            out.append(part)
        elif part[1:] in env:
            out.append(env[part[1:]])
        else:
            _expand(part[1:], env, rand, out)


def _grams(words: list[str], n: int):
    """The n-grams of `words` as tuples."""
    return zip(*(words[i:] for i in range(n)), strict=False)


def _expand_new(symbol: str, env: dict[str, str], rand) -> list[str]:
    out: list[str] = []
    _expand(symbol, env, rand, out)
    return out


def _fresh_sentence(
    symbol: str, env: dict[str, str], rand, before: list[str], start: int
) -> tuple[list[str], bool]:
    """Expand `symbol` after `before` (whose current sentence begins at `start`) up to 5 times,
    until the sentence repeats none of its own trigrams and no 4-gram of `before`.

    Returns the last expansion and whether it passed.
    """
    seen = set(_grams(before, 4))
    for _attempt in range(5):
        out = _expand_new(symbol, env, rand)
        trigrams = list(_grams(before[start:] + out, 3))
        fresh = seen.isdisjoint(_grams(before[-3:] + out, 4))
        if fresh and len(set(trigrams)) == len(trigrams):
            return out, True
    return out, False


def _pick(options, rand):
    r = rand()
    for value, weight in options:
        r -= weight
        if r < 0:
            return value
    return options[-1][0]


def generate_reviews(n: int, seed: int = 0) -> list[Review]:
    """`n` reviews drawn from the grammar; the same `(n, seed)` always gives the same list."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    rand = rng.random
    by_domain = {d: [o for o in OPENINGS if _OPENING_INFO[o][0] == d] for d in ("film", "product")}
    products = list(_ENVS)
    reviews = []
    for _ in range(n):
        domain = "film" if rand() < 0.5 else "product"
        openings = by_domain[domain]
        opening = openings[int(rand() * len(openings))]
        label, suffix = _pick(_SENTIMENTS, rand)
        _, cont, product = _OPENING_INFO[opening]
        env = _ENVS[product or products[int(rand() * len(products))]] if domain == "product" else {}
        # A person does not repeat themselves: a sentence that repeats one of its own trigrams
        # ("the plot was dull and the plot was slow") or a 4-gram of the review so far is drawn
        # again; a later sentence that keeps doing so is left out.
        words = opening.split()
        words += _fresh_sentence(f"{cont}_{suffix}", env, rand, words, 0)[0]
        extra = f"EXTRA_{domain[0].upper()}_{suffix}"
        for _ in range(_pick(_N_SENTENCES, rand) - 1):
            out, ok = _fresh_sentence(extra, env, rand, words, len(words))
            words += out if ok else []
        reviews.append(Review(" ".join(words), opening, label, domain))
    return reviews


def prompts(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """`n` openings drawn with replacement from the `split` ("train" or "eval") openings."""
    openings = split_openings(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return random.Random(seed).choices(openings, k=n)


def split_openings(split: str) -> tuple[str, ...]:
    """The openings of one split ("train" or "eval")."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return _SPLITS[split]


# --- exact enumeration of the words and word pairs the grammar can produce --------------------

_Info = tuple[frozenset, frozenset, frozenset, bool]  # (first words, last words, bigrams, nullable)


def _seq_info(parts, info_of) -> _Info:
    """Combine the infos of a sequence of parts, letting empty parts pass their neighbours."""
    first: set[str] = set()
    last: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    nullable = True
    for part in parts:
        p_first, p_last, p_pairs, p_null = info_of(part)
        pairs |= p_pairs
        pairs.update((a, b) for a in last for b in p_first)
        if nullable:
            first |= p_first
        last = (last | p_last) if p_null else set(p_last)
        nullable = nullable and p_null
    return frozenset(first), frozenset(last), frozenset(pairs), nullable


def _grammar_info(env: dict[str, str]):
    """`info(part)` for one binding of the agreement words, memoised."""
    memo: dict[str, _Info] = {}

    def info(part: str) -> _Info:
        if part[0] != "$":
            return frozenset([part]), frozenset([part]), frozenset(), False
        name = part[1:]
        if name in env:
            words = env[name].split()
            return _info_words(words)
        if name not in memo:
            alts = [_seq_info(alt, info) for alt in _RULES[name]]
            memo[name] = (
                frozenset().union(*(a[0] for a in alts)),
                frozenset().union(*(a[1] for a in alts)),
                frozenset().union(*(a[2] for a in alts)),
                any(a[3] for a in alts),
            )
        return memo[name]

    return info


def _info_words(words: list[str]) -> _Info:
    pairs = frozenset(_grams(words, 2))
    return frozenset(words[:1]), frozenset(words[-1:]), pairs, not words


@functools.cache
def valid_bigrams() -> frozenset[tuple[str, str]]:
    """Every adjacent word pair that some generated review can contain, found by enumeration."""
    pairs: set[tuple[str, str]] = set()
    infos = {None: _grammar_info({})} | {p: _grammar_info(env) for p, env in _ENVS.items()}
    for opening in OPENINGS:
        domain, cont, product = _OPENING_INFO[opening]
        keys = [None] if domain == "film" else ([product] if product else list(_ENVS))
        for key in keys:
            info = infos[key]
            for suffix in ("POS", "NEG", "MIX"):
                extra = f"$EXTRA_{domain[0].upper()}_{suffix}"
                _, cont_last, cont_pairs, _ = _seq_info(
                    [*opening.split(), f"${cont}_{suffix}"], info
                )
                ex_first, ex_last, ex_pairs, _ = info(extra)
                pairs |= cont_pairs | ex_pairs
                pairs.update((a, b) for a in cont_last | ex_last for b in ex_first)
    return frozenset(pairs)


# Every word the grammar can produce (each one has a neighbour, so it is in some pair).
VOCABULARY: frozenset[str] = frozenset(w for pair in valid_bigrams() for w in pair)


@functools.cache
def max_sentence_length() -> int:
    """The most words (end mark not counted) that any one sentence of the grammar can have."""
    memo: dict[str, int] = {}

    def longest(name: str) -> int:
        if name not in memo:
            memo[name] = max(
                sum(1 if p[0] != "$" or p[1:] in _BOUND else longest(p[1:]) for p in alt)
                for alt in _RULES[name]
            )
        return memo[name]

    # Each continuation and each extra sentence is exactly one sentence with one end mark.
    firsts = (
        len(o.split()) + longest(f"{_OPENING_INFO[o][1]}_{s}")
        for o in OPENINGS
        for s in ("POS", "NEG", "MIX")
    )
    extras = (longest(f"EXTRA_{d}_{s}") for d in "FP" for s in ("POS", "NEG", "MIX"))
    return max(*firsts, *extras) - 1
