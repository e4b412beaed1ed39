"""Short spoken-assistant commands, with no transcript shared between splits.

A command is a template ("call {contact}", "turn {onoff} the {room} {device}")
with its slots filled. `split_commands` deals the grammar out to the splits:

* the values of every slot except the few in SHARED_SLOTS are shuffled with
  the seed and dealt out, about 10% to 'dev', 10% to 'test' (at least one
  each) and the rest to 'train';
* about 10% of the templates (at least one) are dev-only and as many
  test-only; the others are used by every split, with that split's values;
* every template has a dealt slot, so the splits' transcripts differ; any
  held-out transcript that two templates happen to share with train (or test
  with dev) is dropped all the same.

So no dev or test command is ever heard in train, and dev and test bring words
(slot values) and sentence patterns that train never has. Numbers are spelled
as words; every transcript is in `conformer_fl.text.normalize_text` form.
"""

import itertools
import re
from collections.abc import Sequence

import numpy as np

from conformer_fl.data import text_sources
from conformer_fl.text import normalize_text

SPLITS = ("train", "dev", "test")

_number_words = lambda numbers: tuple(text_sources.number_to_words(n)
                                      for n in numbers)

SLOTS: dict[str, tuple[str, ...]] = {
    "contact": (
        "mom", "dad", "grandma", "grandpa", "alice", "bob", "emma", "james",
        "olivia", "liam", "sophia", "noah", "mia", "lucas", "amelia", "ethan",
        "harper", "logan", "ella", "henry", "grace", "jack", "chloe", "owen",
        "lily", "daniel", "zoe", "samuel", "nora", "david", "hannah", "peter",
        "my sister", "my brother", "the office", "doctor green", "the plumber",
        "uncle tom", "aunt mary", "the school"),
    "room": ("kitchen", "bedroom", "living room", "bathroom", "hallway",
             "garage", "office", "porch", "basement", "attic", "dining room",
             "nursery", "laundry room", "study", "guest room", "patio"),
    "device": ("lights", "lamp", "fan", "heater", "radio", "tv", "speaker",
               "printer", "kettle", "oven", "fireplace", "air conditioner",
               "sprinkler", "blinds"),
    "genre": ("jazz", "rock", "classical", "country", "pop", "blues", "folk",
              "reggae", "soul", "opera", "disco", "gospel", "punk", "metal",
              "hip hop", "swing", "techno", "salsa"),
    "city": ("paris", "london", "boston", "chicago", "denver", "tokyo",
             "madrid", "dublin", "seattle", "berlin", "rome", "vienna",
             "prague", "lisbon", "oslo", "cairo", "sydney", "toronto",
             "miami", "houston", "phoenix", "atlanta", "moscow", "delhi",
             "lima", "nairobi", "athens", "warsaw", "manila", "havana"),
    "item": ("milk", "eggs", "bread", "apples", "coffee", "rice", "butter",
             "cheese", "tea", "onions", "sugar", "flour", "bananas",
             "tomatoes", "garlic", "pasta", "yogurt", "honey", "lemons",
             "carrots", "soap", "batteries", "napkins", "cereal", "salt",
             "pepper", "beans", "grapes"),
    "task": ("call the bank", "water the plants", "buy milk", "feed the cat",
             "take out the trash", "pay rent", "book a table", "walk the dog",
             "wash the car", "clean the oven", "mail the letter",
             "charge my phone", "lock the door", "pack my bag",
             "renew my passport", "return the books", "check the oven",
             "stretch", "drink water", "call the doctor"),
    "day": ("monday", "tuesday", "wednesday", "thursday", "friday",
            "saturday", "sunday", "tomorrow", "tonight", "this weekend",
            "next week"),
    "app": ("the camera", "the calendar", "my email", "the maps", "the notes",
            "the calculator", "the clock", "my photos", "the browser",
            "the settings", "the music player", "the podcasts"),
    "phrase": ("stop", "pause", "next song", "volume up", "volume down",
               "what time is it", "good morning", "good night",
               "cancel that", "read my messages", "what's on my calendar",
               "skip this song", "play the news", "repeat that", "yes please",
               "no thanks", "louder please", "mute", "unmute", "resume",
               "shuffle my playlist", "tell me a joke", "how are you",
               "thank you", "never mind", "go back", "who is calling",
               "what day is it", "start over", "turn it down"),
    "minutes": _number_words(range(2, 60)),
    "hour": _number_words(range(1, 13)),
    "degrees": _number_words(range(55, 86)),
    "percent": _number_words(range(5, 100, 5)),
    "count": _number_words(range(2, 10)),
    "onoff": ("on", "off"),
}
# Slots too small to deal out: every split uses all their values.
SHARED_SLOTS = frozenset({"onoff"})

TEMPLATES = (
    "set a timer for {minutes} minutes",
    "start a {minutes} minute timer",
    "set an alarm for {hour} o'clock",
    "wake me up at {hour}",
    "call {contact}",
    "text {contact}",
    "send a message to {contact}",
    "email {contact}",
    "turn {onoff} the {room} {device}",
    "switch {onoff} the {device}",
    "play some {genre} music",
    "put on some {genre}",
    "what's the weather in {city}",
    "is it raining in {city}",
    "weather for {day}",
    "add {item} to my list",
    "we are out of {item}",
    "remind me to {task}",
    "set the heat to {degrees} degrees",
    "dim the lights to {percent} percent",
    "skip {count} songs",
    "go back {count} songs",
    "open {app}",
    "close {app}",
    "{phrase}",
    "how far is {city}",
    "play {genre} in the {room}",
    "call {contact} {day}",
)

_SLOT = re.compile(r"\{(\w+)\}")


def template_slots(template: str) -> tuple[str, ...]:
  """The slot names of a template, in order ('call {contact}' -> ('contact',))."""
  return tuple(_SLOT.findall(template))


def _deal(items: Sequence[str], rng: np.random.Generator, held_out_share: float
          ) -> dict[str, list[str]]:
  """Shuffles `items`; dev and test get `held_out_share` each (at least 1)."""
  order = [items[i] for i in rng.permutation(len(items))]
  k = max(1, round(held_out_share * len(order)))
  return {"dev": order[:k], "test": order[k:2 * k], "train": order[2 * k:]}


def fill(template: str, values: dict[str, Sequence[str]]) -> list[str]:
  """Every normalized filling of `template` with the slot `values`, in order."""
  slots = template_slots(template)
  return [normalize_text(template.format(**dict(zip(slots, combo))))
          for combo in itertools.product(*(values[s] for s in slots))]


def split_commands(seed: int, held_out_share: float = 0.1
                   ) -> dict[str, list[str]]:
  """The distinct command transcripts of each split (module docstring), sorted.

  Args:
    seed: seeds the dealing of slot values and templates.
    held_out_share: share of each slot's values, and of the templates, that
      dev and test each get.

  Returns:
    {split: sorted transcripts}; dev and test share none with train, and test
    none with dev.
  """
  rng = np.random.default_rng([seed, 8])
  values = {split: {} for split in SPLITS}
  for slot in sorted(SLOTS):
    if slot in SHARED_SLOTS:
      for split in SPLITS:
        values[split][slot] = SLOTS[slot]
      continue
    for split, dealt in _deal(SLOTS[slot], rng, held_out_share).items():
      values[split][slot] = dealt
  templates = _deal(TEMPLATES, rng, held_out_share)
  shared = templates["train"]
  sentences, seen = {}, set()
  for split in SPLITS:
    own = shared + ([] if split == "train" else templates[split])
    texts = {t for template in own for t in fill(template, values[split])}
    sentences[split] = sorted(texts - seen)
    seen |= texts
  return sentences
