"""VI-ReID metrics, evaluation protocols and reports."""
