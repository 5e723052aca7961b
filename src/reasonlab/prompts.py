"""Rendering a dataset row's question as the prompt a model sees."""

from __future__ import annotations

from reasonlab import ReasonlabError


def render_prompt(tokenizer, question: str, system: str | None = None, mode: str = "chat") -> str:
    """The prompt text for `question`.

    mode "chat": the tokenizer's chat template over an optional system message and the user's
    question, ending with the assistant's generation prompt; mode "plain": the question and a newline.
    """
    if mode == "plain":
        return question + "\n"
    if mode != "chat":
        raise ReasonlabError(f"prompt mode must be 'chat' or 'plain', not {mode!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ReasonlabError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
            "set the prompt mode to 'plain' or give the model a tokenizer with one"
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
