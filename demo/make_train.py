"""Writes demo/train.jsonl: chat examples that teach the answer format, never the facts.

The facts come from a made-up tea company that shares nothing with the demo's knowledge
base (demo/kb, Kestrel Robotics), so the adapter can only learn the form: a JSON object
`{"answer": ..., "source": ...}` (demo/answer.schema.json) that copies the answer from the
passage that holds it and names that passage's source. Three in four examples carry
retrieved passages in exactly the system message the daemon builds for `rag`
(retrieval/rag.py), the right one among distractors at a random rank; the rest are
questions without context, answered from general knowledge with source
"general knowledge".

It also writes the made-up company as a knowledge base of its own, demo/marlow/kb (one page
per document) with its questions in demo/marlow/questions.jsonl (question, answer, gold
source; and questions no page answers, asked about what the pages are about): what
`make demo` trains its RAFT adapter and its relevance adapter from, through the daemon's
own search (`lorag train --rag-namespace`), again with nothing about Kestrel. Those
questions also ask each fact in other words than its page's, some in the unanswerable
ones' form ("What is the name of its head buyer?" said, "What is the email address of its
head buyer?" never), so that neither the wording nor the page's words alone tell an
answerable question from an unanswerable one (RAFT_ONLY).
Deterministic (seeded); run `python demo/make_train.py` to rebuild.
"""

import json
import random
from pathlib import Path

from lorag.retrieval.rag import with_context
from lorag.retrieval.store import Hit

OUT = Path(__file__).with_name("train.jsonl")
MARLOW = Path(__file__).with_name("marlow")  # the same company as pages and questions
ORG = "Marlow & Finch"
FIRST = ["Ada", "Bruno", "Chiara", "Dev", "Elif", "Femi", "Greta", "Hiro", "Ilse", "Jomo",
         "Kaia", "Lars", "Mina", "Nuno", "Olga", "Priya", "Quinn", "Rosa", "Sven", "Tala"]
LAST = ["Abara", "Brandt", "Castillo", "Dahl", "Eze", "Fischer", "Gallo", "Haddad", "Ito",
        "Jansen", "Kovac", "Laine", "Moretti", "Nakamura", "Osei", "Petrov", "Rahman",
        "Silva", "Tanaka", "Varga"]
ROLES = ["head buyer", "chief taster", "logistics director", "head of marketing",
         "finance manager", "quality lead", "head of people", "warehouse manager"]
CITIES = ["Leeds", "Ghent", "Bremen", "Turin", "Lille", "Aarhus", "Utrecht", "Bilbao"]
TEAS = ["Harbour Breakfast", "Smoked Lapsang Reserve", "Moonlit Oolong", "Ginger Ember",
        "Highland Assam", "Jasmine Dawn", "Winter Chai", "Silver Needle Select"]
TOPICS = ["sample requests", "bulk orders", "damaged parcels", "wholesale accounts",
          "press enquiries", "supplier visits", "tasting events", "refund requests"]
EVENTS = ["Leaf Fair", "Steep Week", "Kettle Cup", "Blend Off"]
MONTHS = ["February", "April", "June", "September", "November"]
# RAFT's alone (demo/train.jsonl has none): named programmes, whose pages are not named
# after them, and leave whose page gives two numbers in different units
PROGRAMMES = [("recycling empty tins", "tin-recycling"),
              ("mentoring new tasters", "taster-mentoring"),
              ("planting tea bushes", "bush-planting"),
              ("lending bicycles to staff", "bicycle-loans"),
              ("giving surplus tea to food banks", "food-banks"),
              ("teaching brewing in schools", "school-visits")]
PROGRAMME_NAMES = ["Green Tin", "Second Steep", "Leaf Line", "Open Pot", "Tea Bridge",
                   "Bright Cup"]
LEAVE = ["training leave", "volunteering leave", "moving leave", "sabbatical leave"]
TROPHIES = ["Copper Kettle", "Silver Leaf", "Golden Cup", "Jade Spoon"]
GENERAL = [("What is the capital of France?", "Paris"),
           ("How many days are in a week?", "7"),
           ("What is the largest planet in the solar system?", "Jupiter"),
           ("What is the chemical symbol for water?", "H2O"),
           ("How many continents are there?", "7"),
           ("What is the boiling point of water at sea level in Celsius?", "100 degrees"),
           ("Who wrote Romeo and Juliet?", "William Shakespeare"),
           ("What is the capital of Japan?", "Tokyo"),
           ("How many minutes are in an hour?", "60"),
           ("What colour is the sky on a clear day?", "blue"),
           ("What is the freezing point of water in Celsius?", "0 degrees"),
           ("What is the capital of Italy?", "Rome")]


# per kind of page, questions its page never answers: asked about the very person, tea,
# service or event a page is about, so that RAFT teaches abstention with that page in the
# prompt (the hard case: on topic, and silent on what is asked)
NEVER_SAID = {
    "role": [("Which university did the {role} of {org} study at?", ("universit", "stud")),
             ("What is the email address of {org}'s {role}?", ("email", "@"))],
    "tea": [("In which country is {tea} grown?", ("country", "grown")),
            ("Which estate grows the leaves of {tea}?", ("estate",))],
    "topic": [("What is the email address for {topic} at {org}?", ("email", "@"))],
    "event": [("How many teams enter the {event}?", ("teams enter", "entrants")),
              ("Who judges the {event}?", ("judge",))],
    "programme": [("How many people take part in {org}'s programme for {purpose}?",
                   ("take part", "participants"))],
    "leave": [("Who approves {leave} at {org}?", ("approv",))],
}


# per kind of page, answerable questions for RAFT alone (demo/train.jsonl keeps to the
# ones beside each page), with the fact that answers each. The questions beside the pages
# echo their words ("Who is the head buyer?" of "The head buyer ... is"), and an adapter
# trained on those alone declined questions that ask in other words than their page: on
# demo/kb, "Who chairs the ethics board?" of a page saying "It is chaired by", "How long
# can the drone fly on one battery?" of "flies for 38 minutes per battery". These say it
# in other words, and some take the form of NEVER_SAID's ("What is the name of ...?"
# beside "What is the email address of ...?"), so that neither the wording nor the page's
# words alone tell an answerable question from an unanswerable one.
RAFT_ONLY = {
    "role": [("What is the name of {org}'s {role}?", "name"),
             ("Where is the {role} of {org} based?", "city"),
             ("Since which year has {name} been with {org}?", "year")],
    "tea": [("What is the price of a tin of {tea}?", "price"),
            ("What is the shelf life of a sealed tin of {tea}?", "years"),
            ("For how many minutes does {tea} brew?", "brew")],
    "topic": [("What is the extension for {topic} at {org}?", "extension"),
              ("Whom should I contact about {topic} at {org}?", "name"),
              ("How quickly are {topic} dealt with?", "days")],
    "event": [("What is the prize for winning the {event}?", "trophy"),
              ("Which city hosts the {event}?", "city"),
              ("What trophy is awarded at the {event}?", "trophy")],
    "programme": [("What is the name of the programme for {purpose}?", "name"),
                  ("Who runs the {name} programme?", "person")],
    "leave": [("How much {leave} do {org} employees get?", "days")],
}


def knowledge_base(rng: random.Random, raft: bool = False
                   ) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(document id, text, [(question, answer span)]) for the made-up company; `raft`
    adds RAFT_ONLY's questions to each page (the pages are the same either way)."""
    docs = []

    def page(doc_id: str, text: str, questions: list[tuple[str, str]], kind: str,
             facts: dict[str, str]) -> None:
        extra = [(question.format(org=ORG, **facts), facts[fact])
                 for question, fact in RAFT_ONLY[kind]] if raft else []
        docs.append((doc_id, text, questions + extra))

    for role in ROLES:
        name, city = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.choice(CITIES)
        year = rng.randint(2004, 2024)
        page(f"{role.replace(' ', '-')}.md",
             f"The {role} of {ORG} is {name}, who joined in {year} and works from the "
             f"{city} office.",
             [(f"Who is the {role} of {ORG}?", name),
              (f"Who is {ORG}'s {role}?", name),
              (f"In which year did {name} join {ORG}?", str(year)),
              (f"Which office does the {role} work from?", city)],
             "role", {"role": role, "name": name, "city": city, "year": str(year)})
    for tea in TEAS:
        grams, price, years = rng.choice([50, 100, 125, 250]), rng.randint(6, 40), \
            rng.randint(1, 4)
        brew = rng.randint(2, 6)
        page(f"{tea.lower().replace(' ', '-')}.md",
             f"{tea} is sold in tins of {grams} grams for {price} euros. Steep it for "
             f"{brew} minutes. Sealed tins keep for {years} years.",
             [(f"How much does a tin of {tea} cost?", f"{price} euros"),
              (f"How long should {tea} be steeped?", f"{brew} minutes"),
              (f"How many grams are in a tin of {tea}?", f"{grams} grams"),
              (f"How long does a sealed tin of {tea} keep?", f"{years} years")],
             "tea", {"tea": tea, "price": f"{price} euros", "years": f"{years} years",
                     "brew": f"{brew} minutes"})
    for topic in TOPICS:
        name, days = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.randint(2, 12)
        extension = rng.randint(1000, 9999)
        page(f"policy-{topic.replace(' ', '-')}.md",
             f"{topic.capitalize()} go to {name} on extension {extension} and are answered "
             f"within {days} working days.",
             [(f"Who handles {topic} at {ORG}?", name),
              (f"Within how many working days are {topic} answered?",
               f"{days} working days"),
              (f"Which extension do you call about {topic}?", str(extension))],
             "topic", {"topic": topic, "name": name, "extension": str(extension),
                       "days": f"{days} working days"})
    for event in EVENTS:
        month, trophy, city = rng.choice(MONTHS), rng.choice(TROPHIES), rng.choice(CITIES)
        page(f"{event.lower().replace(' ', '-')}.md",
             f"The {event} takes place every {month} in {city}. The winning team receives "
             f"the {trophy} trophy.",
             [(f"In which month is the {event} held?", month),
              (f"What does the winning team of the {event} receive?",
               f"the {trophy} trophy"),
              (f"Where does the {event} take place?", city)],
             "event", {"event": event, "city": city, "trophy": f"the {trophy} trophy"})
    if raft:
        raft_only_pages(rng, page)
    return docs


def raft_only_pages(rng: random.Random, page) -> None:
    """RAFT's own pages: a programme asked after by what it is for and named only in its
    text (not in its page's id), and leave given in days, to be taken within months."""
    for (purpose, doc_id), name in zip(PROGRAMMES, rng.sample(PROGRAMME_NAMES,
                                                              len(PROGRAMMES)), strict=True):
        person, year = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.randint(2004, 2024)
        page(f"{doc_id}.md",
             f"The {name} programme is {ORG}'s scheme for {purpose}. It began in {year} "
             f"and is run by {person}.",
             [(f"What is {ORG}'s programme for {purpose} called?", name),
              (f"When did the {name} programme begin?", str(year))],
             "programme", {"purpose": purpose, "name": name, "person": person})
    for leave in LEAVE:
        days, months = rng.randint(2, 30), rng.randint(2, 18)
        page(f"{leave.replace(' ', '-')}.md",
             f"{ORG} gives every employee {days} days of paid {leave} a year, to be taken "
             f"within {months} months of asking for it.",
             [(f"How many days of paid {leave} does {ORG} give?", f"{days} days"),
              (f"Within how many months must {leave} be taken?", f"{months} months")],
             "leave", {"leave": leave, "days": f"{days} days"})


def main(seed: int = 0, passages: int = 3) -> None:
    rng = random.Random(seed)
    docs = knowledge_base(rng)
    examples = []
    for index, (doc_id, text, questions) in enumerate(docs):
        for question, answer in questions:
            others = rng.sample([d for d in docs if d[0] != doc_id], passages - 1)
            chosen = [(doc_id, text), *((d[0], d[1]) for d in others)]
            rng.shuffle(chosen)
            hits = [Hit(d, index * 10 + i, 0.0, t, {}) for i, (d, t) in enumerate(chosen)]
            messages = with_context([{"role": "user", "content": question}], hits)
            reply = json.dumps({"answer": answer, "source": doc_id})
            examples.append({"messages": [*messages, {"role": "assistant", "content": reply}]})
    for question, answer in GENERAL * 3:
        reply = json.dumps({"answer": answer, "source": "general knowledge"})
        examples.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": reply}]})
    rng.shuffle(examples)
    with OUT.open("w") as f:
        for example in examples:
            f.write(json.dumps(example) + "\n")
    print(f"wrote {len(examples)} examples to {OUT}")
    write_marlow(knowledge_base(random.Random(seed), raft=True))  # the same pages


def unanswerable() -> list[str]:
    """NEVER_SAID's questions for every person, tea, service, event, programme and leave
    of the company."""
    kinds = [("role", {"role": role}) for role in ROLES] + \
        [("tea", {"tea": tea}) for tea in TEAS] + \
        [("topic", {"topic": topic}) for topic in TOPICS] + \
        [("event", {"event": event}) for event in EVENTS] + \
        [("programme", {"purpose": purpose}) for purpose, _ in PROGRAMMES] + \
        [("leave", {"leave": leave}) for leave in LEAVE]
    return [question.format(org=ORG, **names)
            for kind, names in kinds for question, _ in NEVER_SAID[kind]]


def write_marlow(docs: list[tuple[str, str, list[tuple[str, str]]]]) -> None:
    """The company's pages (a heading, then the text, as demo/kb's) and its questions:
    each answerable one with its gold page, then the unanswerable ones."""
    kb = MARLOW / "kb"
    kb.mkdir(parents=True, exist_ok=True)
    rows = []
    for doc_id, text, questions in docs:
        title = doc_id.removesuffix(".md").removeprefix("policy-").replace("-", " ")
        (kb / doc_id).write_text(f"# {title.capitalize()}\n{text}\n")
        rows += [{"question": q, "answer": a, "source": doc_id} for q, a in questions]
    rows += [{"question": q, "answerable": False} for q in unanswerable()]
    with (MARLOW / "questions.jsonl").open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"wrote {len(docs)} pages to {kb} and {len(rows)} questions beside them")


if __name__ == "__main__":
    main()
