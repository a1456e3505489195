"""External COCO instance sets (LIVECell): streamed into an SQLite index, read as a torch dataset."""
