"""The embedder shared by a daemon's request threads: Hugging Face's fast tokenizer keeps
its padding and truncation settings in one mutable object, so a call that counts tokens
(no padding) in one thread could strip the padding of a batch being encoded in another
(a batch of embedding lines failed so, once in a fast-lane run)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

TEXTS = [["a b"], ["one two three four five six"], ["short", "a much longer text than that"],
         ["x " * 50, "y", "z z z"]]


@pytest.mark.slow
def test_encode_count_and_chunk_at_once_from_many_threads(embedder):
    alone = {i: embedder.encode(texts) for i, texts in enumerate(TEXTS)}
    counts = {i: embedder.token_counts(texts) for i, texts in enumerate(TEXTS)}

    def work(i: int) -> None:
        texts = TEXTS[i % len(TEXTS)]
        if i % 3 == 0:
            assert embedder.token_counts(texts) == counts[i % len(TEXTS)]
        elif i % 3 == 1:
            assert [c.text for c in embedder.chunks(" ".join(texts), 8, 2)]
        else:
            np.testing.assert_allclose(embedder.encode(texts), alone[i % len(TEXTS)],
                                       atol=1e-5)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(1200)))  # without the lock: failed 1 run in 3 at 400
