"""`python -m bench` (`make bench`): the gateway against its floor and its peers, in one run.

Every number is measured in the same run on the same machine, against the same
SMTP sink process, so the ratios mean something even where the absolute numbers
depend on the machine. See docs/benchmarks.md for what each row measures.
"""
