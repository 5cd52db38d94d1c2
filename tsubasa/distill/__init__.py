"""READING wing: self-learning QA, teacher top-d targets, top-d KL loss, LoRA training, adapter registry."""
