"""data=synthetic: a generated fact-retrieval task, so the whole pipeline runs with no Hub access.

A background lists facts ``<entity>'s <relation> is <value>.``; each question asks
``What is <entity>'s <relation>?`` and its answer is the value. Example (defaults)::

    background: Rofa's fruit is pear. Rofa's metal is cobalt. Rofa's bird is heron.
                Rofa's color is teal.
    branch 1:   "\\nQ: What is Rofa's bird?\\nA:"  ->  " heron" + EOS
    branch 2:   "\\nQ: What is Rofa's color?\\nA:"  ->  " teal" + EOS

The value stands at a fixed offset after its relation word ("<relation> is <value>"), whatever
the entity's length in tokens: a pattern a small model finds quickly by induction.

Invariants:
  * Every answer can only be read from the background: values are drawn uniformly from a pool of
    32 words per relation, independently per background, so the question alone predicts the answer
    with probability about 1/32.
  * By default (``entities_per_background=1``) every question is answerable by a key that is unique
    in its background (the relation: each background states each relation once), which a ~1M
    parameter model learns in minutes on CPU. ``entities_per_background > 1`` is the harder
    entity-binding variant: all entities share the same relations, so the answer depends on the
    (entity, relation) pair and a relation-only shortcut gets 1/entities.
  * Background ``index`` of ``split`` is a pure function of ``(seed, split, index)`` (generated on
    demand, so splits of any size cost nothing up front), and a background belongs to exactly one
    split (a hash of its text decides, with redrawing), so train / validation / test never share
    one.
  * ``kind="text"`` is the same world as text for columnar pretraining: one background per branch,
    followed (``text_qa``) by its questions and answers in the QA templates, then EOS.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..layout import Branch, BranchSample
from .io import SPLITS, check_kind, check_split, stable_hash
from .qa import Context, QATemplate, Question, encode_qa
from .text import eos_id, special_prefix, tokenize

log = logging.getLogger(__name__)

RELATIONS: dict[str, tuple[str, ...]] = {
    "color": ("red blue green yellow purple pink brown black white gray orange violet indigo teal "
              "cyan maroon beige ivory navy olive crimson amber coral lime magenta tan scarlet "
              "azure lavender khaki mauve ochre"),
    "fruit": ("apple pear plum grape lemon mango peach cherry banana melon kiwi fig date apricot "
              "papaya guava berry lychee quince nectarine tangerine pineapple coconut avocado "
              "raisin prune citron damson persimmon pomelo grapefruit currant"),
    "animal": ("fox wolf bear deer horse rabbit tiger lion zebra camel goat sheep mouse otter "
               "badger beaver moose panda koala llama bison lynx hyena monkey gorilla squirrel "
               "hedgehog weasel donkey leopard cheetah raccoon"),
    "city": ("Paris London Rome Tokyo Cairo Lima Oslo Delhi Dublin Madrid Berlin Vienna Prague "
             "Athens Lisbon Moscow Sydney Boston Denver Seattle Chicago Austin Toronto Havana "
             "Nairobi Seoul Bangkok Manila Jakarta Istanbul Warsaw Helsinki"),
    "job": ("doctor farmer baker pilot nurse teacher lawyer painter sailor tailor miner chef judge "
            "dentist writer singer dancer plumber barber butcher carpenter soldier banker clerk "
            "driver engineer gardener hunter jeweler mason potter weaver"),
    "sport": ("tennis soccer hockey golf rugby boxing cricket baseball rowing skiing surfing "
              "cycling running fencing karate judo polo squash archery bowling diving sailing "
              "climbing wrestling handball volleyball badminton lacrosse curling softball snooker "
              "darts"),
    "tool": ("hammer saw drill wrench chisel shovel rake axe knife pliers ladder brush needle "
             "scissors spade trowel hoe crowbar mallet sickle scythe lever pulley clamp vise awl "
             "anvil tongs funnel ruler magnet pickaxe"),
    "metal": ("iron copper tin zinc lead nickel gold silver bronze brass steel cobalt chrome "
              "platinum titanium aluminum mercury tungsten lithium sodium calcium uranium radium "
              "bismuth cadmium gallium iridium osmium palladium rhodium thorium vanadium"),
    "drink": ("tea coffee milk juice water soda wine beer cider cocoa lemonade punch kefir mead "
              "sake rum gin vodka whisky brandy sherry espresso latte smoothie cola tonic chai "
              "lassi kvass champagne bourbon tequila"),
    "flower": ("rose tulip lily daisy orchid iris poppy lotus aster peony dahlia jasmine lilac "
               "magnolia marigold daffodil sunflower camellia carnation hibiscus azalea begonia "
               "gardenia geranium crocus freesia petunia primrose zinnia anemone bluebell "
               "hyacinth"),
    "instrument": ("piano violin guitar flute drum harp cello trumpet banjo oboe tuba organ lute "
                   "sitar clarinet saxophone trombone harmonica accordion ukulele mandolin bagpipe "
                   "xylophone piccolo bassoon cymbal tambourine zither fiddle horn gong viola"),
    "vehicle": ("car bus truck train bike boat ship plane tram taxi van jeep canoe kayak yacht "
                "sled scooter tractor wagon cart ferry rocket glider blimp subway trolley raft "
                "barge limo moped buggy carriage"),
    "country": ("France Spain Italy Japan China India Brazil Chile Peru Egypt Kenya Ghana Mexico "
                "Canada Norway Sweden Finland Poland Greece Turkey Iran Nepal Cuba Vietnam Morocco "
                "Portugal Austria Belgium Ireland Iceland Denmark Hungary"),
    "bird": ("eagle hawk owl crow robin sparrow swan duck goose parrot pigeon dove finch heron "
             "stork crane falcon raven magpie gull pelican penguin ostrich flamingo peacock wren "
             "lark jay toucan vulture canary puffin"),
    "tree": ("oak pine maple birch willow cedar elm ash beech spruce fir palm cypress poplar "
             "walnut chestnut hazel alder aspen larch yew juniper sequoia redwood baobab acacia "
             "banyan eucalyptus mahogany teak ebony sycamore"),
    "fabric": ("cotton wool silk linen denim velvet satin leather nylon polyester lace tweed "
               "flannel suede fleece felt canvas corduroy chiffon jersey rayon cashmere muslin "
               "hemp jute taffeta gingham calico burlap chenille mohair spandex"),
}
RELATIONS = {rel: tuple(words.split()) for rel, words in RELATIONS.items()}
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
FACT = "{entity}'s {relation} is {value}."
QUESTION = "What is {entity}'s {relation}?"


@dataclass
class SyntheticDataConfig:
    """Schema of ``conf/data/synthetic.yaml`` (every key, its default and its meaning)."""

    name: str = "synthetic"
    seed: int = 0  # background i of a split is a pure function of (seed, split, i)
    train_size: int = 20_000  # backgrounds per split, generated on demand; splits never share one
    validation_size: int = 300
    test_size: int = 300
    min_facts: int = 4  # facts per background: a seeded count in [min_facts, max_facts]
    max_facts: int = 5  # (4-5 facts: short backgrounds keep the default pipeline within minutes on CPU)
    questions_per_background: int = 4  # a background with more questions than collator.branches_per_sample gives several samples
    entities_per_background: int = 1  # 1: each relation stated once (key unique); >1: harder entity-binding variant
    min_answer_words: int = 1  # words per answer value: a seeded count in [min, max] (max 4)
    max_answer_words: int = 1
    text_qa: bool = True  # kind=text documents also list their Q/A pairs, so pretraining teaches the QA format
    seq_length: int = 256  # kind=text: tokens per branch (one background document each; longer ones are cut)
    template: QATemplate = field(default_factory=QATemplate)  # how QA samples become text; the answer target is template.answer + EOS

    def validate(self) -> "SyntheticDataConfig":
        def bad(key, why):
            raise ValueError(f"data.{key}: {why}")

        for split in SPLITS:
            if getattr(self, f"{split}_size") < 1:
                bad(f"{split}_size", "must be >= 1")
        if not 1 <= self.min_facts <= self.max_facts:
            bad("min_facts", f"need 1 <= min_facts <= max_facts, got {self.min_facts}, "
                             f"{self.max_facts}")
        if self.entities_per_background < 1:
            bad("entities_per_background", f"must be >= 1, got {self.entities_per_background}")
        if self.max_facts // self.entities_per_background > len(RELATIONS):
            bad("max_facts", f"at most {len(RELATIONS)} relations per entity "
                             f"({len(RELATIONS) * self.entities_per_background} facts)")
        n_ent = self.entities_per_background
        fewest = n_ent * max(1, self.min_facts // n_ent)  # the fewest facts a background can have
        if not 1 <= self.questions_per_background <= fewest:
            bad("questions_per_background", f"must be in [1, {fewest}] (at most the number of "
                                            f"facts), got {self.questions_per_background}")
        if not 1 <= self.min_answer_words <= self.max_answer_words <= 4:
            bad("min_answer_words", "need 1 <= min_answer_words <= max_answer_words <= 4")
        if self.seq_length < 8:
            bad("seq_length", f"must be >= 8, got {self.seq_length}")
        self.template.validate()
        return self

    def size(self, split: str) -> int:
        return getattr(self, f"{check_split(split)}_size")


def _entity_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(2))
        if name.capitalize() not in names:
            names.append(name.capitalize())
    return names


def _draw_facts(cfg: SyntheticDataConfig, rng: random.Random) -> tuple[list, list[int]]:
    """Facts ``[(entity number, relation, value)]`` in text order, and the facts asked about."""
    n_facts = rng.randint(cfg.min_facts, cfg.max_facts)
    n_ent = cfg.entities_per_background
    relations = rng.sample(sorted(RELATIONS), max(1, n_facts // n_ent))
    facts = []
    for entity in range(n_ent):
        for relation in relations:
            words = rng.sample(RELATIONS[relation],
                               rng.randint(cfg.min_answer_words, cfg.max_answer_words))
            facts.append((entity, relation, " ".join(words)))
    rng.shuffle(facts)
    return facts, rng.sample(range(len(facts)), cfg.questions_per_background)


def synthetic_background(cfg: SyntheticDataConfig, split: str, index: int) -> Context:
    """Background ``index`` of ``split`` with its questions (a pure function of its arguments)."""
    split_id = SPLITS.index(check_split(split))
    rng = random.Random(f"paradec-synthetic/{cfg.seed}/{split}/{index}")
    facts, picks = _draw_facts(cfg, rng)
    while True:  # redraw the names until the text hashes to this split: no shared backgrounds
        names = _entity_names(rng, cfg.entities_per_background)
        sentences = [FACT.format(entity=names[e], relation=r, value=v) for e, r, v in facts]
        text = " ".join(sentences)
        if stable_hash(text) % len(SPLITS) == split_id:
            break
    starts, pos = [], 0
    for sentence, (_, _, value) in zip(sentences, facts):  # where each value starts in the text
        starts.append(pos + len(sentence) - 1 - len(value))
        pos += len(sentence) + 1
    questions = [Question(id=f"{split}-{index}-{q}",
                          question=QUESTION.format(entity=names[facts[f][0]], relation=facts[f][1]),
                          answers=[facts[f][2]], answer_starts=[starts[f]])
                 for q, f in enumerate(picks)]
    return Context(id=f"synthetic-{split}-{index}", title="", context=text, questions=questions)


def synthetic_document(cfg: SyntheticDataConfig, ctx: Context) -> str:
    """The text-corpus form of a background: the background, then its Q/A pairs (``text_qa``)."""
    t = cfg.template
    text = t.background.format(context=ctx.context, title=ctx.title)
    if cfg.text_qa:
        text += "".join(t.question.format(question=q.question)
                        + t.answer.format(answer=q.answers[0]) for q in ctx.questions)
    return text


class SyntheticQA(torch.utils.data.Dataset):
    """Item ``i``: group ``i % g`` of the questions of background ``i // g`` as one sample, where
    ``g = ceil(questions_per_background / branches_per_sample)``. Generated and encoded on demand;
    ``__getitems__`` (used by the DataLoader) encodes a whole batch in one tokenizer call."""

    kind = "qa"

    def __init__(self, cfg: SyntheticDataConfig, split: str, tokenizer, branches_per_sample: int):
        if branches_per_sample < 1:
            raise ValueError(f"branches_per_sample must be >= 1, got {branches_per_sample}")
        self.cfg, self.split, self.tokenizer, self.k = cfg, split, tokenizer, branches_per_sample
        self.groups = -(-cfg.questions_per_background // branches_per_sample)

    def __len__(self) -> int:
        return self.cfg.size(self.split) * self.groups

    def __getitems__(self, indices: Sequence[int]) -> list[BranchSample]:
        contexts = []
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(i)
            ctx = synthetic_background(self.cfg, self.split, i // self.groups)
            j = i % self.groups
            ctx.questions = ctx.questions[j * self.k: (j + 1) * self.k]
            contexts.append(ctx)
        samples, _ = encode_qa(contexts, self.tokenizer, self.cfg.template,
                               branches_per_sample=self.k, training=self.split == "train")
        return samples

    def __getitem__(self, i: int) -> BranchSample:
        return self.__getitems__([i])[0]


class SyntheticText(torch.utils.data.Dataset):
    """Item ``i``: background ``i`` as text (:func:`synthetic_document`) + EOS, one branch, cut to
    ``seq_length`` tokens (a warning says if the first documents are longer)."""

    kind = "text"

    def __init__(self, cfg: SyntheticDataConfig, split: str, tokenizer):
        self.cfg, self.split, self.tokenizer = cfg, split, tokenizer
        self.prefix, self.eos = special_prefix(tokenizer), eos_id(tokenizer)
        first = self.__getitems__(range(min(64, len(self))), cut=False)
        longest = max(len(b.target) for b in first)
        if longest > cfg.seq_length:
            log.warning("data=synthetic: documents have up to %d tokens, more than "
                        "data.seq_length=%d; they are cut", longest, cfg.seq_length)

    def __len__(self) -> int:
        return self.cfg.size(self.split)

    def __getitems__(self, indices: Sequence[int], cut: bool = True) -> list[Branch]:
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(i)
        docs = [synthetic_document(self.cfg, synthetic_background(self.cfg, self.split, i))
                for i in indices]
        ids = tokenize(self.tokenizer, docs)
        end = self.cfg.seq_length if cut else None
        return [Branch(prompt=[], target=(self.prefix + x + [self.eos])[:end]) for x in ids]

    def __getitem__(self, i: int) -> Branch:
        return self.__getitems__([i])[0]


class SyntheticTask:
    """The built-in offline task (see the module docstring)."""

    kinds = ("text", "qa")

    def __init__(self, config: SyntheticDataConfig):
        self.config = config.validate()

    def backgrounds(self, split: str) -> Iterator[Context]:
        for i in range(self.config.size(split)):
            yield synthetic_background(self.config, split, i)

    def texts(self, split: str = "train") -> Iterator[str]:
        """The text-corpus form of every background of the split (for training a tokenizer)."""
        for ctx in self.backgrounds(split):
            yield synthetic_document(self.config, ctx)

    def dataset(self, split: str, tokenizer, kind: str = "text", branches_per_sample: int = 4):
        check_split(split)
        check_kind(kind, self.kinds, "synthetic")
        if kind == "qa":
            ds = SyntheticQA(self.config, split, tokenizer, branches_per_sample)
        else:
            ds = SyntheticText(self.config, split, tokenizer)
        log.info("data=synthetic %s (%s): %d items from %d backgrounds", split, kind, len(ds),
                 self.config.size(split))
        return ds
