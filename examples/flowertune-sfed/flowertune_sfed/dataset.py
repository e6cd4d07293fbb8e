"""flowertune-sfed: the clients' data (Alpaca-style instructions; GSM8K records read as such)."""

from pathlib import Path

from datasets import load_dataset
from transformers import AutoTokenizer

# The Alpaca prompt of Flower's app; the loss is on the response only, as its
# DataCollatorForCompletionOnlyLM did (TRL >= 0.20 does that for prompt-completion records).
PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def to_prompt_completion(example):
    """An Alpaca (instruction, output) or GSM8K (question, answer) record as TRL's prompt and completion."""
    instruction = example.get("instruction") or example["question"]
    response = example.get("output") or example["answer"]
    return {
        "prompt": f"{PREAMBLE}\n### Instruction:\n{instruction}\n### Response:",
        "completion": f" {response}",
    }


def get_tokenizer(model_name: str):
    tokenizer = AutoTokenizer.from_pretrained(model_name, use_fast=True, padding_side="right")
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_data(partition_id: int, num_partitions: int, dataset_name: str):
    """This node's IID share: the contiguous shard flwr-datasets' IidPartitioner gives it."""
    if Path(dataset_name).is_file():
        data = load_dataset("json", data_files=dataset_name, split="train")
    else:
        data = load_dataset(dataset_name, split="train")
    shard = data.shard(num_shards=num_partitions, index=partition_id, contiguous=True)
    return shard.map(to_prompt_completion, remove_columns=shard.column_names)


def replace_keys(input_dict, match="-", target="_"):
    """Recursively replace ``match`` with ``target`` in dictionary keys."""
    new_dict = {}
    for key, value in input_dict.items():
        new_key = key.replace(match, target)
        new_dict[new_key] = replace_keys(value, match, target) if isinstance(value, dict) else value
    return new_dict
