"""The prompts `baton train-heads` has the model answer: its answers are the heads' training text.

No data set can be downloaded where Baton trains, so the prompts are written here, spread over what
a serving cluster sees: chat questions, stories, code (write, explain, fix), summaries and
extraction from a given text, edits, arithmetic, and raw text continuations without a chat
template. Input-grounded prompts carry their own passage.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HeadsPrompt:
    family: str
    text: str
    chat: bool = True  # False: a raw continuation, sent without the chat template


QUESTIONS = [
    "What causes the seasons on Earth?",
    "Why is the sky blue during the day and red at sunset?",
    "How does a refrigerator keep food cold?",
    "What is the difference between weather and climate?",
    "Explain how vaccines train the immune system.",
    "What are three good habits for better sleep?",
    "How do bees make honey?",
    "Why do we have leap years?",
    "What is photosynthesis, in simple terms?",
    "How does compound interest work? Give a small example.",
    "What should I pack for a three-day hiking trip?",
    "What is the difference between a virus and a bacterium?",
    "How can I become better at public speaking?",
    "Why does ice float on water?",
    "What is machine learning? Explain it to a twelve-year-old.",
    "Give me five ideas for a healthy breakfast.",
    "How do airplanes stay in the air?",
    "What is the capital of Australia, and why was it chosen?",
    "What are the main causes of inflation?",
    "How do I take care of a houseplant that is losing its leaves?",
    "What is the water cycle?",
    "Explain the difference between RAM and disk storage.",
    "What are some tips for learning a new language as an adult?",
    "How does a bicycle's gear system make climbing hills easier?",
    "Why do cats purr?",
    "What is a black hole?",
    "How should I prepare for a job interview?",
    "What are the benefits of regular exercise?",
    "Explain what an API is, with an everyday analogy.",
    "What is the difference between a list and a tuple in Python?",
    "How do tides work?",
    "What is the role of the liver in the human body?",
    "Recommend three classic novels and say why each is worth reading.",
    "How can a small team run better meetings?",
    "What is the difference between HTTP and HTTPS?",
    "How do solar panels turn sunlight into electricity?",
]

STORIES = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Tell a bedtime story about a small dragon who is afraid of the dark.",
    "Write a story about a robot that learns to paint.",
    "Write a short fable about a fox and a crow, with a moral at the end.",
    "Tell a story about two friends who get lost in a big city.",
    "Write a poem about autumn leaves.",
    "Write a short mystery story set on a night train.",
    "Write a story about a baker whose bread makes people remember their childhood.",
    "Write a haiku about the sea, then explain the image it uses.",
    "Tell a funny story about a dog who thinks he is a cat.",
    "Write a letter from a sailor to his family at home.",
    "Write the opening paragraph of a science fiction novel set on Mars.",
    "Write a story about a girl who can talk to trees.",
    "Write a short poem about a rainy Monday morning.",
    "Tell a story about an old clockmaker and his last clock.",
]

CODE = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a JavaScript function that removes duplicates from an array.",
    "Write a SQL query that finds the five customers with the highest total order value.",
    "Write a Python class for a simple bank account with deposit and withdraw methods.",
    "Write a bash script that counts the lines in every .txt file in a directory.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a Python function that counts how often each word appears in a text.",
    "Write a function in C that reverses a string in place.",
    "Write a Python script that reads a CSV file and prints the average of the 'price' column.",
    "Explain what this code does:\n\n```python\ndef f(xs):\n"
    "    return [x * x for x in xs if x % 2 == 0]\n```",
    "Explain what this code does:\n\n```python\nimport collections\n\ndef top(words, k):\n"
    "    return collections.Counter(words).most_common(k)\n```",
    "Fix the bug in this function:\n\n```python\ndef average(xs):\n    total = 0\n"
    "    for x in xs:\n        total += x\n    return total / len(x)\n```",
    "Fix the bug in this function:\n\n```python\ndef find_max(xs):\n    best = 0\n"
    "    for x in xs:\n        if x > best:\n            best = x\n    return best\n```\n"
    "It returns the wrong answer for lists of negative numbers.",
    "Add type hints and a docstring to this function:\n\n```python\ndef area(w, h):\n"
    "    return w * h\n```",
    "Rewrite this loop as a list comprehension:\n\n```python\nresult = []\nfor n in numbers:\n"
    "    if n > 10:\n        result.append(n * 2)\n```",
    "Write unit tests with pytest for a function `add(a, b)` that adds two numbers.",
    "Write a Python function that validates an email address with a regular expression.",
    "What is the time complexity of binary search, and why?",
    "Write a Python generator that yields the prime numbers below a given limit.",
]

PASSAGES = [
    "The city council met on Tuesday to discuss the new bicycle lanes on Main Street. Supporters "
    "said the lanes would make cycling safer and reduce traffic. Shop owners worried that losing "
    "parking spaces would hurt their business. The council voted 5 to 2 to build the lanes, with "
    "construction starting in May and ending in August.",
    "Maria Lopez joined Northwind Labs in 2019 as a data engineer. In 2021 she became the lead of "
    "the analytics team, which grew from four to eleven people. She moved to Berlin in March 2023 "
    "to open the company's first European office.",
    "Honeybees communicate the location of flowers with a waggle dance. The angle of the dance "
    "shows the direction relative to the sun, and the length of the waggle shows the distance. "
    "Other bees in the hive follow the dancer and then fly out to find the food.",
    "Order #4821 was placed on 12 June by Tom Becker. It contains two blue notebooks at 3.50 "
    "euros each, one pack of pens at 4.20 euros, and a desk lamp at 24.90 euros. Shipping to "
    "Hamburg costs 5.00 euros. The order was paid by credit card.",
    "The Great Barrier Reef is the world's largest coral reef system, stretching over 2,300 "
    "kilometres off the coast of Queensland, Australia. It is home to thousands of species of "
    "fish, coral and mollusc. Rising sea temperatures have caused several mass bleaching events "
    "since 1998, which scientists link to climate change.",
    "Our quarterly report shows revenue of 2.4 million dollars, up 12 percent from last quarter. "
    "Costs rose by 5 percent, mainly because of new hires in support. The number of active users "
    "reached 58,000. Next quarter we plan to launch the mobile app and expand to Canada.",
    "The library will be closed on Monday for maintenance. From Tuesday, opening hours change: "
    "weekdays from 9 am to 7 pm, Saturdays from 10 am to 4 pm, and Sundays closed. Members can "
    "return books at the drop box by the main entrance at any time.",
    "Dr. Anika Rao, a marine biologist at the University of Cape Town, led a six-week expedition "
    "in 2022 to count humpback whales along the west coast of South Africa. The team recorded "
    "312 whales, nearly twice the count of 2015.",
    "Sourdough bread is made with a starter, a mix of flour and water that holds wild yeast and "
    "bacteria. The baker feeds the starter for several days, mixes it into the dough, and lets "
    "the dough rise slowly, often overnight. The long rise gives the bread its sour taste.",
    "The meeting on the product launch is moved from Thursday to Friday at 2 pm in room B. Please "
    "bring the final slides. Jonas will present the pricing, Lea the marketing plan, and Omar "
    "the support schedule. The launch date stays 1 October.",
    "The Treaty of Westphalia, signed in 1648, ended the Thirty Years' War in Europe. It is often "
    "seen as the start of the modern system of sovereign states, in which each state controls "
    "its own territory and religion.",
    "Patient reports a sore throat and mild fever for three days. Temperature 38.1 C, pulse 88. "
    "No cough. Throat is red with swollen tonsils. Rapid strep test positive. Prescribed "
    "amoxicillin 500 mg three times a day for ten days.",
]

PASSAGE_TASKS = [
    ("summarize", "Summarize the following text in two sentences.\n\n{p}"),
    ("summarize", "Give a one-line headline for this text.\n\n{p}"),
    ("extract", "List every name, date and number that appears in this text.\n\n{p}"),
    ("extract", "Answer using only the text below: what is the main point?\n\n{p}"),
    ("extract", "Extract the key facts from this text as a JSON object.\n\n{p}"),
    ("quote", "Quote the sentence from this text that matters most, word for word, and say "
              "why.\n\n{p}"),
]

EDITS = [
    "Rewrite this sentence to sound more formal: 'hey, can u send me the file asap?'",
    "Correct the grammar: 'She don't like apples and she have never ate one.'",
    "Make this paragraph shorter without losing meaning: 'In order to be able to finish the "
    "project on time, it is absolutely necessary and essential that every single member of the "
    "team does their part of the work before the deadline arrives.'",
    "Translate into French: 'The weather is nice today, let's go for a walk in the park.'",
    "Turn these notes into a polite email: meeting moved to Friday, bring laptop, lunch provided.",
    "Rewrite this for a child: 'Photosynthesis converts light energy into chemical energy.'",
    "Write three alternative titles for a blog post about saving money on groceries.",
    "Turn this list into a paragraph: eggs, flour, milk, mix, fry in a pan, serve with jam.",
]

MATH = [
    "What is 17 times 23? Show your working.",
    "A train travels 180 kilometres in 2 hours. What is its average speed?",
    "If a shirt costs 40 dollars and is on sale for 25 percent off, what is the new price?",
    "Solve for x: 3x + 7 = 22.",
    "What is the sum of the numbers from 1 to 100?",
    "A recipe for 4 people needs 300 grams of rice. How much rice is needed for 10 people?",
    "What is 15 percent of 240?",
    "Tom has 3 times as many marbles as Sam. Together they have 48. How many does each have?",
    "Convert 72 degrees Fahrenheit to Celsius.",
    "What is the area of a circle with a radius of 5 centimetres?",
]

RAW = [
    "The history of the printing press begins",
    "def quicksort(xs):\n",
    "Once upon a time, in a village at the edge of a great forest,",
    "Dear hiring manager,\n\nI am writing to apply for",
    "The three most important things to know about climate change are",
    "# A simple HTTP server in Python\nimport http.server\n",
    "Chapter 1\n\nThe rain had not stopped for three days when",
    "To make a cup of good coffee, first",
    "Q: What is the tallest mountain in the world?\nA:",
    "import numpy as np\n\n# Compute the mean and standard deviation of a list\n",
]


def build_prompts() -> list[HeadsPrompt]:
    """Every prompt, in a fixed order (split and shuffle with a seed downstream)."""
    prompts = [HeadsPrompt("chat", q) for q in QUESTIONS]
    prompts += [HeadsPrompt("story", s) for s in STORIES]
    prompts += [HeadsPrompt("code", c) for c in CODE]
    prompts += [HeadsPrompt(family, task.format(p=p))
                for i, p in enumerate(PASSAGES)
                for family, task in PASSAGE_TASKS[i % 3 :: 3] + PASSAGE_TASKS[(i + 1) % 3 :: 3]]
    prompts += [HeadsPrompt("edit", e) for e in EDITS]
    prompts += [HeadsPrompt("math", m) for m in MATH]
    prompts += [HeadsPrompt("raw", r, chat=False) for r in RAW]
    return prompts
