"""`make demo-tools`: an adapter that learns to call tools, measured against the base.

Four made-up functions of a made-up company (an order lookup, a meeting-room booking, a
currency conversion, a colleague directory). `write_data` writes demo/tools/train.jsonl
(chats whose answers call the right function with the right arguments, answer plainly
when no function fits, and answer from a function's result) in the daemon's own tool
format (server/tools.py `template_messages`: the same function, never a copy), and
demo/tools/held_out.jsonl (other phrasings, other values, other plain questions).

`main` trains the adapter `tool-user` (`lorag train`), starts the daemon, and asks every
held-out question through the official `openai` client with all four tools offered, the
base and the adapter, with `tool_choice` auto (every question) and required (those that
need a call: the grammar forces one); it scores each call (right function, arguments
valid against the function's schema, arguments equal to the expected ones) and each
plain question (no call), and writes demo-results/tools.{md,json}. Trained and served on
the float32 base (`--quantize none`): on a CPU without AVX512-BF16, NF4 training steps
take ~35 s here.
Run `python -m demo.tools` from the repository root (the Makefile does); `python -m
demo.tools --write-data` rebuilds the data.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
from openai import OpenAI

from lorag.benchmarks.daemon import DaemonProcess
from lorag.server.tools import ToolUse, template_messages

HERE = Path(__file__).resolve().parent / "tools"
ROOT = HERE.parent.parent
OUT = ROOT / "demo-results"
BASE = "smollm2-135m-instruct"
ROOMS, CURRENCIES = ["Fjord", "Tundra", "Aurora", "Glacier"], ["EUR", "USD", "NOK", "GBP"]
NAMES = ["Ines Vargas", "Obi Mensah", "Hanne Solberg", "Radek Novak", "Maya Whitehorse",
         "Beatriz Couto", "Amaru Quispe", "Tobiah Lund"]
FUNCTIONS = {
    "get_order_status": {
        "name": "get_order_status", "description": "The delivery status of a customer order.",
        "parameters": {"type": "object", "additionalProperties": False,
                       "required": ["order_id"],
                       "properties": {"order_id": {"type": "string",
                                                   "pattern": "^KO-[0-9]{5}$"}}}},
    "book_room": {
        "name": "book_room", "description": "Book a meeting room for some hours on a date.",
        "parameters": {"type": "object", "additionalProperties": False,
                       "required": ["room", "date", "hours"],
                       "properties": {"room": {"enum": ROOMS},
                                      "date": {"type": "string",
                                               "pattern": "^2027-[0-9]{2}-[0-9]{2}$"},
                                      "hours": {"type": "integer", "minimum": 1,
                                                "maximum": 8}}}},
    "convert_currency": {
        "name": "convert_currency", "description": "Convert an amount between currencies.",
        "parameters": {"type": "object", "additionalProperties": False,
                       "required": ["amount", "source", "target"],
                       "properties": {"amount": {"type": "number"},
                                      "source": {"enum": CURRENCIES},
                                      "target": {"enum": CURRENCIES}}}},
    "find_colleague": {
        "name": "find_colleague", "description": "A colleague's office and phone extension.",
        "parameters": {"type": "object", "additionalProperties": False,
                       "required": ["name"],
                       "properties": {"name": {"type": "string"}}}},
}
TOOLS = [{"type": "function", "function": f} for f in FUNCTIONS.values()]
# per function: (training phrasings, held-out phrasings); {placeholders} are arguments
ASKS = {
    "get_order_status": (
        ["Where is my order {order_id}?", "What's the status of order {order_id}?",
         "Has order {order_id} shipped yet?", "Can you check order {order_id} for me?"],
        ["I ordered something, number {order_id}. Any news?",
         "Track {order_id} please."]),
    "book_room": (
        ["Book the {room} room on {date} for {hours} hours.",
         "Reserve {room} for {hours} hours on {date}.",
         "I need the {room} room on {date}, {hours} hours please."],
        ["Could you get me {room} for {hours} hours, date {date}?",
         "Please book room {room}: {date}, {hours} hours."]),
    "convert_currency": (
        ["Convert {amount} {source} to {target}.", "How much is {amount} {source} in {target}?",
         "What are {amount} {source} worth in {target}?"],
        ["I have {amount} {source}; what is that in {target}?",
         "{amount} {source} to {target}, please."]),
    "find_colleague": (
        ["Where does {name} sit?", "What is {name}'s extension?",
         "How can I reach {name}?"],
        ["I need to find {name}.", "Look up {name} in the directory."]),
}
PLAIN = (  # (question, answer): nothing to call
    [("What is the capital of France?", "Paris."), ("How many days are in a week?", "Seven."),
     ("Say hello in Spanish.", "Hola."), ("What colour is grass?", "Green."),
     ("What is 3 plus 4?", "7."), ("Who wrote Hamlet?", "William Shakespeare."),
     ("What is the opposite of hot?", "Cold."), ("Name a fruit.", "An apple.")],
    [("What is the capital of Italy?", ""), ("How many legs does a spider have?", ""),
     ("Say thank you in French.", ""), ("What colour is the sky?", ""),
     ("What is 10 minus 4?", ""), ("Name an animal.", "")])
# batches of 2, 4 accumulated: a batch of 8 chats this long took 18 GB in float32
RECIPE = ["--quantize", "none", "--dtype", "float32", "--epochs", "3", "--lr", "1e-3",
          "--batch-size", "2", "--grad-accum", "4",
          "--rank", "16", "--alpha", "32", "--target-modules", "all-linear",
          "--save-steps", "1000"]


def arguments(function: str, rng: random.Random) -> dict:
    """Random arguments for `function`, valid against its schema."""
    if function == "get_order_status":
        return {"order_id": f"KO-{rng.randint(10000, 99999)}"}
    if function == "book_room":
        return {"room": rng.choice(ROOMS), "date": f"2027-{rng.randint(1, 12):02d}-"
                f"{rng.randint(1, 28):02d}", "hours": rng.randint(1, 8)}
    if function == "convert_currency":
        source, target = rng.sample(CURRENCIES, 2)
        return {"amount": rng.choice([20, 75, 120, 450, 1000, 2500]), "source": source,
                "target": target}
    return {"name": rng.choice(NAMES)}


def rendered(messages: list[dict]) -> list[dict]:
    """`messages` in the daemon's tool format, every function offered."""
    return template_messages(messages, ToolUse(FUNCTIONS))


def write_data(seed: int = 0) -> None:
    rng = random.Random(seed)
    train, held_out = [], []
    for function, (asks, unseen) in ASKS.items():
        for i in range(12):
            args = arguments(function, rng)
            question = rng.choice(asks).format(**args)
            call = {"id": f"call_{function}_{i}", "type": "function",
                    "function": {"name": function, "arguments": json.dumps(args)}}
            chat = [{"role": "user", "content": question},
                    {"role": "assistant", "content": "", "tool_calls": [call]}]
            if i % 3 == 0:  # then the result, and an answer from it
                result = {"status": "ok", **args}
                chat += [{"role": "tool", "tool_call_id": call["id"],
                          "content": json.dumps(result)},
                         {"role": "assistant", "content": f"Done: {json.dumps(result)}"}]
            train.append({"messages": rendered(chat)})
        for ask in unseen:
            for _ in range(3):
                args = arguments(function, rng)
                held_out.append({"question": ask.format(**args), "function": function,
                                 "arguments": args})
    for question, answer in PLAIN[0] * 3:
        train.append({"messages": rendered([{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}])})
    held_out += [{"question": question, "function": None} for question, _ in PLAIN[1]]
    rng.shuffle(train)
    HERE.mkdir(exist_ok=True)
    for name, rows in (("train.jsonl", train), ("held_out.jsonl", held_out)):
        (HERE / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(train)} training chats and {len(held_out)} held-out questions")


def score(question: dict, calls: list) -> dict:
    """What one answer did: for a question that needs a function, whether it called the
    right one, with arguments valid against its schema and equal to the expected; for a
    plain one, whether it called nothing."""
    if question["function"] is None:
        return {"no_call": float(not calls)}
    first = calls[0] if calls else None
    parsed = []
    for call in calls:
        try:
            parsed.append((call.function.name, json.loads(call.function.arguments)))
        except ValueError:
            parsed.append((call.function.name, None))
    valid = bool(parsed) and all(
        args is not None and name in FUNCTIONS and
        jsonschema.Draft202012Validator(FUNCTIONS[name]["parameters"]).is_valid(args)
        for name, args in parsed)
    return {"called": float(bool(calls)),
            "right_function": float(first is not None
                                    and first.function.name == question["function"]),
            "valid_arguments": float(valid),
            "right_arguments": float(bool(parsed) and parsed[0] == (question["function"],
                                                                    question["arguments"]))}


def ask(client: OpenAI, model: str, choice: str, questions: list[dict]) -> dict:
    """Every question on `model` with `tool_choice` `choice`; each metric's mean."""
    totals: dict[str, list[float]] = {}
    for question in questions:
        reply = client.chat.completions.create(
            model=model, temperature=0, max_tokens=96, tools=TOOLS, tool_choice=choice,
            parallel_tool_calls=False,
            messages=[{"role": "user", "content": question["question"]}])
        calls = reply.choices[0].message.tool_calls or []
        for key, value in score(question, calls).items():
            totals.setdefault(key, []).append(value)
    return {key: round(sum(values) / len(values), 3) for key, values in totals.items()}


def train(folder: Path) -> dict:
    subprocess.run([sys.executable, "-m", "lorag", "train", "--data",
                    str(HERE / "train.jsonl"), "--out", str(folder), *RECIPE],
                   check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads((folder / "training.json").read_text())


def main() -> dict:
    OUT.mkdir(exist_ok=True)
    adapters = OUT / "tool-adapters"
    run = train(adapters / "tool-user")
    questions = [json.loads(line) for line in
                 (HERE / "held_out.jsonl").read_text().splitlines()]
    daemon = DaemonProcess(OUT / "tools-data", ["--quantize", "none", "--dtype", "float32",
                                                "--adapter-root", str(adapters)],
                           OUT / "tools-daemon.log")
    try:
        client = OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)
        httpx.post(f"{daemon.url}/v1/load_lora_adapter", timeout=120, json={
            "lora_name": "tool-user", "lora_path": str(adapters / "tool-user")}
        ).raise_for_status()
        needing = [q for q in questions if q["function"] is not None]
        table = {f"{name} {choice}": ask(client, model, choice,
                                         questions if choice == "auto" else needing)
                 for name, model in (("base", BASE), ("tool-user adapter", "tool-user"))
                 for choice in ("auto", "required")}
    finally:
        daemon.stop()
    report = {"training": {key: run.get(key) for key in ("global_step", "final_loss",
                                                          "wall_s")},
              "questions": {"need a call": sum(q["function"] is not None
                                               for q in questions),
                            "plain": sum(q["function"] is None for q in questions)},
              "table": table}
    (OUT / "tools.json").write_text(json.dumps(report, indent=2) + "\n")
    columns = ["called", "right_function", "valid_arguments", "right_arguments", "no_call"]
    lines = ["| configuration | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{row[c]:.0%}" if c in row else "n/a"
                                          for c in columns) + " |"
              for name, row in table.items()]
    (OUT / "tools.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    if "--write-data" in sys.argv:
        write_data()
    else:
        main()
