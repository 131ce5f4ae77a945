"""Layer 4, genai: the LLM client, stories and their guardrails, pictures and speech. Imports ``core`` and
``vision`` (the classifier's labels)."""
