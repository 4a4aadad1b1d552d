"""jobctl: the command-line client of jobsvc (installed under the import name jobctl)."""
