"""POST /v1/embeddings: OpenAI's embeddings API on the daemon's embedder, through the
official `openai` client and raw HTTP, on each backend's daemon."""

import base64

import httpx
import numpy as np
import pytest

from tests.daemons import ALICE, client, embedding_model

TEXTS = ["The bakery opens at seven.", "Hekla is a volcano in Iceland."]


def post(daemon, body: dict, key: str | None = ALICE) -> httpx.Response:
    headers = {"Authorization": key} if key else {}
    return httpx.post(f"{daemon.url}/v1/embeddings", json=body, headers=headers, timeout=60)


def test_the_openai_client_gets_the_vectors_retrieval_indexes_with(daemon):
    embedder = daemon.service.embeddings.embedder
    response = client(daemon).embeddings.create(model=embedding_model(daemon), input=TEXTS)
    got = np.array([item.embedding for item in response.data], dtype=np.float32)
    assert [item.index for item in response.data] == [0, 1]
    assert got.shape == (2, embedder.dim)
    np.testing.assert_allclose(got, embedder.encode(TEXTS), atol=1e-6)
    tokens = sum(len(ids) for ids in embedder.tokenizer(TEXTS)["input_ids"])
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens


def test_float_and_base64_encodings_carry_the_same_vector(daemon):
    model = embedding_model(daemon)
    floats = post(daemon, {"model": model, "input": TEXTS[0]}).json()["data"][0]["embedding"]
    packed = post(daemon, {"model": model, "input": TEXTS[0], "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(packed.json()["data"][0]["embedding"]),
                            dtype="<f4")
    np.testing.assert_array_equal(decoded, np.array(floats, dtype=np.float32))


def test_the_catalog_name_and_the_hub_id_name_the_same_embedder(daemon):
    by_hub = post(daemon, {"model": "sentence-transformers/all-MiniLM-L6-v2", "input": "x"})
    assert by_hub.status_code == 200 and by_hub.json()["model"] == embedding_model(daemon)


REFUSALS = [
    ("token-ids", {"input": [[101, 2023]]}, 400, "input.0", "token ids are not taken"),
    ("empty-text", {"input": ["fine", ""]}, 400, "input.1", "input[1] is empty"),
    ("no-texts", {"input": []}, 400, "input", "non-empty list of texts"),
    ("too-long", {"input": ["word " * 600]}, 400, "input.0", "reads at most 256"),
    ("too-many", {"input": ["x"] * 2049}, 413, "input", "--limit embedding_inputs"),
    ("dimensions", {"input": "x", "dimensions": 64}, 400, "dimensions", "must be 384"),
    ("unknown-model", {"input": "x", "model": "text-embedding-3-small"}, 404, "model",
     "embeds with"),
    ("encoding", {"input": "x", "encoding_format": "int8"}, 400, "encoding_format", "float"),
]


@pytest.mark.parametrize(("body", "status", "param", "fragment"),
                         [case[1:] for case in REFUSALS], ids=[case[0] for case in REFUSALS])
def test_a_request_the_embedder_cannot_take_is_refused_naming_the_field(daemon, body, status,
                                                                        param, fragment):
    refused = post(daemon, {"model": embedding_model(daemon), **body})
    assert refused.status_code == status, refused.text
    error = refused.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    assert post(daemon, {"model": embedding_model(daemon), "input": "x"}).status_code == 200


def test_embeddings_need_a_key_where_keys_are_configured(daemon):
    assert post(daemon, {"model": embedding_model(daemon), "input": "x"}, key=None) \
        .status_code == 401
