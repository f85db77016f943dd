# ChatGLM's own Python API over the engine, so that ChatGLM demos (and fastllm / faster-chatglm code) run unchanged,
# for any family's checkpoint:
#
#   model = ChatModel.from_pretrained("checkpoints/THUDM/chatglm3-6b/model.pth")
#   response, history = model.chat(tokenizer, "Hello", history=[])
#   for response, history in model.stream_chat(tokenizer, "And then?", history=history): ...
#
# history is ChatGLM-6B/2's list of (query, response) pairs, or ChatGLM3's list of {"role", "content"} dicts; the
# returned history has the new turn appended in the same form (pairs where the history given was empty, except
# for a chatglm3 checkpoint). The tokenizer argument is taken for compatibility: the checkpoint's own tokenizer
# renders the turns in its chat format.
from typing import Iterator, Optional

from engine import Engine


class ChatModel:
    def __init__(self, engine: Engine):
        self.engine = engine

    @classmethod
    def from_pretrained(cls, checkpoint_path, **engine_kw) -> "ChatModel":
        """engine_kw: Engine's (device, precision, max_seq_length, compile, ...)."""
        return cls(Engine(checkpoint_path, **engine_kw))

    def chat(self, tokenizer, query: str, history: Optional[list] = None, role: str = "user", **gen) -> tuple:
        """(response, history with this turn appended). gen: ChatGLM's max_length (prompt + reply tokens),
        max_new_tokens, do_sample, temperature, top_p, top_k."""
        response = ""
        for response, history in self.stream_chat(tokenizer, query, history, role, **gen):
            pass
        return response, history

    def stream_chat(self, tokenizer, query: str, history: Optional[list] = None, role: str = "user",
                    max_length: Optional[int] = None, max_new_tokens: Optional[int] = None, do_sample: bool = True,
                    temperature: float = 0.8, top_p: float = 0.8, top_k: Optional[int] = None,
                    **ignored) -> Iterator[tuple]:
        """(response so far, history with this turn appended) after each piece of text, as ChatGLM's does."""
        history = list(history or [])
        dicts = bool(history) and isinstance(history[0], dict) or \
            (not history and self.engine.tokenizer.chat_format == "chatglm3")
        messages = history if dicts else [m for q, a in history for m in (
            {"role": "user", "content": q}, {"role": "assistant", "content": a})]
        ids = self.engine.chat_ids(messages + [{"role": role, "content": query}])
        if max_new_tokens is None and max_length is not None:
            max_new_tokens = max_length - len(ids)
        request = self.engine.submit(ids, max_new_tokens, temperature=temperature if do_sample else 0.0,
                                     top_p=top_p if do_sample else None, top_k=top_k if do_sample else None)
        response = ""
        for piece in self.engine.stream(request):
            response += piece
            yield response, self.turn(history, dicts, role, query, response)
        if not response:
            yield response, self.turn(history, dicts, role, query, response)

    @staticmethod
    def turn(history: list, dicts: bool, role: str, query: str, response: str) -> list:
        if dicts:
            return history + [{"role": role, "content": query}, {"role": "assistant", "content": response}]
        return history + [(query, response)]
