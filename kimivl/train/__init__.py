"""Finetuning from outside the model: supervised finetuning (full, LoRA, frozen parts), expert balance, FSDP2."""

from .data import Example, SampleConversations, collate, encode, read_conversations, sample_conversation
from .lora import apply_lora, merge_lora, merged_state_dict
from .sft import SFTConfig, TrainResult, merge_and_save, train

__all__ = ["Example", "SFTConfig", "SampleConversations", "TrainResult", "apply_lora", "collate", "encode",
           "merge_and_save", "merge_lora", "merged_state_dict", "read_conversations", "sample_conversation", "train"]
