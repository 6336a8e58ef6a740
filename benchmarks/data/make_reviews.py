"""Write reviews.csv: 2,000 short movie-review sentences with a sentiment label, like a small review
dataset (about 12 tokens each with BERT's tokenizer, a few long ones). Deterministic: the same file
every time. Used by the README's `tfmem profile --dataset` and `tfmem estimate --dataset` examples.

    python benchmarks/data/make_reviews.py            # writes benchmarks/data/reviews.csv
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

SUBJECTS = ["The film", "This movie", "The plot", "The acting", "The ending", "The soundtrack", "The director",
            "The cast", "The script", "The story", "Every scene", "The lead actor"]
GOOD = ["was wonderful", "is a delight", "kept me hooked", "felt fresh and honest", "made me laugh",
        "is beautifully shot", "works really well", "surprised me in the best way"]
BAD = ["was a mess", "is painfully slow", "made no sense", "felt flat and lifeless", "bored me",
       "is badly written", "never comes together", "wasted a good idea"]
TAILS = ["", "", "", " from start to finish", " overall", ", honestly", " for me", " at times"]
LONG = (" I went in expecting very little after the trailers, but by the second act I had changed my mind twice,"
        " and I am still thinking about the final scene days later.")


def main() -> None:
    rng = random.Random(0)
    path = Path(__file__).with_name("reviews.csv")
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(2000):
            label = rng.randint(0, 1)
            text = f"{rng.choice(SUBJECTS)} {rng.choice(GOOD if label else BAD)}{rng.choice(TAILS)}."
            if rng.random() < 0.005:  # a few long reviews (0.5%), as real datasets have
                text += LONG
            writer.writerow([text, label])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
