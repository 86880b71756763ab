"""Finetuning from outside the model: supervised finetuning (full, LoRA, frozen parts), expert balance, FSDP2; and
reinforcement learning (GRPO, DAPO, PPO: `train_rl`, or `kimivl.train.rl.train`)."""

from .data import Example, SampleConversations, collate, encode, read_conversations, sample_conversation
from .lora import apply_lora, merge_lora, merged_state_dict
from .rewards import REWARDS, get_reward
from .rl import DAPOConfig, GRPOConfig, PPOConfig, RLResult
from .rl import train as train_rl
from .sft import SFTConfig, TrainResult, merge_and_save, train

__all__ = ["DAPOConfig", "Example", "GRPOConfig", "PPOConfig", "REWARDS", "RLResult", "SFTConfig",
           "SampleConversations", "TrainResult", "apply_lora", "collate", "encode", "get_reward", "merge_and_save",
           "merge_lora", "merged_state_dict", "read_conversations", "sample_conversation", "train", "train_rl"]
