"""The RAG prompt's layout (retrieval/rag.py): the best passage last, next to the question;
the others in a fixed order, so that questions retrieving the same passages share the
prompt's prefix whatever their ranks; the lowest-ranked dropped first to fit."""

from lorag.retrieval.rag import augment, with_context
from lorag.retrieval.store import Hit


def hit(document: str, chunk: int = 0, score: float = 0.5) -> Hit:
    return Hit(document, chunk, score, f"text of {document}#{chunk}", {})


def context(messages: list[dict]) -> str:
    return next(m["content"] for m in messages if m["role"] == "system")


def test_the_best_passage_is_last_and_the_others_in_document_order():
    ranked = [hit("kettle", score=0.9), hit("apple", 0, 0.8), hit("zebra", score=0.7),
              hit("apple", 1, 0.6)]
    text = context(with_context([{"role": "user", "content": "q"}], ranked))
    order = [text.index(f"text of {name}") for name in
             ("apple#0", "apple#1", "zebra#0", "kettle#0")]
    assert order == sorted(order)
    assert text.index("[4] source: kettle") < text.index("text of kettle")


def test_the_same_passages_in_another_rank_order_give_the_same_prompt():
    """Only the best one's place depends on rank: that is what lets the KV cache serve
    one question's passages to another phrasing of it."""
    best, others = hit("kettle", score=0.9), [hit("zebra"), hit("apple"), hit("lamp")]
    question = [{"role": "user", "content": "q"}]
    one = with_context(question, [best, *others])
    other = with_context(question, [best, *reversed(others)])
    assert one == other
    assert with_context(question, [others[0], best, *others[1:]]) != one


def test_a_callers_system_message_stays_first():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    out = with_context(messages, [hit("kettle")])
    assert out[0]["content"].startswith("Be brief.\n\n")
    assert out[1:] == messages[1:]


def test_augment_drops_the_lowest_ranked_passages_to_fit():
    ranked = [hit("kettle", score=0.9), hit("apple", score=0.8), hit("zebra", score=0.7)]

    def render(messages: list[dict]) -> list[int]:  # a token per character
        return list(range(sum(len(m["content"]) for m in messages)))

    full = len(render(with_context([{"role": "user", "content": "q"}], ranked)))
    result = augment([{"role": "user", "content": "q"}], ranked, render, len, full - 1)
    assert [h.document_id for h in result.used] == ["kettle", "apple"]
    assert result.dropped == 1
    assert len(result.prompt_ids) <= full - 1
