"""Chat messages -> prompt token ids, where a message's text is only ever text.

A chat template writes control tokens as text (`<|im_start|>system`, `<|im_end|>`), and a
tokenizer turns that text back into the control tokens. Rendered and tokenized whole, a
message that contains the same spelling would become control tokens too: a user could
close their turn and open a system one by typing it. So the template is rendered with a
placeholder for each message's text, which tells exactly where each message's text sits
in the prompt. The prompt is tokenized whole, as every server does; where a control token
came out of a message's text, the template's pieces are tokenized with their control
tokens and each message's text with `split_special_tokens` (its `<|im_end|>` is then the
seven characters it looks like).
"""

import secrets

from transformers import PreTrainedTokenizerBase

from lorag.retrieval.rag import Augmented, augment


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """The prompt ids of `messages` [{"role", "content", ...}] with the tokenizer's chat
    template and the generation prompt; control tokens come from the template only."""
    pieces = _template_pieces(tokenizer, messages)  # len(messages) + 1 pieces around them
    text, spans = pieces[0], []
    for message, piece in zip(messages, pieces[1:], strict=True):
        spans.append((len(text), len(text) + len(message["content"])))
        text += message["content"] + piece
    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    control = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    if not any(token in control and start < end_ and end > start_
               for token, (start, end) in zip(whole["input_ids"], whole["offset_mapping"],
                                              strict=True)
               for start_, end_ in spans):
        return whole["input_ids"]
    ids = _encode(tokenizer, pieces[0], control=True)
    for message, piece in zip(messages, pieces[1:], strict=True):
        ids += _encode(tokenizer, message["content"], control=False)
        ids += _encode(tokenizer, piece, control=True)
    return ids


def render_grounded(tokenizer: PreTrainedTokenizerBase, messages: list[dict], hits: list,
                    budget: int) -> Augmented:
    """A `rag` chat's prompt: `hits` (best first) laid out into `messages` by
    retrieval/rag.py, rendered with `render_chat`, the lowest-ranked passages dropped until
    it is at most `budget` tokens. The daemon's rule, which RAFT's training chats follow."""
    return augment(messages, hits, lambda chat: render_chat(tokenizer, chat),
                   lambda text: len(tokenizer.encode(text, add_special_tokens=False)), budget)


def _template_pieces(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[str]:
    """The rendered template's text around each message's text, in order."""
    nonce = secrets.token_hex(8)  # unguessable: no message can spell a placeholder
    marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    stand_ins = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
    text = tokenizer.apply_chat_template(stand_ins, tokenize=False, add_generation_prompt=True)
    pieces, at = [], 0
    for mark in marks:
        start = text.find(mark, at)
        if start < 0 or text.count(mark) != 1:
            raise RuntimeError("this model's chat template does not write each message's "
                               "text once, verbatim; lorag cannot keep message text apart "
                               "from control tokens with it")
        pieces.append(text[at:start])
        at = start + len(mark)
    return [*pieces, text[at:]]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, control: bool) -> list[int]:
    if not text:
        return []
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=not control)
