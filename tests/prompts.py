"""Prompts for the end-to-end tests: our own, varied (code, facts, lists,
reasoning, open chat), none from the benchmark sets."""

TEST_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a hash table is to a beginner.",
    "Give me three ideas for a weekend trip near the mountains.",
    "What is the difference between a list and a tuple in Python?",
    "Write a haiku about autumn leaves.",
    "How do I reverse a linked list? Show code.",
    "Summarize the plot of a heist movie you invent, in four sentences.",
    "What causes the seasons on Earth?",
    "Write a SQL query that counts orders per customer.",
    "List five healthy breakfast options.",
    "Explain recursion with a short example in JavaScript.",
    "Why do cats purr?",
    "Write a shell command that finds all .log files larger than 1 MB.",
    "Describe the water cycle in simple terms.",
    "Write a Python class for a bank account with deposit and withdraw.",
    "What are the benefits of regular exercise?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Write a short motivational message for a student before an exam.",
    "Explain the difference between TCP and UDP.",
    "Write a function in C that returns the maximum of an array.",
]


def chat(llm, prompts, sampling_params):
    """Greedy chat completions through the model's chat template."""
    return llm.chat([[{"role": "user", "content": p}] for p in prompts], sampling_params,
                    use_tqdm=False)
