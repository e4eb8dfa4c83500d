"""Offline long-context tasks, generated locally and deterministically from a seed.

RULER-style: niah_single_1 (a needle in a repeated-sentence haystack), niah_multikey_2 (every
haystack line is a distractor needle), niah_multikey_3 (UUID keys and values), vt (variable
tracking, 4 hops), cwe (common-word extraction, our own word list).
InfiniteBench-style: passkey, number_string, kv_retrieval (a JSON object of random UUID pairs).
niah: a needle-in-a-haystack grid point (prose haystack; length x depth).

Every prompt is built with the model's tokenizer to exactly `n_tokens` tokens: the chat template
applied to the task text, followed by the answer prefix (as RULER does). Scoring follows the
originals: RULER tasks score the share of reference strings present in the answer (case
insensitive); passkey and number_string compare the first integer of the answer; kv_retrieval
and niah check that the reference is a substring.
"""
from __future__ import annotations

import random
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

RULER_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe")
INFINITE_TASKS = ("passkey", "number_string", "kv_retrieval")
TASKS = RULER_TASKS + INFINITE_TASKS + ("niah",)

# answer lengths (tokens) per task, about what the references need
MAX_TOKENS = {"niah_single_1": 24, "niah_multikey_2": 24, "niah_multikey_3": 48, "vt": 40, "cwe": 80,
              "passkey": 12, "number_string": 16, "kv_retrieval": 48, "niah": 24}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_SYL_ON = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "pl", "st", "tr"]
_SYL_NU = ["a", "e", "i", "o", "u", "ai", "ou"]
_SYL_CO = ["", "", "n", "r", "l", "s", "m", "x"]

# Our own word list for cwe and the key words of the needles (common English nouns).
WORDS = """
apple anchor arrow badge bakery balloon banner barrel basket beacon blanket bottle bracelet bridge
bucket button cabin cactus camera candle canyon carpet castle cedar chimney circle cliff clock
cloud compass copper cottage crayon crystal curtain cushion dagger desert diamond dolphin dragon
drum eagle easel engine falcon feather fence ferry fiddle forest fountain garden garlic giraffe
glacier globe goblet granite guitar hammer harbor harvest helmet hermit honey horizon island
ivory jacket jasmine jungle kettle kitten ladder lantern lemon library lighthouse lizard magnet
mango marble meadow mirror monkey mountain museum needle noodle oasis ocean olive orchard otter
paddle palace panther parrot pebble pepper piano pillow pirate planet pocket pumpkin puzzle
quartz quilt rabbit radio raven ribbon river rocket saddle sailor salmon satchel scarf shadow
shovel silver sketch sparrow spider spoon statue stone sunset tablet teapot temple thunder tiger
timber tomato tower trumpet tulip tunnel turtle umbrella valley velvet violin volcano wagon walnut
whistle willow window wizard yacht zebra acorn album almond antler apron atlas avocado bamboo
banjo beaver bicycle biscuit blossom bonnet boulder bramble brick broom buffalo butter cabbage
camel canoe canvas caravan carrot cathedral cellar chalk cherry chestnut cinnamon clover cobalt
coconut comet coral cricket crown dandelion denim domino donkey dune ember emerald falafel fig
flamingo flannel fossil gadget galaxy gazelle ginger goose grape gravel hazel hedgehog heron
hickory hive hyacinth iceberg igloo jaguar jelly kayak kernel kiwi koala lagoon lava lavender
lemur lentil lilac lobster locket lotus lynx maple marsh meteor mint mitten moss moth mural
mustard nectar nutmeg oak oatmeal orbit orchid ostrich owl oyster pagoda panda papaya parsley
peach pelican penguin pine plum pony poppy prism quail radish raft reef rhubarb robin ruby
saffron sage sapphire sardine scooter seashell sequoia sherbet shrimp sloth snail sorrel spinach
sponge squash squirrel stork straw sugar sundial swan tangerine tapestry thistle thyme toffee
topaz torch truffle tundra turnip vanilla vase walrus wheat wombat yarn yogurt zinnia
""".split()

_PROSE_SUBJ = ["The committee", "A small team", "The old engineer", "Our neighbour", "The research group",
               "A local farmer", "The city council", "The museum guide", "A young writer", "The ship's crew",
               "The librarian", "A travelling musician", "The school board", "The night watchman"]
_PROSE_VERB = ["discussed", "reviewed", "repaired", "described", "measured", "painted", "studied", "planned",
               "questioned", "photographed", "catalogued", "rebuilt", "praised", "ignored"]
_PROSE_OBJ = ["the northern bridge", "an old map of the harbour", "the spring harvest", "a broken clock",
              "the annual budget", "a stack of letters", "the village well", "the train timetable",
              "a collection of seashells", "the weather report", "an unfinished mural", "the garden fence",
              "a list of recipes", "the lighthouse lamp"]
_PROSE_ADV = ["before the rain started", "late in the evening", "with great care", "for the third time",
              "without much enthusiasm", "after a long debate", "in the early morning", "during the festival",
              "while the others waited", "as the sun went down", "under a grey sky", "in complete silence"]

_CITIES = ["Lisbon", "Oslo", "Nairobi", "Quito", "Hanoi", "Tbilisi", "Dakar", "Perth", "Lima", "Riga",
           "Cairo", "Tunis", "Osaka", "Bergen", "Cusco", "Accra", "Kyoto", "Porto", "Zagreb", "Austin"]


@dataclass
class Sample:
    task: str
    n_tokens: int
    seed: int
    index: int
    tokens: list[int]
    references: list[str]
    metric: str                      # all_refs | first_int | substring
    max_tokens: int
    depth: Optional[float] = None    # needle depth (0 = start of the context, 1 = end)
    meta: dict = field(default_factory=dict)

    def header(self) -> dict:
        d = asdict(self)
        d.pop("tokens")
        return d


# ---- scoring -------------------------------------------------------------------------------
def score(metric: str, output: str, references: list[str]) -> float:
    """Score an answer in [0, 1] the way the original benchmarks do."""
    if metric == "all_refs":
        low = output.lower()
        return sum(r.lower() in low for r in references) / len(references)
    if metric == "first_int":
        m = re.search(r"\d+", output)
        return float(m is not None and m.group(0) == references[0])
    if metric == "substring":
        return float(references[0].lower() in output.lower())
    raise ValueError(f"unknown metric {metric!r}")


# ---- text pieces ---------------------------------------------------------------------------
def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _prose(rng: random.Random) -> str:
    return f"{rng.choice(_PROSE_SUBJ)} {rng.choice(_PROSE_VERB)} {rng.choice(_PROSE_OBJ)} {rng.choice(_PROSE_ADV)}."


def pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYL_ON) + rng.choice(_SYL_NU) + rng.choice(_SYL_CO) for _ in range(rng.randint(2, 3)))


@dataclass
class _Spec:
    """What a task contributes: the text around the context, the needles to place, how to make
    the i-th haystack unit, and how to join units."""
    intro: str
    question: str
    answer_prefix: str
    unit: Callable[[int], str]
    needles: list[str]
    references: list[str]
    metric: str
    sep: str = " "
    depths: Optional[list[float]] = None   # one per needle; None: evenly spread
    outro: str = ""
    meta: dict = field(default_factory=dict)
    full_units: Optional[Callable[[int], list[str]]] = None  # cwe: the whole context for m units


def _spec(task: str, rng: random.Random, depth: Optional[float], n_tokens: int) -> _Spec:
    word = rng.choice(WORDS)
    if task == "niah_single_1":
        value = _number(rng, 7)
        return _Spec(
            intro="Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                  "I will quiz you about the numbers afterwards.\n",
            question=f"What is the special magic number for {word} mentioned in the provided text?",
            answer_prefix=f"The special magic number for {word} mentioned in the provided text is",
            unit=lambda i: NOISE, needles=[f"One of the special magic numbers for {word} is: {value}."],
            references=[value], metric="all_refs", depths=[depth if depth is not None else rng.random()],
            meta={"key": word})
    if task in ("niah_multikey_2", "niah_multikey_3"):
        uu = task == "niah_multikey_3"
        kind = "uuid" if uu else "number"
        key = _uuid(rng) if uu else word
        value = _uuid(rng) if uu else _number(rng, 7)
        drng = random.Random(rng.getrandbits(64))
        used = {key}

        def distractor(i: int) -> str:
            k = _uuid(drng) if uu else (drng.choice(WORDS) + "-" + pseudo_word(drng))
            while k in used:
                k = _uuid(drng) if uu else (drng.choice(WORDS) + "-" + pseudo_word(drng))
            used.add(k)
            v = _uuid(drng) if uu else _number(drng, 7)
            return f"One of the special magic {kind}s for {k} is: {v}."
        return _Spec(
            intro=f"Some special magic {kind}s are hidden within the following text. Make sure to memorize it. "
                  f"I will quiz you about the {kind}s afterwards.\n",
            question=f"What is the special magic {kind} for {key} mentioned in the provided text?",
            answer_prefix=f"The special magic {kind} for {key} mentioned in the provided text is",
            unit=distractor, needles=[f"One of the special magic {kind}s for {key} is: {value}."],
            references=[value], metric="all_refs", sep="\n",
            depths=[depth if depth is not None else rng.random()], meta={"key": key})
    if task == "vt":
        value = _number(rng, 5)
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(5)]
        while len(set(names)) < 5:
            names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(5)]
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
        return _Spec(
            intro="Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
            question=f"Question: Find all variables that are assigned the value {value} in the text above.",
            answer_prefix=f"Answer: According to the chain(s) of variable assignment in the text above, "
                          f"5 variables are assigned the value {value}, they are:",
            unit=lambda i: NOISE, needles=chain, references=names, metric="all_refs",
            depths=sorted(rng.uniform(0.05, 0.95) for _ in chain), meta={"value": value})
    if task == "cwe":
        words = rng.sample(WORDS, len(WORDS))
        common, rare_pool = words[:10], words[10:]
        extra = [pseudo_word(rng) for _ in range(2000)]
        rare_pool = rare_pool + [w for w in extra if w not in set(words)]

        # RULER: every common word 30 times, every rare word 3 times; shorter prompts scale the
        # common frequency down (never below 5, so the common words stay the most frequent)
        freq = 30 if n_tokens >= 4000 else max(5, n_tokens * 30 // 4000)

        def full(m: int) -> list[str]:
            # m = number of distinct rare words
            lst = common * freq + rare_pool[:m] * 3
            r = random.Random(len(lst) * 7919 + m)
            r.shuffle(lst)
            return [f"{i + 1}. {w}" for i, w in enumerate(lst)]
        return _Spec(
            intro="Below is a numbered list of words. In these words, some appear more often than others. "
                  "Memorize the ones that appear most often.\n",
            question="Question: What are the 10 most common words in the above list?",
            answer_prefix="Answer: The top 10 words that appear most often in the list are:",
            unit=lambda i: "", needles=[], references=common, metric="all_refs", sep="\n", full_units=full,
            meta={"common": common, "common_freq": freq})
    if task in ("passkey", "number_string"):
        if task == "passkey":
            value, what = _number(rng, 5), "pass key"
            needle = f"The pass key is {value}. Remember it. {value} is the pass key."
            q, prefix = "What is the pass key?", "The pass key is"
        else:
            value, what = _number(rng, 10), "sequence of digits"
            needle = f"The sequence of digits is {value}. Remember it. {value} is the sequence of digits."
            q, prefix = "What is the sequence of digits?", "The sequence of digits is"
        return _Spec(
            intro="There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                  "I will quiz you about the important information there.\n\n",
            question=q, answer_prefix=prefix, unit=lambda i: NOISE, needles=[needle], references=[value],
            metric="first_int", depths=[depth if depth is not None else rng.random()], meta={"what": what})
    if task == "kv_retrieval":
        key, value = _uuid(rng), _uuid(rng)
        drng = random.Random(rng.getrandbits(64))
        return _Spec(
            intro="Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{",
            question=f'Key: "{key}"\nThe value associated with the specified key is:',
            answer_prefix=f'The value associated with the key "{key}" is', sep=", ",
            unit=lambda i: f'"{_uuid(drng)}": "{_uuid(drng)}"', needles=[f'"{key}": "{value}"'],
            references=[value], metric="substring", depths=[depth if depth is not None else rng.random()],
            outro="}", meta={"key": key})
    if task == "niah":
        city, secret = rng.choice(_CITIES), rng.choice(WORDS) + "-" + _number(rng, 3)
        prng = random.Random(rng.getrandbits(64))
        return _Spec(
            intro="Read the following notes carefully. A question about them follows.\n\n",
            question=f"What is the secret code of the {city} project, according to the notes?",
            answer_prefix=f"The secret code of the {city} project is",
            unit=lambda i: _prose(prng), needles=[f"The secret code of the {city} project is {secret}."],
            references=[secret], metric="substring", depths=[0.5 if depth is None else depth],
            meta={"city": city})
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def _context(spec: _Spec, m: int, units: list[str]) -> str:
    if spec.full_units is not None:
        body = spec.full_units(m)
    else:
        body = list(units[:m])
        depths = spec.depths or [(i + 1) / (len(spec.needles) + 1) for i in range(len(spec.needles))]
        # insert from the deepest so earlier indices stay valid; ties keep the needles' order
        slots = [min(m, max(0, round(d * m))) for d in depths]
        for slot, _, needle in sorted(zip(slots, range(len(slots)), spec.needles), reverse=True):
            body.insert(slot, needle)
    return spec.intro + spec.sep.join(body) + spec.outro


_FILL = [" ", ".", " a", "\n", " the", ","]


def build_sample(model, task: str, n_tokens: int, seed: int = 0, index: int = 0,
                 depth: Optional[float] = None, raw: bool = False) -> Sample:
    """One sample of `task` whose model input (chat template + answer prefix) is exactly `n_tokens`
    tokens. Deterministic in (task, n_tokens, seed, index, depth)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{task}/{n_tokens}/{seed}/{index}/{depth}")
    spec = _spec(task, rng, depth, n_tokens)
    units: list[str] = []

    def unit_list(m: int) -> list[str]:
        while len(units) < m:
            units.append(spec.unit(len(units)))
        return units

    def render(m: int, pad: str = "") -> list[int]:
        ctx = _context(spec, m, unit_list(m) if spec.full_units is None else [])
        user = ctx + pad + "\n\n" + spec.question
        if raw or not model.chat_template:
            text = user + "\n" + spec.answer_prefix
            return model.tokenize(text, add_special=True, parse_special=False)
        text = model.format_chat([{"role": "user", "content": user}]) + spec.answer_prefix
        return model.tokenize(text, add_special=False, parse_special=True)

    base = len(render(0))
    if base > n_tokens:
        raise ValueError(f"{task}: {n_tokens} tokens is too short (the task text alone takes {base})")
    # largest unit count m whose prompt fits
    lo, hi = 0, 1
    while len(render(hi)) <= n_tokens:
        lo, hi = hi, hi * 2
        if hi > 10 ** 6:
            raise ValueError("could not size the haystack")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(render(mid)) <= n_tokens:
            lo = mid
        else:
            hi = mid
    m = lo
    # top up to the exact length after the context (before the question): words of the noise
    # sentences first, then single characters
    words = [" " + w for w in NOISE.split()]
    pad = "\n" if len(render(m, "\n")) <= n_tokens else ""
    cur = len(render(m, pad))
    wi = 0
    while cur < n_tokens:
        nxt = len(render(m, pad + words[wi % len(words)]))
        if nxt > n_tokens:
            break
        pad += words[wi % len(words)]
        wi += 1
        cur = nxt
    tries = 0
    while cur < n_tokens:
        for f in _FILL:
            nxt = len(render(m, pad + f))
            if cur < nxt <= n_tokens:
                pad += f
                cur = nxt
                break
        else:
            raise ValueError(f"{task}: could not reach exactly {n_tokens} tokens (stuck at {cur})")
        tries += 1
        if tries > 50:
            raise ValueError(f"{task}: could not reach exactly {n_tokens} tokens")
    tokens = render(m, pad)
    assert len(tokens) == n_tokens
    return Sample(task=task, n_tokens=n_tokens, seed=seed, index=index, tokens=tokens,
                  references=list(spec.references), metric=spec.metric, max_tokens=MAX_TOKENS[task],
                  depth=(spec.depths[0] if spec.depths and len(spec.depths) == 1 else None),
                  meta=dict(spec.meta, units=m, pad=len(pad)))
