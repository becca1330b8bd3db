"""The task suite: 12 held-in tasks (one adapter each) and 4 held-out tasks (no adapter).

Each held-out task resembles one held-in task (``Task.related``) so that routing to that
adapter can help: ``date_us`` ~ ``date_iso``, ``lowercase`` ~ ``uppercase``,
``extract_phone`` ~ ``extract_email``, ``kg_to_g`` ~ ``km_to_m``.

Every task is a ``sample`` function (a seeded rng -> an input string) and a ``solve`` function
(input string -> answer) written from the input text alone. Inputs stay under ~25 words and
answers under ~10 tokens.

A data table, not logic: one short ``sample``/``solve`` pair per task, kept together in one
module (its length is the number of tasks, not the size of an idea) so that the whole suite reads
and diffs in one place; the machinery is :mod:`quiver.tasks.base` and :mod:`quiver.tasks.metrics`.
"""

from __future__ import annotations

import json
import random
import re

from .base import Task
from .metrics import exact_match_ci

# -- dates ---------------------------------------------------------------------------------

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_WORD_DATE = re.compile(r"^([A-Z][a-z]+) (\d{1,2}), (\d{4})$")


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def sample_word_date(rng: random.Random) -> str:
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    days = 29 if month == 2 and _is_leap(year) else _DAYS_IN_MONTH[month - 1]
    return f"{MONTHS[month - 1]} {rng.randint(1, days)}, {year}"


def _parse_word_date(text: str) -> tuple[int, int, int]:
    match = _WORD_DATE.match(text.strip())
    if match is None or match.group(1) not in MONTHS:
        raise ValueError(f"not a date like 'March 5, 2021': {text!r}")
    return int(match.group(3)), MONTHS.index(match.group(1)) + 1, int(match.group(2))


def solve_date_iso(text: str) -> str:
    year, month, day = _parse_word_date(text)
    return f"{year:04d}-{month:02d}-{day:02d}"


def solve_date_us(text: str) -> str:
    year, month, day = _parse_word_date(text)
    return f"{month:02d}/{day:02d}/{year:04d}"


# -- unit conversion -------------------------------------------------------------------------

def _sample_quantity(unit: str):
    def sample(rng: random.Random) -> str:
        return f"{rng.randint(1, 9999)} {unit}"
    return sample


def _solve_times_1000(unit_in: str, unit_out: str):
    def solve(text: str) -> str:
        value, unit = text.split()
        if unit != unit_in:
            raise ValueError(f"expected a quantity in {unit_in}: {text!r}")
        return f"{int(value) * 1000} {unit_out}"
    return solve


# -- letter case, identifiers, plurals ---------------------------------------------------

WORDS = ("apple", "river", "green", "house", "quiet", "morning", "garden", "blue", "silver",
         "winter", "little", "bright", "window", "coffee", "happy", "forest", "paper", "dog",
         "summer", "cold", "stone", "yellow", "music", "light", "ocean", "fast", "bread",
         "train", "cloud", "sunny", "city", "road", "warm", "moon", "table", "old", "big",
         "night", "orange", "simple", "market", "letter", "friend", "school", "water", "golden",
         "small", "evening", "heavy", "soft")
CODE_WORDS = ("user", "account", "total", "count", "file", "name", "max", "size", "item",
              "price", "order", "date", "start", "end", "index", "buffer", "page", "cache",
              "error", "message", "list", "row", "column", "value", "input", "output", "path",
              "token", "batch", "limit", "timeout", "retry", "status", "email", "id", "min",
              "number", "queue", "request", "response")
ADJECTIVES = ("red", "small", "old", "new", "big", "happy", "quiet", "bright", "green",
              "heavy", "empty", "tall", "short", "clean", "dark", "warm", "young", "lucky",
              "strange", "noisy", "tiny", "broken", "shiny", "wooden")
NOUNS = ("cat", "dog", "book", "car", "tree", "house", "bird", "lamp", "chair", "table", "river",
         "road", "garden", "window", "door", "apple", "flower", "shirt", "bottle", "pencil",
         "box", "fox", "bus", "glass", "dress", "class", "brush", "dish", "bench", "church",
         "watch", "match", "peach", "city", "baby", "party", "story", "berry", "lady", "puppy",
         "country", "cherry", "key", "toy", "boy", "day", "monkey", "valley", "tray", "bag")


def _sample_phrase(vocab: tuple[str, ...], lo: int, hi: int, case=str):
    def sample(rng: random.Random) -> str:
        return case(" ".join(rng.sample(vocab, rng.randint(lo, hi))))
    return sample


def solve_uppercase(text: str) -> str:
    return text.upper()


def solve_lowercase(text: str) -> str:
    return text.lower()


def solve_snake_case(text: str) -> str:
    return "_".join(text.lower().split())


def plural(noun: str) -> str:
    """Regular English plural: -s, -es after s/x/z/ch/sh, -ies after consonant + y."""
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and len(noun) > 1 and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def sample_adjective_noun(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"


def solve_pluralize(text: str) -> str:
    *rest, noun = text.split()
    return " ".join([*rest, plural(noun)])


# -- keyword classification ----------------------------------------------------------------

POSITIVE = ("wonderful", "excellent", "great", "delightful", "amazing", "fantastic", "lovely",
            "superb", "brilliant", "enjoyable")
NEGATIVE = ("terrible", "awful", "horrible", "disappointing", "dreadful", "boring", "dull",
            "mediocre", "unpleasant", "frustrating")
_OPINION_TEMPLATES = ("{who} found the {thing} {cue}.", "{who} said the {thing} was {cue}.",
                      "{who} thought the {thing} was really {cue}.",
                      "{who} described the {thing} as {cue}.")
_WHO = ("I", "We", "My friend", "The critic", "Everyone", "My brother", "Our team", "The kids")
_THINGS = ("movie", "meal", "hotel", "service", "concert", "book", "phone", "game", "trip",
           "class", "show", "museum")

TOPICS = {
    "sports": ("football", "tennis", "goalkeeper", "marathon", "referee", "basketball",
               "stadium", "tournament", "cricket", "swimmer"),
    "food": ("pizza", "recipe", "pasta", "dessert", "chef", "sandwich", "soup", "bakery",
             "noodles", "salad"),
    "tech": ("laptop", "software", "smartphone", "processor", "database", "robot", "algorithm",
             "keyboard", "website", "chatbot"),
    "travel": ("airport", "passport", "luggage", "itinerary", "flight", "cruise", "suitcase",
               "tourist", "visa", "hostel"),
    "music": ("guitar", "concert", "melody", "drummer", "album", "piano", "orchestra", "singer",
              "lyrics", "violin"),
}
_TOPIC_TEMPLATES = ("{name} talked about the {kw} all evening.",
                    "Yesterday {name} read an article about the {kw}.",
                    "{name} asked me a question about the {kw}.",
                    "Have you heard what {name} said about the {kw}?",
                    "{name} could not stop thinking about the {kw}.")
FIRST_NAMES = ("Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas",
               "Kira", "Liam", "Maya", "Noah", "Olga", "Priya")


def _find_cue(text: str, lexicon: dict[str, str]) -> str:
    found = {lexicon[w] for w in re.findall(r"[a-z]+", text.lower()) if w in lexicon}
    if len(found) != 1:
        raise ValueError(f"expected cue words of exactly one label in {text!r}, found {found}")
    return found.pop()


_SENTIMENT = {**{w: "positive" for w in POSITIVE}, **{w: "negative" for w in NEGATIVE}}
_TOPIC_OF = {kw: topic for topic, kws in TOPICS.items() for kw in kws}


def sample_opinion(rng: random.Random) -> str:
    return rng.choice(_OPINION_TEMPLATES).format(
        who=rng.choice(_WHO), thing=rng.choice(_THINGS), cue=rng.choice(POSITIVE + NEGATIVE))


def solve_sentiment(text: str) -> str:
    return _find_cue(text, _SENTIMENT)


def sample_topic_sentence(rng: random.Random) -> str:
    return rng.choice(_TOPIC_TEMPLATES).format(name=rng.choice(FIRST_NAMES),
                                               kw=rng.choice(tuple(_TOPIC_OF)))


def solve_topic(text: str) -> str:
    return _find_cue(text, _TOPIC_OF)


# -- extraction ------------------------------------------------------------------------------

LAST_NAMES = ("smith", "garcia", "chen", "novak", "silva", "khan", "muller", "rossi", "tanaka",
              "okafor", "berg", "costa")
DOMAINS = ("example.com", "mail.org", "company.net", "uni.edu", "shop.io", "post.co.uk",
           "studio.dev", "city.gov")
_EMAIL_TEMPLATES = ("Please contact {name} at {contact} for more details.",
                    "You can reach {name} by writing to {contact} today.",
                    "Send the report to {contact} before Friday.",
                    "{name} changed the contact address to {contact} last week.",
                    "For questions, write to {contact} and mention {name}.")
_PHONE_TEMPLATES = ("Please call {name} at {contact} for more details.",
                    "You can reach {name} by phoning {contact} today.",
                    "Text {contact} before Friday to confirm.",
                    "{name} changed the contact number to {contact} last week.",
                    "For questions, dial {contact} and ask for {name}.")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_PHONE = re.compile(r"\b\d{3}-\d{3}-\d{4}\b")


def _sample_email(rng: random.Random) -> str:
    first, last = rng.choice(FIRST_NAMES).lower(), rng.choice(LAST_NAMES)
    local = rng.choice((f"{first}.{last}", f"{first}{rng.randint(1, 99)}", f"{first[0]}{last}"))
    return f"{local}@{rng.choice(DOMAINS)}"


def _sample_phone(rng: random.Random) -> str:
    return f"{rng.randint(200, 999)}-{rng.randint(200, 999)}-{rng.randint(0, 9999):04d}"


def _sample_contact_sentence(templates: tuple[str, ...], contact):
    def sample(rng: random.Random) -> str:
        return rng.choice(templates).format(name=rng.choice(FIRST_NAMES), contact=contact(rng))
    return sample


def _solve_extract(pattern: re.Pattern, what: str):
    def solve(text: str) -> str:
        found = pattern.findall(text)
        if len(found) != 1:
            raise ValueError(f"expected exactly one {what} in {text!r}, found {found}")
        return found[0]
    return solve


# -- numbers, records, clock -----------------------------------------------------------------

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """American English words for 0..999: 'forty-two', 'three hundred five' (no 'and')."""
    if not 0 <= n <= 999:
        raise ValueError(f"number out of range 0..999: {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")
    return f"{_ONES[n // 100]} hundred" + (f" {number_words(n % 100)}" if n % 100 else "")


def solve_number_to_words(text: str) -> str:
    return number_words(int(text))


CITIES = ("Lisbon", "Oslo", "Lima", "Cairo", "Seoul", "Dublin", "Quito", "Perth", "Riga", "Porto")
COLORS = ("red", "blue", "green", "black", "white", "purple", "orange", "gray")
PETS = ("cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish")
_FIELDS = {
    "name": lambda rng: rng.choice(FIRST_NAMES),
    "age": lambda rng: rng.randint(18, 90),
    "city": lambda rng: rng.choice(CITIES),
    "color": lambda rng: rng.choice(COLORS),
    "pet": lambda rng: rng.choice(PETS),
    "score": lambda rng: rng.randint(0, 100),
}


def sample_json_query(rng: random.Random) -> str:
    keys = rng.sample(tuple(_FIELDS), rng.randint(2, 4))
    record = {key: _FIELDS[key](rng) for key in keys}
    return f"{json.dumps(record)} {rng.choice(keys)}"


def solve_json_lookup(text: str) -> str:
    record, key = text.rsplit(" ", 1)
    return str(json.loads(record)[key])


def sample_number_list(rng: random.Random) -> str:
    return " ".join(str(n) for n in rng.sample(range(100), rng.randint(3, 4)))


def solve_sort_numbers(text: str) -> str:
    return " ".join(str(n) for n in sorted(int(tok) for tok in text.split()))


def sample_clock_24h(rng: random.Random) -> str:
    return f"{rng.randrange(24):02d}:{rng.randrange(60):02d}"


def solve_time_12h(text: str) -> str:
    hour, minute = (int(part) for part in text.split(":"))
    return f"{(hour - 1) % 12 + 1}:{minute:02d} {'AM' if hour < 12 else 'PM'}"


# -- the suite -------------------------------------------------------------------------------

_SUITE = (
    Task("date_iso",
         "Convert a date written in words, like 'March 5, 2021', into the ISO 8601 numeric "
         "format YYYY-MM-DD.",
         ("Convert this date to ISO format (YYYY-MM-DD): {input}",
          "Rewrite the date {input} as YYYY-MM-DD.",
          "What is {input} in ISO 8601 date format?",
          "Date: {input}\nGive it as year-month-day (YYYY-MM-DD)."),
         sample_word_date, solve_date_iso),
    Task("km_to_m",
         "Convert a whole-number distance in kilometres (km) into metres (m), multiplying by "
         "1000.",
         ("Convert {input} to metres.",
          "How many metres is {input}?",
          "Express the distance {input} in meters (m).",
          "Distance: {input}\nWrite it in metres."),
         _sample_quantity("km"), _solve_times_1000("km", "m")),
    Task("uppercase",
         "Rewrite a short lowercase English phrase in all capital letters (uppercase).",
         ("Convert to uppercase: {input}",
          "Write this phrase in capital letters: {input}",
          "Rewrite '{input}' in all caps.",
          "Text: {input}\nReturn the same text in UPPERCASE."),
         _sample_phrase(WORDS, 2, 3), solve_uppercase),
    Task("sentiment",
         "Classify the sentiment of a short opinion sentence about a product or experience as "
         "positive or negative.",
         ("Is the sentiment of this sentence positive or negative? {input}",
          "Classify the sentiment (positive/negative): {input}",
          "Review: {input}\nAnswer with positive or negative.",
          "Does the speaker feel positive or negative here? {input}"),
         sample_opinion, solve_sentiment, metric=exact_match_ci),
    Task("topic",
         "Classify a short everyday sentence by its topic keyword into one of sports, food, "
         "tech, travel or music.",
         ("Which topic is this sentence about (sports, food, tech, travel, music)? {input}",
          "Classify the topic of: {input}\nChoose sports, food, tech, travel or music.",
          "Sentence: {input}\nTopic (sports/food/tech/travel/music):",
          "Give the topic label (sports, food, tech, travel or music) for: {input}"),
         sample_topic_sentence, solve_topic, metric=exact_match_ci),
    Task("extract_email",
         "Extract the email address mentioned inside a short English sentence.",
         ("Extract the email address from this sentence: {input}",
          "What email address is mentioned here? {input}",
          "Sentence: {input}\nReturn only the email address.",
          "Find the e-mail in: {input}"),
         _sample_contact_sentence(_EMAIL_TEMPLATES, _sample_email),
         _solve_extract(_EMAIL, "email address")),
    Task("number_to_words",
         "Spell out a whole number from 0 to 999, given in digits, as English words (42 "
         "becomes forty-two).",
         ("Write the number {input} in words.",
          "Spell out {input} in English words.",
          "How do you write {input} in words?",
          "Number: {input}\nWrite it out in words."),
         lambda rng: str(rng.randint(0, 999)), solve_number_to_words),
    Task("json_lookup",
         "Given a small JSON object followed by one of its keys, return the value stored under "
         "that key.",
         ("Look up the key given after this JSON object and return its value: {input}",
          "{input}\nThe last word is a key of the JSON object. What is its value?",
          "JSON and key: {input}\nValue:",
          "Return the value of the final key in: {input}"),
         sample_json_query, solve_json_lookup),
    Task("sort_numbers",
         "Sort a space-separated list of three or four integers from 0 to 99 in ascending "
         "order.",
         ("Sort these numbers from smallest to largest: {input}",
          "Put in ascending order: {input}",
          "Numbers: {input}\nList them sorted in increasing order.",
          "Arrange {input} in ascending order."),
         sample_number_list, solve_sort_numbers),
    Task("time_12h",
         "Convert a 24-hour clock time such as 14:30 into 12-hour format with AM or PM.",
         ("Convert {input} to 12-hour time with AM/PM.",
          "What is {input} in 12-hour clock format?",
          "Time (24h): {input}\nWrite it with AM or PM.",
          "Express the 24-hour time {input} as a 12-hour time."),
         sample_clock_24h, solve_time_12h),
    Task("pluralize",
         "Turn a singular adjective-noun phrase such as 'red box' into its plural using regular "
         "English plural rules.",
         ("Make this phrase plural: {input}",
          "What is the plural of '{input}'?",
          "Phrase: {input}\nWrite its plural form.",
          "Change {input} to the plural."),
         sample_adjective_noun, solve_pluralize),
    Task("snake_case",
         "Join a short phrase of lowercase words into one snake_case identifier with "
         "underscores.",
         ("Convert to snake_case: {input}",
          "Write '{input}' as a snake_case variable name.",
          "Words: {input}\nJoin them into a snake_case identifier.",
          "Turn {input} into a Python snake_case name."),
         _sample_phrase(CODE_WORDS, 2, 4), solve_snake_case),
    # -- held out: no adapter, each resembles one held-in task --------------------------------
    Task("date_us",
         "Convert a date written in words, like 'March 5, 2021', into the US numeric format "
         "MM/DD/YYYY.",
         ("Convert this date to US format (MM/DD/YYYY): {input}",
          "Rewrite the date {input} as MM/DD/YYYY.",
          "What is {input} as a US month/day/year date?",
          "Date: {input}\nGive it as month/day/year (MM/DD/YYYY)."),
         sample_word_date, solve_date_us, held_out=True, related=("date_iso",)),
    Task("lowercase",
         "Rewrite a short English phrase written in capital letters in all lowercase letters.",
         ("Convert to lowercase: {input}",
          "Write this phrase in small letters: {input}",
          "Rewrite '{input}' without any capital letters.",
          "Text: {input}\nReturn the same text in lowercase."),
         _sample_phrase(WORDS, 2, 3, case=str.upper), solve_lowercase,
         held_out=True, related=("uppercase",)),
    Task("extract_phone",
         "Extract the phone number, written like 555-123-4567, mentioned inside a short English "
         "sentence.",
         ("Extract the phone number from this sentence: {input}",
          "What phone number is mentioned here? {input}",
          "Sentence: {input}\nReturn only the phone number.",
          "Find the telephone number in: {input}"),
         _sample_contact_sentence(_PHONE_TEMPLATES, _sample_phone),
         _solve_extract(_PHONE, "phone number"), held_out=True, related=("extract_email",)),
    Task("kg_to_g",
         "Convert a whole-number mass in kilograms (kg) into grams (g), multiplying by 1000.",
         ("Convert {input} to grams.",
          "How many grams is {input}?",
          "Express the mass {input} in grams (g).",
          "Mass: {input}\nWrite it in grams."),
         _sample_quantity("kg"), _solve_times_1000("kg", "g"), held_out=True,
         related=("km_to_m",)),
)

TASKS: dict[str, Task] = {task.name: task for task in _SUITE}
HELD_IN: list[str] = [task.name for task in _SUITE if not task.held_out]
HELD_OUT: list[str] = [task.name for task in _SUITE if task.held_out]


def get_task(name: str) -> Task:
    """The task called ``name``; a ``ValueError`` lists the valid names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}") from None
