"""Write long_reviews.csv: 1,000 movie reviews of one to many sentences with a sentiment label, lengths
skewed as real review sets are (with all-MiniLM-L6-v2's tokenizer: most 16-64 tokens, a tail to 256;
about mean 55, p50 40, p99 240). Deterministic: the same file every time. Used by
`benchmarks/methods_table.py` (the README's "What each method saves"), where rows of ~10 tokens
(`reviews.csv`) would leave every activation-saving method at 1.00x.

    python benchmarks/data/make_long_reviews.py       # writes benchmarks/data/long_reviews.csv
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

ROWS = 1000
SUBJECTS = ["The film", "This movie", "The plot", "The acting", "The ending", "The soundtrack", "The director",
            "The cast", "The script", "The story", "Every scene", "The lead actor", "The camera work",
            "The second half", "The dialogue", "The pacing", "The villain", "The opening sequence"]
GOOD = ["was wonderful", "is a delight", "kept me hooked", "felt fresh and honest", "made me laugh",
        "is beautifully shot", "works really well", "surprised me in the best way", "earns every minute",
        "stayed with me for days", "is clever without showing off", "lands every emotional beat"]
BAD = ["was a mess", "is painfully slow", "made no sense", "felt flat and lifeless", "bored me",
       "is badly written", "never comes together", "wasted a good idea", "drags on far too long",
       "feels like a rough draft", "undercuts its own best moments", "forgets what it was about"]
TAILS = ["", "", "", " from start to finish", " overall", ", honestly", " for me", " at times",
         ", even on a second viewing", " compared with the book", " despite the hype"]
ASIDES = ["I saw it on a rainy Sunday with two friends who disagreed with me about almost everything.",
          "The cinema was half empty, which says something about the marketing.",
          "My expectations were shaped by the trailer, which gives away far too much.",
          "It runs a little over two hours, and you feel both of them.",
          "There is a long flashback in the middle that some viewers will find confusing.",
          "The supporting characters get more interesting material than the lead."]


def sentence(rng: random.Random, label: int) -> str:
    if rng.random() < 0.25:
        return rng.choice(ASIDES)
    return f"{rng.choice(SUBJECTS)} {rng.choice(GOOD if label else BAD)}{rng.choice(TAILS)}."


def main() -> None:
    rng = random.Random(0)
    path = Path(__file__).with_name("long_reviews.csv")
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(ROWS):
            label = rng.randint(0, 1)
            # Sentences per review: log-normal (median 3-4, a long tail), 2 to 22 (~16 to ~256 tokens).
            count = max(2, min(22, round(math.exp(rng.gauss(math.log(3.5), 0.75)))))
            writer.writerow([" ".join(sentence(rng, label) for _ in range(count)), label])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
