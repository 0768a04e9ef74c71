"""The first stage: prompts (the built-in arithmetic set or a file) as token ids that fit the
model's context."""
