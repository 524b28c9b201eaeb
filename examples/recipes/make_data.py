"""Write the small datasets that the worked recipes in examples/recipes/ train on.

    python examples/recipes/make_data.py              # writes examples/data/recipes/
    python examples/recipes/make_data.py --out DIR

Offline and deterministic: fixed seeds, lists (never sets) wherever order reaches a file, no
timestamps, so the same command writes the same bytes. The support rows come from the
quickstart's generator (examples/make_support_data.py), called one intent at a time so labels
and answers are right by construction. The docstrings are parsed from the running Python's
standard library (as examples/docstring_corpus.py does), so wiki.jsonl, instructions.jsonl and pretrain.jsonl
repeat byte for byte only on the same Python minor version (the committed files: 3.11).

    articles.csv           article,highlights               summarisation, CNN/DailyMail layout
    wiki.jsonl             {"text"}                         wikitext rows: headings, paragraphs, ""
    preference.jsonl       {"prompt","chosen","rejected"}   TRL preference format, strings
    preference_chat.jsonl  the same as lists of chat messages
    instructions.jsonl     {"instruction","input","output"} Alpaca layout
    intents.csv            text,label                       customer questions by intent
    pretrain.jsonl         {"text"}                         the recipes' base model's corpus: other
                                                            articles, each with a "TL;DR:" of its
                                                            highlights, support questions answered,
                                                            other packages' documentation
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import random
import re
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/, home of the generators reused here
import docstring_corpus  # noqa: E402
import make_support_data as support  # noqa: E402

SEED = 20240601

# ---- articles.csv: news-style articles whose highlights copy names, numbers and places from them ----

CITIES = ["Riverton", "Port Alder", "Millbrook", "Eastvale", "Cedar Falls", "Lakeshore", "Northgate", "Silver Bay",
          "Oakridge", "Fairhaven", "Westbury", "Granite City", "Marlow", "Stonebridge", "Kingsford", "Ashdown",
          "Bellmont", "Harbor Point", "Elmwood", "Red Mesa", "Clearwater", "Dunmore", "Pinecrest", "Avalon Springs"]
FIRST = ["Maria", "James", "Aisha", "Chen", "Olga", "Diego", "Priya", "Tomas", "Fatima", "Lukas", "Yuki", "Samuel",
         "Grace", "Omar", "Ingrid", "Rafael", "Hannah", "Kwame", "Elena", "Victor", "Nadia", "Arjun", "Claire", "Mateo"]
LAST = ["Alvarez", "Brennan", "Okafor", "Lindqvist", "Nakamura", "Petrov", "Haddad", "Moreau", "Kowalski", "Osei",
        "Ferreira", "Whitfield", "Castellano", "Drummond", "Ivanova", "Mensah", "Albright", "Sorensen", "Tanaka",
        "Quinn"]
COMPANIES = ["Veltrix", "Orbis Labs", "Kestrel Motors", "Lumina Foods", "Halcyon Bank", "Brightwave", "Northwind Air",
             "Quanta Health", "Ironleaf", "Solace Energy", "Pellucid", "Marigold Retail", "Corvid Systems", "Tidewater"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
MEASURES = ["a network of protected bike lanes", "a ban on overnight parking downtown", "a renovation of the central "
            "library", "a new youth sports complex", "free bus fares for students", "a curfew for downtown bars"]
CATEGORIES = ["smartphone", "laptop", "smartwatch", "tablet", "scooter", "robot vacuum", "home speaker", "drone"]
FEATURES = ["a battery that lasts two full days", "a screen twice as bright as before", "a camera that works in near "
            "darkness", "a body made from recycled aluminium", "charging to 80 percent in 15 minutes"]
MASCOTS = ["Hawks", "Comets", "Rangers", "Foxes", "Pilots", "Wolves", "Mariners", "Titans", "Owls", "Bison"]
WEATHER = [("storm", "winds of up to {n} mph", 60, 110), ("flash flood", "{n} inches of rain in six hours", 3, 11),
           ("heat wave", "temperatures as high as {n} degrees", 101, 118), ("snowstorm", "{n} inches of snow", 8, 40)]
SUBJECTS = ["a common garden weed", "a deep-sea bacterium", "a protein found in honeybees", "a compound in green tea",
            "a new battery material", "a species of desert beetle"]
EFFECTS = ["can break down some kinds of plastic", "slows the growth of certain tumour cells in the lab",
           "stores energy more efficiently than expected", "helps crops survive long droughts",
           "can pull water from dry air"]
JOURNALS = ["the Journal of Applied Biology", "Frontiers in Field Research", "the Annals of Materials Science",
            "Environmental Letters"]


def article_facts(rng: random.Random) -> dict[str, str]:
    """Every slot any topic's templates use, drawn fresh per article so the mapping must be learned."""
    city, other_city = rng.sample(CITIES, 2)
    person, person2, other_person = (f"{f} {l}" for f, l in zip(rng.sample(FIRST, 3), rng.sample(LAST, 3)))
    company, other_company = rng.sample(COMPANIES, 2)
    month, other_month, release_month = rng.sample(MONTHS, 3)
    pct = rng.randint(20, 70)
    if rng.random() < 0.5:  # soccer-like or basketball-like scores
        w_score = rng.randint(1, 5)
        points, unit = rng.randint(1, min(3, w_score)), "goals"
        l_score = rng.randint(0, w_score - 1)
    else:
        w_score = rng.randint(85, 125)
        points, unit = rng.randint(18, 45), "points"
        l_score = rng.randint(w_score - 25, w_score - 1)
    winner, loser = (f"{c} {m}" for c, m in zip(rng.sample(CITIES, 2), rng.sample(MASCOTS, 2)))
    event, measurement, low, high = rng.choice(WEATHER)
    last_n = rng.randint(5, 10)
    subject = rng.choice(SUBJECTS)
    direction = rng.choice(["rose", "fell"])
    return dict(
        city=city, CITY=city.upper(), other_city=other_city, person=person, person2=person2,
        other_person=other_person, company=company, other_company=other_company,
        date=f"{month} {rng.randint(1, 28)}", other_date=f"{other_month} {rng.randint(1, 28)}",
        prev_year=str(rng.randint(2012, 2022)), pct=str(pct), pct2=str(rng.randint(5, 95 - pct)),
        other_pct=str(rng.randint(5, 95)), other_big=f"{rng.randint(120, 4800):,}", other_years=str(rng.randint(3, 30)),
        other_a=str(rng.randint(5, 9)), other_b=str(rng.randint(0, 4)), growth=str(rng.randint(3, 40)),
        measure=rng.choice(MEASURES), yes=str(rng.randint(5, 9)), no=str(rng.randint(0, 4)),
        cost=f"{rng.randint(8, 240) / 10:.1f}", category=rng.choice(CATEGORIES), feature=rng.choice(FEATURES),
        product=f"{company} {rng.choice(['Aura', 'Nimbus', 'Vector', 'Echo', 'Pulse', 'Orbit'])} {rng.randint(2, 9)}",
        price=str(rng.randrange(99, 1999, 10)), month=release_month,
        winner=winner, loser=loser, w_score=str(w_score), l_score=str(l_score), player=f"{rng.choice(FIRST)} "
        f"{rng.choice(LAST)}", points=str(points), unit=unit if points > 1 else unit[:-1],
        venue=f"{winner.rsplit(' ', 1)[0]} {rng.choice(['Arena', 'Memorial Stadium', 'Field House'])}",
        crowd=f"{rng.randint(8000, 60000):,}", wins=str(rng.randint(3, 20)), last_n=str(last_n),
        losses=str(rng.randint(2, last_n)), event=event, event_cap=event.capitalize(),
        measurement=measurement.format(n=rng.randint(low, high)), homes=f"{rng.randint(1200, 95000):,}",
        evacuated=f"{rng.randint(300, 20000):,}", quarter=rng.choice(["first", "second", "third", "fourth"]),
        revenue=f"{rng.randint(12, 480) / 10:.1f}", direction=direction, updown="up" if direction == "rose" else
        "down", change=str(rng.randint(2, 35)), profit=f"{rng.randint(40, 2500):,}", shares=str(rng.randint(1, 12)),
        staff=f"{rng.randint(900, 60000):,}", subject=subject, subject_cap=subject[0].upper() + subject[1:],
        effect=rng.choice(EFFECTS), journal=rng.choice(JOURNALS), samples=f"{rng.randint(40, 3000):,}",
        years=str(rng.randint(2, 9)),
    )


# Per topic: "lead" states the key facts; "soft" is a feature-style opener that delays them; "core" sentences
# (always included) restate facts the highlights draw on; each "highlights" group offers paraphrases of one fact.
TOPICS = {
    "council": dict(
        lead=["The {city} city council voted {yes}-{no} on {date} to approve {measure}, a plan expected to cost "
              "${cost} million.", "City leaders in {city} approved {measure} on {date}, passing the ${cost} million "
              "plan by a vote of {yes} to {no}."],
        soft=["For months, residents of {city} have filled the council chamber to argue about {measure}.",
              "The debate over {measure} has divided {city} like few issues in recent memory."],
        core=["Council member {person2}, who voted against the measure, said the city should have waited for a "
              "second cost estimate.", '"This is what people asked us for, and we delivered," Mayor {person} said.'],
        background=["The idea was first floated in {prev_year}, but it stalled after a public hearing drew hundreds "
                    "of complaints.", "Construction is expected to begin next spring, according to a planning "
                    "document.", "A city survey found that {pct} percent of residents supported the plan, while "
                    "{pct2} percent opposed it."],
        highlights=[["{city} council approves {measure} in a {yes}-{no} vote.",
                     "The {city} city council votes {yes} to {no} to approve {measure}."],
                    ["The plan is expected to cost ${cost} million.", "Mayor {person}: \"We delivered.\""],
                    ["Council member {person2} voted against the measure."]]),
    "launch": dict(
        lead=["{company} unveiled the {product} on {date}, a {category} that will sell for ${price} when it "
              "reaches stores in {month}.", "The {product}, a new {category} from {company}, goes on sale in {month} "
              "for ${price}, the company announced on {date}."],
        soft=["Few launches this year have been as closely watched as the one {company} staged in {city}.",
              "Rumours about the next {category} from {company} had circulated for months."],
        core=["Chief executive {person} presented the device at an event in {city}, saying it offers {feature}.",
              '"We built the {product} for people who are tired of compromises," {person} told the audience.'],
        background=["The company sold about {other_big},000 units of the previous model in its first year, "
                    "according to industry estimates.", "Preorders open next week on the company's website and at "
                    "selected retailers.", "Reviewers who tried early units praised the design, though several "
                    "questioned the price."],
        highlights=[["{company} launches the {product}, priced at ${price}.",
                     "The {product} from {company} will cost ${price}."],
                    ["It goes on sale in {month}.", "The {category} reaches stores in {month}."],
                    ["CEO {person} says it offers {feature}.", "{person} presented it at an event in {city}."]]),
    "sports": dict(
        lead=["The {winner} beat the {loser} {w_score}-{l_score} on {date}, with {player} scoring {points} {unit}.",
              "{player} scored {points} {unit} as the {winner} defeated the {loser} {w_score}-{l_score} at {venue} "
              "on {date}."],
        soft=["It was the kind of night that fans at {venue} will talk about for years.",
              "Coming into the game, few people expected much from the {winner}."],
        core=["The win at {venue} gives the {winner} {wins} wins this season, while the {loser} have lost {losses} of "
              "their last {last_n} games.",
              '"We stuck to the plan, and the guys never stopped believing," said {winner} coach {person}.'],
        background=["A crowd of {crowd} packed {venue}, the largest of the season.", "The two teams meet again next "
                    "month in the final round of the regular season.", "Injuries have hit both squads hard this "
                    "year, with several starters missing the game."],
        highlights=[["The {winner} beat the {loser} {w_score}-{l_score}.",
                     "{winner} defeat {loser} {w_score}-{l_score} at {venue}."],
                    ["{player} scores {points} {unit}.", "{player} leads the way with {points} {unit}."],
                    ["Coach {person}: \"The guys never stopped believing.\""]]),
    "weather": dict(
        lead=["A {event} hit {city} on {date}, bringing {measurement} and leaving {homes} homes without power.",
              "More than {homes} homes in {city} lost power on {date} after a {event} brought {measurement}."],
        soft=["Residents of {city} had been warned for days, but few were ready for what arrived.",
              "The sky over {city} turned dark just after noon."],
        core=["Officials ordered {evacuated} people to leave low-lying neighbourhoods, and shelters opened at three "
              "schools.", '"We have not seen anything like this in a generation," said {person}, the county\'s '
              "emergency manager."],
        background=["Forecasters said conditions should improve by the weekend, though another front is expected "
                    "next week.", "Utility crews from neighbouring states were sent to help restore power.",
                    "Insurance companies have not yet estimated the cost of the damage."],
        highlights=[["{event_cap} leaves {homes} homes in {city} without power.",
                     "{homes} homes lose power as a {event} hits {city}."],
                    ["{evacuated} people ordered to evacuate.", "Officials order {evacuated} people out of low-lying "
                     "areas."],
                    ["The {event} brought {measurement}."]]),
    "earnings": dict(
        lead=["{company} said on {date} that revenue {direction} {change} percent to ${revenue} billion in the "
              "{quarter} quarter.", "Revenue at {company} {direction} {change} percent in the {quarter} quarter, to "
              "${revenue} billion, the company reported on {date}."],
        soft=["Investors had been waiting nervously for the latest results from {company}.",
              "It has been a turbulent year for {company}, and this week's numbers did little to settle the mood."],
        core=["Profit for the quarter came to ${profit} million, and shares moved {shares} percent in early trading.",
              '"We are executing well in a difficult market," chief executive {person} told analysts.'],
        background=["The company employs about {staff} people and has offices in {city} and {other_city}.",
                    "Analysts had expected slightly different figures, according to a survey of forecasts.",
                    "The company also confirmed plans to open a new distribution centre next year."],
        highlights=[["{company} revenue {direction} {change} percent to ${revenue} billion.",
                     "{company} reports ${revenue} billion in {quarter}-quarter revenue, {updown} {change} percent."],
                    ["Quarterly profit was ${profit} million.", "The company earned ${profit} million."],
                    ["CEO {person} says the company is executing well."]]),
    "science": dict(
        lead=["Researchers at the University of {city} have found that {subject} {effect}, according to a study "
              "published on {date} in {journal}.", "{subject_cap} {effect}, a team led by Dr. {person} at the "
              "University of {city} reported on {date}."],
        soft=["Scientists have long suspected that {subject} held surprises.",
              "The experiment began almost by accident, in a small laboratory in {city}."],
        core=["The team studied {samples} samples over {years} years and saw an improvement of {pct} percent over a "
              "control group.", '"We were honestly surprised by how strong the effect was," said Dr. {person}, '
              "who led the work, published in {journal}."],
        background=["Other scientists cautioned that the results still need to be repeated by independent groups.",
                    "The work was funded in part by a national research grant.",
                    "The researchers plan a larger study next year."],
        highlights=[["Study: {subject} {effect}.", "University of {city} researchers find that {subject} {effect}."],
                    ["The team studied {samples} samples over {years} years.",
                     "Results show a {pct} percent improvement over a control group."],
                    ["The study was published in {journal}.", "Dr. {person} led the research."]]),
}
GENERIC = [  # shared by every topic, so a summariser learns to drop them
    "The news spread quickly on local radio and social media, where reactions were mixed.",
    "Officials did not say when more details would be released.", "Several people asked not to be named.",
    "A spokesperson declined to comment further, citing ongoing discussions.",
    "Some residents said they had learned about it only through neighbours.",
    "Analysts cautioned that it was too early to judge the long-term effects.",
    "The story has drawn attention well beyond {city}, with commentators weighing in from across the region.",
    "Critics, however, have raised questions about the timing of the announcement.",
    "Local business owners said they would be watching closely over the coming weeks.",
    "{city} has grown by about {growth} percent over the past decade, according to census figures.",
    "A follow-up meeting is planned for later this month.", "It was not clear how neighbouring towns would react.",
]
# Other names, places and numbers, so that copying "the first number" or "any city" is not enough.
DISTRACTORS = [
    "In nearby {other_city}, a similar proposal was rejected {other_a}-{other_b} last year.",
    "Separately, {other_person} of {other_city} announced on {other_date} plans to step down after {other_years} "
    "years.",
    "Last month, officials in {other_city} reported {other_big} complaints about road closures.",
    "A spokesperson for {other_company} said on {other_date} that the company had no plans to change its schedule.",
    "The figure compares with {other_pct} percent recorded in {other_city} in {prev_year}.",
]
MIN_WORDS, MAX_WORDS = 120, 350


def words(sentences: list[str]) -> int:
    return sum(len(s.split()) for s in sentences)


def article_row(rng: random.Random, topic: dict) -> tuple[str, str]:
    facts = article_facts(rng)
    lead = rng.choice(topic["lead"]).format(**facts)
    body = [s.format(**facts) for s in topic["core"]]
    filler = [s.format(**facts) for s in topic["background"] + GENERIC + DISTRACTORS]
    rng.shuffle(filler)
    # Skewed short (mean about 210 words) so most articles fit a 512-token context with their highlights.
    target = round(rng.triangular(MIN_WORDS, MAX_WORDS, 160))
    while filler and words([lead] + body) < target and words([lead] + body + filler[-1:]) <= MAX_WORDS:
        body.insert(rng.randint(0, len(body)), filler.pop())
    # Three in ten open like a feature and state the key facts two to four sentences in, as real leads sometimes do.
    if rng.random() < 0.3:
        sentences = [rng.choice(topic["soft"]).format(**facts)] + body[:rng.randint(0, 2)]
        sentences += [lead] + body[len(sentences) - 1:]
    else:
        sentences = [lead] + body
    sentences[0] = f"{facts['CITY']} (The Ledger) -- {sentences[0]}"
    groups = [topic["highlights"][0]] + [g for g in topic["highlights"][1:] if rng.random() < 0.5]
    highlights = "\n".join(rng.choice(g).format(**facts) for g in groups)  # CNN/DM separates highlights by newlines
    return " ".join(sentences), highlights


def article_rows(count: int, rng: random.Random) -> list[tuple[str, str]]:
    topics = list(TOPICS.values())
    return [article_row(rng, topics[i % len(topics)]) for i in range(count)]


# ---- support rows: preference.jsonl, preference_chat.jsonl, instructions.jsonl, intents.csv ----

INTENT_LABELS = {support.order_question: "order_status", support.return_question: "return",
                 support.troubleshoot_question: "troubleshoot", support.warranty_question: "warranty",
                 support.shipping_question: "shipping", support.cancel_question: "cancel"}
# troubleshoot_question answers with a *return* for a product with none of these issues (a torn backpack),
# so a question is only labelled troubleshoot when its product has one of them.
FIXABLE = {support.POWER, support.NOISE, support.CHARGE, support.LINK}
PRODUCTS_FOR = {intent: [p for p, (_, _, issues) in support.PRODUCTS.items()
                         if intent is not support.troubleshoot_question or FIXABLE.intersection(issues)]
                for intent in support.INTENTS}
CURT = ["Please check our website.", "Please check our website for more information.", "See the FAQ on our website.",
        "Please check our website. We can't help with that here.", "Check your email.", "Try again later."]
RUDE = ["That's not our problem. Read the manual.", "Did you even try? Stop wasting our time.",
        "We get a hundred of these a day. Figure it out yourself.", "Ugh. Fine. Look it up on the website or whatever.",
        "Your {product} is fine, you're just using it wrong.", "Not my department. Stop emailing us."]
REJECTED_KINDS = ["wrong_facts"] * 4 + ["curt"] * 3 + ["rude"] * 3  # cycled, so the proportions are exact per ten
SYSTEM_PROMPT = "You are a helpful support agent."


def tickets(count: int, rng: random.Random, seen: set[str]) -> list[dict]:
    """`count` customer questions not in `seen` (which grows), intents in turn so each label gets the same share."""
    out = []
    while len(out) < count:
        intent = support.INTENTS[len(out) % len(support.INTENTS)]
        product, order = rng.choice(PRODUCTS_FOR[intent]), rng.randrange(100000, 999999)
        name = rng.choice(support.NAMES) if rng.random() < 0.5 else None
        question, answer = intent(rng, product, order, name)
        if intent is support.troubleshoot_question and "\n1. " not in answer:  # numbered steps: no return fallback
            raise AssertionError(f"troubleshoot_question answered {product!r} with a return")
        if question not in seen:
            seen.add(question)
            out.append(dict(question=question, answer=answer, intent=intent, product=product, name=name))
    return out


def wrong_facts_answer(ticket: dict, rng: random.Random) -> str:
    """The polite, fluent answer this question would get for another product and order: right shape, wrong facts."""
    while True:
        product = rng.choice([p for p in PRODUCTS_FOR[ticket["intent"]] if p != ticket["product"]])
        _, answer = ticket["intent"](rng, product, rng.randrange(100000, 999999), ticket["name"])
        # Warranty and shipping answers can differ in the product name alone; require one more wrong fact.
        if answer.replace(product, ticket["product"]) != ticket["answer"]:
            return answer


def preference_pairs(rows: list[dict], rng: random.Random) -> tuple[list[tuple[str, str, str]], dict[str, int]]:
    pairs, kinds = [], dict.fromkeys(REJECTED_KINDS, 0)
    for i, ticket in enumerate(rows):
        kind = REJECTED_KINDS[i % len(REJECTED_KINDS)]
        kinds[kind] += 1
        rejected = (wrong_facts_answer(ticket, rng) if kind == "wrong_facts" else rng.choice(CURT) if kind == "curt"
                    else rng.choice(RUDE).format(product=ticket["product"]))
        pairs.append((ticket["question"], ticket["answer"], rejected))
    return pairs, kinds


def chat_row(prompt: str, chosen: str, rejected: str, with_system: bool) -> dict:
    system = [{"role": "system", "content": SYSTEM_PROMPT}] if with_system else []
    return {"prompt": system + [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


# ---- stdlib docstrings: wiki.jsonl and the other half of instructions.jsonl ----

def documented_defs(package: str) -> list[tuple[str, str, str, str]]:
    """(module, qualified name, kind, docstring) for documented modules, classes and functions, in source order.

    docstring_corpus.docstrings() picks the same files but drops the names, which headings and instructions need.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root = stdlib / package
    files = sorted(root.rglob("*.py")) if root.is_dir() else [stdlib / f"{package}.py"]
    out = []

    def visit(node: ast.AST, module: str, prefix: str, kind: str) -> None:
        doc = ast.get_docstring(node)
        if doc and len(doc) >= docstring_corpus.MIN_CHARS:
            out.append((module, prefix.rstrip("."), kind, doc))
        for child in node.body:
            if isinstance(child, ast.ClassDef):
                visit(child, module, f"{prefix}{child.name}.", "class")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, module, f"{prefix}{child.name}.", "method" if kind == "class" else "function")

    for path in files:
        relative = path.relative_to(stdlib)
        if "test" in relative.parts[1:]:  # the same rule as docstring_corpus: test suites are another kind of text
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        visit(ast.parse(path.read_text(encoding="utf-8")), module, "", "module")
    return out


def prose_paragraphs(doc: str) -> list[str]:
    """Blank-line separated blocks that read as English sentences: no code, doctests, lists or field tables."""
    out = []
    for block in doc.split("\n\n"):
        lines = block.strip("\n").splitlines()
        if not lines or any(line[:1].isspace() or line.lstrip().startswith((">>>", "-", "*", ":", "=")) or
                            line.rstrip().endswith(":") for line in lines):
            continue
        text = " ".join(" ".join(lines).split())
        if text.endswith(".") and text[0].isupper() and len(text.split()) >= 8:
            out.append(text)
    return out


def first_sentence(doc: str) -> str | None:
    paragraph = " ".join(doc.split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(?=\s+[A-Z(`]|$)", paragraph)
    sentence = match.group(1) if match else ""
    usable = sentence[:1].isupper() and 20 <= len(sentence) <= 250 and ">>>" not in sentence
    return sentence if usable else None


def heading(title: str, level: int) -> str:
    marks = " ".join("=" * level)
    return f" {marks} {title} {marks} "


def wiki_rows(paragraphs_per_section: int) -> list[str]:
    """wikitext layout: "" around each heading, paragraphs back to back, a leading and trailing space on each row.

    HF wikitext rows also end in "\\n" and space out punctuation (" @-@ "); neither is copied here.
    """
    rows, seen = [], set()
    for package in docstring_corpus.PACKAGES:
        sections: dict[tuple[str, str], list[str]] = {}  # (module, top-level class or "") -> paragraphs
        for module, name, kind, doc in documented_defs(package):
            owner = name.split(".")[0] if kind in ("class", "method") else ""
            for paragraph in prose_paragraphs(doc):
                if paragraph not in seen:
                    seen.add(paragraph)
                    sections.setdefault((module, owner), []).append(paragraph)
        package_rows, last_module = ["", heading(package.capitalize(), 1), ""], package
        for (module, owner), paragraphs in sections.items():  # a module's sections are contiguous, in source order
            if module not in (last_module, package):  # a submodule's first section opens with its own heading
                package_rows += [heading(module.rsplit(".", 1)[-1].replace("_", " ").strip().capitalize(), 2), ""]
            last_module = module
            if owner:
                package_rows += [heading(owner, 2 if module == package else 3), ""]
            package_rows += [f" {p} " for p in paragraphs[:paragraphs_per_section]] + [""]
        rows += package_rows
    return rows


SUPPORT_INSTRUCTIONS = ["Answer the customer's question.", "Reply to this customer as a helpful support agent.",
                        "Write a reply to the customer message below.", "Respond to the customer's support request."]
DOC_INSTRUCTIONS = ["Explain in one sentence what the Python standard library {kind} `{name}` in `{module}` does.",
                    "In one sentence, what does the {kind} `{name}` from Python's `{module}` module do?",
                    "Describe briefly what the {kind} `{name}` in Python's `{module}` module is for."]


def docstring_instructions(count: int, rng: random.Random) -> list[dict]:
    candidates = []
    for package in docstring_corpus.PACKAGES:
        for module, name, kind, doc in documented_defs(package):
            sentence = first_sentence(doc)
            public = not any(part.startswith("_") for part in (module + "." + name).split("."))
            if kind in ("function", "method") and public and sentence:
                candidates.append((module, name, kind, sentence))
    return [{"instruction": rng.choice(DOC_INSTRUCTIONS).format(kind=kind, name=name, module=module),
             "input": "", "output": sentence} for module, name, kind, sentence in rng.sample(candidates, count)]


def support_instructions(rows: list[dict], rng: random.Random) -> list[dict]:
    return [{"instruction": rng.choice(SUPPORT_INSTRUCTIONS), "input": t["question"], "output": t["answer"]}
            for t in rows]


# ---- writing ----

PRETRAIN_PACKAGES = ("json", "collections", "os", "shutil", "subprocess", "socket", "threading", "random",
                     "statistics", "string", "textwrap", "datetime", "calendar", "functools", "pprint", "csv",
                     "sqlite3", "configparser", "gzip", "hashlib", "queue", "sched", "selectors", "tempfile")
"""Documentation the base reads: never the packages of wiki.jsonl (docstring_corpus.PACKAGES)."""


def other_documentation(limit: int = 1500) -> list[str]:
    """Prose paragraphs of other standard-library docstrings, so the base knows technical English
    before lm_full.yaml and adapter_docs.yaml adapt it to the packages of wiki.jsonl."""
    assert not set(PRETRAIN_PACKAGES) & set(docstring_corpus.PACKAGES)
    out, seen = [], set()
    for package in PRETRAIN_PACKAGES:
        for _, _, _, doc in documented_defs(package):
            for paragraph in prose_paragraphs(doc):
                if paragraph not in seen:
                    seen.add(paragraph)
                    out.append(paragraph)
    return out[:limit]


def pretrain_texts(articles: list[tuple[str, str]], questions: list[dict], documentation: list[str],
                   rng: random.Random) -> list[str]:
    """The base model's corpus, as GPT-2's web text was for the tutorials: articles (never the ones
    in articles.csv) ending in "TL;DR:" and their highlights, as Reddit's posts taught GPT-2 to
    summarise, support questions with their answers, and documentation prose. Shuffled."""
    texts = [f"{article}\nTL;DR: {' '.join(highlights.splitlines())}" for article, highlights in articles]
    texts += [f"Question: {t['question']}\nAnswer: {t['answer']}" for t in questions]
    texts += documentation
    rng.shuffle(texts)
    return texts


def write_atomically(path: Path, write) -> None:
    """Write beside the target under a name unique to this process, then rename: no reader sees half a file."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with staging.open("w", newline="", encoding="utf-8") as f:
        write(f)
    os.replace(staging, path)


def write_csv(path: Path, header: list[str], rows: list) -> None:
    def write(f):
        writer = csv.writer(f, lineterminator="\n")  # QUOTE_MINIMAL: commas, quotes and newlines get quoted
        writer.writerow(header)
        writer.writerows(rows)
    write_atomically(path, write)


def write_jsonl(path: Path, rows: list) -> None:
    write_atomically(path, lambda f: f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/data/recipes"), help="folder to write into")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # One generator per file, so changing one file's recipe does not reshuffle the others.
    rng = {name: random.Random(f"{SEED}:{name}") for name in ("articles", "support", "preference", "instructions", "pretrain")}

    seen_questions: set[str] = set()  # no customer question appears in two files, or twice in one
    preference, kinds = preference_pairs(tickets(1000, rng["support"], seen_questions), rng["preference"])
    chat, chat_kinds = preference_pairs(tickets(300, rng["support"], seen_questions), rng["preference"])
    support_half = support_instructions(tickets(750, rng["support"], seen_questions), rng["instructions"])
    instructions = support_half + docstring_instructions(750, rng["instructions"])
    rng["instructions"].shuffle(instructions)
    intents = [(t["question"], INTENT_LABELS[t["intent"]]) for t in tickets(1500, rng["support"], seen_questions)]
    pretrain = pretrain_texts(article_rows(500, rng["pretrain"]), tickets(1000, rng["pretrain"], seen_questions),
                              other_documentation(), rng["pretrain"])

    write_csv(args.out / "articles.csv", ["article", "highlights"], article_rows(1200, rng["articles"]))
    write_jsonl(args.out / "wiki.jsonl", [{"text": text} for text in wiki_rows(paragraphs_per_section=8)])
    write_jsonl(args.out / "preference.jsonl", [dict(prompt=p, chosen=c, rejected=r) for p, c, r in preference])
    write_jsonl(args.out / "preference_chat.jsonl", [chat_row(*pair, with_system=i % 3 == 0)
                                                     for i, pair in enumerate(chat)])
    write_jsonl(args.out / "instructions.jsonl", instructions)
    write_csv(args.out / "intents.csv", ["text", "label"], intents)
    write_jsonl(args.out / "pretrain.jsonl", [{"text": text} for text in pretrain])
    print(f"rejected answers: preference {kinds}, preference_chat {chat_kinds}")
    for path in sorted(args.out.iterdir()):
        print(f"{path.stat().st_size:>9,} bytes  {path}")


if __name__ == "__main__":
    main()
