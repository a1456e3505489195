"""The competition metric and the out-of-fold prediction cache."""
