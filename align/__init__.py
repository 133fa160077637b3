"""Post-training: SFT, LoRA, reward models and the DPO family, on the pretraining machinery."""
