"""The offline Kaggle bundle: wheels, weights, notebook, rehearsal."""
