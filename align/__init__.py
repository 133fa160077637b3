"""Alignment on top of pretrained models: reward models, DPO, PPO and GRPO (not yet implemented)."""
