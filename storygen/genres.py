"""The genre registry, name resolution, and `auto` genre detection.

Seed genres are the six the public genre model was trained on; the rest are the
ones users ask for. Each genre has aliases, a one-line description, an example
opening, and the cue words `detect_genre` looks for.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from storygen.errors import UnknownGenreError

logger = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(frozen=True)
class Genre:
    name: str  # the identifier: the control token is `<name>` in the genre_tags format
    label: str  # how people write it
    description: str
    example: str  # an opening that shows the genre off
    aliases: tuple[str, ...] = ()
    cues: tuple[str, ...] = ()  # word stems and phrases that suggest the genre (see detect_genre)
    seed: bool = False  # one of the six genres of the seeds' genre model
    # The instruct format's framing (storygen/prompts.py): what happens in such a story, and its tone.
    plot: str = ""  # completes "In a {label} story, ..."
    tone: str = ""  # completes "The tone is ..."
    # The genre steer (storygen/steer.py): words such a story is made of, whose tokens are made a
    # little likelier while it is written. Whole lower-case words; the capitalised form comes too.
    words: tuple[str, ...] = ()


GENRES: tuple[Genre, ...] = (
    Genre(
        "superhero", "superhero", "Masked heroes, secret identities and powers that come at a price.",
        "The night the city's power failed, Maya found she could hold lightning in her hands.",
        aliases=("super hero", "superheroes", "hero", "comic", "comics", "marvel"),
        cues=("superhero", "super hero", "superpower", "super power", "powers", "villain", "mutant", "vigilante",
              "masked", "cape", "secret identity", "spider", "batman", "superman", "avenger", "justice league",
              "comic", "sidekick", "nemesis", "crime-fighting", "crime fighting", "x-men", "hulk", "iron man"),
        seed=True,
        plot=("a superhero with powers, a costume and a secret identity fights crime and a supervillain "
              "who threatens the city, saves innocent people, and pays a price for being a hero"),
        tone="bold and fast, with high stakes",
        words=("superhero", "superheroes", "superpower", "superpowers", "powers", "villain", "villains", "hero",
               "heroes", "heroic", "flying", "flew", "powerful", "super", "mask", "costume", "justice", "rescue",
               "save", "saved", "strength"),
    ),
    Genre(
        "sci_fi", "science fiction", "Spaceships, strange futures and the science that changes everything.",
        "After discovering time travel, the first thing Dr. Ilsa Varn did was warn herself.",
        aliases=("scifi", "sci-fi", "sci fi", "science fiction", "science-fiction", "sf", "space"),
        cues=("space", "spaceship", "starship", "planet", "alien", "robot", "android", "cyborg", "galaxy",
              "time travel", "time machine", "future", "futuristic", "laser", "orbit", "astronaut", "scientist",
              "experiment", "clone", "artificial intelligence", "virus", "mars", "moon", "earth", "nasa",
              "dimension", "teleport", "spacecraft", "colony", "extraterrestrial", "invasion", "dystopia"),
        seed=True,
        plot=("a discovery, a machine or a journey into space or time changes the world, "
              "and the characters must live with what science made possible"),
        tone="full of wonder and ideas",
        words=("space", "planet", "planets", "alien", "aliens", "scientist", "scientists", "experiment",
               "laboratory", "robot", "robots", "earth", "ship", "crew", "spaceship", "future", "technology",
               "machine", "research", "signal", "orbit", "human", "humans"),
    ),
    Genre(
        "horror", "horror", "Dread, the uncanny, and things that should have stayed buried.",
        "The door at the end of the hall had been painted shut for forty years, and tonight it was open.",
        aliases=("scary", "spooky", "terror"),
        cues=("horror", "ghost", "haunt", "demon", "possess", "zombie", "vampire", "werewolf", "monster", "blood",
              "scream", "curse", "creature", "evil", "undead", "graveyard", "cemetery", "corpse", "exorcis",
              "witch", "supernatural", "nightmare", "slasher", "terrif", "occult", "satan", "ritual", "shadow"),
        seed=True,
        plot=("something uncanny and deadly closes in, a presence, a curse or a "
              "monster, and the characters fight to survive it"),
        tone="dark and full of creeping dread",
        words=("blood", "scream", "screams", "dead", "demon", "ghost", "ghosts", "evil", "dark", "darkness",
               "monster", "creature", "kill", "killed", "body", "corpse", "terror", "haunted", "curse",
               "horror", "nightmare"),
    ),
    Genre(
        "action", "action", "Chases, fights and heroes with no time to lose.",
        "The helicopter was already lifting off when Reyes jumped for the skid.",
        aliases=("adventure", "action adventure", "martial arts"),
        cues=("fight", "gang", "gangster", "martial", "kung fu", "army", "soldier", "war", "battle", "mission",
              "explos", "bomb", "gun", "shootout", "chase", "mercenar", "commando", "revenge", "rescue",
              "terrorist", "assassin", "henchmen", "smuggl", "heist", "police", "cop", "sword", "tournament",
              "don", "mafia", "drug", "weapon", "attack", "kill", "boss"),
        seed=True,
        plot=("a soldier, a special agent or a martial-arts fighter goes on a dangerous mission against "
              "terrorists, gangsters or an enemy army, through battles, gunfights and explosions, "
              "to rescue prisoners or take revenge"),
        tone="fast, violent and physical",
        words=("soldier", "soldiers", "troops", "army", "battle", "mission", "enemy", "enemies", "terrorist",
               "terrorists", "attack", "fight", "fighting", "gun", "guns", "commander", "officer", "captain",
               "rescue", "explosion", "explosions", "assassin", "combat", "weapons", "weapon", "killed",
               "kill", "escape", "war", "gunfire", "bullets"),
    ),
    Genre(
        "thriller", "thriller", "Conspiracies, suspects and a clock that will not stop.",
        "The message said only: they know where you live, and you have until midnight.",
        aliases=("suspense", "crime", "crime thriller", "psychological thriller"),
        cues=("thriller", "kidnap", "hostage", "stalk", "serial killer", "psycho", "conspiracy", "spy", "agent",
              "blackmail", "suspect", "ransom", "escape", "hitman", "paranoi", "obsess", "abduct", "witness",
              "threat", "trap", "fbi", "cia", "detective", "investigat", "murder", "victim", "disappear"),
        seed=True,
        plot=("someone is hunted, framed or caught in a conspiracy, and clues, suspects "
              "and a ticking clock drive them to a dangerous showdown"),
        tone="tense and full of suspense",
        words=("police", "detective", "murder", "murdered", "killer", "victim", "suspect", "case", "evidence",
               "investigation", "agent", "kidnapped", "hostage", "threat", "trap", "secret", "conspiracy",
               "danger", "escape", "body"),
    ),
    Genre(
        "drama", "drama", "People, families and the choices that define them.",
        "My father kept the letter in his coat pocket for twenty years before he let me read it.",
        aliases=("dramatic", "family", "melodrama"),
        cues=("family", "father", "mother", "daughter", "son", "marriage", "married", "wife", "husband",
              "brother", "sister", "village", "school", "job", "poor", "struggle", "illness", "death", "life",
              "career", "society", "parents", "grandmother", "grandfather", "wedding", "divorce", "widow",
              "farmer", "elder", "house", "hospital", "career", "dream"),
        seed=True,
        plot="ordinary people face a hard choice about family, love or work, and the story turns on their feelings",
        tone="quiet, emotional and honest",
        words=("family", "mother", "father", "daughter", "son", "wife", "husband", "love", "marriage",
               "married", "home", "life", "heart", "friends", "brother", "sister", "parents", "job", "dream"),
    ),
    Genre(
        "fantasy", "fantasy", "Magic, quests and kingdoms that never were.",
        "The last dragon in the kingdom had been asleep beneath the castle for three hundred years.",
        aliases=("high fantasy", "fairy tale", "fairytale", "magic"),
        cues=("magic", "wizard", "witch", "dragon", "castle", "kingdom", "spell", "elf", "elves", "dwarf", "fairy",
              "quest", "sorcer", "enchant", "prince", "princess", "king", "queen", "sword", "prophecy", "realm",
              "goblin", "unicorn", "potion", "mage", "throne", "legend", "myth", "god", "goddess"),
        plot="magic, strange creatures and an old prophecy send the hero on a quest through a kingdom that never was",
        tone="enchanted and epic",
        words=("magic", "wizard", "dragon", "dragons", "castle", "kingdom", "king", "queen", "prince",
               "princess", "spell", "sword", "quest", "realm", "ancient", "prophecy", "elf", "elves",
               "sorcerer", "enchanted"),
    ),
    Genre(
        "romance", "romance", "Love found, lost and fought for.",
        "She had sworn never to fall for a man who alphabetised his spice rack.",
        aliases=("romantic", "love", "love story", "romcom", "rom-com"),
        cues=("love", "romance", "romantic", "kiss", "heart", "boyfriend", "girlfriend", "date", "wedding",
              "crush", "lover", "fall in love", "falls in love", "fell in love", "sweetheart", "affair",
              "proposal", "propose", "marry", "engaged", "bride", "groom", "passion"),
        plot="two people are drawn together, something keeps them apart, and they must risk their hearts",
        tone="warm, tender and hopeful",
        words=("love", "heart", "kiss", "kissed", "lover", "smile", "date", "romance", "together", "wedding",
               "married", "passion", "tender", "hand", "eyes", "feelings"),
    ),
    Genre(
        "mystery", "mystery", "Clues, red herrings and a puzzle waiting to be solved.",
        "The butler had an alibi, the maid had a motive, and the locked room had a second key.",
        aliases=("whodunit", "whodunnit", "detective", "detective story", "noir"),
        cues=("mystery", "mysterious", "detective", "clue", "solve", "sleuth", "alibi", "inspector", "whodunit",
              "locked room", "secret", "missing", "stolen", "puzzle", "riddle", "murder", "investigat", "case",
              "evidence", "private eye", "suspect"),
        plot=("a puzzling crime or disappearance is solved by following clues and "
              "questioning suspects, until the truth comes out"),
        tone="curious and clever",
        words=("detective", "clue", "clues", "mystery", "suspect", "suspects", "murder", "alibi", "evidence",
               "case", "secret", "truth", "missing", "stolen", "inspector", "puzzle"),
    ),
    Genre(
        "comedy", "comedy", "Misunderstandings, mayhem and everyone having a very bad day.",
        "It was supposed to be a quiet wedding, right up until the goat ate the rings.",
        aliases=("comedic", "funny", "humor", "humour", "humorous", "satire", "parody", "slapstick"),
        cues=("funny", "comedy", "comic", "joke", "hilarious", "laugh", "silly", "prank", "clumsy", "awkward",
              "mishap", "chaos", "mayhem", "ridiculous", "goofy", "accidentally", "disguise", "goat", "llama",
              "duck", "penguin", "pizza", "talking", "wacky", "absurd", "misunderstanding", "mix-up"),
        plot="a small mistake snowballs into ridiculous chaos, and everyone makes it worse before it all works out",
        tone="light, silly and funny",
        words=("funny", "laugh", "laughed", "joke", "jokes", "silly", "chaos", "ridiculous", "mess",
               "disaster", "awkward", "accidentally", "embarrassing", "giggle", "prank"),
    ),
)

_BY_NAME = {g.name: g for g in GENRES}
_LOOKUP = {_key: g for g in GENRES for _key in (g.name, g.label, *g.aliases)}


def _normalise(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text.strip().lower().strip("<>[]"))


_NORMALISED = {_normalise(k): g for k, g in _LOOKUP.items()}


def genre_names(genres: Iterable[Genre] = GENRES) -> list[str]:
    return [g.name for g in genres]


def get_genre(name: str) -> Genre:
    """The registered genre with this exact name."""
    return _BY_NAME[name]


def find_genre(text: str) -> Genre | None:
    """The genre a name or alias refers to (`Sci-Fi`, `science fiction`, `<horror>`), or None."""
    return _NORMALISED.get(_normalise(text))


def to_identifier(text: str) -> str:
    """The snake_case form genre names take: `[Sci-Fi]` and ` Science Fiction ` become `sci_fi`, `science_fiction`.

    Text only, no alias lookup: for keys of tables that map free-text labels (training's genre map).
    """
    name = text.strip().strip("[]<>").strip().lower()
    name = re.sub(r"[\s\-]+", "_", name)
    return re.sub(r"_+", "_", name).strip("_")


def canonical_name(text: str) -> str:
    """The registry's name for a genre name or alias (`scifi` -> `sci_fi`); anything else as an identifier."""
    genre = find_genre(text)
    return genre.name if genre is not None else to_identifier(text)


def resolve_genre(text: str) -> Genre:
    """Like `find_genre`, but an unknown name raises an error that lists the genres."""
    genre = find_genre(text)
    if genre is None:
        raise UnknownGenreError(text[:40], [*genre_names(), AUTO])
    return genre


def is_auto(text: str) -> bool:
    return _normalise(text) in ("auto", "any", "detect", "")


# --- `auto`: detecting the genre of an opening -----------------------------------------------
#
# The method is a lexicon vote, chosen because it needs no model, no data at run time, and
# explains itself ("fantasy: magic, castle"). Each genre lists cue stems; a stem matches a
# word that starts with it ("haunt" matches "haunted"), a multi-word cue matches the phrase
# and counts double because phrases are more specific. Stems under four letters must match
# a whole word, so "war" does not fire on "warm". Each genre's score is its number of
# matches; the highest wins, ties go to the genre listed first among the allowed ones. With
# no cue at all the fallback genre is used, and the caller is told nothing was detected.
# tests/test_genres.py measures it against the labelled dev plots when they are present.

_WORD = re.compile(r"[a-z][a-z'\-]*")


@dataclass(frozen=True)
class Detection:
    genre: Genre
    matched: tuple[str, ...]  # the cues that voted for it; empty when the fallback was used

    @property
    def explanation(self) -> str:
        if not self.matched:
            return f"{self.genre.name} (no genre cues found, using the default)"
        return f"{self.genre.name} ({', '.join(self.matched[:4])})"


def _cue_hits(cue: str, words: list[str], text: str) -> int:
    if " " in cue:
        return 2 * len(re.findall(rf"\b{re.escape(cue)}", text))
    if len(cue) < 4:
        return sum(1 for w in words if w == cue or w == cue + "s")
    return sum(1 for w in words if w.startswith(cue))


def detect_genre(prompt: str, allowed: Iterable[Genre] = GENRES, fallback: Genre | None = None) -> Detection:
    """Guess the genre of an opening from cue words; see the method above."""
    candidates = list(allowed)
    text = prompt.lower()
    words = _WORD.findall(text)
    best: tuple[int, Genre, tuple[str, ...]] | None = None
    for genre in candidates:
        hits = [(cue, _cue_hits(cue, words, text)) for cue in genre.cues]
        matched = tuple(cue for cue, n in hits if n)
        score = sum(n for _, n in hits)
        if score and (best is None or score > best[0]):
            best = (score, genre, matched)
    if best is None:
        default = fallback if fallback is not None else candidates[0]
        return Detection(default, ())
    return Detection(best[1], best[2])
