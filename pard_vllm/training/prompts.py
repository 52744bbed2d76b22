"""A training prompt set generated on the spot, so nothing is downloaded and no eval set leaks in.

Why generated: the benchmarks measure acceptance on HumanEval, GSM8K and MT-Bench, so a
draft must never see those prompts. Instead we mix three families that cover the same
*kinds* of text the target will be asked to write:

* code: prompts built from the Python standard library itself (module and function
  names, signatures and the first line of their docstrings, read with ``inspect``), asking
  for functions, explanations, tests and fixes;
* math: templated arithmetic word problems with random quantities (our own templates);
* chat: templated instructions (explain, list, write, compare, role-play) over topic lists.

Everything is seeded, so ``--seed`` reproduces a file exactly. The held-out evaluation
slice is made with a different seed and filtered against the training prompts.

    python -m pard_vllm.training.prompts --n 1000 --out runs/data/prompts.jsonl \
        --eval-n 20 --eval-out runs/data/eval_prompts.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
from pathlib import Path

STDLIB_MODULES = [
    "os.path", "re", "json", "math", "statistics", "itertools", "functools", "collections",
    "string", "textwrap", "datetime", "calendar", "random", "heapq", "bisect", "shutil",
    "pathlib", "glob", "fnmatch", "csv", "hashlib", "base64", "binascii", "zlib", "gzip",
    "difflib", "operator", "copy", "pprint", "urllib.parse", "html", "uuid", "secrets",
    "fractions", "decimal", "struct", "time", "tempfile", "shlex", "ipaddress", "email.utils",
    "unicodedata", "contextlib", "dataclasses", "enum", "typing", "array", "cmath", "colorsys",
    "zipfile", "tarfile", "configparser", "argparse", "logging", "threading", "queue", "sqlite3",
]

CODE_TEMPLATES = [
    "Write a Python function that uses `{qual}` to {task}. Include a docstring and an example call.",
    "Explain what `{qual}{sig}` does in Python. The documentation says: \"{doc}\". Give a short example.",
    "Write three pytest test cases for `{qual}` from the `{mod}` module.",
    "Implement a simplified version of `{qual}{sig}` in pure Python without importing `{mod}`.",
    "```python\nimport {mod}\n\ndef {helper}(data):\n    \"\"\"{doc}\"\"\"\n```\nComplete this function using `{qual}`.",
    "What are common mistakes when using `{qual}`? Show a buggy snippet and the fixed version.",
    "Write a small command-line script that demonstrates `{qual}` and prints the result.",
    "Compare `{qual}` with an alternative approach in Python. When should I use each?",
]

CODE_TASKS = [
    "process a list of user records", "clean up a text file", "summarise numeric data",
    "validate user input", "parse a configuration string", "build a lookup table",
    "handle file names safely", "format a report", "transform a nested dictionary",
    "speed up a slow loop",
]

ALGO_TASKS = [
    "reverses the words in a sentence", "checks whether a string is a palindrome",
    "returns the k largest numbers in a list", "merges two sorted lists",
    "counts the vowels in a string", "flattens a nested list", "removes duplicates while keeping order",
    "computes the greatest common divisor of two integers", "converts a Roman numeral to an integer",
    "finds the longest common prefix of a list of strings", "rotates a matrix by 90 degrees",
    "groups words that are anagrams", "returns the running average of a list",
    "checks whether brackets in a string are balanced", "computes the n-th triangular number",
    "splits a list into chunks of size n", "converts snake_case to camelCase",
    "finds the second smallest element of a list", "counts word frequencies in a text",
    "returns all prime numbers below n", "computes the Levenshtein distance of two strings",
    "implements binary search", "parses a date string in ISO format", "transposes a list of lists",
]

ALGO_TEMPLATES = [
    "Write a Python function that {task}.",
    "def solve(x):\n    \"\"\"Write a function that {task}.\"\"\"\nComplete the Python function above.",
    "Write a function in Python that {task}, then explain its time complexity.",
    "Implement a function that {task}. Add type hints and handle edge cases.",
]

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jo", "Kofi", "Lena",
         "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara"]
ITEMS = [("apples", "baskets"), ("pencils", "boxes"), ("cookies", "jars"), ("books", "shelves"),
         ("stickers", "sheets"), ("eggs", "cartons"), ("marbles", "bags"), ("tiles", "rows")]

MATH_TEMPLATES = [
    "{a} has {x} {item}. {b} gives {a} {y} more, and then {a} uses {z}. How many {item} does {a} have now?",
    "There are {x} {container} with {y} {item} in each. {a} takes away {z} {item}. How many {item} are left?",
    "{a} earns ${x} per hour and works {y} hours a week. After spending ${z}, how much money is left each week?",
    "A train travels {x} km in {y} hours. At the same speed, how far does it travel in {z} hours?",
    "{a} reads {y} pages a day. The book has {x} pages. How many days does it take to finish the book?",
    "A shop sells {item} at ${y} each. {a} buys {z} and pays with ${x}. How much change does {a} get?",
    "{a} and {b} share {x} {item} in the ratio {y}:{z}. How many {item} does each get?",
    "The price of a jacket is ${x}. It is discounted by {y} percent. What is the new price?",
    "A rectangle is {x} cm long and {y} cm wide. What are its area and perimeter?",
    "{a} saves ${y} every week. How many weeks until {a} has saved ${x}?",
]

TOPICS = [
    "photosynthesis", "the French Revolution", "black holes", "compound interest", "the water cycle",
    "machine learning", "climate change", "the Roman Empire", "vaccines", "plate tectonics",
    "the stock market", "renewable energy", "the human immune system", "supply and demand",
    "the internet", "jazz music", "the Renaissance", "volcanoes", "sleep", "meditation",
    "public speaking", "remote work", "gardening", "chess openings", "electric cars", "recycling",
    "the moon landing", "DNA", "inflation", "coral reefs", "ancient Egypt", "time management",
    "learning a new language", "the printing press", "quantum computing", "healthy eating",
]

CHAT_TEMPLATES = [
    "Explain {topic} to a ten-year-old.",
    "Give me three interesting facts about {topic}.",
    "Write a short poem about {topic}.",
    "What are the main advantages and disadvantages of {topic}?",
    "Summarize the history of {topic} in one paragraph.",
    "Write a persuasive paragraph arguing that everyone should learn about {topic}.",
    "Imagine you are a tour guide. Describe {topic} to a group of visitors.",
    "Write a short blog post introduction about {topic}.",
    "List five questions a student might ask about {topic}, with brief answers.",
    "Compare {topic} and {topic2}. How are they similar and how are they different?",
    "Write a friendly email to a colleague explaining {topic}.",
    "What is a common misconception about {topic}? Explain why it is wrong.",
    "Create a short quiz with three multiple-choice questions about {topic}.",
    "Pretend you are a teacher. Write a lesson plan outline on {topic}.",
    "Write a dialogue between two friends discussing {topic}.",
    "Rewrite this sentence to be more formal: 'I think {topic} is kind of cool and stuff.'",
]


def stdlib_functions(seed: int = 0) -> list[tuple[str, str, str, str]]:
    """(module, qualified name, signature, first docstring line) of public stdlib callables."""
    found = []
    for mod_name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except Exception:  # noqa: BLE001 - a missing optional module just contributes nothing
            continue
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not callable(obj) or getattr(obj, "__module__", None) is None:
                continue
            doc = (inspect.getdoc(obj) or "").strip().splitlines()
            if not doc or len(doc[0]) < 12:
                continue
            try:
                sig = str(inspect.signature(obj))
            except (TypeError, ValueError):
                sig = "(...)"
            if len(sig) > 80:
                sig = "(...)"
            found.append((mod_name, f"{mod_name}.{name}", sig, doc[0].replace('"', "'")[:160]))
    random.Random(seed).shuffle(found)
    return found


def _code_prompt(rng: random.Random, funcs) -> str:
    if rng.random() < 0.35:
        return rng.choice(ALGO_TEMPLATES).format(task=rng.choice(ALGO_TASKS))
    mod, qual, sig, doc = rng.choice(funcs)
    helper = qual.split(".")[-1].lower() + "_helper"
    return rng.choice(CODE_TEMPLATES).format(qual=qual, sig=sig, doc=doc, mod=mod, helper=helper,
                                             task=rng.choice(CODE_TASKS))


def _math_prompt(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    item, container = rng.choice(ITEMS)
    x = rng.randint(20, 400)
    y = rng.randint(2, 30)
    z = rng.randint(1, 19)
    text = rng.choice(MATH_TEMPLATES).format(a=a, b=b, item=item, container=container, x=x, y=y, z=z)
    return text + rng.choice(["", " Show your reasoning step by step.", " Explain each step."])


def _chat_prompt(rng: random.Random) -> str:
    t1, t2 = rng.sample(TOPICS, 2)
    return rng.choice(CHAT_TEMPLATES).format(topic=t1, topic2=t2)


def generate(n: int, seed: int = 0, mix=(0.4, 0.2, 0.4), exclude: set[str] | None = None) -> list[dict]:
    """``n`` distinct prompts as ``{"id", "kind", "prompt"}``, mixed code/math/chat by ``mix``."""
    rng = random.Random(seed)
    funcs = stdlib_functions(seed)
    seen = set(exclude or ())
    out = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n:
            raise RuntimeError(f"could only make {len(out)} distinct prompts out of {n}")
        u = rng.random()
        kind = "code" if u < mix[0] else "math" if u < mix[0] + mix[1] else "chat"
        text = _code_prompt(rng, funcs) if kind == "code" else _math_prompt(rng) if kind == "math" else _chat_prompt(rng)
        if text in seen:
            continue
        seen.add(text)
        out.append({"id": f"s{seed}-{len(out):05d}", "kind": kind, "prompt": text})
    return out


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_prompts(path: str | Path) -> list[dict]:
    """A JSONL file of ``{"prompt": ...}`` (or ``{"messages": [...]}``) rows, or plain text lines."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        line = line.strip()
        if not line:
            continue
        row = json.loads(line) if line.startswith("{") else {"prompt": line}
        row.setdefault("id", f"p{i:05d}")
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval-n", type=int, default=0, help="also write a held-out slice of this size")
    ap.add_argument("--eval-out")
    args = ap.parse_args(argv)
    train = generate(args.n, args.seed)
    write_jsonl(train, args.out)
    print(f"wrote {len(train)} prompts to {args.out}")
    if args.eval_n:
        held = generate(args.eval_n, args.seed + 1000, exclude={r["prompt"] for r in train})
        write_jsonl(held, args.eval_out or str(Path(args.out).with_name("eval_prompts.jsonl")))
        print(f"wrote {len(held)} held-out prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
