"""Data with known truth and its scoring: the kinematic simulator, abTEM multislice sets,
the Cramer-Rao floor, and errors of a strain result against the truth."""
