"""Generate a synthetic customer-support dataset (prompt,response CSV) for the quickstart.

    python examples/make_support_data.py --rows 3000 --out examples/data/support.csv

All text is our own templates. Each answer is a fixed function of the question (the intent, the
product, the order number, the customer's name), so a tiny model trained for a few minutes can
learn visible structure. Some answers hold commas, double quotes and line breaks, so the file
only parses with proper CSV quoting. The same --seed always writes the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

POWER, NOISE, CHARGE, LINK, DAMAGED, SIZE, ZIPPER = (
    "will not turn on", "makes a loud noise", "stopped charging", "keeps disconnecting",
    "arrived damaged", "is the wrong size", "has a broken zipper",
)
# product -> (category, warranty in months, issues it can have)
PRODUCTS = {
    "AeroBlend 500 blender": ("kitchen", 24, [POWER, NOISE, DAMAGED]),
    "QuietBrew coffee maker": ("kitchen", 24, [POWER, NOISE, DAMAGED]),
    "PixelView 27 monitor": ("electronics", 36, [POWER, DAMAGED]),
    "TrailLite backpack": ("outdoor", 12, [ZIPPER, DAMAGED]),
    "SnapCharge power bank": ("electronics", 12, [CHARGE, DAMAGED]),
    "CloudStep rain jacket": ("apparel", 6, [SIZE, ZIPPER, DAMAGED]),
    "NovaSound headset": ("electronics", 24, [CHARGE, LINK, DAMAGED]),
    "HearthGlow desk lamp": ("home", 18, [POWER, DAMAGED]),
    "FrostBox mini fridge": ("kitchen", 24, [POWER, NOISE, DAMAGED]),
    "ZenMat yoga mat": ("outdoor", 6, [SIZE, DAMAGED]),
    "SwiftType keyboard": ("electronics", 12, [CHARGE, LINK, DAMAGED]),
    "NestWarm heated blanket": ("home", 12, [POWER, SIZE, DAMAGED]),
}
# issue -> the first thing to try
ISSUES = {
    POWER: "hold the power button for ten seconds, then plug it into a different outlet",
    NOISE: "check that every part is seated firmly and nothing touches the moving parts",
    CHARGE: "try a different cable and charger, and clean the charging port with a dry brush",
    LINK: "turn Bluetooth off and on, then forget the device and pair it again",
    DAMAGED: "take a photo of the damage and the box, and keep all the packaging",
    SIZE: "compare the label with the size chart on the product page",
    ZIPPER: "take a photo of the zipper so we can see where it failed",
}
COUNTRIES = {"Canada": 12, "Mexico": 15, "Germany": 25, "Japan": 30, "Australia": 35, "Brazil": 28}
NAMES = ["Maria", "James", "Aisha", "Chen", "Olga", "Diego", "Priya", "Tom", "Fatima", "Lukas", "Yuki", "Sam"]
GREETINGS = ["Hi!", "Hello.", "Hey there!", "Good morning.", "", "Hello support team."]
CLOSINGS = ["Thanks!", "Thank you so much.", "Please help.", "I appreciate your help.", "", "Cheers."]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


def order_status(order: int) -> str:
    # A deterministic status per order number, so the answer is learnable from the question.
    return ["is being packed", "has shipped and arrives in 2 business days", "is out for delivery today",
            "has shipped and arrives in 4 business days"][order % 4]


def ask(rng: random.Random, body: str, name: str | None) -> str:
    intro = f"This is {name}." if name else ""
    parts = [rng.choice(GREETINGS), intro, body[0].upper() + body[1:], rng.choice(CLOSINGS)]
    return " ".join(p for p in parts if p)


def salute(name: str | None) -> str:
    return f"Hi {name}," if name else "Hello,"


def order_question(rng, product, order, name):
    body = rng.choice([
        f"where is my order #{order}? I bought the {product} last week and have not heard anything since.",
        f"can you tell me the status of order #{order}, the {product}? The tracking page is not loading for me.",
        f"I am still waiting for my {product}, order number {order}. When will it arrive?",
    ])
    answer = (f"{salute(name)} thanks for checking in. Order #{order}, your {product}, {order_status(order)}. "
              "You will get an email with the tracking link as soon as the carrier scans it.")
    return ask(rng, body, name), answer


def issue_of(rng, product: str) -> str:
    return rng.choice(PRODUCTS[product][2])


def return_question(rng, product, order, name):
    issue = issue_of(rng, product)
    body = rng.choice([
        f"my {product} {issue}. I would like to return it, order #{order}.",
        f"I want a refund for the {product} from order #{order}, it {issue}.",
    ])
    answer = (f"{salute(name)} I'm sorry your {product} {issue}. You can return it within 30 days for a full refund: "
              f'open Orders, choose #{order} and click "Return item". We will email you a prepaid label.')
    return ask(rng, body, name), answer


def troubleshoot_question(rng, product, order, name):
    fixable = [i for i in PRODUCTS[product][2] if i in (POWER, NOISE, CHARGE, LINK)]
    if not fixable:  # nothing to try for a torn backpack: that is a return
        return return_question(rng, product, order, name)
    issue = rng.choice(fixable)
    body = rng.choice([
        f"my {product} {issue}. Is there something I can try before sending it back?",
        f"the {product} I received {issue}. What should I do?",
    ])
    answer = (f"{salute(name)} let's fix that. Please try these steps:\n"
              f"1. {ISSUES[issue].capitalize()}.\n"
              f"2. If your {product} still {issue}, reply with order #{order} and we will replace it.")
    return ask(rng, body, name), answer


def warranty_question(rng, product, order, name):
    category, months, _ = PRODUCTS[product]
    body = rng.choice([
        f"how long is the warranty on the {product}? I bought it with order #{order}.",
        f"does the {product} come with a warranty, and what does it cover?",
    ])
    article = "an" if months == 18 else "a"
    answer = (f"{salute(name)} the {product} has {article} {months}-month warranty, like all our {category} products. "
              "It covers defects in materials and workmanship, but not accidental damage.")
    return ask(rng, body, name), answer


def shipping_question(rng, product, order, name):
    country, cost = rng.choice(list(COUNTRIES.items()))
    body = rng.choice([
        f"do you ship the {product} to {country}, and how much does it cost?",
        f"I live in {country}. What would shipping cost for a {product}?",
    ])
    answer = (f"{salute(name)} yes, we ship to {country}. Standard shipping for the {product} costs ${cost}, "
              "and delivery takes 7 to 12 business days. Import duties, if any, are paid on delivery.")
    return ask(rng, body, name), answer


def cancel_question(rng, product, order, name):
    day = rng.choice(DAYS)
    body = rng.choice([
        f"I placed order #{order} for a {product} on {day} by mistake. Can I cancel it?",
        f"please cancel my order #{order}, I no longer need the {product}.",
    ])
    if order % 4 == 0:
        answer = (f"{salute(name)} done: order #{order} is cancelled, since it had not shipped yet. "
                  "The refund reaches your card in 3 to 5 business days.")
    else:
        answer = (f"{salute(name)} order #{order} {order_status(order)}, so it can no longer be cancelled. "
                  'Once it arrives, choose "Return item" under Orders for a full refund.')
    return ask(rng, body, name), answer


INTENTS = [
    order_question, return_question, troubleshoot_question, warranty_question, shipping_question, cancel_question,
]


def make_rows(rows: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        intent = rng.choice(INTENTS)
        product = rng.choice(list(PRODUCTS))
        order = rng.randrange(100000, 999999)
        name = rng.choice(NAMES) if rng.random() < 0.5 else None
        out.append(intent(rng, product, order, name))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("examples/data/support.csv"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["prompt", "response"])
        writer.writerows(make_rows(args.rows, args.seed))
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
