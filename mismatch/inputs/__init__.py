"""The first stage: prompts (a built-in set or a file) as token ids that fit the model's context."""
