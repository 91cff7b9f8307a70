"""Prompt formats: how an Alpaca record (instruction, optional input) becomes the prompt text of one family.

Template (Stanford Alpaca), with input:

    Below is an instruction that describes a task, paired with an input that provides further context.
    Write a response that appropriately completes the request.\\n\\n### Instruction:\\n{instruction}\\n\\n
    ### Input:\\n{input}\\n\\n### Response:\\n

and without input the ", paired with ..." clause and the "### Input" section are left out.

Each family renders records into its own chat format (its record's `prompt_format`, family_registry.py;
the data pipeline picks it by `tokenizer.family`):

    llama, bloom  the Alpaca template above, [BOS] in front, the response ends with EOS
    chatglm       "[Round 0]\n问：{instruction}\n答：" (an input goes on its own line after the instruction), then
                  [gMASK] <sop>; the response ends with <eop> (ChatGLM-6B's tokenizer puts the marks there)
    chatglm2      "[Round 1]\n\n问：{instruction}\n\n答：", with [gMASK] sop in *front*; the response ends with </s>
"""

from __future__ import annotations

from dataclasses import dataclass

from .family_registry import family_of_tokenizer

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
RESPONSE_MARKER = "### Response:\n"


@dataclass(frozen=True)
class PromptFormat:
    """One family's chat format: the prompt text with and without an input, and the marker it ends with."""
    with_input: str
    no_input: str
    response_marker: str

    def render(self, instruction: str, input: str = "") -> str:
        if input:
            return self.with_input.format(instruction=instruction, input=input)
        return self.no_input.format(instruction=instruction)


# The formats of the built-in families (families.py puts each on its family's record).
ALPACA = PromptFormat(PROMPT_WITH_INPUT, PROMPT_NO_INPUT, RESPONSE_MARKER)          # LLaMA, Chinese-LLaMA, BLOOM
CHATGLM_6B = PromptFormat("[Round 0]\n问：{instruction}\n{input}\n答：", "[Round 0]\n问：{instruction}\n答：", "答：")
CHATGLM2_6B = PromptFormat("[Round 1]\n\n问：{instruction}\n{input}\n\n答：", "[Round 1]\n\n问：{instruction}\n\n答：",
                           "答：")


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for one record (the response follows it directly); other families: their record's
    prompt_format (prompt_format_of)."""
    return ALPACA.render(instruction, input)


def prompt_format_of(tokenizer) -> PromptFormat:
    """The format a tokenizer's family renders records in (its family record's prompt_format)."""
    return family_of_tokenizer(tokenizer).prompt_format
