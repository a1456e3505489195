"""Box fusion, consensus fusion, its parameters, the cell-type vote, tuning and the report."""
