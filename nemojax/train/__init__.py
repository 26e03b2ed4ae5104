"""Training: data and tokenizer, optimizer and schedules, losses, and the loop."""
