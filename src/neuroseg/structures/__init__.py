"""In-memory formats: Kaggle RLE, label images, box-mask geometry, prediction containers, the
submission CSV.
"""
