"""DiffusionGemma denoising: schedule, policies, fused statistics and a reference driver (pure torch)."""
