"""One module per numbered step and stage command (01..06, pretrain, pseudo-label, score-oof).
Nothing below imports it.
"""
