"""Fine-tuning a channel's LoRA adapter in a child process (`python -m core.training`).

The trainer runs apart from the bot so a crash, an out-of-memory kill or a cancel never takes the
served model down with it. `protocol` is all the parent needs (no torch); `recipe` trains.
"""
