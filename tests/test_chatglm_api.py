# chatglm_api.ChatModel: ChatGLM's chat / stream_chat over the engine, with ChatGLM's history forms, on the default
# model in fp32 (greedy replies compared with the engine's own chat()).
from chatglm_api import ChatModel


def test_chat_and_stream_chat_keep_chatglms_history(default_checkpoint):
    model = ChatModel.from_pretrained(default_checkpoint / "model.pth", device="cpu", precision="fp32",
                                      max_batch_size=1, max_seq_length=512)
    engine = model.engine
    try:
        first = "Name a colour."
        response, history = model.chat(None, first, history=[], do_sample=False, max_new_tokens=16)
        assert response and history == [(first, response)]
        assert response == engine.chat([{"role": "user", "content": first}], max_tokens=16, temperature=0)

        second = "And another one?"
        # max_length counts the prompt's tokens too (128: a reply of ~60, where 512 decoded 447 tokens twice, 70 s)
        streamed = list(model.stream_chat(None, second, history, do_sample=False, max_length=128))
        final, history = streamed[-1]
        assert len(streamed) > 1 and all(final.startswith(r) for r, _ in streamed)
        assert history == [(first, response), (second, final)]
        turns = [{"role": "user", "content": first}, {"role": "assistant", "content": response},
                 {"role": "user", "content": second}]
        assert final == engine.chat(turns, max_tokens=128 - len(engine.chat_ids(turns)), temperature=0)

        system = [{"role": "system", "content": "Be brief."}]   # ChatGLM3's history: dicts in, dicts out
        reply, history = model.chat(None, "Hi", history=system, do_sample=False, max_new_tokens=8)
        assert history == system + [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]
    finally:
        engine.close()
