"""`bench rag` end to end on the tiny model: two real daemons, the same RAG workload,
the prefix cache serving prompt tokens only where it is on."""

import json

import pytest

from lorag.benchmarks.rag import RagWorkload, main, notes, questions


def test_questions_go_through_their_notes_adapter_and_favour_the_hot_notes():
    documents = notes(50)
    asks = questions(documents, 400, hot=5, hot_share=0.8, adapters=4)
    hot_codes = {d["metadata"]["code"] for d in documents[:5]}
    hot = sum(any(code in question for code in hot_codes) for question, _ in asks)
    assert 0.7 < hot / len(asks) < 0.9
    for question, adapter in asks:
        index = next(i for i, d in enumerate(documents) if d["metadata"]["code"] in question)
        assert adapter == f"ad{index % 4}"


@pytest.mark.slow
def test_bench_rag_saves_prefill_only_with_prefix_caching(tiny_base, tmp_path):
    out = tmp_path / "rag.json"
    workload = RagWorkload(adapters=2, documents=6, questions=10, hot=2, hot_share=0.8,
                           clients=2, max_tokens=4, top_k=2, model=str(tiny_base))
    result = main(workload, json_path=out)
    on, off = result["systems"]["prefix_caching"], result["systems"]["no_prefix_caching"]
    assert on["prompt_tokens"] == off["prompt_tokens"] > 0  # the same prompts
    assert 0 < on["prefill_tokens_saved"] < on["prompt_tokens"]
    assert off["prefill_tokens_saved"] == 0
    assert json.loads(out.read_text()) == result  # the final file is complete
    assert "partial" not in result
