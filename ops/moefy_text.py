"""Text `baton moefy` runs the dense model over: calibration (to cluster neurons and fit routers)
and a disjoint held-out part (to measure what the experts cost). English prose, code and chat
turns, so the experts see the kinds of input the server sees.
"""

from __future__ import annotations

CALIBRATION_PROSE = [
    """The river town woke slowly in winter. Before sunrise the baker lit his ovens, and the smell
of bread drifted over the frozen docks where fishermen mended their nets. Children walked to
school in pairs, kicking at the crusted snow, while their parents argued about the price of
firewood and whether the ferry would run again before March. Nobody in the town remembered a
colder year, though the oldest residents liked to claim otherwise.""",
    """Photosynthesis turns light into chemical energy. In the chloroplasts of a leaf, pigments
absorb photons and use their energy to split water, releasing oxygen as a by-product. The
electrons freed in this step travel along a transport chain that pumps protons across a
membrane, and the resulting gradient drives the synthesis of ATP. In a second stage, the Calvin
cycle uses that ATP to fix carbon dioxide into sugars the plant can store or burn.""",
    """The committee met on Tuesday to review the budget for the coming fiscal year. Revenue from
parking fees fell by twelve percent, largely because of the new bicycle lanes downtown, while
spending on road maintenance rose after an unusually wet spring. The chair proposed delaying the
library renovation by six months; two members objected, saying the roof would not survive
another season. A final vote was postponed until the auditors submit their report.""",
    """To make a simple tomato sauce, warm two tablespoons of olive oil in a heavy pan over medium
heat. Add a finely chopped onion and a pinch of salt, and cook until soft but not brown, about
eight minutes. Stir in two cloves of garlic for one minute, then add a can of crushed tomatoes.
Let it simmer gently for twenty minutes, stirring now and then, and finish with torn basil
leaves and a little butter.""",
    """In 1869 the first transcontinental railroad in the United States was completed when the
Central Pacific and Union Pacific lines met at Promontory Summit in Utah. The journey from coast
to coast, which had taken months by wagon, could now be made in about a week. The railroad
reshaped trade, settled the interior quickly, and displaced many Native American nations whose
lands the tracks crossed.""",
    """Dear Ms. Alvarez, thank you for your letter of the fourth. I have looked into the billing
error you described and can confirm that you were charged twice for the October service. A
refund of forty-two dollars has been issued to your account and should appear within five
business days. Please accept our apologies for the inconvenience, and do not hesitate to contact
me directly if anything else is unclear.""",
    """A black hole forms when a massive star exhausts its fuel and its core collapses under its own
gravity. If the remaining mass is large enough, no known force can halt the collapse, and a
region forms from which not even light can escape. The boundary of that region is called the
event horizon. Astronomers detect black holes indirectly, by watching gas heat up as it spirals
inward or by measuring the orbits of nearby stars.""",
    """She had never meant to become a lighthouse keeper. The job was advertised in a newspaper she
found on a train, between a notice about lost dogs and an advert for sewing machines. Three
weeks later she stood on a rock in the North Sea with a suitcase, a box of books and a cat
that refused to leave the kitchen. The first storm arrived that night.""",
    """Interest rates affect nearly every part of the economy. When a central bank raises its
policy rate, borrowing becomes more expensive for households and firms, which tends to cool
spending and investment. Savers earn more on deposits, and the currency often strengthens as
foreign capital seeks higher returns. The effects arrive with long and variable lags, which is
why policy makers try to act before inflation is visible in the data.""",
]

CALIBRATION_CODE = [
    '''def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    """Merge two sorted lists into one sorted list."""
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out
''',
    '''import json
from pathlib import Path


class Settings:
    def __init__(self, path: Path):
        self.path = path
        self.values = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key, default=None):
        return self.values.get(key, default)

    def set(self, key, value):
        self.values[key] = value
        self.path.write_text(json.dumps(self.values, indent=2))
''',
    '''SELECT c.name, COUNT(o.id) AS orders, SUM(o.total) AS revenue
FROM customers AS c
JOIN orders AS o ON o.customer_id = c.id
WHERE o.created_at >= DATE '2024-01-01'
GROUP BY c.name
HAVING COUNT(o.id) > 3
ORDER BY revenue DESC
LIMIT 20;
''',
    '''function debounce(fn, ms) {
  let timer = null;
  return function (...args) {
    clearTimeout(timer);
    timer = setTimeout(() => fn.apply(this, args), ms);
  };
}

document.querySelector("#search").addEventListener(
  "input",
  debounce((event) => fetchResults(event.target.value), 250),
);
''',
    '''#include <stdio.h>

int gcd(int a, int b) {
    while (b != 0) {
        int t = a % b;
        a = b;
        b = t;
    }
    return a;
}

int main(void) {
    printf("%d\\n", gcd(84, 36));
    return 0;
}
''',
    '''$ git status
On branch main
Changes not staged for commit:
  modified:   src/server.py
$ git diff --stat
 src/server.py | 14 +++++++++-----
 1 file changed, 9 insertions(+), 5 deletions(-)
$ pytest -q tests/test_server.py
....F
FAILED tests/test_server.py::test_timeout - AssertionError: expected 504, got 200
''',
]

CALIBRATION_CHATS = [
    [{"role": "user", "content": "What is the capital of Australia?"},
     {"role": "assistant", "content": "The capital of Australia is Canberra. Many people guess "
      "Sydney or Melbourne, but Canberra was chosen as a compromise between the two cities."}],
    [{"role": "user", "content": "Can you give me three tips for sleeping better?"},
     {"role": "assistant", "content": "Sure. First, keep a regular schedule, even on weekends. "
      "Second, avoid screens for an hour before bed. Third, keep your bedroom cool, dark and "
      "quiet."}],
    [{"role": "user", "content": "Translate 'good morning, how are you?' into French."},
     {"role": "assistant", "content": "Bonjour, comment allez-vous ? In a casual setting you "
      "could also say: Salut, ça va ?"}],
    [{"role": "user", "content": "Write a haiku about autumn."},
     {"role": "assistant", "content": "Red leaves drift and fall,\ncold wind hums through empty "
      "trees,\nthe year breathes out slow."}],
    [{"role": "user", "content": "How do I reverse a string in Python?"},
     {"role": "assistant", "content": "Use slicing with a step of minus one: `reversed_text = "
      "text[::-1]`. This works for any string and returns a new one."}],
    [{"role": "user", "content": "Is it safe to eat raw cookie dough?"},
     {"role": "assistant", "content": "It is best avoided. Raw eggs can carry salmonella and raw "
      "flour can carry E. coli. Doughs made for eating raw use heat-treated flour and no eggs."}],
]

HELDOUT_PROSE = [
    """The orchard sat on a south-facing slope above the village, and every autumn the whole
family came back to pick apples. The grandparents worked the low branches, the teenagers
climbed ladders with baskets tied to their belts, and the youngest children sorted the fruit
into crates by size. By evening the barn smelled of cider and woodsmoke, and someone always
brought out a guitar.""",
    """Vaccines train the immune system to recognise a pathogen without causing the disease. Most
contain a weakened or inactivated form of the microbe, or a harmless piece of it such as a
surface protein. When the body meets the real pathogen later, memory cells respond quickly,
producing antibodies before the infection can take hold. Herd immunity arises when enough of a
population is protected that the disease cannot spread easily.""",
    """The museum reopened after two years of renovation with a new wing devoted to maritime
history. Visitors can walk through a reconstructed merchant ship, examine navigation tools from
the sixteenth century, and listen to recordings of sailors' songs. The curators say attendance
in the first month has already doubled compared with the same period before the closure.""",
]

HELDOUT_CODE = [
    '''def word_counts(lines):
    counts = {}
    for line in lines:
        for word in line.lower().split():
            word = word.strip(".,;:!?\\"'")
            if word:
                counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
''',
    '''class Stack:
    def __init__(self):
        self._items = []

    def push(self, item):
        self._items.append(item)

    def pop(self):
        if not self._items:
            raise IndexError("pop from empty stack")
        return self._items.pop()
''',
]

HELDOUT_CHATS = [
    [{"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Sunlight is scattered by the molecules in the air, and "
      "shorter blue wavelengths scatter much more than red ones, so blue light reaches your eyes "
      "from every direction of the sky."}],
    [{"role": "user", "content": "Suggest a name for a small coffee shop near a library."},
     {"role": "assistant", "content": "How about 'The Reading Room Café' or 'Chapter & Bean'? "
      "Both hint at books and feel warm and quiet."}],
]

# Prompts for comparing greedy continuations of the dense and the moefied model.
GREEDY_PROMPTS = [
    "The most important thing to remember when learning to swim is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
    "The main causes of the French Revolution were",
    "Here is a short list of healthy breakfast ideas:\n1.",
    "import numpy as np\n\n# compute the mean of each column\n",
]
GREEDY_CHATS = [
    [{"role": "user", "content": "What are the benefits of regular exercise?"}],
    [{"role": "user", "content": "Explain what a hash table is in two sentences."}],
]
