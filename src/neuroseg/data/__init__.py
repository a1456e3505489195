"""train.csv records, cleaning, folds, semantic targets, COCO export, torch datasets, synthetic
data, pseudo-labels; data/coco/ for external COCO sets (LIVECell).
"""
