"""LLaVA-1.5's conversation template, one turn: what LLaVA trains on and is prompted with.

    USER: <image> x F
    {instruction} ASSISTANT: {reply}</s>

(FastChat's `vicuna_v1` template as llava-hf's model cards write a single turn, without the system sentence;
the image token repeated once per image feature, as llava-hf's processor does.) The reply is a question's
answer (visual instruction tuning) or a description of the image (feature alignment: the instruction is a
brief-description request, LLaVA's "describe the image briefly" family). The loss is on the reply's tokens and
the end token only: `prompt_length` tells `losses.lm_labels` where the reply starts.
"""
import torch

USER, ASSISTANT = "USER:", "ASSISTANT:"
TEMPLATE = "USER: <image>\\n{} ASSISTANT:"  # as results report it (the image token once per feature)


def prompt_ids(tokenizer, instruction: str, image_tokens: int, image_id: int) -> list[int]:
    """The ids of a turn up to and including "ASSISTANT:": start token, "USER:", the image token `image_tokens`
    times, the instruction."""
    return [tokenizer.bos_id, *tokenizer.encode(USER), *[image_id] * image_tokens,
            *tokenizer.encode(f"\n{instruction} {ASSISTANT}")]


def reply_ids(tokenizer, reply: str) -> list[int]:
    """A reply's ids and the end token: what the model learns to say."""
    return [*tokenizer.encode(f" {reply}"), tokenizer.eos_id]


def conversation_rows(tokenizer, instructions: list[str], replies: list[str], image_tokens: int, image_id: int,
                      length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `prompt reply </s>` right-padded (tokenizer.pad_id) to the longest, at most `length` ids, and each
    row's prompt length. A reply too long is cut, its end token kept; a prompt that leaves no room fails.
    Returns ((B, T) long, (B,) long)."""
    rows, prompt_lengths = [], []
    for instruction, reply in zip(instructions, replies):
        prompt, answer = prompt_ids(tokenizer, instruction, image_tokens, image_id), reply_ids(tokenizer, reply)
        if len(prompt) >= length:
            raise ValueError(f"a conversation prompt of {len(prompt)} ids (with {image_tokens} image tokens) leaves "
                             f"no room for a reply within data.context_length={length}: raise it")
        answer = answer[: length - len(prompt) - 1] + answer[-1:] if len(prompt) + len(answer) > length else answer
        rows.append(prompt + answer)
        prompt_lengths.append(len(prompt))
    width = max(map(len, rows))
    tokens = torch.tensor([row + [tokenizer.pad_id] * (width - len(row)) for row in rows], dtype=torch.long)
    return tokens, torch.tensor(prompt_lengths, dtype=torch.long)
