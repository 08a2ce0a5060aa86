"""Is the character in this scene? The rules planner's per-scene decision, with its reason.

:func:`hero_presence` reads a storyboard's scenes in order, as a reader would, and says for each
whether the character (the *hero*) is in it, why, and what the scene's subject is. No language
model: the rules below, in the order they are tried.

Who the hero is (:func:`Cast.of`): ``character.name`` (``_``/``-`` read as spaces),
``display_name``, every ``aliases`` entry and the trigger, matched as whole words without regard
to case; each single word of a multi-word name (``Aldar`` of ``Aldar Kose``) matches when written
with a capital. The hero's pronouns are ``character.pronouns`` (he, she, they, it), else taken
from the class word (``man``, ``boy``, ``king`` ... -> he; ``woman``, ``girl``, ``queen`` ... ->
she; anything else -> he or she). ``the <class word>`` (``the man``) also names the hero.

Per scene, split into clauses (``;``, ``,``, ``and``, ``but``, ``while``, ``then``, ``who``):

1. **Named**: a name, alias or the trigger appears -> present.
2. **Subject pronoun** (a clause opens with he/she/they ...): it refers to the previous clause's
   subject when that is a person it fits, else to the last person it fits, else (nobody yet) to the
   hero, the protagonist. "He meets a greedy bai" after a scene of Aldar is Aldar; "He goes home"
   right after "The bai shivers" is the bai. ``they`` (for a hero who is not ``they``) refers to
   the people of the previous scene: present when the hero was among them.
3. **Other pronouns**: a possessive or reflexive (his, himself) belongs to its clause's subject
   when that is a person it fits ("The bai trades his horse": the bai's); an object pronoun (him,
   her) never means its clause's own subject, so it is the other person in focus ("The bai gives
   him the coat": the hero, when the hero was in focus).
4. Otherwise the hero is **absent**, and the reason names the subject: another character (a
   capitalised name, or a noun phrase ``the bai`` that the story treats as a person: introduced
   with ``who``, or the subject of a person's verb such as says, laughs, trades), or not a person
   (a place, a thing, an animal: "The sun sets over the steppe").

A scene's subject is its first clause's leading noun phrase, after an opening adverbial
("At dawn, ..."; "Meanwhile ..."). :func:`subject_is_person` tells the planner whether a
hero-absent scene shows a person (the keyword shot stands) or a place or thing (wide or medium).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

PRONOUN_FORMS = {
    "he": {"subject": {"he"}, "object": {"him"}, "own": {"his", "himself"}},
    "she": {"subject": {"she"}, "object": {"her"}, "own": {"her", "hers", "herself"}},
    "they": {"subject": {"they"}, "object": {"them"}, "own": {"their", "theirs", "themselves", "themself"}},
    "it": {"subject": {"it"}, "object": {"it"}, "own": {"its", "itself"}},
}
MASCULINE = {"man", "boy", "guy", "gentleman", "king", "prince", "father", "son", "brother", "husband", "uncle",
             "grandfather", "knight", "wizard", "monk", "lord", "sir", "male", "hero", "sultan", "khan", "emperor"}
FEMININE = {"woman", "girl", "lady", "queen", "princess", "mother", "daughter", "sister", "wife", "aunt",
            "grandmother", "witch", "nun", "female", "heroine", "empress", "maiden", "bride"}
PERSON_NOUNS = MASCULINE | FEMININE | {
    "person", "child", "kid", "baby", "friend", "stranger", "merchant", "farmer", "villager", "villagers",
    "soldier", "guard", "thief", "trader", "shepherd", "hunter", "rider", "traveller", "traveler", "crowd",
    "people", "family", "elder", "chief", "teacher", "student", "doctor", "officer", "driver", "neighbour",
    "neighbor", "owner", "boss", "servant", "master", "bai", "beggar", "judge", "girlfriend", "boyfriend"}
# Verbs that (in a story) only a person does: their subject is a person.
PERSON_VERBS = {"says", "said", "tells", "told", "asks", "asked", "laughs", "laughed", "smiles", "smiled",
                "cries", "cried", "shouts", "shouted", "thinks", "thought", "frowns", "frowned", "whispers",
                "whispered", "refuses", "refused", "agrees", "agreed", "trades", "traded", "answers", "answered",
                "sings", "sang", "weeps", "wept", "grins", "grinned", "winks", "sighs", "nods", "argues", "greets",
                "meets", "buys", "sells", "gives", "gave", "curses", "paints", "reads", "writes", "waves"}
# Other verbs a story opens clauses with (for telling a verb from a name or noun).
VERBS = PERSON_VERBS | {"sleeps", "wakes", "walks", "runs", "rides", "eats", "drinks", "dances", "listens",
                        "looks", "shivers", "goes", "went", "comes", "came", "sees", "saw", "ran", "rode"}
DETERMINERS = {"the", "a", "an", "this", "that", "these", "those", "his", "her", "their", "its", "my", "our",
               "your", "one", "two", "three", "some", "every", "each", "no", "another", "several", "many"}
OPENERS = {"then", "meanwhile", "suddenly", "later", "finally", "soon", "next", "now", "so", "but", "and",
           "still", "again", "afterwards", "eventually", "at", "last", "once", "there", "here", "slowly",
           "quickly", "quietly", "alone", "together"}
PREPOSITIONS = {"at", "in", "on", "by", "after", "before", "when", "as", "during", "under", "over", "across",
                "inside", "outside", "through", "with", "without", "from", "near", "behind", "beside", "while",
                "since", "until", "into", "onto", "of", "to", "for", "toward", "towards", "among", "between"}
FUNCTION = PREPOSITIONS | DETERMINERS | {"who", "which", "that", "and", "or", "but", "not", "him", "her", "them",
                                         "it", "away", "up", "down", "out", "off", "back", "is", "are", "was",
                                         "were", "has", "have", "had", "will", "can", "could", "would", "does"}
_CLAUSE = re.compile(r";|,\s*(?:and\s+then|then|and|but|while)?\s*|\s+(?:and\s+then|and|but|while|then|who)\s+",
                     re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z][A-Za-z'\u2019-]*")


def _norm(name: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", name.lower().replace("_", " ").replace("-", " ")))


@dataclass(frozen=True)
class Cast:
    """How the story can name the hero (see the module docstring)."""

    names: tuple[str, ...]  # normalised full names, aliases, trigger (whole words, any case)
    parts: tuple[str, ...]  # single words of multi-word names (matched only when capitalised)
    class_word: str
    pronouns: frozenset[str]  # keys of PRONOUN_FORMS the hero answers to

    @classmethod
    def of(cls, character: dict[str, Any]) -> "Cast":
        raw = [character.get("name"), character.get("display_name"), character.get("trigger"),
               *(character.get("aliases") or [])]
        names = tuple(dict.fromkeys(n for n in (_norm(str(r)) for r in raw if r) if n))
        parts = tuple(dict.fromkeys(p for n in names if " " in n for p in n.split()
                                    if len(p) > 2 and p not in FUNCTION))
        class_word = _norm(str(character.get("class_word") or "person")).split(" ")[-1]
        return cls(names, parts, class_word, frozenset(pronouns_of(character)))

    def named_in(self, text: str) -> str | None:
        """The name the text uses for the hero, or None."""
        low = " " + _norm(text) + " "
        for n in sorted(self.names, key=len, reverse=True):  # the fullest name it uses
            if f" {n} " in low:
                return n
        for w in _WORD.findall(text):
            if w[:1].isupper() and w.lower().removesuffix("'s").removesuffix("\u2019s") in self.parts:
                return w
        m = re.search(rf"\bthe\s+{re.escape(self.class_word)}\b", text, re.IGNORECASE)
        return m.group(0).lower() if m and self.class_word not in ("person", "character") else None


def pronouns_of(character: dict[str, Any]) -> set[str]:
    declared = character.get("pronouns")
    if declared:
        return {str(declared)}
    words = set(_norm(str(character.get("class_word") or "")).split())
    if words & MASCULINE:
        return {"he"}
    if words & FEMININE:
        return {"she"}
    return {"he", "she"}


@dataclass(eq=False)
class Entity:
    key: str  # "hero", or a normalised name / head noun
    label: str  # how the reason prints it
    person: bool
    pronouns: frozenset[str]


@dataclass
class Presence:
    """The decision for one scene."""

    hero: bool
    reason: str
    subject: str | None  # the scene's subject as written ("the bai", "he"), None when none is found
    subject_is_person: bool = True
    people: list[str] = field(default_factory=list)  # entity keys seen in the scene


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _strip_opening(words: list[str], text: str) -> list[str]:
    """Drop an opening adverbial: "At dawn, ...", "Meanwhile ...", "Later that night, ..."."""
    if words and words[0].lower() in PREPOSITIONS | OPENERS and "," in text:
        head = text.split(",", 1)[0]
        if len(_words(head)) <= 8:
            return _words(text.split(",", 1)[1])
    while words and words[0].lower() in OPENERS:
        words = words[1:]
    return words


def _verb_like(word: str, nxt: str | None) -> bool:
    w = word.lower()
    if w in VERBS or w in {"is", "are", "was", "were", "has", "have", "had", "will", "can"}:
        return True
    if re.search(r"(?<![su])s$|ed$", w) and len(w) > 3:
        return True
    return nxt is None or nxt.lower() in FUNCTION


def subject_phrase(clause: str, common: frozenset[str] = frozenset()) -> tuple[str, str, str] | None:
    """(kind, phrase, head) of a clause's leading subject: kind is 'pronoun', 'name' or 'noun';
    None when the clause does not open with one (it shares the previous clause's subject:
    "Trades his hat", the second half of a split "Aldar rides ... and trades his hat"). A
    capitalised opening word that the story also writes in lower case (``common``) is no name."""
    words = _strip_opening(_words(clause), clause)
    if not words:
        return None
    first = words[0].lower()
    if any(first in f["subject"] for f in PRONOUN_FORMS.values()):
        return "pronoun", first, first
    if first in DETERMINERS:
        np = [words[1]] if len(words) > 1 else []
        for i in range(2, min(len(words), 6)):
            nxt = words[i + 1] if i + 1 < len(words) else None
            if _verb_like(words[i], nxt) or words[i].lower() in FUNCTION:
                break
            np.append(words[i])
        if not np:
            return None
        head = np[-1].lower().removesuffix("'s").removesuffix("\u2019s")
        return "noun", " ".join([first] + [w.lower() for w in np]), head
    if not words[0][:1].isupper() or first in FUNCTION or first in OPENERS:
        return None
    if first in common:
        verb = first in VERBS or bool(re.search(r"(?<![su])s$|ed$", first))
        return None if verb else ("noun", first, first)
    return "name", words[0], first


def _person_evidence(story: str) -> set[str]:
    """Nouns and names the story treats as people (``X who``, ``X says``, ``X laughs``)."""
    found = {m.group(1).lower() for m in re.finditer(r"\b([A-Za-z]+)\s*,?\s+(?:who|whom)\b", story)}
    ws = _words(story)
    found |= {a.lower() for a, b in zip(ws, ws[1:]) if b.lower() in PERSON_VERBS}
    # a capitalised word inside a sentence is a name ("Aldar meets Omar")
    found |= {m.group(1).lower() for m in re.finditer(r"(?<=[a-z,;:]\s)([A-Z][a-z]+)", story)}
    return found


def _gender_evidence(story: str) -> dict[str, frozenset[str]]:
    """``a greedy bai who refuses to share his tea``: the bai is 'he'."""
    out: dict[str, frozenset[str]] = {}
    for m in re.finditer(r"\b([A-Za-z]+)\s*,?\s+who\b([^.;!?]*)", story):
        rel = set(_words(m.group(2).lower()))
        if rel & {"he", "his", "him", "himself"}:
            out[m.group(1).lower()] = frozenset({"he"})
        elif rel & {"she", "her", "hers", "herself"}:
            out[m.group(1).lower()] = frozenset({"she"})
    return out


class Reader:
    """Reads scenes in order, keeping who is in focus (see the module docstring)."""

    def __init__(self, cast: Cast, story: str) -> None:
        self.cast = cast
        self.people_words = _person_evidence(story) | PERSON_NOUNS
        self.genders = _gender_evidence(story)
        self.common = frozenset(w for w in _words(story) if w.islower())
        self.hero = Entity("hero", "the character", True, cast.pronouns)
        self.known: dict[str, Entity] = {}
        self.focus: list[Entity] = []  # most recent first
        self.last_subject: Entity | None = None
        self.last_people: list[Entity] = []

    def entity(self, kind: str, phrase: str, head: str) -> Entity:
        if kind == "name" and (head in self.cast.parts or head in self.cast.names):
            return self.hero
        if head not in self.known:
            person = head in self.people_words  # a capitalised opening word is not a name by itself
            if head in MASCULINE or head in FEMININE:
                pron = frozenset({"he" if head in MASCULINE else "she"})
            elif head in self.genders:
                pron = self.genders[head]
            elif head in {"people", "crowd", "family"} or (kind == "noun" and head.endswith("s") and person):
                pron = frozenset({"they"})
            else:
                pron = frozenset({"he", "she"}) if person else frozenset({"it"})
            self.known[head] = Entity(head, phrase, person, pron)
        return self.known[head]

    def resolve(self, pronoun: str, not_this: Entity | None = None) -> list[Entity]:
        """Who a pronoun means here: rule 2 and 3 of the module docstring."""
        key = next(k for k, f in PRONOUN_FORMS.items() if pronoun in f["subject"] | f["object"] | f["own"])
        if key == "they" and "they" not in self.cast.pronouns:
            plural = [e for e in self.focus if "they" in e.pronouns and e is not not_this]
            group = [e for e in self.last_people if e is not not_this]
            return plural[:1] if plural and len(group) < 2 else group
        first = [self.last_subject] if self.last_subject else []
        fits = [e for e in first + self.focus if e is not not_this and e.person and key in e.pronouns]
        if fits:
            return fits[:1]
        return [self.hero] if key in self.cast.pronouns and not_this is not self.hero else []

    def _clause(self, clause: str,
                subject: Entity | None) -> tuple[Entity | None, list[Entity], str | None, str | None]:
        """(its subject, who it mentions, why the hero is in it or None, the subject as written)."""
        sp = subject_phrase(clause, self.common)
        words = [w.lower() for w in _words(clause)]
        seen: list[Entity] = []
        via = phrase = None
        if sp is not None:
            kind, phrase, head = sp
            if kind == "pronoun":
                words.remove(head)
                refs = self.resolve(head)
                subject = refs[0] if len(refs) == 1 else None
                seen += refs
                if self.hero in refs:
                    via = f"'{phrase}' refers to the character ({self._why(refs)})"
            else:
                subject = self.entity(kind, phrase, head)
                seen.append(subject)
        for i, w in enumerate(words):
            nxt = words[i + 1] if i + 1 < len(words) else None
            if w == "her" and (nxt is None or nxt in FUNCTION):
                w = "her:object"  # "watches her" (object), not "her easel" (possessive)
            refs = self._pronoun_in_clause(w, subject)
            seen += refs
            if self.hero in refs and via is None:
                via = f"'{w.split(':')[0]}' refers to the character"
        return subject, seen, via, phrase

    def _pronoun_in_clause(self, w: str, subject: Entity | None) -> list[Entity]:
        if w == "her:object":
            return self.resolve("her", not_this=subject)
        for key, f in PRONOUN_FORMS.items():
            if w in f["own"] and subject is not None and subject.person and key in subject.pronouns:
                return [subject]  # his/himself: the clause's subject
            if w in f["object"] and w not in f["own"]:
                return self.resolve(w, not_this=subject)  # him: someone else
            if w in f["own"] | f["object"] | f["subject"]:
                return self.resolve(w, not_this=subject if w in f["object"] else None)
        return []

    def read(self, text: str) -> Presence:
        named = self.cast.named_in(text)
        seen: list[Entity] = [self.hero] if named else []
        via = None
        first: tuple[Entity | None, str | None] | None = None
        subject: Entity | None = None
        for clause in (c for c in _CLAUSE.split(text) if c and c.strip(" .!?")):
            subject, mentioned, why, phrase = self._clause(clause, subject)
            seen += mentioned
            via = via or why
            if first is None and phrase is not None:
                first = (subject, phrase)
            if subject is not None:
                self.last_subject = subject
        if first is None and self.last_subject is not None:  # no subject of its own: the previous one's
            seen.append(self.last_subject)
            first = (self.last_subject, None)
            if self.last_subject is self.hero and via is None:
                via = "it has no subject of its own and goes on with the previous scene's, the character"
        for e in reversed(seen):
            self.focus = [e] + [f for f in self.focus if f is not e]
        people = list(dict.fromkeys(e for e in seen if e.person))
        self.last_people = people
        subj, phrase = first or (None, None)
        keys = [e.key for e in people]
        if named:
            return Presence(True, f"names the character ('{named}')", phrase, True, keys)
        if via:
            return Presence(True, via, phrase, True, keys)
        if subj is not None and subj.person and phrase in ("he", "she", "they", "it"):
            why = f"its subject '{phrase}' refers to '{subj.label}' (the last person it fits), not the character"
            return Presence(False, why, phrase, True, keys)
        if subj is not None and subj.person:
            why = f"its subject is '{phrase}', another character, and nothing in it refers to the character"
            return Presence(False, why, phrase, True, keys)
        if phrase:
            return Presence(False, f"its subject is '{phrase}', not a person, and it does not mention the "
                                   "character", phrase, bool(people), keys)
        return Presence(False, "it does not name the character or refer to them", None, bool(people), keys)

    def _why(self, refs: list[Entity]) -> str:
        if len(refs) > 1:
            return "the people of the previous scene"
        if self.hero in self.focus or any(self.hero is not e and e.person for e in self.focus):
            return "the last person it fits"
        return "the protagonist: nobody else it fits is in the story yet"


def hero_presence(texts: Sequence[str], character: dict[str, Any], story: str | None = None) -> list[Presence]:
    """One :class:`Presence` per scene text, read in order (``story`` for the person evidence;
    default: the scenes joined)."""
    reader = Reader(Cast.of(character), story if story is not None else " ".join(texts))
    return [reader.read(t) for t in texts]
