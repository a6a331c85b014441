"""Regenerate the shipped sample dataset and the tiny test tokenizer.

    .venv/bin/python scripts/make_assets.py            # rewrites data/sample/*.jsonl and tests/assets/tokenizer/
    .venv/bin/python scripts/make_assets.py --check    # exit 1 if the committed files differ from a fresh build

Outputs (committed; the build is deterministic, so re-running it leaves `git status` clean):
    data/sample/train.jsonl, data/sample/eval.jsonl
        {"prompt": ..., "completion": ...} records in the format of yizhongw/self_instruct
        (prompt ends with "Output:", completion starts with a space). Templated tasks (arithmetic, word
        reversal, capitals, sorting, tense rewriting, plurals, opposites, definitions, ...) drawn with a fixed seed,
        so a tiny model's loss drops within a few dozen steps. All text is written here; nothing is downloaded.
    tests/assets/tokenizer/{spiece.model, tokenizer_config.json, special_tokens_map.json}
        A sentencepiece model trained on the sample data with the umT5 special-token layout that the
        published OpenMoE checkpoints use: <pad>=0 (OpenMoE's BOS), </s>=1, <unk>=2, no sentencepiece BOS,
        byte fallback (any UTF-8 text encodes without <unk>), digits split one per piece (arithmetic learns per digit).
        Saved through transformers.T5Tokenizer with extra_ids=0, so len(tokenizer) == VOCAB_SIZE <= 1024, the
        vocab_size of the `tiny` model preset.
"""

import argparse
import filecmp
import io
import json
import random
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
from transformers import T5Tokenizer

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data" / "sample"
TOKENIZER_DIR = ROOT / "tests" / "assets" / "tokenizer"

SEED = 1234
NUM_TRAIN = 480
NUM_EVAL = 60
VOCAB_SIZE = 768  # = len(T5Tokenizer(extra_ids=0)); <= 1024 (tiny preset); the sample text supports at most ~800

# ---------------------------------------------------------------------------------------------------------------------
# Word lists (written for this file).

WORDS = (
    "apple garden river window pencil market silver orange bottle forest candle rabbit doctor yellow planet "
    "bridge monkey kitchen summer winter button castle dragon guitar island jacket ladder mirror number ocean "
    "pocket rocket school tiger violin wallet basket butter circle desert engine flower hammer letter meadow "
    "paper puzzle shadow spider tomato travel velvet wonder anchor copper"
).split()

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima",
    "Chile": "Santiago", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow", "Ireland": "Dublin",
    "Austria": "Vienna", "Hungary": "Budapest", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Australia": "Canberra",
    "Nigeria": "Abuja", "Ghana": "Accra", "Morocco": "Rabat", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Switzerland": "Bern", "Cuba": "Havana", "Colombia": "Bogota", "South Korea": "Seoul", "Indonesia": "Jakarta",
}

# (plural form) - regular and irregular nouns.
PLURALS = {
    "cat": "cats", "dog": "dogs", "box": "boxes", "bus": "buses", "child": "children", "mouse": "mice",
    "tooth": "teeth", "foot": "feet", "city": "cities", "baby": "babies", "leaf": "leaves", "knife": "knives",
    "man": "men", "woman": "women", "person": "people", "sheep": "sheep", "fish": "fish", "glass": "glasses",
    "church": "churches", "toy": "toys", "day": "days", "potato": "potatoes", "hero": "heroes", "wolf": "wolves",
    "goose": "geese", "story": "stories", "key": "keys", "wish": "wishes", "bench": "benches", "tree": "trees",
}

OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "open": "closed", "full": "empty", "high": "low", "old": "young", "rich": "poor", "strong": "weak",
    "hard": "soft", "up": "down", "inside": "outside", "loud": "quiet", "wet": "dry", "long": "short",
    "clean": "dirty", "easy": "difficult", "first": "last", "heavy": "light", "thick": "thin", "near": "far",
}

DEFINITIONS = {
    "river": "a large natural stream of water that flows toward a lake or the sea",
    "mountain": "a very high hill with steep sides",
    "library": "a building where people can read and borrow books",
    "teacher": "a person who helps others learn",
    "bread": "a food made by baking a dough of flour and water",
    "clock": "a device that shows the time",
    "island": "a piece of land with water all around it",
    "farmer": "a person who grows crops or raises animals",
    "bicycle": "a vehicle with two wheels that a rider moves with pedals",
    "umbrella": "a folding cover that keeps rain off a person",
    "kitchen": "a room where food is prepared and cooked",
    "desert": "a dry area of land that gets very little rain",
    "map": "a drawing that shows where places are",
    "bridge": "a structure that lets people cross over a river or road",
    "seed": "a small part of a plant from which a new plant can grow",
    "forest": "a large area of land covered with trees",
    "thermometer": "a tool that measures temperature",
    "calendar": "a chart that shows the days, weeks and months of a year",
    "volcano": "a mountain that can throw out hot melted rock",
    "orchestra": "a large group of musicians who play together",
    "harbor": "a sheltered place where ships can stay safely",
    "recipe": "a list of steps for cooking a dish",
    "planet": "a large round object that moves around a star",
    "dictionary": "a book that lists words and explains what they mean",
    "pilot": "a person who flies an aircraft",
    "garden": "a piece of ground where flowers or vegetables are grown",
    "ladder": "a set of steps used for climbing up and down",
    "battery": "a device that stores electric energy",
    "nest": "a place that a bird builds to lay its eggs",
    "compass": "a tool with a needle that points north",
}

SUBJECTS = ["The farmer", "My sister", "The teacher", "Our neighbor", "The old man", "A young girl", "The baker",
            "His brother", "The student", "The pilot"]
# (present, past, object)
VERBS = [
    ("plants", "planted", "a tree"), ("walks", "walked", "to the park"), ("cooks", "cooked", "dinner"),
    ("paints", "painted", "the fence"), ("opens", "opened", "the door"), ("cleans", "cleaned", "the kitchen"),
    ("watches", "watched", "the birds"), ("writes", "wrote", "a letter"), ("reads", "read", "a book"),
    ("drinks", "drank", "a cup of tea"), ("eats", "ate", "an apple"), ("sings", "sang", "a song"),
    ("buys", "bought", "some bread"), ("finds", "found", "a coin"), ("drives", "drove", "to the city"),
    ("builds", "built", "a small boat"), ("catches", "caught", "the ball"), ("teaches", "taught", "the class"),
]

COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "purple"]
THINGS = ["car", "hat", "house", "kite", "bag", "chair", "cup", "shirt"]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


# ---------------------------------------------------------------------------------------------------------------------
# Task generators: each returns (instruction, input or "", answer).

def task_add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return rng.choice(["Add the two numbers.", "What is the sum of the two numbers?"]), f"{a} and {b}", str(a + b)


def task_subtract(rng):
    a = rng.randint(10, 99)
    b = rng.randint(0, a)
    return "Subtract the second number from the first.", f"{a} and {b}", str(a - b)


def task_multiply(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return "Multiply the two numbers.", f"{a} and {b}", str(a * b)


def task_reverse(rng):
    word = rng.choice(WORDS)
    return "Write the word backwards.", word, word[::-1]


def task_uppercase(rng):
    word = rng.choice(WORDS)
    return "Write the word in capital letters.", word, word.upper()


def task_first_letter(rng):
    word = rng.choice(WORDS)
    return "What is the first letter of the word?", word, word[0]


def task_word_length(rng):
    word = rng.choice(WORDS)
    return "How many letters are in the word?", word, str(len(word))


def task_capital(rng):
    country = rng.choice(sorted(CAPITALS))
    instruction = rng.choice(["What is the capital of the country?", "Name the capital city of the country."])
    return instruction, country, f"The capital of {country} is {CAPITALS[country]}."


def task_sort(rng):
    nums = rng.sample(range(100), rng.randint(3, 5))
    order = rng.choice(["smallest to largest", "largest to smallest"])
    answer = sorted(nums, reverse=order.startswith("largest"))
    return f"Sort the numbers from {order}.", ", ".join(map(str, nums)), ", ".join(map(str, answer))


def task_max(rng):
    nums = rng.sample(range(100), rng.randint(3, 5))
    which, pick = rng.choice([("largest", max), ("smallest", min)])
    return f"Which number is the {which}?", ", ".join(map(str, nums)), str(pick(nums))


def task_even_odd(rng):
    n = rng.randint(0, 200)
    return "Is the number even or odd?", str(n), f"{n} is {'even' if n % 2 == 0 else 'odd'}."


def task_past_tense(rng):
    subject = rng.choice(SUBJECTS)
    present, past, obj = rng.choice(VERBS)
    return "Rewrite the sentence in the past tense.", f"{subject} {present} {obj}.", f"{subject} {past} {obj}."


def task_question(rng):
    color, thing = rng.choice(COLORS), rng.choice(THINGS)
    return ("Turn the statement into a question.", f"The {thing} is {color}.", f"Is the {thing} {color}?")


def task_plural(rng):
    noun = rng.choice(sorted(PLURALS))
    return "Give the plural form of the noun.", noun, PLURALS[noun]


def task_opposite(rng):
    word = rng.choice(sorted(OPPOSITES))
    return "Give the opposite of the word.", word, OPPOSITES[word]


def task_define(rng):
    word = rng.choice(sorted(DEFINITIONS))
    return "Give a short definition of the word.", word, f"A {word} is {DEFINITIONS[word]}."


def task_number_word(rng):
    n = rng.randint(0, 20)
    return "Write the number in words.", str(n), NUMBER_WORDS[n]


def task_count_list(rng):
    items = rng.sample(WORDS, rng.randint(2, 6))
    return "How many items are in the list?", ", ".join(items), str(len(items))


TASKS = [task_add, task_subtract, task_multiply, task_reverse, task_uppercase, task_first_letter, task_word_length,
         task_capital, task_sort, task_max, task_even_odd, task_past_tense, task_question, task_plural, task_opposite,
         task_define, task_number_word, task_count_list]


def format_record(instruction, inp, answer):
    # self_instruct layout: the prompt ends with "Output:", the completion starts with a space.
    prompt = f"{instruction}\n\nInput: {inp}\n\nOutput:" if inp else f"{instruction}\n\nOutput:"
    return {"prompt": prompt, "completion": f" {answer}"}


def make_records(seed=SEED, num=NUM_TRAIN + NUM_EVAL):
    """`num` distinct records (by prompt), round-robin over the tasks; a small task that repeats itself is skipped."""
    rng = random.Random(seed)
    records, seen = [], set()
    attempts = 0
    while len(records) < num:
        attempts += 1
        if attempts > 100 * num:
            raise RuntimeError(f"could only draw {len(records)} distinct records out of {num}")
        task = TASKS[attempts % len(TASKS)]
        record = format_record(*task(rng))
        if record["prompt"] in seen:
            continue
        seen.add(record["prompt"])
        records.append(record)
    rng.shuffle(records)
    return records


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def train_tokenizer(texts, out_dir):
    """Train the sentencepiece model in memory (so no file path is recorded in it) and save it via T5Tokenizer."""
    model = io.BytesIO()
    spm.set_random_generator_seed(SEED)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        # umT5 itself is a unigram model; on 40 KB of templated text unigram EM keeps fragments ("In", "pu", "t")
        # where BPE learns whole words (23 vs 33 pieces per record). The id layout below is the convention that matters.
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        # umT5 layout: pad=0 (OpenMoE's BOS), eos=1, unk=2, no sentencepiece BOS.
        pad_id=0, pad_piece="<pad>",
        eos_id=1, eos_piece="</s>",
        unk_id=2, unk_piece="<unk>",
        bos_id=-1,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        shuffle_input_sentence=False,
        num_threads=1,  # multi-threaded EM sums in a scheduling-dependent order; one thread keeps the file stable
        minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "spiece.model"
    tmp.write_bytes(model.getvalue())
    tokenizer = T5Tokenizer(vocab_file=str(tmp), extra_ids=0, legacy=False)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build(root):
    records = make_records()
    train, eval_ = records[:NUM_TRAIN], records[NUM_TRAIN:]
    write_jsonl(root / DATA_DIR.relative_to(ROOT) / "train.jsonl", train)
    write_jsonl(root / DATA_DIR.relative_to(ROOT) / "eval.jsonl", eval_)
    texts = [r["prompt"] + r["completion"] for r in records]
    tokenizer = train_tokenizer(texts, root / TOKENIZER_DIR.relative_to(ROOT))
    if len(tokenizer) > 1024:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} entries; the tiny preset's vocab_size is 1024")
    return len(train), len(eval_), tokenizer


OUTPUTS = [
    "data/sample/train.jsonl",
    "data/sample/eval.jsonl",
    "tests/assets/tokenizer/spiece.model",
    "tests/assets/tokenizer/tokenizer_config.json",
    "tests/assets/tokenizer/special_tokens_map.json",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="build into a temp dir and compare with the repo")
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp))
            stale = [p for p in OUTPUTS if not (ROOT / p).exists()
                     or not filecmp.cmp(Path(tmp) / p, ROOT / p, shallow=False)]
        if stale:
            print("out of date: " + ", ".join(stale))
            sys.exit(1)
        print("assets up to date")
        return
    n_train, n_eval, tokenizer = build(ROOT)
    print(f"wrote {n_train} train + {n_eval} eval records to {DATA_DIR.relative_to(ROOT)}/")
    print(f"wrote tokenizer to {TOKENIZER_DIR.relative_to(ROOT)}/: len={len(tokenizer)} "
          f"pad={tokenizer.pad_token_id} eos={tokenizer.eos_token_id} unk={tokenizer.unk_token_id}")


if __name__ == "__main__":
    main()
